"""Tiny SOMA experiments for the loader tests, written with tiledbsoma directly (atlas layout of DEVELOPERS.md)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import tiledbsoma

from scldm_scale.config.data import SomaDataConfig


def loader_config(uri: str, **kw) -> SomaDataConfig:
    """The data config of the loader tests: batches of 16, chunks of 16, blocks of 64 cells, seed 3, two labels."""
    base = dict(
        atlas_uri=uri,
        micro_batch_size=16,
        shuffle_chunk_cells=16,
        shuffle_buffer_cells=64,
        seed=3,
        label_columns=["dataset_id", "cell_type"],
    )
    base.update(kw)
    return SomaDataConfig(**base)


def gene_ids(n_genes: int, *, reverse: bool = False, extra: int = 0) -> list[str]:
    """feature_ids of a test atlas var: G00000.. (reversed if asked), the last `extra` renamed X00000.."""
    ids = [f"G{i:05d}" for i in range(n_genes)]
    ids = ids[::-1] if reverse else ids
    return ids[: n_genes - extra] + [f"X{i:05d}" for i in range(extra)]


def write_test_atlas(
    uri: str,
    *,
    n_cells: int = 600,
    n_genes: int = 50,
    n_datasets: int = 3,
    density: float | list[float] = 0.2,
    seed: int = 0,
    nnz_column: bool = False,
    reverse_genes: bool = False,
    extra_genes: int = 0,
    context: tiledbsoma.SOMATileDBContext | None = None,
) -> str:
    """Write an experiment with datasets stored one after another, a `split` column and var `n_cells`.

    `density` may be one value per dataset (a heterogeneous atlas); `nnz_column` adds obs `nnz` as Census has.
    """
    rng = np.random.default_rng(seed)
    dataset = np.repeat(np.arange(n_datasets), -(-n_cells // n_datasets))[:n_cells]
    obs = pd.DataFrame(
        {
            "soma_joinid": np.arange(n_cells, dtype=np.int64),
            "dataset_id": [f"ds{d}" for d in dataset],
            "cell_type": rng.choice(["B", "T", "NK"], size=n_cells),
            "split": np.where(np.arange(n_cells) % 5 == 4, "val", "train"),
        }
    )
    dens = np.asarray(density, np.float64)
    nnz_mask = (
        rng.random((n_cells, n_genes)) < (dens[dataset] if dens.ndim else np.full(n_cells, dens))[:, None]
    )
    if nnz_column:
        obs["nnz"] = nnz_mask.sum(axis=1).astype(np.int64)
    rows, cols = np.nonzero(nnz_mask)
    data = rng.integers(1, 20, size=rows.size).astype(np.float32)
    var = pd.DataFrame(
        {
            "soma_joinid": np.arange(n_genes, dtype=np.int64),
            "feature_id": gene_ids(n_genes, reverse=reverse_genes, extra=extra_genes),
            "feature_name": [f"gene{i}" for i in range(n_genes)],
            "n_cells": np.bincount(cols, minlength=n_genes).astype(np.int64),
        }
    )
    with tiledbsoma.Experiment.create(uri, context=context) as exp:
        exp.add_new_dataframe(
            "obs",
            schema=pa.Schema.from_pandas(obs, preserve_index=False),
            domain=[(0, n_cells - 1)],
        ).write(pa.Table.from_pandas(obs, preserve_index=False))
        ms = exp.add_new_collection("ms", tiledbsoma.Collection)
        rna = ms.add_new_collection("RNA", tiledbsoma.Measurement)
        rna.add_new_dataframe(
            "var",
            schema=pa.Schema.from_pandas(var, preserve_index=False),
            domain=[(0, n_genes - 1)],
        ).write(pa.Table.from_pandas(var, preserve_index=False))
        x = rna.add_new_collection("X", tiledbsoma.Collection)
        arr = x.add_new_sparse_ndarray("raw", type=pa.float32(), shape=(n_cells, n_genes))
        arr.write(
            pa.Table.from_pydict(
                {
                    "soma_dim_0": rows.astype(np.int64),
                    "soma_dim_1": cols.astype(np.int64),
                    "soma_data": data,
                }
            )
        )
    return uri
