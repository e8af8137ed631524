"""The evaluation protocol on a real SOMA atlas (synthetic: brain10k cluster profiles): it sees conditioning,
it is deterministic under a seed, and the whole evaluation returns the documented JSON shape."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from scldm_scale.config import LDMExperimentConfig
from scldm_scale.config.data import SomaDataConfig
from scldm_scale.config.eval import ProtocolConfig, SamplingConfig
from scldm_scale.config.model import DiTConfig, VAEConfig
from scldm_scale.data import build_loader, library_size_stats
from scldm_scale.eval import protocol as P
from scldm_scale.eval.evaluate import dense_counts, evaluate, read_cells, real_cellset
from scldm_scale.eval.loading import stage2_from_memory
from scldm_scale.models import build_dit, build_vae

METRICS = ("w2", "mmd2_unbiased", "fd", "energy", "knn_condition_acc")


def _model(atlas: str, labels: list[str], **data_kw):
    """An untrained tiny scLDM over `atlas`, with the manifest training would write."""
    data = SomaDataConfig(atlas_uri=atlas, label_columns=labels, seed=0, num_workers=0, **data_kw)
    cfg = LDMExperimentConfig(data=data, model=DiTConfig(dim=16, num_layers=1, num_heads=2))
    loader = build_loader(data, rank=0, world_size=1)
    torch.manual_seed(0)
    vae = build_vae(VAEConfig(dim=16, latent_dim=4, num_latent_tokens=4, num_layers=1, num_heads=2,
                              num_cross_heads=2), loader.gene_vocab.num_genes).eval()
    dit = build_dit(cfg.model, vae.latent_shape, [v.num_classes - 1 for v in loader.label_vocabs.values()])
    manifest = {
        "gene_vocab": loader.gene_vocab.to_json(),
        "label_vocabs": {c: v.to_json() for c, v in loader.label_vocabs.items()},
        "library_size_stats": library_size_stats(data, label_vocabs=loader.label_vocabs),
        "atlas_uri": atlas,
    }
    return stage2_from_memory(dit, vae, cfg, manifest, "raw")


@pytest.fixture(scope="module")
def model(synthetic_atlas):
    return _model(synthetic_atlas, ["cell_type"])


@pytest.fixture(scope="module")
def brain(demo_atlas):
    """brain10k of the demo atlas (real counts), conditioned on its 10 Leiden clusters."""
    return _model(demo_atlas, ["cluster"], value_filter="split == 'train' and dataset_id == 'brain10k'",
                  min_gene_cells=20)


def _sets(model):
    """Real test cells and training cells of brain10k in the protocol's space (conditions = cluster)."""
    test = read_cells(model, model.atlas_uri, "split == 'test' and dataset_id == 'brain10k'", max_cells=1000,
                      seed=0, batch_size=256)
    train = read_cells(model, model.atlas_uri, model.cfg.data.value_filter, max_cells=3000, seed=1, batch_size=512)
    hvg = P.choose_hvgs(dense_counts(model, train), 2000)
    cats = {c: v.categories for c, v in model.label_vocabs.items()}
    cond = [P.condition_names(c.labels, model.label_columns, cats, model.label_columns) for c in (test, train)]
    return real_cellset(model, test, hvg, cond[0]), real_cellset(model, train, hvg, cond[1]), hvg


def test_the_protocol_sees_conditioning_real_cells_with_permuted_conditions_score_worse(brain):
    real, train, hvg = _sets(brain)
    space = P.fit_space(hvg, real, 30)
    knn_cells, pool = P.halves(train)
    scorer = P.Scorer(space, real, knn_cells, min_cells=30, knn_k=15)
    floor = P.floor_sample(pool, real.conditions, np.random.default_rng(0))
    # a perfect generator: real training cells of the right condition, each as many as the test cells
    assert sorted(floor.conditions) == sorted(real.conditions)
    right = scorer.score(floor)
    wrong = scorer.score(floor.relabel(P.derange(floor.conditions, np.random.default_rng(0))))
    assert (P.derange(floor.conditions, np.random.default_rng(0)) != floor.conditions).all()
    on_real = scorer.knn_on_real()
    assert abs(right["knn_condition_acc"] - on_real) < 0.1 and wrong["knn_condition_acc"] < on_real / 3
    # measured: FD 23 -> 166, energy 0.62 -> 2.59, MMD2 0.02 -> 0.21, W2 13.3 -> 17.9 (W2 in 30 PCs at ~100
    # cells per condition is mostly its finite-sample floor, so it moves least)
    for m in ("fd", "energy"):
        assert wrong[m] > 3 * right[m], (m, right[m], wrong[m])
    assert wrong["w2"] > 1.2 * right["w2"]
    assert wrong["mmd2_unbiased"] > right["mmd2_unbiased"] + 0.1
    assert abs(right["mmd2_unbiased"]) < 0.05  # unbiased: two samples of one distribution score ~0
    # pooled scores cannot see the permutation (same cells): the per-condition average can
    assert wrong["pooled"]["w2"] == pytest.approx(right["pooled"]["w2"])


def test_condition_names_and_floor_mix():
    labels = np.array([[1, 2], [2, 0], [1, 1]])
    names = P.condition_names(labels, ["a", "b"], {"a": ["x", "y"], "b": ["p", "q"]}, ["a", "b"])
    assert names.tolist() == ["a=x|b=q", "a=y|b=?", "a=x|b=p"]
    assert P.condition_names(labels, ["a", "b"], {"a": ["x", "y"], "b": ["p", "q"]}, []).tolist() == ["all"] * 3
    train = P.CellSet(np.ones((5, 2)), np.ones(5), np.array(["u", "u", "v", "v", "v"], dtype=object))
    floor = P.floor_sample(train, np.array(["u", "v", "v", "v", "v"], dtype=object), np.random.default_rng(0))
    assert sorted(floor.conditions) == ["u", "v", "v", "v", "v"]  # 4 v from 3 training cells: with replacement


def _small_protocol(**kw):
    return ProtocolConfig(max_cells=300, seeds=[0, 1], num_hvg=100, num_pcs=10, min_cells_per_condition=12, **kw)


def test_evaluate_is_deterministic_and_has_the_documented_shape(model):
    sampling = SamplingConfig(sampler="euler", num_steps=2)
    a, plot_data = evaluate(model, _small_protocol(), sampling, batch_size=128, progress=False)
    b, _ = evaluate(model, _small_protocol(), sampling, batch_size=128, progress=False)
    strip = lambda r: json.dumps({k: v for k, v in r.items() if k != "seconds"}, sort_keys=True, default=float)  # noqa: E731
    assert strip(a) == strip(b)
    gen = a["generation"]
    assert {"scldm", "gaussian_baseline", "stage1_ceiling", "real_floor", "scldm_shuffled_labels"} == set(gen)
    for source in ("scldm", "gaussian_baseline", "stage1_ceiling", "real_floor"):
        for m in METRICS:
            assert set(gen[source][m]) == {"mean", "std"} and np.isfinite(gen[source][m]["mean"]), (source, m)
        per = gen[source]["per_condition"]
        assert per and all("n_real" in v for v in per.values())
    assert set(a["reconstruction"]) >= {"nll", "pearson_gene", "pearson_cell", "mse"}
    assert set(a["classification"]["cell_type"]) >= {"logreg_acc", "knn_acc", "macro_f1"}
    assert a["protocol"]["seeds"] == [0, 1] and a["protocol"]["hvg"]["flavor"] == "seurat_v3"
    assert a["protocol"]["conditions"]["min_cells"] == 12
    # the real floor is far below an untrained model, and the ceiling's cells are real cells' reconstructions
    assert gen["real_floor"]["fd"]["mean"] < gen["scldm"]["fd"]["mean"]
    assert set(plot_data) == {"real", "scldm", "gaussian_baseline"}
    other, _ = evaluate(model, dataclasses.replace(_small_protocol(), seeds=[2, 3]), sampling, batch_size=128,
                        progress=False)
    assert other["generation"]["scldm"]["fd"] != gen["scldm"]["fd"]
