"""The stage-2 latent cache: shards written per rank, read back memory-mapped, sorted by soma_joinid."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from scldm_scale.data.latent_cache import LATENTS, LatentCacheLoader, write_index, write_shard

M, L = 3, 4


def _cells(joinids: list[int]) -> dict[str, torch.Tensor]:
    j = torch.tensor(joinids)
    return {
        "soma_joinid": j,
        "labels": torch.stack([j % 3, j % 5], 1),
        "library_size": j.float() * 10,
        "z": j.float()[:, None, None] + torch.arange(M * L).float().reshape(1, M, L) / 100,
    }


@pytest.fixture
def cache(tmp_path):
    rng = np.random.default_rng(0)
    joinids = rng.permutation(np.arange(100, 157)).tolist()  # 57 cells, written by 2 "ranks" out of order
    for rank, part in enumerate((joinids[:30], joinids[30:])):
        batches = [_cells(part[i : i + 8]) for i in range(0, len(part), 8)]
        write_shard(tmp_path, batches, lambda b: b["z"], rank=rank, world_size=2)
    index = write_index(tmp_path, world_size=2, key={"k": 1})
    assert index["num_cells"] == 57 and index["latent_shape"] == [M, L]
    return tmp_path


def test_reads_are_memory_mapped_and_match_what_was_written(cache):
    loader = LatentCacheLoader(cache, rank=0, world_size=1, micro_batch_size=8, seed=3)
    assert all(isinstance(x, np.memmap) for x in loader._latents)  # nothing loaded up front
    assert loader.meta["soma_joinid"].tolist() == list(range(100, 157))
    seen = []
    for batch in loader:
        want = _cells(batch["soma_joinid"].tolist())
        torch.testing.assert_close(batch[LATENTS], want["z"])
        assert torch.equal(batch["labels"], want["labels"]) and torch.equal(batch["library_size"], want["library_size"])
        seen += batch["soma_joinid"].tolist()
    assert sorted(seen) == list(range(100, 157))
    torch.testing.assert_close(loader.latent_sample(5), _cells(list(range(100, 105)))["z"])


def test_ranks_disjoint_equal_and_resume_exact(cache):
    loaders = [LatentCacheLoader(cache, rank=r, world_size=2, micro_batch_size=5, seed=1) for r in range(2)]
    per_rank = [[b["soma_joinid"].tolist() for b in ld] for ld in loaders]
    assert len(per_rank[0]) == len(per_rank[1]) == len(loaders[0])
    flat = [sum(p, []) for p in per_rank]
    assert not set(flat[0]) & set(flat[1])
    first = LatentCacheLoader(cache, rank=0, world_size=2, micro_batch_size=5, seed=1)
    it = iter(first)
    head = [next(it)["soma_joinid"].tolist() for _ in range(2)]
    resumed = LatentCacheLoader(cache, rank=0, world_size=2, micro_batch_size=5, seed=1)
    resumed.load_state_dict(first.state_dict())
    assert head + [b["soma_joinid"].tolist() for b in resumed] == per_rank[0]


@pytest.mark.parametrize("before, after", [(2, 3), (3, 1), (1, 2)])
def test_resume_at_another_world_size_consumes_exactly_the_rest_of_the_epoch(cache, before, after):
    """Stop after 2 steps at `before` ranks, resume at `after` ranks: consumed + remaining = the epoch, once each."""
    first = [LatentCacheLoader(cache, rank=r, world_size=before, micro_batch_size=4, seed=5) for r in range(before)]
    its = [iter(ld) for ld in first]
    consumed = [j for _ in range(2) for it in its for j in next(it)["soma_joinid"].tolist()]
    state = first[0].state_dict()
    assert all(ld.state_dict() == state for ld in first) and state == {"epoch": 0, "cells": 2 * 4 * before}
    rest = []
    for r in range(after):
        resumed = LatentCacheLoader(cache, rank=r, world_size=after, micro_batch_size=4, seed=5)
        resumed.load_state_dict(state)
        rest += [j for b in resumed for j in b["soma_joinid"].tolist()]
    everything = consumed + rest
    assert len(everything) == len(set(everything))  # nothing repeated
    assert 57 - len(everything) < after  # nothing lost but the < world_size cells an epoch leaves out
    one_rank = LatentCacheLoader(cache, rank=0, world_size=1, micro_batch_size=4, seed=5)
    order = [j for b in one_rank for j in b["soma_joinid"].tolist()]
    assert sorted(consumed) == sorted(order[: len(consumed)])  # the same cells as any world size's first steps


def test_a_file_that_is_not_safetensors_is_named(cache):
    (cache / "shard-00001-of-00002.safetensors").write_bytes(b"\xff" * 16)
    with pytest.raises(ValueError, match="shard-00001-of-00002.safetensors"):
        LatentCacheLoader(cache, rank=0, world_size=1, micro_batch_size=8)
