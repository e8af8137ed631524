"""`CellIndex`: the cells a loader serves, position -> soma_joinid, in a fraction of a byte per cell.

A cell's *position* is its rank among the selected joinids in ascending order (`order.py` shuffles positions).
Holding the joinids as int64 cost 8 B per cell and rank, 0.8 GB per rank at 10^8 cells; this index keeps
whichever of two encodings is smaller:

- **runs**: per run of consecutive joinids its first joinid and first position (16 B a run). No filter is one
  run; a filter on whole datasets is one run per dataset.
- **bitmap**: one bit per joinid of the atlas plus, per 64-bit word, the number of selected cells before it
  (uint32): 0.19 B per atlas cell, 0.23 B per selected cell for `split == 'train'` (80 % of the cells).

`IndexBuilder` takes the selected joinids as ascending arrays, one obs read slice at a time, so the full joinid
column never exists; it also hashes the int64 joinids (the loader's `obs_joinids_sha1` fingerprint, equal to
hashing the whole array at once).
"""

from __future__ import annotations

import hashlib

import numpy as np

_WORD = 64
_SELECT_CELLS = 16_384
"""Positions resolved at a time in a bitmap lookup (bounds its (n, 64) temporaries to about 2 MB)."""
_RUN_BYTES = 16


class CellIndex:
    """Sorted selected joinids, position -> joinid (`joinids`), as runs or as a ranked bitmap (see the module)."""

    def __init__(
        self,
        n: int,
        sha1: str,
        *,
        words: np.ndarray | None = None,
        word_rank: np.ndarray | None = None,
        run_starts: np.ndarray | None = None,
        run_positions: np.ndarray | None = None,
    ) -> None:
        self.n = int(n)
        self.sha1 = sha1
        """First 16 hex digits of the sha1 of the joinids as int64 (the loader fingerprint)."""
        self._words, self._word_rank = words, word_rank
        self._run_starts, self._run_positions = run_starts, run_positions

    @property
    def encoding(self) -> str:
        return "runs" if self._run_starts is not None else "bitmap"

    @property
    def nbytes(self) -> int:
        arrays = (self._words, self._word_rank, self._run_starts, self._run_positions)
        return sum(a.nbytes for a in arrays if a is not None)

    def __len__(self) -> int:
        return self.n

    @classmethod
    def from_joinids(cls, joinids: np.ndarray) -> CellIndex:
        """The index of sorted unique joinids (tests and small selections)."""
        builder = IndexBuilder()
        builder.add(np.asarray(joinids, np.int64))
        return builder.finish()

    def joinids(self, positions: np.ndarray) -> np.ndarray:
        """int64 joinids of `positions` (any order, each in [0, n))."""
        p = np.asarray(positions, np.int64)
        if len(p) and (p.min() < 0 or p.max() >= self.n):
            raise IndexError(f"cell positions outside [0, {self.n})")
        if self._run_starts is not None:
            r = np.searchsorted(self._run_positions, p, side="right") - 1
            return self._run_starts[r] + (p - self._run_positions[r])
        out = np.empty(len(p), np.int64)
        for lo in range(0, len(p), _SELECT_CELLS):
            out[lo : lo + _SELECT_CELLS] = self._select(p[lo : lo + _SELECT_CELLS])
        return out

    def _select(self, p: np.ndarray) -> np.ndarray:
        """Bitmap lookup: the word holding each position's cell, then that cell's bit within the word."""
        w = np.searchsorted(self._word_rank, p, side="right") - 1
        k = (p - self._word_rank[w]).astype(np.uint8)  # index of the wanted set bit within the word (< 64)
        bits = np.unpackbits(self._words[w].view(np.uint8).reshape(-1, 8), axis=1, bitorder="little")
        seen = np.cumsum(bits, axis=1, dtype=np.uint8)
        bit = (seen <= k[:, None]).sum(axis=1)  # bits before (and at) the wanted one that leave it unreached
        return w * _WORD + bit

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CellIndex) and self.n == other.n and self.sha1 == other.sha1


class IndexBuilder:
    """Collects ascending joinid arrays (each above the last) into a `CellIndex`."""

    def __init__(self) -> None:
        self._words = np.zeros(1024, np.uint64)
        self._n = 0
        self._last = -1
        self._sha1 = hashlib.sha1()

    def add(self, joinids: np.ndarray) -> None:
        j = np.asarray(joinids, np.int64)
        if not len(j):
            return
        if j[0] <= self._last or (len(j) > 1 and np.any(j[1:] <= j[:-1])):
            raise ValueError("CellIndex: joinids must arrive ascending and unique")
        self._sha1.update(j.tobytes())
        lo_w, hi_w = int(j[0]) // _WORD, int(j[-1]) // _WORD
        if hi_w >= len(self._words):
            grown = np.zeros(max(hi_w + 1, 2 * len(self._words)), np.uint64)
            grown[: len(self._words)] = self._words
            self._words = grown
        mask = np.zeros((hi_w - lo_w + 1) * _WORD, bool)
        mask[j - lo_w * _WORD] = True
        self._words[lo_w : hi_w + 1] |= np.packbits(mask, bitorder="little").view(np.uint64)
        self._n += len(j)
        self._last = int(j[-1])

    def finish(self) -> CellIndex:
        """The smaller encoding of what was added."""
        sha = self._sha1.hexdigest()[:16]
        words = self._words[: self._last // _WORD + 1] if self._n else np.zeros(0, np.uint64)
        counts = np.bitwise_count(words).astype(np.int64)
        rank = np.concatenate([[0], np.cumsum(counts)[:-1]]) if len(words) else np.zeros(0, np.int64)
        carry = (
            np.concatenate([[0], words[:-1] >> np.uint64(_WORD - 1)]).astype(np.uint64)
            if len(words)
            else words
        )
        rising = words & ~((words << np.uint64(1)) | carry)  # first joinid of each run of consecutive ones
        n_runs = int(np.bitwise_count(rising).sum())
        rank_dtype = np.uint32 if self._n < 2**32 else np.uint64
        if n_runs * _RUN_BYTES < words.nbytes + len(words) * np.dtype(rank_dtype).itemsize:
            starts = _set_bits(rising)
            w, b = starts // _WORD, (starts % _WORD).astype(np.uint64)
            below = words[w] & ((np.uint64(1) << b) - np.uint64(1))
            positions = rank[w] + np.bitwise_count(below).astype(np.int64)
            return CellIndex(self._n, sha, run_starts=starts, run_positions=positions)
        return CellIndex(self._n, sha, words=words.copy(), word_rank=rank.astype(rank_dtype))


def _set_bits(words: np.ndarray) -> np.ndarray:
    """Indices of the set bits of a (sparse) bitmap, ascending."""
    nz = np.flatnonzero(words)
    if not len(nz):
        return np.zeros(0, np.int64)
    bits = np.unpackbits(words[nz].view(np.uint8).reshape(-1, 8), axis=1, bitorder="little")
    row, col = np.nonzero(bits)
    return nz[row].astype(np.int64) * _WORD + col
