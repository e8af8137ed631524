"""generate.py, evaluate.py and compare.py end to end on a debug run, as users start them (plain python and
torchrun), with a real MLflow SQLite store: the same h5ad on 1 and 2 ranks, library sizes from the manifest,
cells appended to a SOMA atlas, the evaluation JSON's shape and its MLflow run, a comparison table."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import anndata
import numpy as np
import pytest
import tiledbsoma

from scldm_scale.data import LibrarySizeStats
from scldm_scale.data.vocab import LabelVocab
from tests.integration._launch import (
    COMPARE,
    EVALUATE,
    GENERATE,
    LDM,
    LDM_DEBUG,
    SMALL_DATA,
    TORCHRUN,
    VAE,
    VAE_DEBUG,
    launch_env,
    run,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

QUIET = ["tracking.enable_system_metrics=false"]


@pytest.fixture(scope="module")
def trained(demo_atlas, tmp_path_factory):
    """A debug stage 1 and stage 2 on the two small demo datasets (plain python, SQLite MLflow store)."""
    root = tmp_path_factory.mktemp("trained")
    uri = f"sqlite:///{root}/mlruns.db"
    env = launch_env(demo_atlas)
    common = [*SMALL_DATA, f"tracking.uri={uri}", "train.max_steps=6", *QUIET]
    run([sys.executable, VAE, "--config", VAE_DEBUG, *common, f"train.run_dir={root}/s1"], env)
    run([sys.executable, LDM, "--config", LDM_DEBUG, *common, f"train.run_dir={root}/s2",
         f"stage1.checkpoint={root}/s1", "eval.num_cells=48", "flow.num_steps=2"], env)
    return {"root": root, "uri": uri, "s2": root / "s2", "env": env}


def _manifest(run_dir):
    ckpt = sorted((run_dir / "checkpoints").glob("step-*"))[-1]
    return json.loads((ckpt / "meta.json").read_text())["manifest"]


def test_generate_writes_the_same_h5ad_on_one_and_two_ranks(trained):
    root, env = trained["root"], trained["env"]
    args = [f"model.checkpoint={trained['s2']}", "like_split=test", "num_cells=30", "model.batch_size=8",
            "sampling.num_steps=2", "seed=3", f"tracking.uri={trained['uri']}"]
    run([sys.executable, GENERATE, *args, f"out={root}/one.h5ad"], env)
    run([*TORCHRUN, "--standalone", "--nproc_per_node", "2", GENERATE, *args, f"out={root}/two.h5ad"], env)
    one, two = anndata.read_h5ad(root / "one.h5ad"), anndata.read_h5ad(root / "two.h5ad")
    assert one.shape == two.shape and one.shape[0] == 30
    assert (one.X != two.X).nnz == 0 and one.X.dtype == np.int32 and one.X.sum() > 0
    np.testing.assert_array_equal(one.obsm["X_latent"], two.obsm["X_latent"])
    assert one.obs.equals(two.obs) and list(one.var_names) == list(two.var_names)
    settings = json.loads(one.uns["scldm"]["settings"])
    assert settings["seed"] == 3 and settings["labels"] == "like split test"
    assert json.loads(two.uns["scldm"]["settings"])["world_size"] == 2
    assert json.loads(one.uns["scldm"]["model"])["checkpoint"].startswith(str(trained["s2"]))
    # the label mix of the test split: pbmc700 70 cells, wu2020 18 -> 24 and 6 of 30
    assert one.obs["dataset_id"].value_counts().to_dict() == {"pbmc700": 24, "wu2020": 6}


def test_generate_from_conditions_draws_library_sizes_from_the_manifest_and_appends_to_soma(trained):
    root, env = trained["root"], trained["env"]
    atlas = root / "with_generated"
    run([sys.executable, GENERATE, f"model.checkpoint={trained['s2']}", "--condition", "dataset_id=pbmc700:150",
         "--condition", "dataset_id=wu2020:50", "sampling.num_steps=2", f"out={root}/cond.h5ad",
         f"soma_uri={atlas}", "dataset_id=my-generated-cells"], env)
    adata = anndata.read_h5ad(root / "cond.h5ad")
    manifest = _manifest(trained["s2"])
    stats = LibrarySizeStats.from_manifest(manifest["library_size_stats"])
    vocab = LabelVocab.from_json(manifest["label_vocabs"]["dataset_id"])
    j = stats.label_columns.index("dataset_id")
    for name, n in (("pbmc700", 150), ("wu2020", 50)):
        logs = np.log(adata.obs["library_size"][adata.obs["dataset_id"] == name].to_numpy(np.float64))
        row = [0] * len(stats.label_columns)
        row[j] = vocab.categories.index(name) + 1
        fit = stats.fit_for(tuple(row))
        assert len(logs) == n and abs(logs.mean() - fit.mean_log) < 4 * fit.std_log / np.sqrt(n) + 1e-3
    assert adata.obs["cell_type"].isna().all()  # left free
    with tiledbsoma.Experiment.open(str(atlas)) as exp:
        obs = exp.obs.read().concat().to_pandas()
    assert len(obs) == 200 and set(obs["dataset_id"]) == {"my-generated-cells"}
    assert set(obs["split"]) == {"generated"}  # never read by the default training filters


def test_evaluate_json_mlflow_and_compare(trained, tmp_path):
    env, uri = trained["env"], trained["uri"]
    out = tmp_path / "eval.json"
    proc = run([sys.executable, EVALUATE, f"model.checkpoint={trained['s2']}", "--json", str(out),
                "protocol.value_filter=split == 'test' and dataset_id != 'brain10k'",
                "protocol.condition_columns=[dataset_id]", "protocol.min_cells_per_condition=10",
                "protocol.max_cells=200", "protocol.seeds=[0,1]", "protocol.num_pcs=10",
                "sampling.num_steps=2", f"out_dir={tmp_path}/report", f"tracking.uri={uri}", *QUIET], env)
    result = json.loads(out.read_text())
    gen = result["generation"]
    for source in ("scldm", "gaussian_baseline", "stage1_ceiling", "real_floor"):
        for m in ("w2", "mmd2_unbiased", "fd", "energy", "knn_condition_acc"):
            assert set(gen[source][m]) == {"mean", "std"}, (source, m)
        assert gen[source]["per_condition"]["dataset_id=wu2020"]["n_real"] == 18
        assert "w2" in gen[source]["per_condition"]["dataset_id=pbmc700"]
    assert set(result["reconstruction"]) >= {"nll", "pearson_gene", "pearson_cell", "mse"}
    assert set(result["classification"]["dataset_id"]) >= {"logreg_acc", "knn_acc", "macro_f1"}
    assert result["protocol"]["seeds"] == [0, 1] and result["protocol"]["eval_cells"] == 88
    assert (tmp_path / "report" / "umap_real_vs_generated.png").stat().st_size > 10_000
    assert (tmp_path / "report" / "per_condition_metrics.png").stat().st_size > 10_000
    assert "report:" in proc.stdout

    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("scldm_scale").experiment_id])
    by_stage = {r.data.tags.get("scldm.stage"): r for r in runs}
    ev, s2 = by_stage["eval"], by_stage["ldm"]
    assert ev.data.tags["scldm.evaluated_run"] == s2.info.run_id
    assert ev.info.run_name.startswith("eval-s2-") and s2.info.run_name.startswith("ldm-s2-")
    assert ev.data.metrics["eval/scldm/fd"] == pytest.approx(gen["scldm"]["fd"]["mean"])
    assert {"evaluation/evaluation.json", "evaluation/umap_real_vs_generated.png"} <= {
        a.path for a in client.list_artifacts(ev.info.run_id, "evaluation")
    }

    table = tmp_path / "runs.md"
    proc = run([sys.executable, COMPARE, "--uri", uri, "--out", str(table)], env)
    text = table.read_text()
    for r in (ev, s2):
        assert r.info.run_name in text
    assert "eval/scldm/fd" in text


def test_a_bad_model_location_is_one_error_line(trained, tmp_path):
    for launcher, extra in ((GENERATE, []), (EVALUATE, ["umap=false"])):
        proc = subprocess.run([sys.executable, launcher, f"model.checkpoint={tmp_path}/nothing", *extra],
                              env=trained["env"], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, proc.stderr[-2000:]
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "model.checkpoint" in errors[0] and "Traceback" not in proc.stderr


def test_external_models_are_scored_on_the_same_cells_labels_and_library_sizes(trained, tmp_path):
    """`evaluate(external=...)` (how quality_bench.py scores scVI): a source that copies training cells of the
    asked condition scores near the real floor and beats the 6-step scLDM; it is handed scLDM's library sizes;
    a wrong shape is an error naming the source."""
    from scldm_scale.config.eval import ProtocolConfig, SamplingConfig
    from scldm_scale.eval.evaluate import dense_counts, evaluate, read_cells
    from scldm_scale.eval.loading import load_stage2

    model = load_stage2(trained["s2"])
    train = read_cells(model, model.atlas_uri, model.cfg.data.value_filter, max_cells=2000, seed=5, batch_size=256)
    counts = dense_counts(model, train)
    seen = {}

    def copy_train(labels_NK, library_size, seed):
        rng = np.random.default_rng(seed)
        seen.setdefault("lib", []).append(library_size)
        rows = [rng.choice(np.flatnonzero((train.labels == row).all(1))) for row in labels_NK]
        return counts[rows]

    protocol = ProtocolConfig(value_filter="split == 'test' and dataset_id != 'brain10k'", condition_columns=["dataset_id"],
                              min_cells_per_condition=10, max_cells=200, seeds=[0, 1], num_pcs=10)
    result, plot_data = evaluate(model, protocol, SamplingConfig(num_steps=2), external={"copy_train": copy_train},
                                 progress=False)
    gen = result["generation"]
    assert gen["copy_train"]["fd"]["mean"] < 2 * gen["real_floor"]["fd"]["mean"]
    assert gen["copy_train"]["fd"]["mean"] < gen["scldm"]["fd"]["mean"]
    assert "copy_train" in result["summary"] and "copy_train" in plot_data
    assert len(seen["lib"]) == 2 and not np.allclose(seen["lib"][0], seen["lib"][1])  # redrawn per seed

    def wrong(labels_NK, library_size, seed):
        return np.zeros((len(labels_NK), 3))

    with pytest.raises(ValueError, match="'wrong' returned counts of shape"):
        evaluate(model, protocol, SamplingConfig(num_steps=2), external={"wrong": wrong}, progress=False)


def test_a_stage1_run_is_evaluated_without_generation(trained, tmp_path):
    """evaluate.py on a stage-1 run_dir: the autoencoder's ceiling, reconstruction, baseline and floor (what
    benchmarks/stage1_curve.py scores); no scLDM samples; compare_weights is refused in one line. `--json` may
    name the report's own evaluation.json."""
    env = trained["env"]
    out = tmp_path / "report" / "evaluation.json"
    run([sys.executable, EVALUATE, f"model.checkpoint={trained['root']}/s1", "--json", str(out), "umap=false",
         "protocol.value_filter=split == 'test' and dataset_id != 'brain10k'", "protocol.condition_columns=[dataset_id]",
         "protocol.min_cells_per_condition=10", "protocol.max_cells=200", "protocol.seeds=[0]", "protocol.num_pcs=10",
         f"out_dir={tmp_path}/report", "tracking.backend=none", *QUIET], env)
    result = json.loads(out.read_text())
    assert set(result["generation"]) == {"gaussian_baseline", "stage1_ceiling", "real_floor"}
    assert result["model"]["stage"] == "vae" and result["protocol"]["sampling"] == {}
    assert result["summary"]["stage1_ceiling"]["fd_over_floor"] > 0 and result["reconstruction"]["nll"] > 0
    proc = subprocess.run([sys.executable, EVALUATE, f"model.checkpoint={trained['root']}/s1", "compare_weights=true",
                           "tracking.backend=none"], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "compare_weights=true needs a stage-2 model" in proc.stderr


def test_the_scvi_peer_trains_for_its_wall_time_and_samples_each_condition(trained):
    """benchmarks/scvi_peer.py (scvi-tools, the `bench` extra): trained on the model's training cells and genes for
    the given seconds; prior samples per condition at the given library sizes; an unseen label is an error."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    from scvi_peer import ScviPeer

    from scldm_scale.eval.loading import load_stage2

    model = load_stage2(trained["s2"])
    peer = ScviPeer(model, seconds=4)
    info = peer.describe()
    assert info["epochs"] >= 1 and info["genes"] == model.gene_vocab.num_genes
    assert 3.5 < info["train_seconds"] < 30 and info["categorical_covariates"] == model.label_columns
    labels = np.repeat(np.array([[1] * len(model.label_columns), [2] * len(model.label_columns)]), 100, axis=0)
    lib = np.full(len(labels), 2000.0)
    x = peer(labels, lib, seed=0)
    assert x.shape == (200, model.gene_vocab.num_genes) and (x >= 0).all() and np.array_equal(x, np.round(x))
    assert abs(x.sum(1).mean() / 2000 - 1) < 0.2  # NB means sum to the library size
    np.testing.assert_array_equal(x, peer(labels, lib, seed=0))
    with pytest.raises(ValueError, match="were not in its training cells"):
        peer(np.full((2, len(model.label_columns)), 999), lib[:2], seed=0)
