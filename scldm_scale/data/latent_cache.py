"""Latent cache for stage 2: the frozen autoencoder encodes the whole training set once, each rank writes
its shard, and a loader reads the latents back with the loader contract (`set_epoch`, `state_dict`).

Layout under the cache folder: `shard-<rank>-of-<world>.safetensors` (latents (N, M, L) fp32, labels (N, K),
soma_joinid (N,), library_size (N,)) and `index.json` (shards, cell count, latent shape, and the `key`
that names the stage-1 checkpoint, atlas and filter the cache was built from; a cache whose key differs
is rebuilt). Reading sorts cells by `soma_joinid`, so the order does not depend on the writer's world size.
Readers memory-map the latents (the safetensors header is JSON: its offsets locate the raw array) and hold in
memory only the small per-cell arrays and the sort index (~30 bytes per cell with one label column), so an
atlas-sized cache costs disk, not the memory of every rank.

Shape legend: N cells, B micro-batch, M latent tokens, L latent dim, K label columns.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from scldm_scale.utils.seed import SEED_STRIDE

logger = logging.getLogger(__name__)

LATENTS = "latents"
"""Batch key of cached latents (B, M, L) (`train/ldm_step.py` reads it)."""

INDEX_FILE = "index.json"
"""The cache's table of contents, written by rank 0 once every shard exists."""
CACHED_KEYS = (LATENTS, "labels", "soma_joinid", "library_size")
"""Batch keys stored per cell."""


def estimate_bytes(num_cells: int, latent_shape: tuple[int, int], num_labels: int) -> int:
    """Bytes the cache takes on disk (readers memory-map the latents)."""
    m, l_dim = latent_shape
    return num_cells * (4 * m * l_dim + 8 * num_labels + 8 + 4)


def cache_is_valid(cache_dir: str | Path, key: dict[str, Any]) -> bool:
    """True when `index.json` exists and was built from the same stage-1 checkpoint, atlas and filter."""
    index = Path(cache_dir) / INDEX_FILE
    return index.exists() and json.loads(index.read_text()).get("key") == key


def write_shard(
    cache_dir: str | Path,
    batches: Iterable[dict[str, torch.Tensor]],
    encode: Callable[[dict[str, torch.Tensor]], torch.Tensor],
    *,
    rank: int,
    world_size: int,
    progress: Callable[[int], None] | None = None,
) -> int:
    """Encode this rank's share of the training set (one pass of its loader) and write its shard.

    Args:
        cache_dir: cache folder (created).
        batches: this rank's batches, each with `gene_ids`, `counts`, `mask`, `labels`, `soma_joinid`,
            `library_size` (on the encoder's device).
        encode: batch -> latents (B, M, L), e.g. the frozen VAE's posterior mean.
        progress: called with the number of cells encoded so far (rank 0 progress).

    Returns:
        Cells written by this rank.
    """
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in CACHED_KEYS}
    seen = 0
    for batch in batches:
        parts[LATENTS].append(encode(batch).float().cpu())
        for k in CACHED_KEYS[1:]:
            parts[k].append(batch[k].cpu())
        seen += batch["soma_joinid"].shape[0]
        if progress is not None:
            progress(seen)
    if not parts[LATENTS]:
        raise ValueError(f"rank {rank}: the training loader yielded no cells to encode")
    tensors = {k: torch.cat(v).contiguous() for k, v in parts.items()}
    path = Path(cache_dir) / f"shard-{rank:05d}-of-{world_size:05d}.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path.with_suffix(".tmp")))
    path.with_suffix(".tmp").rename(path)  # a crash never leaves a half-written shard under the real name
    return seen


_NUMPY_DTYPES = {"F32": np.float32, "F64": np.float64, "I64": np.int64, "I32": np.int32, "BOOL": np.bool_}


def _header(path: Path) -> tuple[dict[str, Any], int]:
    """A safetensors file's JSON header (name -> dtype, shape, data_offsets) and where its data starts."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        if size <= 0 or size > 100 * 2**20:
            raise ValueError(f"{path}: not a safetensors file (header size {size})")
        header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    return header, 8 + size


def _open_array(path: Path, name: str) -> np.ndarray:
    """Tensor `name` of a safetensors file as a read-only memory map (nothing read until indexed)."""
    header, start = _header(path)
    if name not in header:
        raise KeyError(f"{path}: no tensor {name!r} (has {sorted(header)})")
    info = header[name]
    if info["dtype"] not in _NUMPY_DTYPES:
        raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
    begin = info["data_offsets"][0]
    shape = tuple(info["shape"])
    if not all(shape):
        return np.zeros(shape, _NUMPY_DTYPES[info["dtype"]])
    return np.memmap(path, _NUMPY_DTYPES[info["dtype"]], mode="r", offset=start + begin, shape=shape)


def write_index(cache_dir: str | Path, *, world_size: int, key: dict[str, Any]) -> dict[str, Any]:
    """Rank 0, after every shard is written (barrier): record the shards and the cache's key."""
    cache_dir = Path(cache_dir)
    shards = [f"shard-{r:05d}-of-{world_size:05d}.safetensors" for r in range(world_size)]
    missing = [s for s in shards if not (cache_dir / s).exists()]
    if missing:
        raise FileNotFoundError(f"latent cache {cache_dir}: shards missing {missing}")
    counts, shape = [], None
    for s in shards:
        header = _header(cache_dir / s)[0]
        counts.append(int(header["soma_joinid"]["shape"][0]))
        shape = list(header[LATENTS]["shape"][1:])
    index = {
        "shards": shards,
        "num_cells_per_shard": counts,
        "num_cells": sum(counts),
        "latent_shape": shape,
        "key": key,
    }
    (cache_dir / INDEX_FILE).write_text(json.dumps(index, indent=1))
    return index


class LatentCacheLoader:
    """Batches of cached latents for one rank, with the loader's epoch and position semantics.

    Every epoch is a seeded permutation of all cached cells (a pure function of seed and epoch). Each step
    takes the next `micro_batch_size * world_size` cells of it, rank r the positions r, r + world, ...; the
    last step of an epoch is shortened so every rank gets the same number of cells (a rank must never wait
    on a collective its peers skip; fewer than `world_size` cells are left out). `state_dict()` is (epoch,
    cells consumed in the epoch over all ranks), the same on every rank, so a job resumed at another world
    size continues with exactly the cells that were not yet consumed.

    Args:
        cache_dir: folder holding `index.json` and the shards.
        rank, world_size: this rank's place.
        micro_batch_size: cells per batch.
        seed: permutation seed.
        shuffle: False reads cells in `soma_joinid` order.
    """

    def __init__(
        self,
        cache_dir: str | Path,
        *,
        rank: int,
        world_size: int,
        micro_batch_size: int,
        seed: int = 0,
        shuffle: bool = True,
    ) -> None:
        index = json.loads((Path(cache_dir) / INDEX_FILE).read_text())
        paths = [Path(cache_dir) / s for s in index["shards"]]
        self._latents = [_open_array(p, LATENTS) for p in paths]
        small = {k: [torch.from_numpy(np.array(_open_array(p, k))) for p in paths] for k in CACHED_KEYS[1:]}
        shard = torch.cat([torch.full((len(x),), i, dtype=torch.int32) for i, x in enumerate(self._latents)])
        row = torch.cat([torch.arange(len(x)) for x in self._latents])
        joinids = torch.cat(small["soma_joinid"])
        order = torch.argsort(joinids)
        self.meta = {k: torch.cat(v)[order] for k, v in small.items()}
        self._shard, self._row = shard[order].numpy(), row[order].numpy()
        self.num_cells = int(order.numel())
        self.rank, self.world_size = rank, world_size
        self.micro_batch_size, self.seed, self.shuffle = micro_batch_size, seed, shuffle
        self.epoch, self.cells = 0, 0
        if self.num_cells < world_size:
            raise ValueError(f"latent cache has {self.num_cells} cells for {world_size} ranks")

    def latents(self, idx: torch.Tensor) -> torch.Tensor:
        """Latents (len(idx), M, L) of the cells at sorted positions `idx`: rows read per shard in file order."""
        idx = idx.numpy()
        out = np.empty((len(idx), *self._latents[0].shape[1:]), np.float32)
        shard, row = self._shard[idx], self._row[idx]
        for s in np.unique(shard):
            at = np.flatnonzero(shard == s)
            at = at[np.argsort(row[at], kind="stable")]  # ascending file offsets: sequential page reads
            out[at] = self._latents[s][row[at]]
        return torch.from_numpy(out)

    def latent_sample(self, n: int) -> torch.Tensor:
        """Latents of the first `n` cells in `soma_joinid` order (for fitting normalisation statistics)."""
        return self.latents(torch.arange(min(n, self.num_cells)))

    def __len__(self) -> int:
        """Batches per epoch on every rank (from the start of an epoch)."""
        step = self.micro_batch_size * self.world_size
        full = self.num_cells // step
        return full + (1 if (self.num_cells - full * step) // self.world_size else 0)

    def set_epoch(self, epoch: int) -> None:
        """Start `epoch` from its first batch."""
        self.epoch, self.cells = epoch, 0

    def _epoch_order(self) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.num_cells)
        g = torch.Generator().manual_seed(self.seed * SEED_STRIDE + self.epoch)
        return torch.randperm(self.num_cells, generator=g)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        order, world = self._epoch_order(), self.world_size
        while (per_rank := min(self.micro_batch_size, (self.num_cells - self.cells) // world)) > 0:
            idx = order[self.cells + self.rank : self.cells + per_rank * world : world]
            self.cells += per_rank * world
            yield {LATENTS: self.latents(idx), **{k: v[idx] for k, v in self.meta.items()}}

    def state_dict(self) -> dict[str, int]:
        """Epoch and cells consumed in it over all ranks (world-size independent)."""
        return {"epoch": self.epoch, "cells": self.cells}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue after the last consumed cell, at any world size."""
        if "cells" not in state:
            raise ValueError(
                f"latent cache loader state {state} predates world-size independent resume (it has no 'cells'); "
                "resume that stage-2 run with the code version that wrote it, or start it again"
            )
        cells = int(state["cells"])
        if not 0 <= cells <= self.num_cells:
            raise ValueError(f"latent cache loader state: cells={cells} outside 0..{self.num_cells} (another cache?)")
        self.epoch, self.cells = int(state["epoch"]), cells
