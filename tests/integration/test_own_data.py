"""README "Ingest your own .h5ad files", as written: two fresh .h5ad files without `cell_type` or `split` are
ingested and both stages train with the default data settings; a bad setting stops a launcher with one line.

The commands are read from the README section itself; only the paths and the presets (the tiny debug ones)
are substituted, plus a few speed / isolation overrides (MLflow store, steps, generation size).
"""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
import sys
from pathlib import Path

import anndata
import numpy as np
import pytest
import scipy.sparse as sp
import tiledbsoma

from tests.integration._launch import (
    EVALUATE,
    LDM,
    LDM_DEBUG,
    REPO,
    TORCHRUN,
    VAE,
    VAE_DEBUG,
    free_port,
    launch_env,
    run,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DEMO_DATA = REPO / "data_pipelines" / "demo_data"
SECTION = "## Ingest your own .h5ad files"
SPEED = ["train.max_steps=6", "train.enable_progress_bar=false", "checkpoint.interval_steps=6"]


def readme_commands() -> list[list[str]]:
    """The shell commands of the section's first code block (continuation lines joined)."""
    text = (REPO / "README.md").read_text()
    section = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    block = section.split("```bash", 1)[1].split("```", 1)[0].replace("\\\n", " ")
    return [shlex.split(line) for line in block.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def write_small_h5ad(path: Path, source: str, n_cells: int, n_genes: int, seed: int) -> None:
    """A few hundred real cells of a demo dataset, its most-expressed genes; obs without cell_type / split /
    dataset_id (so the file stem names the dataset), as a user's own file might be."""
    adata = anndata.read_h5ad(DEMO_DATA / source)
    rng = np.random.default_rng(seed)
    cells = np.sort(rng.choice(adata.n_obs, size=n_cells, replace=False))
    adata = adata[cells]
    genes = np.argsort(-np.asarray((adata.X > 0).sum(0)).ravel(), kind="stable")[:n_genes]
    adata = adata[:, np.sort(genes)].copy()
    obs = adata.obs[[c for c in adata.obs.columns if c in ("cluster", "phase")]]
    out = anndata.AnnData(X=sp.csr_matrix(adata.X), obs=obs.copy(), var=adata.var[[]].copy())
    out.write_h5ad(path)


@pytest.fixture(scope="module")
def own_data(tmp_path_factory, demo_atlas) -> dict:
    """The README's commands on two fresh files (debug presets, tmp paths); every stage must exit 0."""
    root = tmp_path_factory.mktemp("own_data")
    first, second = root / "first.h5ad", root / "second.h5ad"
    write_small_h5ad(first, "brain10k.h5ad", n_cells=300, n_genes=150, seed=0)
    write_small_h5ad(second, "pbmc700.h5ad", n_cells=200, n_genes=150, seed=1)
    paths = {
        "/data/my_atlas": str(root / "my_atlas"),
        "runs/my_vae": str(root / "runs" / "my_vae"),
        "runs/my_ldm": str(root / "runs" / "my_ldm"),
        "configs/vae/base.yaml": VAE_DEBUG,
        "configs/ldm/base.yaml": LDM_DEBUG,
        "launchers/train_vae.py": VAE,
        "launchers/train_ldm.py": LDM,
        "launchers/evaluate.py": EVALUATE,
        "first.h5ad": str(first),
        "second.h5ad": str(second),
    }
    commands = readme_commands()
    assert [c[:3] for c in commands] == [
        ["python", "-m", "data_pipelines.ingest"],
        ["python", "launchers/train_vae.py", "--config"],
        ["python", "launchers/train_ldm.py", "--config"],
        ["python", "launchers/evaluate.py", "model.checkpoint=runs/my_ldm"],
    ], commands
    used: set[str] = set()

    def substitute(token: str) -> str:
        for old, new in paths.items():
            if old in token:
                used.add(old)
                token = token.replace(old, new)
        return token

    extra = [
        [],  # ingestion exactly as written
        [f"tracking.uri=sqlite:///{root}/mlruns.db", *SPEED],
        [f"tracking.uri=sqlite:///{root}/mlruns.db", *SPEED, "eval.num_cells=48", "flow.num_steps=2"],
        [f"tracking.uri=sqlite:///{root}/mlruns.db", "tracking.enable_system_metrics=false", "umap=false",
         "protocol.max_cells=100", "protocol.seeds=[0]", "protocol.min_cells_per_condition=10",
         "sampling.num_steps=2"],
    ]
    env, outputs = launch_env(demo_atlas), []
    for cmd, more in zip(commands, extra):
        full = [sys.executable, *(substitute(t) for t in cmd[1:]), *more]
        outputs.append(run(full, env, cwd=root, timeout=240))
    assert used == set(paths), f"README paths not substituted: {set(paths) - used}"
    return {"root": root, "atlas": paths["/data/my_atlas"], "outputs": outputs, "vae": paths["runs/my_vae"]}


def test_readme_own_data_commands_run_as_written(own_data):
    ingest_out = own_data["outputs"][0].stdout
    assert "first: 300 cells" in ingest_out and "second: 200 cells" in ingest_out, ingest_out
    with tiledbsoma.Experiment.open(own_data["atlas"]) as exp:
        assert "cell_type" not in exp.obs.schema.names
        obs = exp.obs.read(column_names=["dataset_id", "split"]).concat().to_pandas()
    assert set(obs["split"]) == {"train", "val", "test"}
    for _, group in obs.groupby("dataset_id"):
        frac = group["split"].value_counts(normalize=True)
        assert abs(frac["train"] - 0.8) < 0.06 and abs(frac["val"] - 0.1) < 0.06, frac
    root = Path(own_data["root"])
    for stage in ("my_vae", "my_ldm"):
        ckpts = sorted((root / "runs" / stage / "checkpoints").glob("step-*"))
        assert ckpts and ckpts[-1].name == "step-00000006", ckpts
    result = json.loads((root / "runs" / "my_ldm" / "eval.json").read_text())  # the split gives a test set
    assert {"dataset_id=first", "dataset_id=second"} == set(result["generation"]["scldm"]["per_condition"])
    config = (root / "runs" / "my_vae" / "config.yaml").read_text()
    assert "label_columns: null" in config  # the auto default, resolved in the atlas (dataset_id only)


def _error_lines(proc) -> list[str]:
    return [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("error:")]


@pytest.mark.parametrize(
    "launcher,preset,override,key",
    [
        (VAE, VAE_DEBUG, "train.max_steps=-1", "train.max_steps"),
        (VAE, VAE_DEBUG, "train.max_stepz=3", "train.max_stepz"),
        (VAE, VAE_DEBUG, "data.label_columns=[nope]", "'nope'"),
        (VAE, VAE_DEBUG, "data.value_filter=tissue == 'x'", "data.value_filter"),
        (LDM, LDM_DEBUG, "stage1.checkpoint=/nonexistent/run", "stage1.checkpoint"),
    ],
)
def test_config_error_is_one_line_and_exit_2(own_data, tmp_path, demo_atlas, launcher, preset, override, key):
    cmd = [
        sys.executable,
        launcher,
        "--config",
        preset,
        f"data.atlas_uri={own_data['atlas']}",
        f"train.run_dir={tmp_path}/run",
        f"tracking.uri=sqlite:///{tmp_path}/mlruns.db",
        override,
    ]
    if launcher == LDM and not override.startswith("stage1."):
        cmd.append(f"stage1.checkpoint={own_data['vae']}")
    proc = run(cmd, launch_env(demo_atlas), cwd=tmp_path, timeout=120, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2 and "Traceback" not in out, out[-3000:]
    (line,) = _error_lines(proc)
    assert key in line, line
    if "label_columns" in override:
        assert "obs columns: soma_joinid, obs_id, dataset_id, cluster, split" in line, line


def test_config_error_under_torchrun_exits_nonzero_on_both_ranks(own_data, tmp_path, demo_atlas):
    """A ConfigError raised inside `run_vae` (the atlas check, after the process group is up) on 2 ranks."""
    cmd = [
        *TORCHRUN,
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        VAE,
        "--config",
        VAE_DEBUG,
        f"data.atlas_uri={own_data['atlas']}",
        "data.label_columns=[nope]",
        "data.seed=0",
        f"train.run_dir={tmp_path}/run",
        f"tracking.uri=sqlite:///{tmp_path}/mlruns.db",
    ]
    proc = run(cmd, launch_env(demo_atlas), cwd=tmp_path, timeout=180, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    (line,) = _error_lines(proc)  # rank 0 only
    assert "data.label_columns" in line and "'nope'" in line, line
    # torchrun's failure report: both ranks ended non-zero (2, or SIGTERM from torchrun once the first exited)
    ranks = re.findall(r"rank\s+: (\d+) \(local_rank: \d+\)\s+exitcode\s+: (-?\d+)", out)
    assert {r for r, _ in ranks} == {"0", "1"} and all(int(c) != 0 for _, c in ranks), out[-3000:]


def _cli_module():
    spec = importlib.util.spec_from_file_location("launchers_cli", REPO / "launchers" / "_cli.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_main_prints_one_line_on_rank_0_and_exits_2(monkeypatch, capsys):
    from scldm_scale.config import ConfigError

    cli = _cli_module()
    seen = []

    def bad(argv):
        seen.append(argv)
        raise ConfigError("data.x: bad\n  and more")

    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(SystemExit) as info:
        cli.cli_main(bad, ["a=1"])
    assert info.value.code == 2 and seen == [["a=1"]]
    assert capsys.readouterr().err == "error: data.x: bad; and more\n"
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(cli, "PEER_EXIT_DELAY_SECONDS", 0.0)
    with pytest.raises(SystemExit) as info:
        cli.cli_main(bad, ["a=1"])
    assert info.value.code == 2 and capsys.readouterr().err == ""
    monkeypatch.setattr(sys, "argv", ["train_vae.py", "b=2"])
    cli.cli_main(seen.append)  # no error: returns; argv defaults to sys.argv[1:]
    assert seen[-1] == ["b=2"]
    with pytest.raises(RuntimeError):  # anything else is not a configuration error: it propagates
        cli.cli_main(lambda argv: (_ for _ in ()).throw(RuntimeError("boom")), [])
