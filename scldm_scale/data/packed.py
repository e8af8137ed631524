"""Batches before padding (numpy only): `RowBatch` (rows of read blocks) and `PackedBatch` (gathered, ragged).

A worker (thread or process) packs each RowBatch once (`RowBatch.pack`), and the consumer pads the PackedBatch
(`collate.unpack_batch`); with no worker the consumer does both.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from scldm_scale.data.reader import CellBlock

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: a cheap vectorised hash (uint64 arithmetic wraps on purpose)."""
    x = x.astype(np.uint64, copy=True)
    x ^= x >> np.uint64(30)
    x *= _M1
    x ^= x >> np.uint64(27)
    x *= _M2
    x ^= x >> np.uint64(31)
    return x


@dataclass
class PackedBatch:
    """Cells one after another: cell i's tokens and counts follow those of cells 0..i-1 (`lengths[i]` of them)."""

    lengths: np.ndarray  # int64 (B,) tokens per cell, after the cap
    tokens: np.ndarray  # uint16 / int32 (nnz,)
    counts: np.ndarray  # float32 (nnz,)
    library_size: np.ndarray  # float32 (B,)
    labels: np.ndarray  # int64 (B, K)
    soma_joinid: np.ndarray  # int64 (B,)
    truncated: np.ndarray  # bool (B,)
    is_padding: np.ndarray  # bool (B,)
    target: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
    """With the token cap: every cell whole, (lengths, tokens, counts) packed as above (the decoder's target)."""

    def __len__(self) -> int:
        return len(self.lengths)


@dataclass
class RowBatch:
    """A batch as references: rows of read blocks (a batch may straddle two load units), not yet gathered.

    `pack()` gathers it into a PackedBatch, the one copy of its cells' data.
    """

    parts: list[tuple[CellBlock, np.ndarray]]  # (block, rows of the block in stream order)
    labels: np.ndarray  # int64 (B, K)
    is_padding: np.ndarray  # bool (B,)

    def __len__(self) -> int:
        return len(self.labels)

    def starts_lengths(self) -> tuple[list[np.ndarray], np.ndarray]:
        """Per part the CSR start of each row; the token count of every row of the batch."""
        starts = [block.indptr[rows] for block, rows in self.parts]
        lengths = [block.indptr[rows + 1] - s for (block, rows), s in zip(self.parts, starts, strict=True)]
        return starts, np.concatenate(lengths) if len(lengths) > 1 else lengths[0]

    def cell_field(self, name: str) -> np.ndarray:
        arrays = [getattr(block, name)[rows] for block, rows in self.parts]
        return np.concatenate(arrays) if len(arrays) > 1 else arrays[0]

    def pack(self) -> PackedBatch:
        """Gather the rows' tokens and counts, cells one after another."""
        starts, lengths = self.starts_lengths()
        tok_l, cnt_l, lo = [], [], 0
        for (block, _), s in zip(self.parts, starts, strict=True):
            n = len(s)
            span = lengths[lo : lo + n]
            src = np.repeat(s - (np.cumsum(span) - span), span)
            src += np.arange(len(src), dtype=np.int64)
            tok_l.append(block.tokens[src])
            cnt_l.append(block.counts[src])
            lo += n
        return PackedBatch(
            lengths=lengths,
            tokens=np.concatenate(tok_l) if len(tok_l) > 1 else tok_l[0],
            counts=np.concatenate(cnt_l) if len(cnt_l) > 1 else cnt_l[0],
            library_size=self.cell_field("library_size"),
            labels=self.labels,
            soma_joinid=self.cell_field("joinids"),
            truncated=np.zeros(len(lengths), bool),
            is_padding=self.is_padding,
        )


def cap_tokens(batch: PackedBatch, max_tokens: int, cap_seed: int) -> PackedBatch:
    """Keep `max_tokens` genes of each longer cell, chosen by a hash of (seed, joinid, token); flag them.

    The choice depends on the cell and the seed only, so it is the same whichever rank or worker reads it. The
    whole cells travel as `target`: the encoder sees the kept genes, the decoder is scored on every gene.
    """
    lengths = batch.lengths
    if len(lengths) == 0 or lengths.max() <= max_tokens:
        return batch
    row_id = np.repeat(np.arange(len(lengths)), lengths)
    key = mix64(
        mix64(np.full(len(row_id), cap_seed, np.uint64) ^ batch.soma_joinid[row_id].astype(np.uint64))
        ^ batch.tokens.astype(np.uint64)
    )
    order = np.lexsort((key, row_id))
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    rank_in_row = np.arange(len(order)) - np.repeat(starts, lengths)
    keep = order[rank_in_row < max_tokens]
    return PackedBatch(
        lengths=np.minimum(lengths, max_tokens),
        tokens=batch.tokens[keep],
        counts=batch.counts[keep],
        library_size=batch.library_size,
        labels=batch.labels,
        soma_joinid=batch.soma_joinid,
        truncated=lengths > max_tokens,
        is_padding=batch.is_padding,
        target=(lengths, batch.tokens, batch.counts),
    )
