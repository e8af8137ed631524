"""Evaluation metrics against closed forms and hand cases: W2 / FD / energy / MMD^2 of identical, shifted and
same-law samples, per-condition weighting, kNN and probe accuracies, reconstruction correlations, HVG, PCA."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from scipy import linalg, stats

from scldm_scale.eval import (
    distribution_metrics,
    frechet_distance,
    highly_variable_genes,
    log1p_normalize,
    metrics,
    mmd2_rbf,
    per_condition_metrics,
    preprocess,
    wasserstein2,
)
from scldm_scale.eval.metrics import (
    METRICS,
    aggregate_seeds,
    classification_scores,
    condition_scores,
    distribution_scores,
    energy_distance,
    knn_condition_accuracy,
    mean_std,
    mmd2_unbiased,
    reconstruction_scores,
)


def test_w2_of_a_translation_is_the_shift():
    x = np.random.default_rng(0).normal(size=(200, 3))
    assert wasserstein2(x, x) == pytest.approx(0.0, abs=1e-9)
    assert wasserstein2(x, x + np.array([3.0, 4.0, 0.0])) == pytest.approx(5.0, rel=1e-6)


def test_mmd_zero_for_identical_positive_for_shifted():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(150, 2)), rng.normal(size=(150, 2))
    assert mmd2_rbf(x, x) == pytest.approx(0.0, abs=1e-9)
    assert mmd2_rbf(x, y + 2.0) > 10 * abs(mmd2_rbf(x, y))


def test_frechet_distance_of_gaussians():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(20000, 2))
    y = rng.normal(size=(20000, 2)) * 2.0 + 1.0
    # |mu|^2 = 2; trace term per dim: 1 + 4 - 2 * 2 = 1
    assert frechet_distance(x, y) == pytest.approx(4.0, rel=0.05)


def test_hvg_and_preprocess():
    rng = np.random.default_rng(3)
    means = np.geomspace(0.5, 50.0, 50)
    counts = rng.poisson(means, size=(300, 50)).astype(float)
    counts[:, 7] = rng.poisson(rng.gamma(0.5, means[7] / 0.5, size=300))  # same mean, overdispersed
    assert 7 in highly_variable_genes(counts, 5)
    real, gen = preprocess(counts, counts[::-1], n_hvg=20, n_components=5)
    assert real.shape == (300, 5) and gen.shape == (300, 5)
    np.testing.assert_allclose(np.sort(real[:, 0]), np.sort(gen[:, 0]))
    assert np.allclose(log1p_normalize(counts).sum(1) > 0, True)


def test_per_condition_average():
    rng = np.random.default_rng(4)
    real, gen = rng.normal(size=(40, 2)), rng.normal(size=(40, 2)) + 1.0
    cond = np.repeat([0, 1], 20)
    out = per_condition_metrics(real, gen, cond, cond)
    by_hand = np.mean([distribution_metrics(real[cond == c], gen[cond == c])["w2"] for c in (0, 1)])
    assert out["num_conditions"] == 2 and out["w2"] == pytest.approx(by_hand)
    with pytest.raises(ValueError, match="min_cells"):
        per_condition_metrics(real, gen, cond, cond + 5)


def test_hvg_matches_scanpy_seurat_v3_on_real_cells():
    """The same 500 genes as scanpy's reference implementation on real PBMC counts."""
    from pathlib import Path

    import anndata
    import scanpy as sc  # installed with tiledbsoma

    path = Path(__file__).resolve().parents[3] / "data_pipelines" / "demo_data" / "pbmc700.h5ad"
    adata = anndata.read_h5ad(path)
    counts = adata.X.toarray() if hasattr(adata.X, "toarray") else np.asarray(adata.X)
    keep = (counts > 0).sum(0) >= 3
    adata = anndata.AnnData(counts[:, keep].astype(np.float32))
    sc.pp.highly_variable_genes(adata, flavor="seurat_v3", n_top_genes=500)
    want = np.flatnonzero(adata.var["highly_variable"].to_numpy())
    got = highly_variable_genes(adata.X, 500)
    assert len(got) == 500 and np.array_equal(got, want)


def test_hvg_on_few_cells_falls_back_instead_of_failing(caplog):
    """48 sparse cells: many genes share a mean and seurat_v3's loess is singular (scanpy raises)."""
    rng = np.random.default_rng(0)
    counts = rng.poisson(rng.gamma(0.3, 0.2, size=400), size=(48, 400)).astype(float)
    counts[:, 5] = rng.poisson(30.0, size=48) * (rng.random(48) < 0.5)  # overdispersed
    with caplog.at_level("WARNING"):
        hvg = highly_variable_genes(counts, 50)
    assert len(hvg) == 50 and 5 in hvg
    assert "HVG loess with span 0.3 failed" in caplog.text  # the fallback, not the loess, chose them


def _rbf(a, b):
    d2 = ((a[:, None] - b[None]) ** 2).sum(-1)
    return sum(np.exp(-d2 / (2 * s * s)) for s in metrics.RBF_SIGMAS)


def test_identical_samples_score_zero():
    x = np.random.default_rng(5).normal(size=(300, 5))
    assert wasserstein2(x, x) == pytest.approx(0.0, abs=1e-9)
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-9)
    assert energy_distance(x, x) == 0.0


def test_translation_gives_w2_norm_and_fd_squared_norm():
    rng = np.random.default_rng(6)
    x, delta = rng.normal(size=(400, 5)), np.array([1.0, -2.0, 0.5, 0.0, 2.0])
    assert wasserstein2(x, x + delta) == pytest.approx(np.linalg.norm(delta), rel=1e-6)
    assert frechet_distance(x, x + delta) == pytest.approx((delta**2).sum(), rel=1e-9)
    # independent samples with the same covariance: FD -> |delta|^2 (+ O(d^2 / n))
    y = rng.normal(size=(20000, 5)) + delta
    assert frechet_distance(rng.normal(size=(20000, 5)), y) == pytest.approx((delta**2).sum(), rel=0.02)


def test_mmd2_unbiased_is_the_u_statistic_and_near_zero_for_one_law():
    rng = np.random.default_rng(7)
    x, y = rng.normal(size=(60, 3)), rng.normal(size=(45, 3)) + 0.3
    kxx, kyy = _rbf(x, x), _rbf(y, y)
    want = ((kxx.sum() - np.trace(kxx)) / (60 * 59) + (kyy.sum() - np.trace(kyy)) / (45 * 44)
            - 2 * _rbf(x, y).mean())
    assert mmd2_unbiased(x, y) == pytest.approx(want, rel=1e-9)
    assert mmd2_rbf(x, y) == pytest.approx(kxx.mean() + kyy.mean() - 2 * _rbf(x, y).mean(), rel=1e-9)

    x, y = rng.normal(size=(500, 5)), rng.normal(size=(500, 5))
    unbiased, biased = mmd2_unbiased(x, y), mmd2_rbf(x, y)
    assert abs(unbiased) < 0.005  # 20 draws: |value| <= 0.002
    assert biased > 0.008  # the V-statistic's O(1/n) bias: ~0.012 at n = 500
    assert mmd2_unbiased(x, rng.normal(size=(500, 5)) + 1.0) > 0.05  # ~0.12, 20x the same-law bound


def test_mmd2_unbiased_blockwise_equals_one_block(monkeypatch):
    rng = np.random.default_rng(8)
    x, y = rng.normal(size=(37, 4)), rng.normal(size=(23, 4)) * 1.5
    whole = (mmd2_unbiased(x, y), mmd2_rbf(x, y), energy_distance(x, y))
    monkeypatch.setattr(metrics, "_BLOCK_ENTRIES", 50)  # blocks of 1-2 rows
    np.testing.assert_allclose((mmd2_unbiased(x, y), mmd2_rbf(x, y), energy_distance(x, y)), whole, rtol=1e-10)
    with pytest.raises(ValueError, match="got 1 and 23"):
        mmd2_unbiased(x[:1], y)


def test_energy_distance_matches_scipy_in_1d_and_brute_force_in_3d():
    rng = np.random.default_rng(9)
    u, v = rng.normal(size=300), rng.normal(size=200) * 2.0 + 1.0
    assert energy_distance(u, v) == pytest.approx(stats.energy_distance(u, v), rel=1e-9)
    assert energy_distance(u[:, None], v[:, None]) == pytest.approx(stats.energy_distance(u, v), rel=1e-9)
    x, y = rng.normal(size=(40, 3)), rng.normal(size=(30, 3)) + 1.0

    def mean_dist(a, b):
        return np.linalg.norm(a[:, None] - b[None], axis=-1).mean()

    want = np.sqrt(2 * mean_dist(x, y) - mean_dist(x, x) - mean_dist(y, y))
    assert energy_distance(x, y) == pytest.approx(want, rel=1e-9)


def test_frechet_distance_few_cells_many_pcs_does_not_warn():
    rng = np.random.default_rng(10)
    x, y = rng.normal(size=(20, 30)), rng.normal(size=(20, 30))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fd = frechet_distance(x, y)
    assert np.isfinite(fd) and fd > 0
    # well conditioned: the eigenvalue form equals the sqrtm form
    x, y = rng.normal(size=(500, 4)), rng.normal(size=(500, 4)) @ rng.normal(size=(4, 4))
    s_x, s_y = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    want = ((x.mean(0) - y.mean(0)) ** 2).sum() + np.trace(s_x + s_y - 2 * linalg.sqrtm(s_x @ s_y).real)
    assert frechet_distance(x, y) == pytest.approx(want, rel=1e-8)


def test_distribution_scores_keys():
    rng = np.random.default_rng(11)
    out = distribution_scores(rng.normal(size=(50, 3)), rng.normal(size=(40, 3)) + 2.0)
    assert tuple(out) == METRICS and all(isinstance(v, float) and v > 0 for v in out.values())


def test_condition_scores_weights_by_real_cells_and_skips_small_conditions():
    rng = np.random.default_rng(12)
    real = np.concatenate([rng.normal(size=(40, 3)), rng.normal(size=(60, 3)) + 5.0, rng.normal(size=(5, 3))])
    gen = np.concatenate([rng.normal(size=(35, 3)) + 1.0, rng.normal(size=(50, 3)) + 5.0, rng.normal(size=(40, 3))])
    real_cond = ["a"] * 40 + ["b|x"] * 60 + ["c"] * 5
    gen_cond = np.array(["a"] * 35 + ["b|x"] * 50 + ["c"] * 40)
    out = condition_scores(real, gen, real_cond, gen_cond, min_cells=30)
    per = out["per_condition"]
    assert set(per) == {"a", "b|x", "c"}
    assert per["c"]["n_real"] == 5 and per["c"]["n_gen"] == 40 and "real 5" in per["c"]["skipped"]
    assert per["a"]["n_gen"] == 35 and "skipped" not in per["a"]
    score_a, score_b = distribution_scores(real[:40], gen[:35]), distribution_scores(real[40:100], gen[35:85])
    for m in METRICS:
        assert per["a"][m] == pytest.approx(score_a[m])
        assert out["weighted"][m] == pytest.approx((40 * score_a[m] + 60 * score_b[m]) / 100)
    assert out["num_conditions"] == 2 and out["cells_scored"] == 100
    with pytest.raises(ValueError, match=r"c: real 5 gen 40"):
        condition_scores(real, gen, real_cond, gen_cond, min_cells=100)


def test_knn_condition_accuracy_separable_and_shuffled():
    rng = np.random.default_rng(13)
    labels = np.repeat(["t0", "t1", "t2", "t3"], 100)
    centres = {lab: rng.normal(size=5) * 10 for lab in np.unique(labels)}
    x = np.stack([centres[lab] for lab in labels]) + rng.normal(size=(400, 5))
    q = np.stack([centres[lab] for lab in labels]) + rng.normal(size=(400, 5))
    assert knn_condition_accuracy(x, labels, q, labels) == 1.0
    assert abs(knn_condition_accuracy(x, rng.permutation(labels), q, labels) - 0.25) < 0.1
    assert knn_condition_accuracy(x[:3], [0, 1, 1], q[:2], [0, 1], k=15) in (0.0, 0.5, 1.0)  # k capped at 3


def test_mean_std_and_aggregate_seeds():
    assert mean_std([1.0, 3.0]) == {"mean": 2.0, "std": 1.0}
    assert mean_std([4.0]) == {"mean": 4.0, "std": 0.0}
    seeds = [{"weighted": {"w2": 1.0}, "per_condition": {"a": {"n_real": 40, "fd": 2.0}, "c": {"skipped": "few"}},
              "num_conditions": 1},
             {"weighted": {"w2": 3.0}, "per_condition": {"a": {"n_real": 40, "fd": np.float64(4.0)},
                                                         "c": {"skipped": "few"}}, "num_conditions": 1}]
    out = aggregate_seeds(seeds)
    assert out["weighted"]["w2"] == {"mean": 2.0, "std": 1.0}
    assert out["per_condition"]["a"] == {"n_real": 40, "fd": {"mean": 3.0, "std": 1.0}}
    assert out["per_condition"]["c"] == {"skipped": "few"} and out["num_conditions"] == 1
    seeds[1]["per_condition"]["c"] = {"fd": 5.0}  # scored in seed 1 only: aggregated over that seed
    assert aggregate_seeds(seeds)["per_condition"]["c"] == {"skipped": "few", "fd": {"mean": 5.0, "std": 0.0}}


def test_reconstruction_scores():
    counts = np.random.default_rng(14).poisson(3.0, size=(30, 20)).astype(float)
    out = reconstruction_scores(counts, 2.5 * counts)
    assert out["pearson_gene"] == pytest.approx(1.0) and out["pearson_cell"] == pytest.approx(1.0)
    assert out["mse"] == pytest.approx(0.0, abs=1e-20)
    # rows sum to 1e4, so the normalised values are log1p(x) = L or 0
    real = np.array([[5000.0, 5000.0, 0.0], [0.0, 5000.0, 5000.0]])
    mu = np.array([[5000.0, 0.0, 5000.0], [0.0, 5000.0, 5000.0]])
    out, big_l = reconstruction_scores(real, mu), np.log1p(5000.0)
    assert out["mse"] == pytest.approx(big_l**2 / 3)
    assert out["pearson_cell"] == pytest.approx((-0.5 + 1.0) / 2)
    assert out["pearson_gene"] == pytest.approx(1.0)  # genes 1 and 2 are constant in one of the two: left out
    # given totals (e.g. over all genes, when only some columns are passed) replace the row sums
    out = reconstruction_scores(real / 2, mu / 4, real_totals=[5000.0, 5000.0], mu_totals=[2500.0, 2500.0])
    assert out["mse"] == pytest.approx(big_l**2 / 3)


def test_classification_scores():
    rng = np.random.default_rng(15)
    labels = np.repeat(["B", "T", "NK"], 60)
    emb = rng.normal(size=(180, 8))
    emb[:, 0] += np.where(labels == "B", 8.0, 0.0)
    emb[:, 1] += np.where(labels == "T", 8.0, 0.0)
    out = classification_scores(emb, labels)
    assert out["logreg_acc"] > 0.98 and out["knn_acc"] > 0.98 and out["macro_f1"] > 0.98
    assert (out["folds"], out["n_cells"], out["n_classes"], out["dropped_classes"]) == (5, 180, 3, {})
    chance = classification_scores(emb, rng.permutation(labels))
    assert abs(chance["logreg_acc"] - 1 / 3) < 0.15 and abs(chance["knn_acc"] - 1 / 3) < 0.15
    odd = np.concatenate([labels[:-4], ["rare", "few", "few", "few"]])
    out = classification_scores(emb, odd)
    assert out["dropped_classes"] == {"rare": 1} and out["n_cells"] == 179 and out["n_classes"] == 4
    assert out["folds"] == 3  # the smallest kept class has 3 cells
