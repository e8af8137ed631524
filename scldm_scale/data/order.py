"""Epoch order and its partition over (rank, worker): pure numpy, no SOMA, no torch.

Cells are addressed by *position*: the index into the sorted `obs_joinids` matching the filter.

1. Chunks: positions cut into contiguous runs of `chunk_cells` (contiguous = fast reads).
2. Blocks: the chunk list is permuted by (seed, epoch) and cut into blocks of `block_chunks` chunks (the first
   one 1/8 of that, for a quick first batch); each block's
   cells are permuted by (seed, epoch, block). The epoch sequence is the blocks one after another. It depends on
   (seed, epoch) and the data only, never on the world size or the number of workers.
3. Work: what is left of the epoch, as an ordered list of pieces `(block, start, end)` = block positions
   `start:end` of the block's permuted order. A fresh epoch is one piece per whole block.
4. Layout: the work is cut into one contiguous range per rank (equal batch counts: padded or dropped tail),
   then per worker; rank batch j comes from worker j % num_workers (the DataLoader's round robin).

The loader state is the work left, in pieces: resuming at any world size or worker count re-partitions exactly
the cells not yet consumed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

Piece = tuple[int, int, int]
"""(block, start, end): positions `start:end` of the block's permuted cell order."""


def _rng(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed % 2**63, *keys]))


@dataclass(frozen=True)
class EpochOrder:
    """The epoch's cell sequence, a pure function of (n_cells, chunk_cells, block_chunks, seed, epoch, shuffle)."""

    n_cells: int
    chunk_cells: int
    block_chunks: int
    seed: int
    epoch: int
    shuffle: bool = True

    @property
    def num_chunks(self) -> int:
        return -(-self.n_cells // self.chunk_cells)

    @property
    def first_block_chunks(self) -> int:
        """The first block is smaller (1/8), so the first batch arrives after a short read."""
        return max(1, self.block_chunks // 8)

    @property
    def num_blocks(self) -> int:
        rest = max(0, self.num_chunks - self.first_block_chunks)
        return (self.num_chunks > 0) + -(-rest // self.block_chunks)

    def _chunk_range(self, block: int) -> tuple[int, int]:
        if block == 0:
            return 0, min(self.first_block_chunks, self.num_chunks)
        start = self.first_block_chunks + (block - 1) * self.block_chunks
        return start, min(start + self.block_chunks, self.num_chunks)

    def chunk_order(self) -> np.ndarray:
        """Chunk ids in epoch order (first shuffle level)."""
        if not self.shuffle:
            return np.arange(self.num_chunks)
        return _rng(self.seed, self.epoch, 0).permutation(self.num_chunks)

    def block_chunk_ids(self, block: int, chunk_order: np.ndarray | None = None) -> np.ndarray:
        order = self.chunk_order() if chunk_order is None else chunk_order
        start, end = self._chunk_range(block)
        return order[start:end]

    def block_len(self, block: int, chunk_order: np.ndarray | None = None) -> int:
        chunks = self.block_chunk_ids(block, chunk_order)
        return int(
            np.minimum(chunks * self.chunk_cells + self.chunk_cells, self.n_cells).sum()
            - (chunks * self.chunk_cells).sum()
        )

    def block_positions(self, block: int, chunk_order: np.ndarray | None = None) -> np.ndarray:
        """Positions of the block's cells in their permuted order (second shuffle level)."""
        chunks = self.block_chunk_ids(block, chunk_order)
        pos = (
            np.concatenate(
                [
                    np.arange(c * self.chunk_cells, min((c + 1) * self.chunk_cells, self.n_cells))
                    for c in chunks
                ]
            )
            if len(chunks)
            else np.zeros(0, np.int64)
        )
        if self.shuffle:
            pos = pos[_rng(self.seed, self.epoch, 1, block).permutation(len(pos))]
        return pos.astype(np.int64)

    def fresh_pieces(self) -> list[Piece]:
        """One piece per whole block: the work of an epoch not yet started."""
        order = self.chunk_order()
        return [(b, 0, self.block_len(b, order)) for b in range(self.num_blocks)]

    def sequence(self) -> np.ndarray:
        """The whole epoch sequence of positions (tests and small data only)."""
        order = self.chunk_order()
        return np.concatenate([self.block_positions(b, order) for b in range(self.num_blocks)])


@dataclass(frozen=True)
class Slot:
    """One (rank, worker)'s share: `real` cells from work offset `start`, then `pad` repeated cells."""

    start: int
    real: int
    num_batches: int
    pad_start: int
    pad_len: int
    """Padding cycles over work offsets [pad_start, pad_start + pad_len)."""


def rank_num_batches(total: int, *, world_size: int, batch_size: int, remainder: str) -> int:
    """Batches every rank yields for `total` cells of work."""
    if remainder == "drop":
        return total // (world_size * batch_size)
    return -(-total // (world_size * batch_size))


def layout(
    total: int, *, world_size: int, num_workers: int, batch_size: int, remainder: str
) -> list[list[Slot]]:
    """Slots[rank][worker] for `total` cells of work; every rank gets the same number of batches.

    "pad": ranks get total // W cells (+1 for the first total % W) and fill their last batch by repeating their
    own last cells (the same ones whether or not the pass was resumed mid-epoch). "drop": every rank gets nb * batch_size cells, the tail of the work is left unread.
    """
    nw = max(1, num_workers)
    nb = rank_num_batches(total, world_size=world_size, batch_size=batch_size, remainder=remainder)
    slots: list[list[Slot]] = []
    rank_start = 0
    for r in range(world_size):
        if remainder == "drop":
            m_r = nb * batch_size
        else:
            m_r = total // world_size + (r < total % world_size)
        row: list[Slot] = []
        used = 0
        for w in range(nw):
            nb_w = len(range(w, nb, nw))
            real = min(nb_w * batch_size, max(0, m_r - used))
            if real > 0:
                # Pad from the slot's last cells: a pass resumed mid-epoch still ends with them, so its last
                # batch repeats the same cells as an uninterrupted pass would.
                need = min(real, max(1, nb_w * batch_size - real))
                pad_start, pad_len = rank_start + used + real - need, need
            elif m_r > 0:
                pad_start, pad_len = rank_start, m_r
            else:
                pad_start, pad_len = 0, total
            row.append(Slot(rank_start + used, real, nb_w, pad_start, pad_len))
            used += real
        slots.append(row)
        rank_start += m_r
    return slots


def worker_batches_consumed(rank_batches: int, *, worker: int, num_workers: int) -> int:
    """Batches of `worker` among the first `rank_batches` of its rank (DataLoader in-order round robin)."""
    return len(range(worker, rank_batches, max(1, num_workers)))


def take(pieces: list[Piece], start: int, length: int) -> list[Piece]:
    """Work offsets [start, start + length) as pieces."""
    out: list[Piece] = []
    offset = 0
    end = start + length
    for b, s, e in pieces:
        n = e - s
        lo, hi = max(start, offset), min(end, offset + n)
        if lo < hi:
            out.append((b, s + lo - offset, s + hi - offset))
        offset += n
        if offset >= end:
            break
    return out


def remaining(pieces: list[Piece], consumed: list[tuple[int, int]]) -> list[Piece]:
    """Pieces minus consumed work offset ranges [(start, length), ...], order kept."""
    total = sum(e - s for _, s, e in pieces)
    cuts = sorted((a, a + n) for a, n in consumed if n > 0)
    keep: list[tuple[int, int]] = []
    cursor = 0
    for a, b in cuts:
        if a > cursor:
            keep.append((cursor, a - cursor))
        cursor = max(cursor, b)
    if cursor < total:
        keep.append((cursor, total - cursor))
    out: list[Piece] = []
    for a, n in keep:
        out.extend(take(pieces, a, n))
    return _merge(out)


def _merge(pieces: list[Piece]) -> list[Piece]:
    out: list[Piece] = []
    for p in pieces:
        if out and out[-1][0] == p[0] and out[-1][2] == p[1]:
            out[-1] = (p[0], out[-1][1], p[2])
        else:
            out.append(p)
    return out


def consumed_ranges(
    total: int, rank_batches: int, *, world_size: int, num_workers: int, batch_size: int, remainder: str
) -> list[tuple[int, int]]:
    """Work offset ranges consumed by every rank after each yielded `rank_batches` batches (lockstep)."""
    out = []
    for row in layout(
        total, world_size=world_size, num_workers=num_workers, batch_size=batch_size, remainder=remainder
    ):
        for w, slot in enumerate(row):
            k = worker_batches_consumed(rank_batches, worker=w, num_workers=num_workers)
            out.append((slot.start, min(k * batch_size, slot.real)))
    return out
