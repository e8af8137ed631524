"""Synthetic SOMA atlas for benchmarks and tests: per-cluster negative-binomial counts fitted on brain10k.

`python -m data_pipelines.synthetic_atlas --atlas PATH --cells N --genes G --datasets K [--layout L]` writes N
cells in K datasets stored one after another (as Census stores them), streaming chunks straight into SOMA.
Every layout writes obs `nnz` (int64: the stored non-zero values of the cell's X row, as in CELLxGENE Census).

Model (fitted once per process from `demo_data/brain10k.h5ad`, 10 Leiden clusters c0..c9):
  * size factor s_c = library size / mean library size of the cell's cluster (cells with zero counts are
    left out of the fit); synthetic cells draw s_c from the empirical distribution;
  * per cluster k and gene g, method-of-moments NB on size-normalised counts x / s_c: mean mu_kg and inverse
    dispersion theta_kg = mu^2 / (var - mu), clipped to [0.01, 1000] (1000, near-Poisson, when var <= mu);
  * counts ~ Poisson(Gamma(shape=theta_kg, scale=s_c * mu_kg * b_dg / theta_kg)) (the NB as a gamma-Poisson).
Genes: synthetic gene j < 1000 uses brain10k gene j (so G < 1000 keeps the first G genes, in annotation
order); for j >= 1000 the parameters of a brain10k gene drawn uniformly with replacement are reused, with the
mean scaled by one log-normal factor exp(N(0, 0.25^2)) per new gene (shared by all clusters, so the cluster
structure is kept). Each dataset d has a mild batch effect b_dg = exp(N(0, 0.1^2)). Splits are drawn per
cell, 80 / 10 / 10. Everything is a function of `seed` (and, for the counts, of the chunk size).

Layouts:
  * `blocks` (default): K equal datasets; dataset d has its own cluster proportions ~ Dirichlet(50 * p) and
    its cells are drawn independently, so any contiguous run of cells is a fair sample of its dataset.
    obs: obs_id, dataset_id, cell_type (the cluster), split, nnz.
  * `census`: shaped like CELLxGENE Census (details: `_census_layout.py`): log-normal dataset sizes, 200
    cell types (type t: cluster t mod 10 times a per-(type, gene) log-normal factor), each dataset with its
    own 5 to 30 types, 1 to 20 donors, one assay, one tissue, a primary flag. obs: obs_id, dataset_id,
    cell_type, donor_id, assay, tissue, is_primary_data (bool), split, nnz.
    Storage order: WITHIN each dataset the cells are sorted by (donor_id, cell_type), as in Census. Contiguous
    runs of cells are therefore homogeneous (one donor, one cell type): a loader reading contiguous ranges
    must mix many ranges and datasets to get representative batches; this layout is there to test that.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources

import anndata
import numpy as np
import pandas as pd
import pyarrow as pa
import scipy.sparse as sp
import tiledbsoma
from tqdm.auto import tqdm

from data_pipelines._atlas import (
    META_DATASETS,
    META_LABEL_COLUMNS,
    NNZ_COLUMN,
    atlas_exists,
    create_atlas,
    soma_context,
    write_obs,
    write_var,
    write_x,
)
from data_pipelines._census_layout import (
    CENSUS_LABEL_COLUMNS,
    CENSUS_OBS_COLUMNS,
    SPLIT_P,
    SPLITS,
    dataset_entry,
    obs_ids,
    plan_datasets,
    type_gene_factors,
    write_census,
)
from data_pipelines._commit import CommitInfo, commit, next_timestamp
from data_pipelines._staging import staged_atlas

logger = logging.getLogger(__name__)

__all__ = ["LAYOUTS", "NBModel", "fit_brain10k_model", "main", "write_synthetic_atlas"]

_THETA_MIN, _THETA_MAX = 0.01, 1000.0
_BLOCK_VALUES = 8_000_000
"""Cells x genes values drawn at once (~100 MB of float64 temporaries), whatever chunk_cells is."""


@dataclass(frozen=True)
class NBModel:
    """Per-cluster negative-binomial parameters fitted on brain10k."""

    clusters: np.ndarray
    """Cluster names, (K,)."""
    proportions: np.ndarray
    """Cluster frequencies, (K,)."""
    mu: np.ndarray
    """Size-normalised mean count, (K, 1000)."""
    theta: np.ndarray
    """Inverse dispersion, (K, 1000)."""
    size_factors: np.ndarray
    """Empirical size factors to resample, (cells,)."""
    gene_names: np.ndarray
    """brain10k gene symbols, (1000,)."""


@functools.lru_cache(maxsize=1)
def fit_brain10k_model() -> NBModel:
    """Fit the per-cluster NB model on the embedded brain10k counts (cached per process)."""
    with resources.as_file(resources.files("data_pipelines") / "demo_data" / "brain10k.h5ad") as path:
        adata = anndata.read_h5ad(path)
    x = sp.csr_matrix(adata.X, dtype=np.float64)
    clusters = adata.obs["cluster"].astype(str).to_numpy()
    names = np.array(sorted(pd.unique(clusters), key=lambda c: (len(c), c)))
    lib = np.asarray(x.sum(axis=1)).ravel()
    size = np.zeros_like(lib)
    mu = np.zeros((len(names), x.shape[1]))
    theta = np.full_like(mu, _THETA_MAX)
    for k, name in enumerate(names):
        rows = np.flatnonzero((clusters == name) & (lib > 0))
        size[rows] = lib[rows] / lib[rows].mean()
        y = sp.diags(1.0 / size[rows]) @ x[rows]
        m = np.asarray(y.mean(axis=0)).ravel()
        v = np.asarray(y.multiply(y).mean(axis=0)).ravel() - m**2
        over = v > m
        theta[k, over] = np.clip(m[over] ** 2 / (v[over] - m[over]), _THETA_MIN, _THETA_MAX)
        mu[k] = m
    proportions = np.array([(clusters == n).mean() for n in names])
    return NBModel(names, proportions, mu, theta, size[lib > 0], np.asarray(adata.var_names, dtype=object))


def _gene_params(
    model: NBModel, n_genes: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mu (K, G), theta (K, G), feature names (G,)): real genes first, then resampled ones."""
    n_real = model.mu.shape[1]
    src = np.arange(min(n_genes, n_real))
    extra = rng.integers(0, n_real, size=max(0, n_genes - n_real))
    scale = np.concatenate([np.ones(len(src)), np.exp(rng.normal(0.0, 0.25, size=len(extra)))])
    genes = np.concatenate([src, extra])
    names = [
        str(model.gene_names[g]) if j < n_real else f"{model.gene_names[g]}_r{j}" for j, g in enumerate(genes)
    ]
    return model.mu[:, genes] * scale, model.theta[:, genes], np.asarray(names, dtype=object)


def _sample_block(
    rng: np.random.Generator, cell_type: np.ndarray, size: np.ndarray, mu: np.ndarray, theta: np.ndarray
) -> sp.csr_matrix:
    """Gamma-Poisson draws for one block of cells; mu already carries the dataset's batch effect.

    Cells are drawn cluster by cluster and put back in their original order. Genes with a zero mean in the
    cluster (about half of brain10k's (cluster, gene) pairs) are skipped and near-Poisson genes (theta at its
    cap) skip the gamma draw: both are exact shortcuts and make sampling ~3x faster.
    """
    n_genes = mu.shape[1]
    order = np.argsort(cell_type, kind="stable")
    bounds = np.searchsorted(cell_type[order], np.arange(mu.shape[0] + 1))
    parts = []
    for k in range(mu.shape[0]):
        rows = order[bounds[k] : bounds[k + 1]]
        if len(rows) == 0:
            continue
        size_k = size[rows, None]
        gamma_genes = np.flatnonzero((mu[k] > 0) & (theta[k] < _THETA_MAX))
        poisson_genes = np.flatnonzero((mu[k] > 0) & (theta[k] >= _THETA_MAX))
        shape = theta[k, gamma_genes]
        lam = rng.gamma(shape, size_k * mu[k, gamma_genes] / shape)
        counts = np.hstack([rng.poisson(lam), rng.poisson(size_k * mu[k, poisson_genes])]).astype(np.float32)
        dense = sp.csr_matrix(counts)
        cols = np.concatenate([gamma_genes, poisson_genes])
        parts.append(
            sp.csr_matrix((dense.data, cols[dense.indices], dense.indptr), shape=(len(rows), n_genes))
        )
    inverse = np.empty_like(order)
    inverse[order] = np.arange(len(order))
    block = sp.vstack(parts, format="csr")[inverse]
    block.sort_indices()
    return block


LAYOUTS = ("blocks", "census")
_BLOCKS_OBS = ("obs_id", "dataset_id", "cell_type", "split", "nnz")
_STRING = pa.large_string()


def _sample_counts(
    rng: np.random.Generator, cell_type: np.ndarray, size: np.ndarray, mu: np.ndarray, theta: np.ndarray
) -> sp.csr_matrix:
    """Counts of cells with the given rows of mu / theta and size factors, in blocks of <= _BLOCK_VALUES."""
    block = max(1, _BLOCK_VALUES // mu.shape[1])
    return sp.vstack(
        [
            _sample_block(rng, cell_type[i : i + block], size[i : i + block], mu, theta)
            for i in range(0, len(cell_type), block)
        ],
        format="csr",
    )


class _ChunkWriter:
    """Writes chunks of cells in joinid order (obs with each cell's `nnz`, then X) and keeps the totals."""

    def __init__(self, exp: tiledbsoma.Experiment, n_genes: int, bar: tqdm) -> None:
        self.exp, self.bar = exp, bar
        self.n_cells_per_gene = np.zeros(n_genes, dtype=np.int64)
        self.nnz = 0

    def write(self, first: int, obs: dict[str, pa.Array], counts: sp.csr_matrix) -> None:
        """Write cells first .. first + len(counts) - 1: `obs` (every column but soma_joinid and nnz), counts."""
        n = counts.shape[0]
        write_obs(self.exp, first, {**obs, NNZ_COLUMN: np.diff(counts.indptr).astype(np.int64)})
        coo = counts.tocoo()
        write_x(self.exp, coo.row.astype(np.int64) + first, coo.col, coo.data)
        self.n_cells_per_gene += np.bincount(coo.col, minlength=len(self.n_cells_per_gene))
        self.nnz += coo.nnz
        self.bar.update(n)


def _dataset_ids(n_datasets: int) -> list[str]:
    width = max(2, len(str(n_datasets - 1)))
    return [f"ds{d:0{width}d}" for d in range(n_datasets)]


def _write_blocks(
    writer: _ChunkWriter,
    model: NBModel,
    n_cells: int,
    n_genes: int,
    n_datasets: int,
    seed: int,
    chunk_cells: int,
) -> tuple[list[dict], np.ndarray]:
    """Equal datasets, each with its own cluster proportions; returns (the metadata's datasets, gene names)."""
    rng = np.random.default_rng(seed)
    mu, theta, names = _gene_params(model, n_genes, rng)
    dataset_ids = _dataset_ids(n_datasets)
    id_vocab, cluster_vocab = pa.array(dataset_ids, _STRING), pa.array(model.clusters.tolist(), _STRING)
    datasets, offset = [], 0
    q, r = divmod(n_cells, n_datasets)  # np.array_split's sizes
    for d, n in enumerate([q + 1] * r + [q] * (n_datasets - r)):
        props = rng.dirichlet(50.0 * model.proportions)
        mu_d = mu * np.exp(rng.normal(0.0, 0.1, size=n_genes))
        for start in range(0, n, chunk_cells):
            m = min(chunk_cells, n - start)
            cell_type = rng.choice(len(props), size=m, p=props)
            size = rng.choice(model.size_factors, size=m)
            counts = _sample_counts(rng, cell_type, size, mu_d, theta)
            split = rng.choice(len(SPLITS), size=m, p=SPLIT_P)
            dataset_col = id_vocab.take(pa.array(np.full(m, d)))
            obs = {
                "obs_id": obs_ids(dataset_col, np.arange(start, start + m)),
                "dataset_id": dataset_col,
                "cell_type": cluster_vocab.take(pa.array(cell_type)),
                "split": SPLITS.take(pa.array(split)),
            }
            writer.write(offset + start, obs, counts)
        datasets.append(dataset_entry(dataset_ids[d], offset, n, n_genes))
        offset += n
    return datasets, names


def _write_census_layout(
    writer: _ChunkWriter,
    model: NBModel,
    n_cells: int,
    n_genes: int,
    n_datasets: int,
    seed: int,
    chunk_cells: int,
) -> tuple[list[dict], np.ndarray]:
    """The census layout (`_census_layout.py`): plan from one generator, cells from another; returns as
    `_write_blocks`."""
    plan_rng, rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2))
    mu, theta, names = _gene_params(model, n_genes, plan_rng)
    factors = type_gene_factors(plan_rng, n_genes)
    plan = plan_datasets(n_cells, _dataset_ids(n_datasets), plan_rng)
    write_census(writer.write, rng, _sample_counts, model.size_factors, mu, theta, factors, plan, chunk_cells)
    return [ds.summary(n_genes) for ds in plan], names


_LAYOUTS = {
    "blocks": (_write_blocks, _BLOCKS_OBS, ("cell_type", "split")),
    "census": (_write_census_layout, CENSUS_OBS_COLUMNS, CENSUS_LABEL_COLUMNS),
}
"""layout -> (writer, obs columns, the metadata's label columns)."""


def _check_sizes(layout: str, n_cells: int, n_genes: int, n_datasets: int, chunk_cells: int) -> None:
    if layout not in LAYOUTS:
        raise ValueError(
            f"layout={layout!r}: unknown synthetic atlas layout; choose one of {', '.join(LAYOUTS)}"
        )
    if n_cells < 1 or n_genes < 1 or not 1 <= n_datasets <= n_cells or chunk_cells < 1:
        raise ValueError(
            f"need cells >= datasets >= 1, genes >= 1, chunk_cells >= 1; got cells={n_cells}, genes={n_genes}, "
            f"datasets={n_datasets}, chunk_cells={chunk_cells}"
        )


def _var_table(names: np.ndarray, n_cells_per_gene: np.ndarray) -> pd.DataFrame:
    """var: synthetic feature ids SYNG000000.., the brain10k symbol each gene was drawn from, cells per gene."""
    return pd.DataFrame(
        {
            "feature_id": [f"SYNG{j:06d}" for j in range(len(names))],
            "feature_name": names,
            "n_cells": n_cells_per_gene,
        }
    )


def write_synthetic_atlas(
    uri: str,
    *,
    n_cells: int,
    n_genes: int,
    n_datasets: int,
    seed: int = 0,
    chunk_cells: int = 50_000,
    layout: str = "blocks",
    s3_endpoint_url: str | None = None,
    s3_verify_tls: bool = True,
) -> dict:
    """Write a synthetic atlas of `n_cells` x `n_genes` in `n_datasets` contiguous datasets (ds00, ds01, ...).

    layout="blocks": equal datasets; obs: obs_id, dataset_id, cell_type (the brain10k cluster), split, nnz.
    layout="census": log-normal dataset sizes, Census-like obs (obs_id, dataset_id, cell_type, donor_id, assay,
    tissue, is_primary_data, split, nnz), cells sorted by (donor_id, cell_type) within each dataset (module
    docstring). var: feature_id (SYNG000000, ...), feature_name (the source brain10k symbol), n_cells. One
    committed write (`_commit.py`): an interrupted one is never read; local paths are in addition staged and
    published atomically. Memory is bounded by `chunk_cells` (and the sampling blocks), not by `n_cells`.

    Returns:
        A summary with the sizes, nnz, the seed, the layout, the wall time in seconds and the datasets.

    Raises:
        ValueError: an unknown layout, bad sizes, or an atlas already exists at `uri`.
    """
    _check_sizes(layout, n_cells, n_genes, n_datasets, chunk_cells)
    ctx = soma_context(uri, s3_endpoint_url, s3_verify_tls)
    if atlas_exists(uri, ctx):
        raise ValueError(f"{uri}: an atlas already exists; remove it first")
    t0 = time.perf_counter()
    model = fit_brain10k_model()
    write_layout, obs_columns, labels = _LAYOUTS[layout]
    with staged_atlas(uri) as target:
        timestamp = next_timestamp(CommitInfo())
        create_atlas(target, ctx, obs_columns=obs_columns, n_obs=n_cells, n_vars=n_genes, timestamp=timestamp)
        with (
            tiledbsoma.Experiment.open(target, "w", context=ctx, tiledb_timestamp=timestamp) as exp,
            tqdm(total=n_cells, unit="cells", desc="synthetic atlas", file=sys.stderr, disable=None) as bar,
        ):
            writer = _ChunkWriter(exp, n_genes, bar)
            datasets, names = write_layout(writer, model, n_cells, n_genes, n_datasets, seed, chunk_cells)
            write_var(exp, _var_table(names, writer.n_cells_per_gene))
        metadata = {
            META_DATASETS: json.dumps(datasets),
            META_LABEL_COLUMNS: json.dumps(list(labels)),
            "synthetic_seed": seed,
            "synthetic_layout": layout,
            "synthetic_model": "per-cluster negative binomial fitted on brain10k",
        }
        commit(target, ctx, timestamp, metadata)
    wall = time.perf_counter() - t0
    logger.info(
        "wrote %s (%s layout): %d cells x %d genes, nnz %d, %.1f s",
        uri,
        layout,
        n_cells,
        n_genes,
        writer.nnz,
        wall,
    )
    return {
        "atlas_uri": uri,
        "layout": layout,
        "n_obs": n_cells,
        "n_vars": n_genes,
        "n_datasets": n_datasets,
        "nnz": writer.nnz,
        "seed": seed,
        "wall_seconds": wall,
        "datasets": datasets,
    }


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: write a synthetic atlas; prints a one-line summary (and peak RSS) to stdout."""
    p = argparse.ArgumentParser(
        prog="python -m data_pipelines.synthetic_atlas", description=__doc__.splitlines()[0]
    )
    p.add_argument(
        "--atlas", required=True, help="output SOMA experiment (local path or s3:// URI); must not exist"
    )
    p.add_argument("--cells", type=int, required=True, help="number of cells N")
    p.add_argument("--genes", type=int, required=True, help="number of genes G (may exceed brain10k's 1000)")
    p.add_argument("--datasets", type=int, default=1, help="number of datasets K, stored one after another")
    p.add_argument(
        "--layout",
        choices=LAYOUTS,
        default="blocks",
        help="blocks: K equal datasets; census: K log-normal datasets with Census-like obs, cells sorted by "
        "(donor_id, cell_type) within each (give hundreds of datasets, e.g. --datasets 500)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chunk-cells", type=int, default=50_000, help="cells per write (bounds memory)")
    p.add_argument("--s3-endpoint-url", default=None)
    p.add_argument(
        "--s3-no-verify-tls", dest="s3_verify_tls", action="store_false", help="skip TLS certificate checks"
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        s = write_synthetic_atlas(
            args.atlas,
            n_cells=args.cells,
            n_genes=args.genes,
            n_datasets=args.datasets,
            seed=args.seed,
            chunk_cells=args.chunk_cells,
            layout=args.layout,
            s3_endpoint_url=args.s3_endpoint_url,
            s3_verify_tls=args.s3_verify_tls,
        )
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    peak = _peak_rss_bytes()
    print(
        f"{s['atlas_uri']}: {s['n_obs']} cells x {s['n_vars']} genes, {s['n_datasets']} datasets "
        f"({s['layout']} layout), nnz {s['nnz']}, "
        f"{s['wall_seconds']:.1f} s, peak RSS {peak / 2**30:.2f} GiB"
    )
    return 0


def _peak_rss_bytes() -> int:
    import resource

    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(kib) * (1 if sys.platform == "darwin" else 1024)


if __name__ == "__main__":
    sys.exit(main())
