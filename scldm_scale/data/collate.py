"""Turn rows of CellBlocks into one batch dict (the batch contract of DEVELOPERS.md), vectorised.

Keys: gene_ids, counts, mask, library_size, labels, soma_joinid, truncated, plus `is_padding` (True for cells
repeated to give every rank the same number of batches; a trainer may weight them 0).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from scldm_scale.data.reader import CellBlock

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: a cheap vectorised hash (uint64 arithmetic wraps on purpose)."""
    x = x.astype(np.uint64, copy=True)
    x ^= x >> np.uint64(30)
    x *= _M1
    x ^= x >> np.uint64(27)
    x *= _M2
    x ^= x >> np.uint64(31)
    return x


def _cap_tokens(row_id, tokens, counts, lengths, joinids, max_tokens, cap_seed):
    """Keep `max_tokens` genes of each longer cell, chosen by a hash of (seed, joinid, token).

    The choice depends on the cell and the seed only, so it is the same whichever rank or worker reads it.
    """
    key = _mix(
        _mix(np.full(len(tokens), cap_seed, np.uint64) ^ joinids[row_id].astype(np.uint64))
        ^ tokens.astype(np.uint64)
    )
    order = np.lexsort((key, row_id))
    row_id, tokens, counts = row_id[order], tokens[order], counts[order]
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    rank_in_row = np.arange(len(tokens)) - np.repeat(starts, lengths)
    keep = rank_in_row < max_tokens
    return row_id[keep], tokens[keep], counts[keep], np.minimum(lengths, max_tokens)


@dataclass
class PackedBatch:
    """A batch before padding: numpy only, so DataLoader workers pickle it through a pipe.

    Sending the padded int64 tensors instead costs a shared-memory segment per tensor per batch, which caps
    worker throughput well below the reader's (measured ~3x slower). `unpack_batch` pads it in the consumer.
    """

    lengths: np.ndarray  # int64 (B,) tokens per cell, after the cap
    tokens: np.ndarray  # int32 (nnz,) cells one after another
    counts: np.ndarray  # float32 (nnz,)
    library_size: np.ndarray  # float32 (B,)
    labels: np.ndarray  # int64 (B, K)
    soma_joinid: np.ndarray  # int64 (B,)
    truncated: np.ndarray  # bool (B,)
    is_padding: np.ndarray  # bool (B,)


def pack_rows(
    parts: list[tuple[CellBlock, np.ndarray]],
    labels: np.ndarray,
    is_padding: np.ndarray,
    *,
    max_tokens_per_cell: int | None = None,
    cap_seed: int = 0,
) -> PackedBatch:
    """Gather the cells `rows` of each block (in order) into a PackedBatch.

    Args:
        parts: (block, row indices into the block) pairs; a batch may straddle two blocks.
        labels: int64 (B, K) label ids of the batch's cells.
        is_padding: bool (B,) cells repeated to balance ranks.
        max_tokens_per_cell: cap on tokens; longer cells are subsampled and flagged `truncated`.
        cap_seed: seed of the subsampling.
    """
    lengths_l, tok_l, cnt_l, jid_l, lib_l = [], [], [], [], []
    for block, rows in parts:
        starts = block.indptr[rows]
        lengths = block.indptr[rows + 1] - starts
        base = np.cumsum(lengths) - lengths
        offs = np.arange(int(lengths.sum()), dtype=np.int64) + np.repeat(starts - base, lengths)
        lengths_l.append(lengths)
        tok_l.append(block.tokens[offs])
        cnt_l.append(block.counts[offs])
        jid_l.append(block.joinids[rows])
        lib_l.append(block.library_size[rows])
    lengths, tokens, counts, joinids = (
        np.concatenate(x) if len(parts) > 1 else x[0] for x in (lengths_l, tok_l, cnt_l, jid_l)
    )
    n = len(lengths)
    truncated = np.zeros(n, dtype=bool)
    if max_tokens_per_cell is not None and n and lengths.max() > max_tokens_per_cell:
        truncated = lengths > max_tokens_per_cell
        row_id = np.repeat(np.arange(n), lengths)
        _, tokens, counts, lengths = _cap_tokens(
            row_id, tokens, counts, lengths, joinids, max_tokens_per_cell, cap_seed
        )
    return PackedBatch(
        lengths=lengths.astype(np.int64, copy=False),
        tokens=tokens,
        counts=counts,
        library_size=np.concatenate(lib_l).astype(np.float32, copy=False),
        labels=np.ascontiguousarray(labels, dtype=np.int64),
        soma_joinid=joinids.astype(np.int64, copy=False),
        truncated=truncated,
        is_padding=np.asarray(is_padding, dtype=bool),
    )


def unpack_batch(p: PackedBatch) -> dict[str, torch.Tensor]:
    """The batch dict of DEVELOPERS.md: tokens padded to the batch's longest cell, with the mask."""
    n, lengths = len(p.lengths), p.lengths
    width = max(1, int(lengths.max()) if n else 1)
    # flat index of each token in the (n, width) matrix: row * width + rank within the row
    base = np.cumsum(lengths) - lengths
    flat = np.arange(len(p.tokens), dtype=np.int64) + np.repeat(
        np.arange(n, dtype=np.int64) * width - base, lengths
    )
    gene_ids = np.zeros(n * width, np.int64)
    counts = np.zeros(n * width, np.float32)
    gene_ids[flat] = p.tokens
    counts[flat] = p.counts
    return {
        "gene_ids": torch.from_numpy(gene_ids.reshape(n, width)),
        "counts": torch.from_numpy(counts.reshape(n, width)),
        "mask": torch.from_numpy(np.arange(width)[None, :] < lengths[:, None]),
        "library_size": torch.from_numpy(p.library_size),
        "labels": torch.from_numpy(p.labels),
        "soma_joinid": torch.from_numpy(p.soma_joinid),
        "truncated": torch.from_numpy(p.truncated),
        "is_padding": torch.from_numpy(p.is_padding),
    }


def collate_rows(
    parts: list[tuple[CellBlock, np.ndarray]],
    labels: np.ndarray,
    is_padding: np.ndarray,
    *,
    max_tokens_per_cell: int | None = None,
    cap_seed: int = 0,
) -> dict[str, torch.Tensor]:
    """`unpack_batch(pack_rows(...))`: the padded batch dict in one call."""
    return unpack_batch(
        pack_rows(parts, labels, is_padding, max_tokens_per_cell=max_tokens_per_cell, cap_seed=cap_seed)
    )
