"""Distribution metrics against closed forms: W2 and FD of Gaussians, MMD of identical / shifted sets, HVG, PCA."""

from __future__ import annotations

import numpy as np
import pytest

from scldm_scale.eval import (
    distribution_metrics,
    frechet_distance,
    highly_variable_genes,
    log1p_normalize,
    mmd2_rbf,
    per_condition_metrics,
    preprocess,
    wasserstein2,
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
