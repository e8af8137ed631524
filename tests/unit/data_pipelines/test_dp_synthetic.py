"""Synthetic atlas: layout, contiguous datasets, NB model fitted on brain10k, determinism, CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.sparse as sp
import tiledbsoma

from data_pipelines import synthetic_atlas as syn


def _read_x(uri: str) -> sp.csr_matrix:
    with tiledbsoma.Experiment.open(uri) as exp:
        x = exp.ms["RNA"].X["raw"]
        t = x.read().tables().concat()
        shape = x.shape
    rows, cols = t["soma_dim_0"].to_numpy(), t["soma_dim_1"].to_numpy()
    return sp.csr_matrix((t["soma_data"].to_numpy(), (rows, cols)), shape=shape)


def test_layout_and_contiguous_datasets(synthetic_atlas):
    with tiledbsoma.Experiment.open(synthetic_atlas) as exp:
        obs = exp.obs.read().concat().to_pandas().sort_values("soma_joinid")
        var = exp.ms["RNA"].var.read().concat().to_pandas().sort_values("soma_joinid")
        meta = dict(exp.metadata)
    assert list(obs.columns) == ["soma_joinid", "obs_id", "dataset_id", "cell_type", "split", "nnz"]
    assert obs["soma_joinid"].tolist() == list(range(2000))
    assert obs["dataset_id"].tolist() == [f"ds{d:02d}" for d in range(4) for _ in range(500)]
    assert set(obs["cell_type"]) <= {f"c{k}" for k in range(10)} and obs["cell_type"].nunique() >= 8
    assert (
        set(obs["split"]) == {"train", "val", "test"} and abs((obs["split"] == "train").mean() - 0.8) < 0.05
    )
    assert obs["obs_id"].is_unique
    assert len(var) == 200 and var["feature_id"].is_unique and var["feature_name"].iloc[0] == "Xkr4"
    ranges = [(d["obs_joinid_start"], d["obs_joinid_stop"]) for d in json.loads(meta["scldm_scale.datasets"])]
    assert ranges == [(0, 500), (500, 1000), (1000, 1500), (1500, 2000)]
    x = _read_x(synthetic_atlas)
    assert x.nnz > 0 and (x.data > 0).all() and (x.data == np.round(x.data)).all()
    assert var["n_cells"].tolist() == np.asarray((x > 0).sum(0)).ravel().tolist()


def test_model_fit_on_brain10k():
    m = syn.fit_brain10k_model()
    assert m.clusters.tolist() == [f"c{k}" for k in range(10)]
    assert m.mu.shape == m.theta.shape == (10, 1000)
    assert abs(m.proportions[0] - 0.2616) < 1e-6 and np.isclose(m.proportions.sum(), 1.0)
    assert ((m.theta >= 0.01) & (m.theta <= 1000)).all()
    assert np.isclose(m.size_factors.mean(), 1.0, atol=0.05)


def test_counts_resemble_brain10k(synthetic_atlas_factory):
    """1,000 genes = brain10k's genes: library size and detection rate are close to the real data."""
    x = _read_x(synthetic_atlas_factory(n_cells=3000, n_genes=1000, n_datasets=1, seed=3))
    lib = np.asarray(x.sum(1)).ravel()
    assert 110 < np.median(lib) < 170  # brain10k: median 137
    assert 0.05 < x.nnz / (3000 * 1000) < 0.09  # brain10k: 6.9 % non-zero


def test_deterministic_and_more_genes_than_brain10k(tmp_path):
    kwargs = dict(n_cells=300, n_genes=1200, n_datasets=3, seed=7, chunk_cells=64)
    a = syn.write_synthetic_atlas(str(tmp_path / "a"), **kwargs)
    syn.write_synthetic_atlas(str(tmp_path / "b"), **kwargs)
    xa, xb = _read_x(str(tmp_path / "a")), _read_x(str(tmp_path / "b"))
    assert a["nnz"] == xa.nnz and (xa != xb).nnz == 0
    assert xa[:, 1000:].nnz > 0  # resampled genes are expressed too
    assert [d["n_cells"] for d in a["datasets"]] == [100, 100, 100]


def test_cli_and_refuses_to_overwrite(tmp_path, capsys):
    uri = str(tmp_path / "s")
    assert syn.main(["--atlas", uri, "--cells", "50", "--genes", "20", "--datasets", "2"]) == 0
    assert "50 cells x 20 genes, 2 datasets" in capsys.readouterr().out
    assert syn.main(["--atlas", uri, "--cells", "50", "--genes", "20"]) == 2
    assert "already exists" in capsys.readouterr().err
    with pytest.raises(ValueError, match="datasets"):
        syn.write_synthetic_atlas(str(tmp_path / "t"), n_cells=2, n_genes=5, n_datasets=3)
