"""Read cells of X into a token CSR block: contiguous chunk reads, vectorised decode, no dense matrix.

Owns the SOMA X reads of the loader. It does not decide which cells (see `order.py`) or batch them
(see `collate.py`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tiledbsoma

BYTES_PER_NNZ = 24
"""Decoded bytes per non-zero while a block is built (int32 token + float32 count, concatenation copies,
the arrow read of one chunk in flight); used to size blocks against `data.memory_budget_mb`."""
SLICE_SPAN_FACTOR = 4
"""Read a chunk's cells with one slice when their joinid span is at most this many times their count."""


@dataclass
class CellBlock:
    """Cells in ascending soma_joinid order, as CSR over vocabulary tokens."""

    joinids: np.ndarray  # int64 (n,)
    indptr: np.ndarray  # int64 (n + 1,)
    tokens: np.ndarray  # int32 (nnz,), 1..num_genes
    counts: np.ndarray  # float32 (nnz,)
    library_size: np.ndarray  # float32 (n,), over vocabulary genes

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.joinids, self.indptr, self.tokens, self.counts, self.library_size))


def _decode(table, row_joinids: np.ndarray, var_to_token: np.ndarray, exact: bool):
    """(row, token, count) of one read, rows indexing `row_joinids`; genes outside the vocabulary dropped."""
    d0 = table.column("soma_dim_0").to_numpy()
    d1 = table.column("soma_dim_1").to_numpy()
    val = table.column("soma_data").to_numpy().astype(np.float32, copy=False)
    tok = var_to_token[d1]
    row = np.searchsorted(row_joinids, d0)
    keep = tok > 0
    if not exact:  # a slice read returns cells between the wanted ones (other splits of the filter)
        inside = row < len(row_joinids)
        keep &= inside
        keep[inside] &= row_joinids[row[inside]] == d0[inside]
    return row[keep], tok[keep], val[keep]


def read_block(
    X: tiledbsoma.SparseNDArray, joinids: np.ndarray, var_to_token: np.ndarray, chunk_cells: int
) -> CellBlock:
    """Read the cells `joinids` (ascending, unique) of X into a CellBlock.

    Joinids are read in groups of up to `chunk_cells`: a group whose span is short is read as one slice
    (fast contiguous read, unwanted cells filtered out), a sparse group as a point read.
    """
    rows_l, toks_l, vals_l = [], [], []
    n = len(joinids)
    for lo in range(0, n, chunk_cells):
        group = joinids[lo : lo + chunk_cells]
        span = int(group[-1] - group[0]) + 1
        if span <= SLICE_SPAN_FACTOR * len(group):
            coords, exact = (slice(int(group[0]), int(group[-1])),), span == len(group)
        else:
            coords, exact = (group,), True
        table = X.read(coords=coords).tables().concat()
        row, tok, val = _decode(table, group, var_to_token, exact)
        del table
        rows_l.append(row + lo)
        toks_l.append(tok)
        vals_l.append(val)
    row = np.concatenate(rows_l) if rows_l else np.zeros(0, np.int64)
    tok = np.concatenate(toks_l) if toks_l else np.zeros(0, np.int32)
    val = np.concatenate(vals_l) if vals_l else np.zeros(0, np.float32)
    if len(row) > 1 and np.any(row[1:] < row[:-1]):  # result order of a sparse read is not guaranteed
        order = np.argsort(row, kind="stable")
        row, tok, val = row[order], tok[order], val[order]
    indptr = np.zeros(n + 1, np.int64)
    np.cumsum(np.bincount(row, minlength=n), out=indptr[1:])
    library = np.bincount(row, weights=val, minlength=n).astype(np.float32)
    return CellBlock(joinids.astype(np.int64), indptr, tok.astype(np.int32, copy=False), val, library)
