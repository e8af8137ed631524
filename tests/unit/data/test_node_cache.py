"""The node-local decoded cache on a real SOMA atlas: later epochs come from local disk, batch for batch the
same as without it, shared by ranks, off when the disk lacks room, and robust to a damaged segment."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import pytest
import torch
from soma_test_atlas import loader_config

from scldm_scale.config.data import SomaDataConfig
from scldm_scale.data import build_loader, node_cache


def _cfg(uri: str, cache: str | None, **kw) -> SomaDataConfig:
    return loader_config(uri, **{"remainder": "drop", "node_cache_dir": cache, **kw})


def _epoch(loader, epoch: int) -> list[dict[str, torch.Tensor]]:
    loader.set_epoch(epoch)
    return list(loader)


def _assert_same(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b) > 0
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for key in x:
            assert torch.equal(x[key], y[key]), key


def _hide_x(atlas: str) -> None:
    """Take X's stored values away (its schema stays): a read of X now returns no values."""
    x = Path(atlas, "ms", "RNA", "X", "raw")
    for name in ("__fragments", "__commits"):
        shutil.move(x / name, x / f"hidden{name}")
        (x / name).mkdir()


@pytest.fixture
def atlas(small_atlas, tmp_path) -> str:
    copy = tmp_path / "atlas"
    shutil.copytree(small_atlas, copy)
    return str(copy)


@pytest.mark.parametrize(
    "kw",
    [
        {},
        # 4 workers share 1 MiB: a block of 480 cells exceeds a worker's share, so units are random parts of it
        {"num_workers": 4, "memory_budget_mb": 1, "shuffle_buffer_cells": 480},
    ],
    ids=["whole-blocks", "parts-of-blocks"],
)
def test_later_epochs_come_from_the_cache_with_the_same_batches(atlas, tmp_path, caplog, kw):
    reference = build_loader(_cfg(atlas, None, **kw), rank=0, world_size=1)
    want = [_epoch(reference, e) for e in range(3)]
    cache = str(tmp_path / "cache")
    with caplog.at_level(logging.INFO, logger="scldm_scale.data.node_cache"):
        loader = build_loader(_cfg(atlas, cache, **kw), rank=0, world_size=1)
    assert "node-local cache on" in caplog.text and cache in caplog.text
    spec = loader.dataset.spec
    if kw:
        assert spec.unit_plan(spec.order(0), 0)[0] < spec.block_chunks * spec.chunk_cells
    _assert_same(_epoch(loader, 0), want[0])  # streams from SOMA and stores every cell
    # a new loader (a new run on the same node) finds the same cache; built before X changes, since an atlas
    # without ingest commit keys is keyed by X's nnz (a changed X gets a new cache)
    again = build_loader(_cfg(atlas, cache, **kw), rank=0, world_size=1)
    assert again.dataset.spec.node_cache == spec.node_cache
    _hide_x(atlas)
    # Without the cache, the atlas now yields cells without counts: the check below has teeth.
    blind = _epoch(build_loader(_cfg(atlas, None, **kw), rank=0, world_size=1), 1)
    assert all(float(b["counts"].sum()) == 0 for b in blind)
    _assert_same(_epoch(loader, 1), want[1])
    _assert_same(_epoch(loader, 2), want[2])
    _assert_same(_epoch(again, 1), want[1])
    changed = build_loader(_cfg(atlas, cache, **kw), rank=0, world_size=1)
    assert changed.dataset.spec.node_cache != spec.node_cache


def test_ranks_share_one_cache_including_chunks_split_between_them(atlas, tmp_path):
    # 30 cells a chunk and 2 ranks: slot boundaries cut chunks between the ranks
    kw = dict(shuffle_chunk_cells=30, shuffle_buffer_cells=90, remainder="pad")
    cache = str(tmp_path / "cache")
    ref = [build_loader(_cfg(atlas, None, **kw), rank=r, world_size=2) for r in range(2)]
    want = {(r, e): _epoch(ref[r], e) for e in range(2) for r in range(2)}
    loaders = [build_loader(_cfg(atlas, cache, **kw), rank=r, world_size=2) for r in range(2)]
    for r in range(2):
        _assert_same(_epoch(loaders[r], 0), want[(r, 0)])
    (directory,) = Path(cache).iterdir()
    assert len(list(directory.glob("tok-*.bin"))) == 2  # one writer per rank
    stored = node_cache.NodeCache(loaders[0].dataset.spec.node_cache).cells
    assert bool((stored != 0).all())  # every one of the 480 training cells, also those of cut chunks
    _hide_x(atlas)
    for r in range(2):
        _assert_same(_epoch(loaders[r], 1), want[(r, 1)])


def test_off_when_the_disk_lacks_room_and_logged(atlas, tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(node_cache, "RESERVE_FRACTION", 1.0)  # keep the whole disk free: no room
    cache = tmp_path / "cache"
    with caplog.at_level(logging.INFO, logger="scldm_scale.data.node_cache"):
        loader = build_loader(_cfg(atlas, str(cache)), rank=0, world_size=1)
    assert "node-local cache off" in caplog.text and "GiB free" in caplog.text
    assert loader.dataset.spec.node_cache is None
    assert len(_epoch(loader, 0)) > 0
    assert not list(cache.rglob("tok-*.bin"))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="scldm_scale.data.node_cache"):
        build_loader(_cfg(atlas, None), rank=0, world_size=1)
    assert "node-local cache off (data.node_cache_dir=null)" in caplog.text


def test_a_damaged_segment_is_read_from_the_atlas_again(atlas, tmp_path, caplog):
    cache = str(tmp_path / "cache")
    want = _epoch(build_loader(_cfg(atlas, None), rank=0, world_size=1), 1)
    loader = build_loader(_cfg(atlas, cache), rank=0, world_size=1)
    _epoch(loader, 0)
    (segment,) = Path(cache).glob("*/tok-*.bin")
    with open(segment, "r+b") as f:
        f.truncate(os.path.getsize(segment) // 2)
    with caplog.at_level(logging.WARNING, logger="scldm_scale.data.node_cache"):
        _assert_same(_epoch(loader, 1), want)
    assert "unreadable (segment 1 is missing or shorter" in caplog.text
    # the cells it could not read were read from the atlas; the next reads store them again
    _epoch(loader, 2)
    assert bool((node_cache.NodeCache(loader.dataset.spec.node_cache).cells != 0).all())


def test_a_cache_deleted_under_a_running_loader_is_a_warning_not_an_error(atlas, tmp_path, caplog):
    cache = tmp_path / "cache"
    want = _epoch(build_loader(_cfg(atlas, None), rank=0, world_size=1), 1)
    loader = build_loader(_cfg(atlas, str(cache)), rank=0, world_size=1)
    shutil.rmtree(cache)
    with caplog.at_level(logging.WARNING, logger="scldm_scale.data.node_cache"):
        _assert_same(_epoch(loader, 1), want)
    assert "cannot be opened" in caplog.text
    # a cache root that cannot be a directory: off, with the reason in the log
    (tmp_path / "a_file").write_text("not a directory")
    with caplog.at_level(logging.INFO, logger="scldm_scale.data.node_cache"):
        off = build_loader(_cfg(atlas, str(tmp_path / "a_file")), rank=0, world_size=1)
    assert off.dataset.spec.node_cache is None and "node-local cache off: cannot create" in caplog.text


def test_other_cells_or_genes_get_their_own_cache(atlas, tmp_path):
    cache = tmp_path / "cache"
    a = build_loader(_cfg(atlas, str(cache)), rank=0, world_size=1).dataset.spec.node_cache
    b = build_loader(_cfg(atlas, str(cache), value_filter="split == 'val'"), rank=0, world_size=1)
    c = build_loader(_cfg(atlas, str(cache), min_gene_cells=120), rank=0, world_size=1)
    same = build_loader(_cfg(atlas, str(cache)), rank=0, world_size=1).dataset.spec.node_cache
    paths = {a.path, b.dataset.spec.node_cache.path, c.dataset.spec.node_cache.path}
    assert len(paths) == 3 and same.path == a.path
    # a derived loader (another chunk size, order) serves the same cells: the same cache
    derived = build_loader(_cfg(atlas, str(cache)), rank=0, world_size=1).derive(chunk_cells=8, shuffle=False)
    assert derived.dataset.spec.node_cache == a


def test_config_rejects_a_non_path():
    with pytest.raises(ValueError, match="data.node_cache_dir"):
        SomaDataConfig(node_cache_dir=3)
