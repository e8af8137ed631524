"""The Census-like layout of the synthetic atlas (`synthetic_atlas.py --layout census`): the plan and obs.

Shaped like CELLxGENE Census:
  * K datasets of log-normal sizes (`lognormal_sizes`: sigma 1.5, each >= 1 cell, summing exactly to N),
    stored one after another in joinid order;
  * a global vocabulary of 200 cell types (`CELL_TYPES`); type t draws its counts from brain10k cluster
    t mod 10 with the mean times a per-(type, gene) factor exp(N(0, 0.2^2)) (`type_gene_factors`), so types
    differ. Each dataset uses 5 to 30 types (chosen with log-normal popularity: some types are in many
    datasets) in Dirichlet(0.7) proportions, and has a batch effect exp(N(0, 0.1^2)) per gene;
  * per dataset 1 to 20 donors ("<dataset_id>_d00", ...; Dirichlet(2) proportions), one assay (`ASSAYS`), one
    tissue (`TISSUES`), is_primary_data False for ~15 % of datasets;
  * WITHIN each dataset the cells are stored sorted by (donor_id, cell_type): contiguous runs of cells are
    homogeneous, which is what makes mixing hard for a loader that reads contiguous ranges.

Everything but the per-cell draws is planned first, from one generator (`plan_datasets`): the sizes, and per
dataset its labels and the number of cells of every (donor, cell type) pair (multinomial). Cells are then
emitted in storage order, chunk by chunk (`write_census`, `pieces`, `CensusDataset.labels`, `census_obs`), so
memory is bounded by the chunk, not by the atlas, and a dataset larger than a chunk keeps its order across
chunks; the plan does not depend on the chunk size.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import scipy.sparse as sp

__all__ = [
    "CENSUS_LABEL_COLUMNS",
    "CENSUS_OBS_COLUMNS",
    "ASSAYS",
    "CELL_TYPES",
    "SPLITS",
    "SPLIT_P",
    "TISSUES",
    "CensusDataset",
    "census_obs",
    "dataset_entry",
    "lognormal_sizes",
    "obs_ids",
    "pieces",
    "plan_datasets",
    "type_gene_factors",
    "write_census",
]

CENSUS_OBS_COLUMNS = tuple(
    "obs_id dataset_id cell_type donor_id assay tissue is_primary_data split nnz".split()
)
"""obs columns of the census layout, in schema order (nnz is added by the chunk writer)."""
CENSUS_LABEL_COLUMNS = ("cell_type", "donor_id", "assay", "tissue", "is_primary_data", "split")
"""The atlas metadata's label columns."""
CELL_TYPES = np.array([f"type_{t:03d}" for t in range(200)], dtype=object)
"""The global cell-type vocabulary (zero-padded: name order is number order)."""
ASSAYS = ("10x 3' v2", "10x 3' v3", "10x 5' v1", "Smart-seq2")
_ASSAY_P = (0.3, 0.45, 0.15, 0.1)
TISSUES = (
    "blood",
    "bone marrow",
    "brain",
    "breast",
    "eye",
    "heart",
    "intestine",
    "kidney",
    "liver",
    "lung",
    "lymph node",
    "pancreas",
    "skeletal muscle",
    "skin",
    "spleen",
)
SIZE_SIGMA = 1.5
"""sd of log dataset size."""
TYPES_PER_DATASET = (5, 30)
MAX_DONORS = 20
NON_PRIMARY_FRACTION = 0.15
TYPE_GENE_SD = 0.2
"""sd of the per-(cell type, gene) log-normal factor on the mean of the type's brain10k cluster."""
_STRING = pa.large_string()
_DONOR_SUFFIXES = pa.array([f"_d{k:02d}" for k in range(MAX_DONORS)], _STRING)
SPLITS = pa.array(["train", "val", "test"], _STRING)
SPLIT_P = (0.8, 0.1, 0.1)
"""Splits, drawn per cell (both layouts)."""


def lognormal_sizes(n_cells: int, n_datasets: int, rng: np.random.Generator) -> np.ndarray:
    """Dataset sizes: 1 cell each plus the rest shared by log-normal weights (largest remainder, exact sum).

    Returns:
        int64 array (n_datasets,), every entry >= 1, summing to `n_cells` (needs n_cells >= n_datasets).
    """
    weights = rng.lognormal(0.0, SIZE_SIGMA, size=n_datasets)
    exact = (n_cells - n_datasets) * weights / weights.sum()
    sizes = np.floor(exact).astype(np.int64)
    rest = n_cells - n_datasets - int(sizes.sum())
    sizes[np.argsort(sizes - exact, kind="stable")[:rest]] += 1
    return sizes + 1


def type_gene_factors(rng: np.random.Generator, n_genes: int) -> np.ndarray:
    """exp(N(0, TYPE_GENE_SD^2)) per (cell type, gene), (len(CELL_TYPES), n_genes)."""
    return np.exp(rng.normal(0.0, TYPE_GENE_SD, size=(len(CELL_TYPES), n_genes)))


@dataclass(frozen=True)
class CensusDataset:
    """One dataset of the plan: its labels and its cells as runs of one (donor, cell type), in storage order."""

    index: int
    dataset_id: str
    start: int
    """soma_joinid of its first cell."""
    n_cells: int
    assay: int
    """Index into ASSAYS."""
    tissue: int
    """Index into TISSUES."""
    is_primary_data: bool
    cell_types: np.ndarray
    """Global cell-type ids used, in name order, (k,)."""
    n_donors: int
    run_donor: np.ndarray
    """Donor number (0 .. n_donors - 1) of each run, (R,)."""
    run_type: np.ndarray
    """Index into `cell_types` of each run, (R,)."""
    run_stop: np.ndarray
    """Dataset-local end (exclusive) of each run, (R,); the last is n_cells."""
    batch_seed: int
    """Seed of the dataset's batch effect (drawn when its first cell is sampled)."""

    @property
    def stop(self) -> int:
        return self.start + self.n_cells

    def labels(self, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
        """(donor number, index into `cell_types`) of the dataset-local cells lo .. hi - 1."""
        run = np.searchsorted(self.run_stop, np.arange(lo, hi), side="right")
        return self.run_donor[run], self.run_type[run]

    def summary(self, n_genes: int) -> dict:
        """The dataset's entry in the atlas metadata: `dataset_entry` and its labels."""
        return dataset_entry(
            self.dataset_id,
            self.start,
            self.n_cells,
            n_genes,
            assay=ASSAYS[self.assay],
            tissue=TISSUES[self.tissue],
            is_primary_data=self.is_primary_data,
            n_donors=self.n_donors,
            n_cell_types=len(self.cell_types),
        )


def dataset_entry(dataset_id: str, start: int, n_cells: int, n_genes: int, **labels) -> dict:
    """A dataset's entry in the atlas metadata (`META_DATASETS`), for both layouts."""
    return {
        "dataset_id": dataset_id,
        "source": "synthetic",
        "n_cells": n_cells,
        "n_genes": n_genes,
        "obs_joinid_start": start,
        "obs_joinid_stop": start + n_cells,
        **labels,
    }


def _plan_one(
    index: int, dataset_id: str, start: int, n: int, popularity: np.ndarray, rng: np.random.Generator
) -> CensusDataset:
    """Labels of one dataset and its (donor, cell type) cell counts, multinomial on donor x type proportions."""
    k = int(rng.integers(TYPES_PER_DATASET[0], TYPES_PER_DATASET[1] + 1))
    types = rng.choice(len(CELL_TYPES), size=k, replace=False, p=popularity)
    types = types[np.argsort(CELL_TYPES[types].astype(str), kind="stable")]
    n_donors = int(rng.integers(1, MAX_DONORS + 1))
    p = np.outer(rng.dirichlet(np.full(n_donors, 2.0)), rng.dirichlet(np.full(k, 0.7))).ravel()
    counts = rng.multinomial(n, p / p.sum())
    runs = np.flatnonzero(counts)  # donor-major: sorted by (donor id, cell type name)
    return CensusDataset(
        index=index,
        dataset_id=dataset_id,
        start=start,
        n_cells=n,
        assay=int(rng.choice(len(ASSAYS), p=_ASSAY_P)),
        tissue=int(rng.integers(len(TISSUES))),
        is_primary_data=bool(rng.random() >= NON_PRIMARY_FRACTION),
        cell_types=types,
        n_donors=n_donors,
        run_donor=runs // k,
        run_type=runs % k,
        run_stop=np.cumsum(counts[runs]),
        batch_seed=int(rng.integers(2**63)),
    )


def plan_datasets(n_cells: int, dataset_ids: list[str], rng: np.random.Generator) -> list[CensusDataset]:
    """Sizes (`lognormal_sizes`) and labels of every dataset, stored one after another in this order."""
    sizes = lognormal_sizes(n_cells, len(dataset_ids), rng)
    popularity = rng.lognormal(0.0, 1.0, size=len(CELL_TYPES))
    popularity /= popularity.sum()
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    return [
        _plan_one(d, ds, int(s), int(n), popularity, rng)
        for d, (ds, s, n) in enumerate(zip(dataset_ids, starts, sizes))
    ]


def pieces(datasets: list[CensusDataset], start: int, stop: int) -> Iterator[tuple[CensusDataset, int, int]]:
    """(dataset, local lo, local hi) of every dataset overlapping the joinids start .. stop - 1, in order."""
    starts = np.fromiter((ds.start for ds in datasets), dtype=np.int64, count=len(datasets))
    d = int(np.searchsorted(starts, start, side="right")) - 1
    while d < len(datasets) and datasets[d].start < stop:
        ds = datasets[d]
        yield ds, max(start, ds.start) - ds.start, min(stop, ds.stop) - ds.start
        d += 1


def obs_ids(dataset_ids: pa.Array, local: np.ndarray) -> pa.Array:
    """f"{dataset_id}_c{local:09d}" per cell, built by Arrow kernels (no per-cell Python)."""
    number = pc.utf8_lpad(pc.cast(pa.array(local, pa.int64()), _STRING), width=9, padding="0")
    return pc.binary_join_element_wise(
        dataset_ids.cast(_STRING), pa.scalar("_c", _STRING), number, pa.scalar("", _STRING)
    )


def _vocab(values) -> pa.Array:
    return pa.array([str(v) for v in values], _STRING)


def census_obs(
    datasets: list[CensusDataset],
    dataset: np.ndarray,
    local: np.ndarray,
    donor: np.ndarray,
    cell_type: np.ndarray,
    split: pa.Array,
) -> dict[str, pa.Array]:
    """obs columns (but nnz) of a chunk, from per-cell dataset index, dataset-local position, donor number and
    global cell-type id; string columns are dictionary lookups (`take`), not per-cell Python."""
    span = datasets[dataset[0] : dataset[-1] + 1]  # the datasets of the chunk
    rel = dataset - dataset[0]
    dataset_col = _vocab(ds.dataset_id for ds in span).take(pa.array(rel))
    assay = np.array([ds.assay for ds in span])[rel]
    tissue = np.array([ds.tissue for ds in span])[rel]
    primary = np.array([ds.is_primary_data for ds in span], dtype=bool)[rel]
    donor_col = pc.binary_join_element_wise(
        dataset_col, _DONOR_SUFFIXES.take(pa.array(donor)), pa.scalar("", _STRING)
    )
    return {
        "obs_id": obs_ids(dataset_col, local),
        "dataset_id": dataset_col,
        "cell_type": _vocab(CELL_TYPES).take(pa.array(cell_type)),
        "donor_id": donor_col,
        "assay": _vocab(ASSAYS).take(pa.array(assay)),
        "tissue": _vocab(TISSUES).take(pa.array(tissue)),
        "is_primary_data": pa.array(primary, pa.bool_()),
        "split": split,
    }


def _params(
    ds: CensusDataset, mu: np.ndarray, theta: np.ndarray, factors: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(mu, theta) rows of the dataset's cell types: cluster t mod K times the type's gene factors, and the
    dataset's batch effect exp(N(0, 0.1^2)) per gene (seeded by the dataset: the same in each of its chunks)."""
    cluster = ds.cell_types % mu.shape[0]
    batch = np.exp(np.random.default_rng(ds.batch_seed).normal(0.0, 0.1, size=mu.shape[1]))
    return mu[cluster] * factors[ds.cell_types] * batch, theta[cluster]


def write_census(
    write: Callable[[int, dict[str, pa.Array], sp.csr_matrix], None],
    rng: np.random.Generator,
    sample_counts: Callable[..., sp.csr_matrix],
    size_factors: np.ndarray,
    mu: np.ndarray,
    theta: np.ndarray,
    factors: np.ndarray,
    plan: list[CensusDataset],
    chunk_cells: int,
) -> None:
    """Draw and write the planned cells in storage order, `chunk_cells` at a time.

    Parameters
    ----------
    write
        `write(first_joinid, obs_columns, counts)`: writes one chunk (the synthetic atlas's chunk writer).
    rng
        Generator of the per-cell draws (size factors, counts, splits).
    sample_counts
        `sample_counts(rng, type_index, size, mu, theta) -> csr counts`, the NB sampler.
    size_factors
        Empirical size factors to resample.
    mu, theta
        Per-cluster NB parameters, (K, G).
    factors
        `type_gene_factors`, (len(CELL_TYPES), G).
    plan
        `plan_datasets`.
    chunk_cells
        Cells per write. A chunk may hold the end of one dataset and the start of the next ones: one write
        per chunk, not per dataset (hundreds of datasets would otherwise be hundreds of small fragments).
    """
    n_cells = plan[-1].stop
    for start in range(0, n_cells, chunk_cells):
        parts = []
        for ds, lo, hi in pieces(plan, start, min(n_cells, start + chunk_cells)):
            donor, t = ds.labels(lo, hi)
            mu_d, theta_d = _params(ds, mu, theta, factors)
            size = rng.choice(size_factors, size=hi - lo)
            counts = sample_counts(rng, t, size, mu_d, theta_d)
            split = rng.choice(len(SPLITS), size=hi - lo, p=SPLIT_P)
            parts.append(
                (np.full(hi - lo, ds.index), np.arange(lo, hi), donor, ds.cell_types[t], split, counts)
            )
        dataset, local, donor, cell_type, split = (np.concatenate(c) for c in list(zip(*parts))[:5])
        obs = census_obs(plan, dataset, local, donor, cell_type, SPLITS.take(pa.array(split)))
        write(start, obs, sp.vstack([p[5] for p in parts], format="csr"))
