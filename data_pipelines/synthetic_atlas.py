"""Synthetic SOMA atlas for benchmarks and tests: per-cluster negative-binomial counts fitted on brain10k.

`python -m data_pipelines.synthetic_atlas --atlas PATH --cells N --genes G --datasets K` writes N cells in K
datasets stored one after another (as Census stores them), streaming chunks straight into SOMA.

Model (fitted once per process from `demo_data/brain10k.h5ad`, 10 Leiden clusters c0..c9):
  * size factor s_c = library size / mean library size of the cell's cluster (cells with zero counts are
    left out of the fit); synthetic cells draw s_c from the empirical distribution;
  * per cluster k and gene g, method-of-moments NB on size-normalised counts x / s_c: mean mu_kg and inverse
    dispersion theta_kg = mu^2 / (var - mu), clipped to [0.01, 1000] (1000, near-Poisson, when var <= mu);
  * counts ~ Poisson(Gamma(shape=theta_kg, scale=s_c * mu_kg * b_dg / theta_kg)) (the NB as a gamma-Poisson).
Genes: synthetic gene j < 1000 uses brain10k gene j (so G < 1000 keeps the first G genes, in annotation
order); for j >= 1000 the parameters of a brain10k gene drawn uniformly with replacement are reused, with the
mean scaled by one log-normal factor exp(N(0, 0.25^2)) per new gene (shared by all clusters, so the cluster
structure is kept). Dataset d has its own cluster proportions ~ Dirichlet(50 * p) and a mild batch effect
b_dg = exp(N(0, 0.1^2)). Splits are drawn per cell, 80 / 10 / 10. Everything is a function of `seed`.
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
import scipy.sparse as sp
import tiledbsoma
from tqdm.auto import tqdm

from data_pipelines._atlas import (
    META_DATASETS,
    META_LABEL_COLUMNS,
    atlas_exists,
    create_atlas,
    soma_context,
    write_obs,
    write_var,
    write_x,
)
from data_pipelines._commit import CommitInfo, commit, next_timestamp
from data_pipelines._staging import staged_atlas

logger = logging.getLogger(__name__)

__all__ = ["NBModel", "fit_brain10k_model", "main", "write_synthetic_atlas"]

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


_OBS_COLUMNS = ("obs_id", "dataset_id", "cell_type", "split")
_SPLITS = np.array(["train", "val", "test"], dtype=object)


def _sample_chunk(
    rng: np.random.Generator, model: NBModel, props: np.ndarray, mu: np.ndarray, theta: np.ndarray, n: int
) -> tuple[dict[str, np.ndarray], sp.csr_matrix]:
    """Cell types, size factors, counts (in blocks of <= _BLOCK_VALUES values) and splits of `n` new cells."""
    cell_type = rng.choice(len(props), size=n, p=props)
    size = rng.choice(model.size_factors, size=n)
    block = max(1, _BLOCK_VALUES // mu.shape[1])
    counts = sp.vstack(
        [
            _sample_block(rng, cell_type[i : i + block], size[i : i + block], mu, theta)
            for i in range(0, n, block)
        ],
        format="csr",
    )
    split = rng.choice(_SPLITS, size=n, p=[0.8, 0.1, 0.1])
    return {"cell_type": model.clusters[cell_type].astype(object), "split": split}, counts


def _dataset_sizes(n_cells: int, n_datasets: int) -> list[int]:
    return [len(a) for a in np.array_split(np.arange(n_cells), n_datasets)]


def write_synthetic_atlas(
    uri: str,
    *,
    n_cells: int,
    n_genes: int,
    n_datasets: int,
    seed: int = 0,
    chunk_cells: int = 50_000,
    s3_endpoint_url: str | None = None,
    s3_verify_tls: bool = True,
) -> dict:
    """Write a synthetic atlas of `n_cells` x `n_genes` in `n_datasets` contiguous datasets (ds00, ds01, ...).

    obs: obs_id, dataset_id, cell_type (the brain10k cluster), split; var: feature_id (SYNG000000, ...),
    feature_name (the source brain10k symbol), n_cells. One committed write (`_commit.py`): an interrupted
    one is never read; local paths are in addition staged and published atomically.

    Returns:
        A summary with the sizes, nnz, the seed and the wall time in seconds.

    Raises:
        ValueError: bad sizes, or an atlas already exists at `uri`.
    """
    if n_cells < 1 or n_genes < 1 or not 1 <= n_datasets <= n_cells or chunk_cells < 1:
        raise ValueError(
            f"need cells >= datasets >= 1, genes >= 1, chunk_cells >= 1; got cells={n_cells}, genes={n_genes}, "
            f"datasets={n_datasets}, chunk_cells={chunk_cells}"
        )
    ctx = soma_context(uri, s3_endpoint_url, s3_verify_tls)
    if atlas_exists(uri, ctx):
        raise ValueError(f"{uri}: an atlas already exists; remove it first")
    t0 = time.perf_counter()
    model = fit_brain10k_model()
    rng = np.random.default_rng(seed)
    mu, theta, names = _gene_params(model, n_genes, rng)
    sizes = _dataset_sizes(n_cells, n_datasets)
    width = max(2, len(str(n_datasets - 1)))
    dataset_ids = [f"ds{d:0{width}d}" for d in range(n_datasets)]
    n_cells_per_gene = np.zeros(n_genes, dtype=np.int64)
    datasets, nnz, offset = [], 0, 0
    with staged_atlas(uri) as target:
        timestamp = next_timestamp(CommitInfo())
        create_atlas(
            target,
            ctx,
            obs_columns=list(_OBS_COLUMNS),
            n_obs=n_cells,
            n_vars=n_genes,
            timestamp=timestamp,
        )
        with (
            tiledbsoma.Experiment.open(target, "w", context=ctx, tiledb_timestamp=timestamp) as exp,
            tqdm(total=n_cells, unit="cells", desc="synthetic atlas", file=sys.stderr, disable=None) as bar,
        ):
            for dataset_id, n in zip(dataset_ids, sizes):
                props = rng.dirichlet(50.0 * model.proportions)
                mu_d = mu * np.exp(rng.normal(0.0, 0.1, size=n_genes))
                for start in range(0, n, chunk_cells):
                    m = min(chunk_cells, n - start)
                    obs, chunk = _sample_chunk(rng, model, props, mu_d, theta, m)
                    obs["obs_id"] = np.array(
                        [f"{dataset_id}_c{i:09d}" for i in range(start, start + m)], dtype=object
                    )
                    obs["dataset_id"] = np.full(m, dataset_id, dtype=object)
                    first = offset + start
                    write_obs(exp, first, {c: obs[c] for c in _OBS_COLUMNS})
                    coo = chunk.tocoo()
                    write_x(exp, coo.row.astype(np.int64) + first, coo.col, coo.data)
                    n_cells_per_gene += np.bincount(coo.col, minlength=n_genes)
                    nnz += coo.nnz
                    bar.update(m)
                datasets.append(
                    {
                        "dataset_id": dataset_id,
                        "source": "synthetic",
                        "n_cells": n,
                        "n_genes": n_genes,
                        "obs_joinid_start": offset,
                        "obs_joinid_stop": offset + n,
                    }
                )
                offset += n
            var = pd.DataFrame(
                {
                    "feature_id": [f"SYNG{j:06d}" for j in range(n_genes)],
                    "feature_name": names,
                    "n_cells": n_cells_per_gene,
                }
            )
            write_var(exp, var)
        metadata = {
            META_DATASETS: json.dumps(datasets),
            META_LABEL_COLUMNS: json.dumps(["cell_type", "split"]),
            "synthetic_seed": seed,
            "synthetic_model": "per-cluster negative binomial fitted on brain10k",
        }
        commit(target, ctx, timestamp, metadata)
    wall = time.perf_counter() - t0
    logger.info(
        "wrote %s: %d cells x %d genes in %d datasets, nnz %d, %.1f s",
        uri,
        n_cells,
        n_genes,
        n_datasets,
        nnz,
        wall,
    )
    return {
        "atlas_uri": uri,
        "n_obs": n_cells,
        "n_vars": n_genes,
        "n_datasets": n_datasets,
        "nnz": nnz,
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
            s3_endpoint_url=args.s3_endpoint_url,
            s3_verify_tls=args.s3_verify_tls,
        )
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    peak = _peak_rss_bytes()
    print(
        f"{s['atlas_uri']}: {s['n_obs']} cells x {s['n_vars']} genes, {s['n_datasets']} datasets, nnz {s['nnz']}, "
        f"{s['wall_seconds']:.1f} s, peak RSS {peak / 2**30:.2f} GiB"
    )
    return 0


def _peak_rss_bytes() -> int:
    import resource

    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(kib) * (1 if sys.platform == "darwin" else 1024)


if __name__ == "__main__":
    sys.exit(main())
