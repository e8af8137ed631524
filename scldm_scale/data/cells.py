"""Select the cells of a loader from obs in bounded memory: the `CellIndex`, per-chunk nnz, label vocabularies.

obs is read one joinid slice of `OBS_SLICE_CELLS` at a time (`iter_obs`), so no step holds a full-atlas column:
not the joinids, not the labels (batches read their labels with their X rows), not an Arrow table of obs.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import tiledbsoma

from scldm_scale.data.index import CellIndex, IndexBuilder
from scldm_scale.data.reader import release_arrow_memory
from scldm_scale.data.vocab import LabelVocab

logger = logging.getLogger(__name__)

OBS_SLICE_CELLS = 1 << 17
"""obs rows (joinids) per read while selecting cells: bounds the build's temporaries. Arrow's allocator keeps
what the largest slice took, so slices of 2^20 rows left a 10^6-cell build 16 MB above a 10^5-cell one; at 2^17
the two are within 1 MB (benchmarks/scale_bench.py, index-only)."""
NNZ_COLUMN = "nnz"
"""obs column with each cell's stored non-zeros (CELLxGENE Census has it; our ingest and generator write it)."""
NNZ_SAMPLE_CHUNKS = 64
"""Without an nnz column: chunks, spread evenly over the selection, whose first cells are read to measure nnz."""
NNZ_SAMPLE_CELLS = 32
"""Cells read at the start of each sampled chunk."""


def iter_obs(exp: tiledbsoma.Experiment, value_filter: str | None, columns: list[str]) -> Iterator[pa.Table]:
    """obs rows matching `value_filter`, `columns` (soma_joinid first), ascending joinid, one slice at a time."""
    domain = exp.obs.non_empty_domain()
    if not domain or domain[0] is None:
        return
    lo, hi = (int(v) for v in domain[0])
    names = ["soma_joinid", *[c for c in columns if c != "soma_joinid"]]
    for start in range(lo, hi + 1, OBS_SLICE_CELLS):
        stop = min(hi, start + OBS_SLICE_CELLS - 1)
        table = exp.obs.read(
            coords=(slice(start, stop),), value_filter=value_filter, column_names=names
        ).concat()
        if not table.num_rows:
            continue
        joinids = table.column("soma_joinid").to_numpy()
        if len(joinids) > 1 and np.any(joinids[1:] < joinids[:-1]):
            table = table.take(np.argsort(joinids, kind="stable"))
        yield table


@dataclass
class CellSelection:
    """What `select_cells` found."""

    index: CellIndex
    chunk_nnz: np.ndarray
    """float32 (num chunks,): mean stored non-zeros per cell of each chunk of `chunk_cells` positions."""
    nnz_source: str
    """Where chunk_nnz came from: the obs nnz column, or a sample of cells spread over the selection."""
    label_vocabs: dict[str, LabelVocab]
    unknown_labels: dict[str, int] = field(default_factory=dict)
    """Selected cells per label column whose value is null or outside its vocabulary (label id 0)."""


def select_cells(
    exp: tiledbsoma.Experiment,
    X: tiledbsoma.SparseNDArray,
    value_filter: str | None,
    *,
    label_columns: list[str],
    chunk_cells: int,
    label_vocabs: dict[str, LabelVocab] | None = None,
) -> CellSelection:
    """One pass over obs: the index of the matching cells, their nnz per chunk, and the label vocabularies
    (from the matching cells' values when `label_vocabs` is None, else those given, with unknowns counted)."""
    has_nnz = NNZ_COLUMN in exp.obs.schema.names and pa.types.is_integer(
        exp.obs.schema.field(NNZ_COLUMN).type
    )
    builder = IndexBuilder()
    nnz_sums: list[np.ndarray] = []
    seen: dict[str, set] = {c: set() for c in label_columns}
    unknown = dict.fromkeys(label_columns, 0)
    n = 0
    for table in iter_obs(exp, value_filter, [*label_columns, *([NNZ_COLUMN] if has_nnz else [])]):
        builder.add(table.column("soma_joinid").to_numpy())
        if has_nnz:
            _add_chunk_sums(nnz_sums, n, table.column(NNZ_COLUMN).to_numpy(zero_copy_only=False), chunk_cells)
        for c in label_columns:
            if label_vocabs is None:
                seen[c] |= LabelVocab.distinct(table.column(c))
                unknown[c] += table.column(c).null_count
            else:
                unknown[c] += label_vocabs[c].encode(table.column(c))[1]
        n += table.num_rows
    index = builder.finish()
    release_arrow_memory()
    if label_vocabs is None:
        label_vocabs = {c: LabelVocab(c, sorted(seen[c])) for c in label_columns}
    else:
        label_vocabs = {c: label_vocabs[c] for c in label_columns}
    n_chunks = -(-n // chunk_cells)
    if has_nnz:
        sums = np.concatenate(nnz_sums) if nnz_sums else np.zeros(0)
        sizes = np.minimum(chunk_cells, n - np.arange(n_chunks) * chunk_cells)
        chunk_nnz, source = (
            (sums[:n_chunks] / np.maximum(sizes, 1)).astype(np.float32),
            f"obs column {NNZ_COLUMN!r}",
        )
    else:
        chunk_nnz, source = _sampled_nnz(X, index, n_chunks, chunk_cells)
    return CellSelection(index, chunk_nnz, source, label_vocabs, unknown)


def _add_chunk_sums(sums: list[np.ndarray], first: int, nnz: np.ndarray, chunk_cells: int) -> None:
    """Add per-chunk sums of the cells at positions first, first + 1, ... (chunks may span obs slices)."""
    chunk = (first + np.arange(len(nnz))) // chunk_cells
    c0 = int(chunk[0]) if len(chunk) else 0
    part = np.bincount(chunk - c0, weights=nnz.astype(np.float64))
    have = sum(len(s) for s in sums)
    if have > c0:  # the first chunk continues the last one of the previous slice
        sums[-1][-1] += part[0]
        part = part[1:]
    sums.append(part)


def _sampled_nnz(X: tiledbsoma.SparseNDArray, index: CellIndex, n_chunks: int, chunk_cells: int):
    """Every chunk gets the highest mean nnz of NNZ_SAMPLE_CELLS cells in each of NNZ_SAMPLE_CHUNKS chunks
    spread over the selection (conservative: the memory budget holds for the densest part seen)."""
    if n_chunks == 0:
        return np.zeros(0, np.float32), "no cells"
    chunks = np.unique(np.linspace(0, n_chunks - 1, min(n_chunks, NNZ_SAMPLE_CHUNKS)).astype(np.int64))
    pos = (chunks[:, None] * chunk_cells + np.arange(NNZ_SAMPLE_CELLS)[None, :]).ravel()
    pos = pos[pos < len(index)]  # ascending, so their joinids are too
    joinids = index.joinids(pos)
    d0 = X.read(coords=(joinids,)).tables().concat().column("soma_dim_0").to_numpy()
    per_cell = np.bincount(np.searchsorted(joinids, d0), minlength=len(joinids))
    owner = np.searchsorted(chunks, pos // chunk_cells)
    means = np.bincount(owner, weights=per_cell) / np.maximum(np.bincount(owner), 1)
    densest = max(float(means.max()), 1.0)
    source = f"the densest of {len(chunks)} sampled chunks ({len(joinids)} cells; obs has no {NNZ_COLUMN!r} column)"
    return np.full(n_chunks, densest, np.float32), source
