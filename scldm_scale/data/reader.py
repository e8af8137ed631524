"""Read cells of X into a token CSR block: one point read per group of cells, vectorised decode, no dense matrix.

Owns the SOMA X reads of the loader. It does not decide which cells (see `order.py`) or batch them
(see `stream.py`). numpy and tiledbsoma only (worker processes import it without torch).

Reading a shuffle block's cells with one point read (sorted joinids, many contiguous runs) costs about as much
CPU per cell as a sequential scan (measured 12-14 us per cell against 12 for 8,192-cell slices on the loader
benchmark's atlas), and 1.3-1.5x less than one slice read per chunk: TileDB decodes each tile once per query.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import tiledbsoma


def token_dtype(num_tokens: int) -> np.dtype:
    """Smallest unsigned dtype holding token ids below `num_tokens` (uint16 up to 65,535 genes: Census fits)."""
    return np.dtype(np.uint16) if num_tokens <= np.iinfo(np.uint16).max + 1 else np.dtype(np.int32)


@dataclass
class CellBlock:
    """Cells as CSR over vocabulary tokens; row i is the cell `joinids[i]`."""

    joinids: np.ndarray  # int64 (n,)
    indptr: np.ndarray  # int64 (n + 1,)
    tokens: np.ndarray  # uint16 or int32 (nnz,), 1..num_genes
    counts: np.ndarray  # float32 (nnz,)
    library_size: np.ndarray  # float32 (n,), over vocabulary genes


class TokenMap:
    """var soma_joinid -> token id, with the fast paths of a vocabulary built from this atlas's var."""

    def __init__(self, var_to_token: np.ndarray) -> None:
        lut = np.asarray(var_to_token)
        self.dtype = token_dtype(int(lut.max()) + 1 if len(lut) else 1)
        self.lut = lut.astype(self.dtype)
        self.identity = bool(np.array_equal(lut, np.arange(1, len(lut) + 1)))
        self.all_in_vocab = bool((lut > 0).all())

    def __call__(self, d1: np.ndarray) -> np.ndarray:
        if self.identity:  # token = var joinid + 1: skip the gather (one pass: add and narrow together)
            return np.add(d1, 1, out=np.empty(len(d1), self.dtype), casting="unsafe")
        return self.lut[d1]


def _coords(group: np.ndarray):
    """A slice for one contiguous run of joinids, else the sorted points (TileDB merges adjacent ranges)."""
    if int(group[-1] - group[0]) + 1 == len(group):
        return slice(int(group[0]), int(group[-1]))
    return group


def _run_starts(d0: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(start offsets, row ids) of the runs of equal values in `d0`: one pass over d0."""
    starts = np.concatenate([[0], np.flatnonzero(d0[1:] != d0[:-1]) + 1])
    return starts, d0[starts]


def _row_lengths(d0: np.ndarray, group: np.ndarray, runs=None) -> np.ndarray:
    """Values per cell of `group` in the sorted row coordinates `d0` (no binary search in d0)."""
    lengths = np.zeros(len(group), np.int64)
    if len(d0) == 0:
        return lengths
    starts, cells = _run_starts(d0) if runs is None else runs
    at = np.searchsorted(group, cells)
    if at[-1] >= len(group) or np.any(group[at] != cells):
        raise RuntimeError("X read returned cells that were not asked for")
    lengths[at] = np.diff(np.concatenate([starts, [len(d0)]]))
    return lengths


def decode_group(table, group: np.ndarray, tokens: TokenMap):
    """(cells' token counts, tokens, counts) of `read_group(X, group)`'s table (cells `group`, ascending)."""
    d0 = table.column("soma_dim_0").to_numpy()
    d1 = table.column("soma_dim_1").to_numpy()
    val = table.column("soma_data").to_numpy().astype(np.float32, copy=False)
    runs = _run_starts(d0) if len(d0) else None
    # Result order of a sparse read is not guaranteed: d0 is sorted iff its run values increase (a decrease in
    # d0 starts a run with a smaller value), checked on the runs, not on every value.
    if runs is not None and np.any(runs[1][1:] <= runs[1][:-1]):
        order = np.argsort(d0, kind="stable")
        d0, d1, val = d0[order], d1[order], val[order]
        runs = _run_starts(d0)
    lengths = _row_lengths(d0, group, runs)
    tok = tokens(d1)
    if not tokens.all_in_vocab:  # drop genes outside the vocabulary, then recount per cell
        keep = tok > 0
        kept = np.concatenate([[0], np.cumsum(keep)])
        lengths = np.diff(kept[np.concatenate([[0], np.cumsum(lengths)])])
        tok, val = tok[keep], val[keep]
    return lengths, tok, val


def _library(counts: np.ndarray, indptr: np.ndarray) -> np.ndarray:
    """Per-row sums (float32: exact for integer counts while a cell's total stays below 2**24)."""
    n = len(indptr) - 1
    out = np.zeros(n, np.float32)
    if len(counts) == 0 or n == 0:
        return out
    starts = np.minimum(indptr[:-1], len(counts) - 1)
    out[:] = np.add.reduceat(counts, starts)
    out[indptr[1:] == indptr[:-1]] = 0.0
    return out


_readers = 0
_readers_lock = threading.Lock()


@contextlib.contextmanager
def reading() -> Iterator[None]:
    """Mark a loader reading thread (its TileDB reads allocate from Arrow's pool) as alive while inside."""
    global _readers
    with _readers_lock:
        _readers += 1
    try:
        yield
    finally:
        with _readers_lock:
            _readers -= 1


def release_arrow_memory() -> bool:
    """Hand the memory that Arrow's pool has freed back to the OS (a few microseconds); False, doing nothing,
    while a loader reading thread of this process is alive.

    pyarrow's default pool (mimalloc) otherwise keeps freed pages per thread, and the amount kept grows with
    the reads' working set, hence with the atlas: on the index-only scale run (census layout, 16 genes,
    `split == 'train'`) it was most of the loader's private-memory growth from 10^5 to 10^7 cells. The loader
    calls it once, after the obs pass of its build. mimalloc's forced collection is not documented as safe
    while other threads allocate: reading threads calling it after every unit crashed one CI run (a segfault),
    and a build next to a still-running reading thread of an earlier loader aborted another. So it runs only
    when no reading thread is alive, and a reading thread cannot start while it runs.
    """
    with _readers_lock:
        if _readers:
            return False
        pa.default_memory_pool().release_unused()
        return True


def split_groups(joinids: np.ndarray, group_cells: int) -> list[np.ndarray]:
    """The read groups of a unit's sorted joinids (one X read each)."""
    step = max(1, group_cells)
    return [joinids[lo : lo + step] for lo in range(0, len(joinids), step)]


def read_group(X: tiledbsoma.SparseNDArray, group: np.ndarray):
    """One X read of the cells `group` (ascending joinids): the arrow table (TileDB runs without the GIL)."""
    return X.read(coords=(_coords(group),)).tables().concat()


def assemble(joinids: np.ndarray, parts: list, dtype: np.dtype) -> CellBlock:
    """The CellBlock of the decoded groups `parts` of the cells `joinids`, in order."""
    if not parts:
        parts = [(np.zeros(0, np.int64), np.zeros(0, dtype), np.zeros(0, np.float32))]
    lengths, tok, val = (p[0] if len(parts) == 1 else np.concatenate(p) for p in zip(*parts, strict=True))
    indptr = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(lengths, out=indptr[1:])
    return CellBlock(joinids.astype(np.int64), indptr, tok, val, _library(val, indptr))


def read_block(
    X: tiledbsoma.SparseNDArray, joinids: np.ndarray, tokens: TokenMap | np.ndarray, group_cells: int
) -> CellBlock:
    """Read the cells `joinids` (ascending, unique) of X into a CellBlock in that order, `group_cells` per read.

    The loader's reading thread does the same with the next read in flight while it decodes (`stream.py`).
    """
    tokens = tokens if isinstance(tokens, TokenMap) else TokenMap(tokens)
    parts = [decode_group(read_group(X, g), g, tokens) for g in split_groups(joinids, group_cells)]
    return assemble(joinids, parts, tokens.dtype)


def read_labels_dtype(vocabs) -> np.dtype:
    """The dtype of `read_labels`' ids: the narrowest that holds the largest vocabulary's ids."""
    most = max((v.num_classes for v in vocabs), default=1)
    return np.dtype(np.uint8 if most <= 256 else np.uint16 if most <= 65_536 else np.int32)


def read_labels(obs: tiledbsoma.DataFrame, joinids: np.ndarray, vocabs) -> np.ndarray:
    """Label ids (len(joinids), K) of the cells `joinids` (ascending) from one obs read, one column per vocab.

    Ids fit the narrowest unsigned dtype of the largest vocabulary (uint8 to 255 categories, uint16 beyond).
    Labels are read per unit with its X rows, so the loader holds no per-cell label array for the atlas.
    """
    out = np.zeros((len(joinids), len(vocabs)), read_labels_dtype(vocabs))
    if not len(vocabs) or not len(joinids):
        return out
    columns = ["soma_joinid", *(v.column for v in vocabs)]
    table = obs.read(coords=(_coords(joinids),), column_names=columns).concat()
    got = table.column("soma_joinid").to_numpy()
    if len(got) != len(joinids):
        raise RuntimeError(f"obs read returned {len(got)} rows for {len(joinids)} cells")
    order = np.argsort(got, kind="stable") if np.any(got[1:] < got[:-1]) else None
    for j, vocab in enumerate(vocabs):
        ids, _ = vocab.encode(table.column(vocab.column))
        out[:, j] = ids if order is None else ids[order]
    return out
