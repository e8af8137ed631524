"""Input datasets for ingestion: open an .h5ad (backed) or wrap an AnnData, validate it, stream X in row chunks,
and the seeded, stratified train / val / test split of its cells.

Everything here is read-only: validation runs to the end before the atlas is touched. Every problem raises
`IngestError` naming the file (or AnnData), the column, gene or cell, and what is wrong.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import anndata
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp

from data_pipelines._atlas import FLOAT32_EXACT_MAX, GENERATED_SPLIT, INT32_MAX, SPLIT_COLUMN, SPLIT_VALUES

logger = logging.getLogger(__name__)

DEFAULT_SPLIT_FRACTIONS = (0.8, 0.1, 0.1)
"""train / val / test fractions of the cells whose split ingestion assigns."""
MIN_STRATUM_CELLS = 20
"""Label values with fewer cells than this in a dataset share one stratum (else they would stay in train)."""
_DENSE_CHUNK_VALUES = 20_000_000
"""Dense X is read in row chunks of at most this many values (80 MB of float32) to bound memory."""


class IngestError(ValueError):
    """Bad input for ingestion; the message names the file, the column / gene / cell and the problem."""


@dataclass
class Source:
    """One validated input dataset."""

    name: str
    adata: anndata.AnnData
    dataset_id: str
    feature_ids: np.ndarray
    feature_names: np.ndarray
    obs_ids: np.ndarray
    labels: dict[str, np.ndarray] = field(default_factory=dict)
    split: np.ndarray | None = None
    """train / val / test per cell: the input's values where it has them, then the assigned ones."""
    n_split_kept: int = 0
    """Cells whose split came from the input's obs['split']."""
    n_cells_per_gene: np.ndarray | None = None
    nnz: int = 0

    @property
    def n_obs(self) -> int:
        return int(self.adata.n_obs)

    def close(self) -> None:
        if self.adata.isbacked:
            self.adata.file.close()

    def iter_chunks(self, chunk_rows: int) -> Iterator[tuple[int, sp.csr_matrix]]:
        """Yield (first row, CSR chunk) over X; only one chunk is in memory at a time (backed mode)."""
        x = self.adata.X
        dense = isinstance(x, (np.ndarray, h5py.Dataset))
        step = (
            max(1, min(chunk_rows, _DENSE_CHUNK_VALUES // max(1, self.adata.n_vars))) if dense else chunk_rows
        )
        for start in range(0, self.n_obs, step):
            chunk = x[start : min(start + step, self.n_obs)]
            chunk = sp.csr_matrix(chunk) if not sp.issparse(chunk) else chunk.tocsr()
            chunk.sum_duplicates()
            yield start, chunk


def open_h5ad(path: str) -> anndata.AnnData:
    """Open `path` in backed mode, turning every failure into an IngestError naming the file."""
    if not os.path.isfile(path):
        raise IngestError(f"{path}: file not found")
    try:
        is_hdf5 = h5py.is_hdf5(path)
    except OSError as exc:
        raise IngestError(f"{path}: cannot read file: {exc}") from exc
    if not is_hdf5:
        raise IngestError(f"{path}: not an HDF5 file (expected an .h5ad written by anndata)")
    try:
        return anndata.read_h5ad(path, backed="r")
    except Exception as exc:  # anndata raises many types for corrupt or foreign HDF5 layouts
        raise IngestError(f"{path}: cannot read as AnnData (.h5ad): {type(exc).__name__}: {exc}") from exc


def _missing(values: pd.Series) -> np.ndarray:
    as_str = values.astype(object)
    return (values.isna() | (as_str.astype(str).str.strip() == "")).to_numpy()


def _gene_keys(name: str, adata: anndata.AnnData) -> tuple[np.ndarray, np.ndarray]:
    var = adata.var
    ids = (
        var["feature_id"]
        if "feature_id" in var.columns
        else pd.Series(adata.var_names, index=adata.var_names)
    )
    column = "var['feature_id']" if "feature_id" in var.columns else "var_names"
    empty = _missing(ids)
    if empty.any():
        i = int(np.flatnonzero(empty)[0])
        raise IngestError(f"{name}: {column} has {int(empty.sum())} empty gene id(s), first at var row {i}")
    ids = ids.astype(str)
    dup = ids.duplicated().to_numpy()
    if dup.any():
        first = ids.iloc[int(np.flatnonzero(dup)[0])]
        raise IngestError(f"{name}: {column} has {int(dup.sum())} duplicated gene id(s), first {first!r}")
    for candidate in ("feature_name", "gene_symbol"):
        if candidate in var.columns:
            names = var[candidate].astype(object).where(~_missing(var[candidate]), ids.to_numpy())
            return ids.to_numpy(dtype=object), names.astype(str).to_numpy(dtype=object)
    return ids.to_numpy(dtype=object), np.asarray(adata.var_names, dtype=object)


def _dataset_id(name: str, adata: anndata.AnnData, given: str | None, stem: str) -> str:
    if "dataset_id" in adata.obs.columns:
        col = adata.obs["dataset_id"]
        if _missing(col).any():
            raise IngestError(f"{name}: obs['dataset_id'] has missing values")
        values = pd.unique(col.astype(str))
        if len(values) != 1:
            raise IngestError(
                f"{name}: obs['dataset_id'] holds {len(values)} values ({', '.join(map(str, values[:5]))}); "
                "one file must be one dataset (datasets are stored contiguously)"
            )
        if given is not None and given != values[0]:
            logger.warning("%s: obs['dataset_id'] = %r takes precedence over %r", name, values[0], given)
        return str(values[0])
    return given if given is not None else stem


def _labels(
    name: str, adata: anndata.AnnData, label_columns: list[str], fill_values: dict[str, str]
) -> dict[str, np.ndarray]:
    labels: dict[str, np.ndarray] = {}
    obs_names = np.asarray(adata.obs_names)
    for col in label_columns:
        fill = fill_values.get(col)
        if col not in adata.obs.columns:
            if fill is None:
                raise IngestError(
                    f"{name}: label column {col!r} is missing from obs; pass a fill value (--fill {col}=VALUE)"
                )
            labels[col] = np.full(adata.n_obs, fill, dtype=object)
            continue
        values = adata.obs[col]
        missing = _missing(values)
        out = values.astype(object).astype(str).to_numpy(dtype=object)
        if missing.any():
            if fill is None:
                first = obs_names[int(np.flatnonzero(missing)[0])]
                raise IngestError(
                    f"{name}: label column {col!r} has {int(missing.sum())} missing value(s), first at cell "
                    f"{first!r}; pass a fill value (--fill {col}=VALUE)"
                )
            out[missing] = fill
        labels[col] = out
    return labels


def _first_bad(
    src: Source, cells: np.ndarray, chunk: sp.csr_matrix, start: int, bad: np.ndarray, what: str
) -> IngestError:
    k = int(np.flatnonzero(bad)[0])
    row = int(np.searchsorted(chunk.indptr, k, side="right") - 1)
    col = int(chunk.indices[k])
    gene = repr(src.feature_ids[col])
    if src.feature_names[col] != src.feature_ids[col]:
        gene += f" ({src.feature_names[col]})"
    return IngestError(
        f"{src.name}: X has {what}: value {chunk.data[k].item()!r} at cell {cells[start + row]!r} "
        f"(row {start + row}), gene {gene}; {int(bad.sum())} such value(s) in rows {start}-{start + chunk.shape[0] - 1}"
    )


def _check_counts(src: Source, chunk_rows: int) -> None:
    """Scan X chunk by chunk: finite, non-negative, integer, within int32; count cells per gene."""
    x = src.adata.X
    if x is None:
        raise IngestError(f"{src.name}: has no X matrix")
    dtype = np.dtype(x.dtype)
    if not (np.issubdtype(dtype, np.number) or dtype == np.bool_):
        raise IngestError(f"{src.name}: X has dtype {dtype}, expected numeric counts")
    n_cells = np.zeros(len(src.feature_ids), dtype=np.int64)
    nnz, warned = 0, False
    cells = np.asarray(src.adata.obs_names)
    for start, chunk in src.iter_chunks(chunk_rows):
        data = chunk.data
        if np.issubdtype(data.dtype, np.floating):
            checks = [
                (~np.isfinite(data), "NaN or Inf values"),
                (data < 0, "negative values"),
                (
                    data != np.floor(data),
                    "non-integer values (log-normalised data? ingest raw integer counts)",
                ),
                (data > INT32_MAX, f"counts beyond int32 (max {INT32_MAX})"),
            ]
        elif np.issubdtype(data.dtype, np.integer):
            checks = [
                (data < 0, "negative values"),
                (data > INT32_MAX, f"counts beyond int32 (max {INT32_MAX})"),
            ]
        else:
            checks = []
        for bad, what in checks:
            if bad.any():
                raise _first_bad(src, cells, chunk, start, bad, what)
        if not warned and data.size and data.max() > FLOAT32_EXACT_MAX:
            logger.warning("%s: counts above 2**24 are rounded by the float32 X layer", src.name)
            warned = True
        nonzero = data != 0
        nnz += int(nonzero.sum())
        n_cells += np.bincount(chunk.indices[nonzero], minlength=len(n_cells))
    src.n_cells_per_gene, src.nnz = n_cells, nnz


def validate_source(
    name: str,
    adata: anndata.AnnData,
    *,
    dataset_id: str | None,
    stem: str,
    label_columns: list[str],
    fill_values: dict[str, str],
    chunk_rows: int,
) -> Source:
    """Check one dataset end to end (ids, labels, every count) and return it ready to write."""
    if adata.n_obs == 0:
        raise IngestError(f"{name}: has zero cells")
    if adata.n_vars == 0:
        raise IngestError(f"{name}: has zero genes")
    cells = pd.Index(adata.obs_names)
    if cells.has_duplicates:
        dup = cells[cells.duplicated()]
        raise IngestError(f"{name}: obs_names has {len(dup)} duplicated cell id(s), first {dup[0]!r}")
    feature_ids, feature_names = _gene_keys(name, adata)
    src = Source(
        name=name,
        adata=adata,
        dataset_id=_dataset_id(name, adata, dataset_id, stem),
        feature_ids=feature_ids,
        feature_names=feature_names,
        obs_ids=np.asarray(cells, dtype=object),
        labels=_labels(name, adata, label_columns, fill_values),
        split=input_split(name, adata),
    )
    _check_counts(src, chunk_rows)
    return src


def default_label_columns(adatas: list[anndata.AnnData]) -> list[str]:
    """The categorical / string obs columns (except dataset_id and split) that every input has, in first-seen
    order. A column only some inputs have is left out (logged): it would need a fill value for the others."""
    per_input: list[list[str]] = []
    for adata in adatas:
        cols = []
        for col, dtype in adata.obs.dtypes.items():
            is_text = isinstance(dtype, pd.CategoricalDtype) or pd.api.types.is_string_dtype(dtype)
            if is_text and col not in ("dataset_id", "obs_id", SPLIT_COLUMN):
                cols.append(str(col))
        per_input.append(cols)
    seen = list(dict.fromkeys(c for cols in per_input for c in cols))
    common = [c for c in seen if all(c in cols for cols in per_input)]
    partial = [c for c in seen if c not in common]
    if partial:
        logger.info(
            "obs column(s) %s are not in every input: not stored as labels (keep them with --label-column COL "
            "--fill COL=VALUE)",
            partial,
        )
    return common


# ---- train / val / test split ---------------------------------------------------------------------------


def input_split(name: str, adata: anndata.AnnData) -> np.ndarray | None:
    """The input's own obs['split'] (None where missing), or None without the column; bad values raise."""
    if SPLIT_COLUMN not in adata.obs.columns:
        return None
    values = adata.obs[SPLIT_COLUMN]
    missing = _missing(values)
    out = values.astype(object).astype(str).to_numpy(dtype=object)
    bad = ~missing & ~np.isin(out, (*SPLIT_VALUES, GENERATED_SPLIT))
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise IngestError(
            f"{name}: obs[{SPLIT_COLUMN!r}] must be one of {', '.join(SPLIT_VALUES)} (or missing, then assigned; "
            f"{GENERATED_SPLIT!r} marks generated cells), "
            f"got {out[first]!r} at cell {adata.obs_names[first]!r} ({int(bad.sum())} such cell(s))"
        )
    out[missing] = None
    return out


def check_split_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    """Three non-negative train / val / test fractions summing to 1, as a tuple."""
    fr = tuple(float(f) for f in fractions)
    if len(fr) != 3 or any(not np.isfinite(f) or f < 0 for f in fr) or abs(sum(fr) - 1.0) > 1e-6:
        raise IngestError(
            f"split fractions must be three numbers >= 0 (train, val, test) summing to 1, got {list(fractions)}"
        )
    return fr  # type: ignore[return-value]


def stratified_split(
    strata: pd.DataFrame, seed: int = 0, fractions: Sequence[float] = DEFAULT_SPLIT_FRACTIONS
) -> np.ndarray:
    """Assign train / val / test within each stratum (row group of `strata`), by `fractions` (train, val, test).

    Each stratum is shuffled with one generator seeded by `seed` (strata visited in sorted order), so the
    split is a pure function of the table, the seed and the fractions. A stratum of n cells gets
    round(val n) val and round(test n) test cells (Python rounding, half to even), the rest train; with the
    default 0.1 / 0.1, strata of at most 5 cells stay in train.
    """
    _, f_val, f_test = check_split_fractions(fractions)
    rng = np.random.default_rng(seed)
    split = np.empty(len(strata), dtype=object)
    keys = (
        strata.astype(str).agg("\x1f".join, axis=1) if strata.shape[1] else pd.Series("", index=strata.index)
    )
    for _, idx in sorted(pd.Series(np.arange(len(strata))).groupby(keys.to_numpy()).groups.items()):
        order = rng.permutation(np.asarray(idx))
        n_val = round(f_val * len(order))
        n_test = min(round(f_test * len(order)), len(order) - n_val)
        split[order[:n_val]] = "val"
        split[order[n_val : n_val + n_test]] = "test"
        split[order[n_val + n_test :]] = "train"
    return split


def assign_split(src: Source, stratify_by: str | None, *, seed: int, fractions: Sequence[float]) -> None:
    """Fill the cells of `src` without a split: stratified by its first label column (`stratify_by`).

    The input's own values are kept. Label values with fewer than `MIN_STRATUM_CELLS` cells among the cells
    to assign share one stratum. A dataset's split depends only on its own cells, labels, seed and fractions
    (not on what is ingested with it).
    """
    split = src.split if src.split is not None else np.full(src.n_obs, None, dtype=object)
    todo = np.flatnonzero(pd.isna(split))
    src.n_split_kept = src.n_obs - len(todo)
    if len(todo):
        strata = pd.DataFrame(index=np.arange(len(todo)))
        if stratify_by is not None:
            values = pd.Series(src.labels[stratify_by][todo], dtype=object)
            counts = values.map(values.value_counts())
            strata[stratify_by] = values.where(counts >= MIN_STRATUM_CELLS, "\x00pooled")
        split[todo] = stratified_split(strata, seed=seed, fractions=fractions)
    src.split = split
