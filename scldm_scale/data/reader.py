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


class _TokenMap:
    """var soma_joinid -> token id, with the fast paths of a vocabulary built from this atlas's var."""

    def __init__(self, var_to_token: np.ndarray) -> None:
        self.lut = var_to_token.astype(np.int32, copy=False)
        self.identity = bool(np.array_equal(self.lut, np.arange(1, len(self.lut) + 1)))
        self.all_in_vocab = bool((self.lut > 0).all())

    def __call__(self, d1: np.ndarray) -> np.ndarray:
        if self.identity:  # token = var joinid + 1: skip the gather
            tok = d1.astype(np.int32)
            tok += 1
            return tok
        return self.lut[d1]


def _decode(table, group: np.ndarray, tokens: _TokenMap):
    """(cells' token counts, tokens, counts) of one read for the wanted cells `group` (ascending joinids)."""
    d0 = table.column("soma_dim_0").to_numpy()
    d1 = table.column("soma_dim_1").to_numpy()
    val = table.column("soma_data").to_numpy().astype(np.float32, copy=False)
    if len(d0) > 1 and np.any(d0[1:] < d0[:-1]):  # result order of a sparse read is not guaranteed
        order = np.argsort(d0, kind="stable")
        d0, d1, val = d0[order], d1[order], val[order]
    left = np.searchsorted(d0, group, "left")
    lengths = np.searchsorted(d0, group, "right") - left
    total = int(lengths.sum())
    if total != len(d0):  # a slice read also returns cells between the wanted ones (other splits)
        idx = np.arange(total, dtype=np.int64) + np.repeat(left - (np.cumsum(lengths) - lengths), lengths)
        d1, val = d1[idx], val[idx]
    tok = tokens(d1)
    if not tokens.all_in_vocab:  # drop genes outside the vocabulary, then recount per cell
        keep = tok > 0
        kept = np.concatenate([[0], np.cumsum(keep)])
        lengths = np.diff(kept[np.concatenate([[0], np.cumsum(lengths)])])
        tok, val = tok[keep], val[keep]
    return lengths, tok, val


def read_block(
    X: tiledbsoma.SparseNDArray, joinids: np.ndarray, var_to_token: np.ndarray, chunk_cells: int
) -> CellBlock:
    """Read the cells `joinids` (ascending, unique) of X into a CellBlock.

    Joinids are read in groups of up to `chunk_cells`: a group whose span is short is read as one slice
    (fast contiguous read, unwanted cells filtered out), a sparse group as a point read.
    """
    tokens = var_to_token if isinstance(var_to_token, _TokenMap) else _TokenMap(var_to_token)
    len_l, tok_l, val_l = [], [], []
    for lo in range(0, len(joinids), chunk_cells):
        group = joinids[lo : lo + chunk_cells]
        span = int(group[-1] - group[0]) + 1
        coords = (
            (slice(int(group[0]), int(group[-1])),) if span <= SLICE_SPAN_FACTOR * len(group) else (group,)
        )
        table = X.read(coords=coords).tables().concat()
        lengths, tok, val = _decode(table, group, tokens)
        del table
        len_l.append(lengths)
        tok_l.append(tok)
        val_l.append(val)
    lengths = np.concatenate(len_l) if len_l else np.zeros(0, np.int64)
    tok = np.concatenate(tok_l) if tok_l else np.zeros(0, np.int32)
    val = np.concatenate(val_l) if val_l else np.zeros(0, np.float32)
    indptr = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(lengths, out=indptr[1:])
    library = np.zeros(len(lengths), np.float32)
    nonempty = lengths > 0
    if nonempty.any():  # float64 sums: exact for integer counts
        library[nonempty] = np.add.reduceat(val, indptr[:-1][nonempty], dtype=np.float64)
    return CellBlock(joinids.astype(np.int64), indptr, tok, val, library)


def nnz_per_cell(X: tiledbsoma.SparseNDArray, joinids: np.ndarray, sample_cells: int = 512) -> float:
    """Mean non-zeros per cell over the first `sample_cells` wanted cells (cheap: `X.nnz` scans fragments)."""
    if len(joinids) == 0:
        return 1.0
    sample = joinids[:sample_cells]
    table = X.read(coords=(slice(int(sample[0]), int(sample[-1])),)).tables().concat()
    span = int(sample[-1] - sample[0]) + 1
    return max(1.0, table.num_rows / span)
