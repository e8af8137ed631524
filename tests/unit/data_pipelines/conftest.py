"""Fixtures for data_pipelines tests: tiny AnnData / .h5ad factories, a small base atlas, a tree hash."""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Callable

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp


def _tree_hash(root: str) -> dict[str, str]:
    """sha256 of every file under `root` (relative path -> digest); the lock file beside it is outside."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            full = os.path.join(dirpath, name)
            with open(full, "rb") as f:
                out[os.path.relpath(full, root)] = hashlib.sha256(f.read()).hexdigest()
    return out


def _make_adata(
    n_cells: int = 30,
    n_genes: int = 12,
    *,
    seed: int = 0,
    gene_prefix: str = "G",
    cell_prefix: str = "cell",
    dense: bool = False,
    dtype: type = np.float32,
    labels: bool = True,
) -> anndata.AnnData:
    """Random integer counts (about 40 % non-zero) with `cell_type` / `batch` labels and feature_id in var."""
    rng = np.random.default_rng(seed)
    x = rng.poisson(0.8, size=(n_cells, n_genes)).astype(dtype)
    obs = pd.DataFrame(index=[f"{cell_prefix}{i}" for i in range(n_cells)])
    if labels:
        obs["cell_type"] = pd.Categorical(rng.choice(["T", "B", "NK"], size=n_cells))
        obs["batch"] = pd.Categorical(rng.choice(["b1", "b2"], size=n_cells))
    genes = [f"{gene_prefix}{j}" for j in range(n_genes)]
    var = pd.DataFrame({"feature_id": [f"ID_{g}" for g in genes]}, index=genes)
    return anndata.AnnData(X=x if dense else sp.csr_matrix(x), obs=obs, var=var)


@pytest.fixture
def make_adata() -> Callable[..., anndata.AnnData]:
    return _make_adata


@pytest.fixture
def write_h5ad(tmp_path) -> Callable[..., str]:
    """`write_h5ad(adata, name)` -> path of the written file under tmp_path."""

    def write(adata: anndata.AnnData, name: str = "data") -> str:
        path = str(tmp_path / f"{name}.h5ad")
        adata.write_h5ad(path)
        return path

    return write


@pytest.fixture
def tree_hash() -> Callable[[str], dict[str, str]]:
    return _tree_hash


@pytest.fixture(scope="module")
def _base_atlas_template(tmp_path_factory) -> str:
    from data_pipelines.ingest import ingest_anndata

    path = str(tmp_path_factory.mktemp("base") / "atlas")
    ingest_anndata(path, [_make_adata(seed=1)], dataset_ids=["base"])
    return path


@pytest.fixture
def base_atlas(_base_atlas_template: str, tmp_path) -> str:
    """A fresh copy of a small atlas (30 cells x 12 genes, dataset `base`, labels cell_type + batch)."""
    path = str(tmp_path / "atlas")
    shutil.copytree(_base_atlas_template, path)
    return path
