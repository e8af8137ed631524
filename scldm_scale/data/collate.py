"""Pad a `RowBatch` or `PackedBatch` into the batch dict of DEVELOPERS.md (the one torch step of the loader).

Keys: gene_ids, counts, mask, library_size, labels, soma_joinid, truncated, plus `is_padding` (True for cells
repeated to give every rank the same number of batches; a trainer may weight them 0), and with the token cap
`target_gene_ids`, `target_counts`, `target_mask`: every cell whole, the decoder's reconstruction target.
"""

from __future__ import annotations

import numpy as np
import torch

from scldm_scale.data.packed import PackedBatch, RowBatch, cap_tokens


def _pad(lengths: np.ndarray, tokens: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, ...]:
    """(gene_ids, counts, mask) padded to the longest cell. A cell's tokens are consecutive and the mask's True
    entries, read row by row, are too: one boolean-mask assignment scatters them (no index arrays)."""
    n = len(lengths)
    width = max(1, int(lengths.max()) if n else 1)
    small = np.int16 if width < 2**15 else np.int64  # a narrower compare is ~2x faster
    mask = np.arange(width, dtype=small)[None, :] < lengths.astype(small)[:, None]
    gene_ids = np.zeros((n, width), np.int64)
    padded = np.zeros((n, width), np.float32)
    gene_ids[mask] = tokens
    padded[mask] = counts
    return gene_ids, padded, mask


def unpack_batch(p: PackedBatch) -> dict[str, torch.Tensor]:
    """Tokens padded to the batch's longest cell, with the mask (and the whole cells, when capped).

    Every tensor is a copy: none keeps a load unit alive.
    """
    gene_ids, counts, mask = _pad(p.lengths, p.tokens, p.counts)
    out = {
        "gene_ids": torch.from_numpy(gene_ids),
        "counts": torch.from_numpy(counts),
        "mask": torch.from_numpy(mask),
        "library_size": torch.from_numpy(np.array(p.library_size, np.float32)),
        "labels": torch.from_numpy(np.array(p.labels, np.int64)),
        "soma_joinid": torch.from_numpy(np.array(p.soma_joinid, np.int64)),
        "truncated": torch.from_numpy(np.array(p.truncated, bool)),
        "is_padding": torch.from_numpy(np.array(p.is_padding, bool)),
    }
    if p.target is not None:
        for key, value in zip(("target_gene_ids", "target_counts", "target_mask"), _pad(*p.target)):
            out[key] = torch.from_numpy(value)
    return out


def to_tensors(batch: RowBatch | PackedBatch, max_tokens_per_cell: int | None, cap_seed: int):
    """The batch dict of a RowBatch (in-process) or PackedBatch (from a worker), applying the token cap."""
    if isinstance(batch, RowBatch):
        batch = batch.pack()
    if max_tokens_per_cell is not None:
        batch = cap_tokens(batch, max_tokens_per_cell, cap_seed)
    return unpack_batch(batch)
