"""The node-local decoded cache on a real SOMA atlas: later epochs come from local disk, batch for batch the
same as without it, shared by ranks, off when the disk lacks room, and robust to a damaged segment."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import pytest
import torch

from scldm_scale.config.data import SomaDataConfig
from scldm_scale.data import build_loader, node_cache


def _cfg(uri: str, cache: str | None, **kw) -> SomaDataConfig:
    base = dict(
        atlas_uri=uri,
        micro_batch_size=16,
        shuffle_chunk_cells=16,
        shuffle_buffer_cells=64,
        seed=3,
        remainder="drop",
        label_columns=["dataset_id", "cell_type"],
        node_cache_dir=cache,
    )
    base.update(kw)
    return SomaDataConfig(**base)


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


def test_later_epochs_come_from_the_cache_with_the_same_batches(atlas, tmp_path, caplog):
    reference = build_loader(_cfg(atlas, None), rank=0, world_size=1)
    want = [_epoch(reference, e) for e in range(3)]
    cache = str(tmp_path / "cache")
    with caplog.at_level(logging.INFO, logger="scldm_scale.data.node_cache"):
        loader = build_loader(_cfg(atlas, cache), rank=0, world_size=1)
    assert "node-local cache on" in caplog.text and cache in caplog.text
    _assert_same(_epoch(loader, 0), want[0])  # streams from SOMA and stores every chunk
    # a new loader (a new run on the same node) finds the same cache; built before X changes, since an atlas
    # without ingest commit keys is keyed by X's nnz (a changed X gets a new cache)
    again = build_loader(_cfg(atlas, cache), rank=0, world_size=1)
    assert again.dataset.spec.node_cache == loader.dataset.spec.node_cache
    _hide_x(atlas)
    # Without the cache, the atlas now yields cells without counts: the check below has teeth.
    blind = _epoch(build_loader(_cfg(atlas, None), rank=0, world_size=1), 1)
    assert all(float(b["counts"].sum()) == 0 for b in blind)
    _assert_same(_epoch(loader, 1), want[1])
    _assert_same(_epoch(loader, 2), want[2])
    _assert_same(_epoch(again, 1), want[1])
    assert (
        build_loader(_cfg(atlas, cache), rank=0, world_size=1).dataset.spec.node_cache
        != again.dataset.spec.node_cache
    )


def test_ranks_share_one_cache_including_chunks_split_between_them(atlas, tmp_path):
    # 30 cells a chunk and 2 ranks: slot boundaries cut chunks, so a rank also serves parts of stored chunks
    kw = dict(shuffle_chunk_cells=30, shuffle_buffer_cells=90, remainder="pad")
    cache = str(tmp_path / "cache")
    ref = [build_loader(_cfg(atlas, None, **kw), rank=r, world_size=2) for r in range(2)]
    want = {(r, e): _epoch(ref[r], e) for e in range(2) for r in range(2)}
    loaders = [build_loader(_cfg(atlas, cache, **kw), rank=r, world_size=2) for r in range(2)]
    for r in range(2):
        _assert_same(_epoch(loaders[r], 0), want[(r, 0)])
    (directory,) = Path(cache).iterdir()
    assert len(list(directory.glob("seg-*.bin"))) == 2  # one writer per rank
    table = node_cache.NodeCache(
        node_cache.CacheLayout(str(directory), 480, 30, "<u2", "|u1", 2)
    ).table  # 480 training cells
    stored = int((table != 0).sum())
    assert 12 <= stored < 16  # whole chunks only: those cut by a slot boundary are read again next time
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
    assert not list(cache.rglob("seg-*.bin"))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="scldm_scale.data.node_cache"):
        build_loader(_cfg(atlas, None), rank=0, world_size=1)
    assert "node-local cache off (data.node_cache_dir=null)" in caplog.text


def test_a_damaged_segment_is_read_from_the_atlas_again(atlas, tmp_path, caplog):
    cache = str(tmp_path / "cache")
    want = _epoch(build_loader(_cfg(atlas, None), rank=0, world_size=1), 1)
    loader = build_loader(_cfg(atlas, cache), rank=0, world_size=1)
    _epoch(loader, 0)
    (segment,) = Path(cache).glob("*/seg-*.bin")
    with open(segment, "r+b") as f:
        f.truncate(os.path.getsize(segment) // 2)
    with caplog.at_level(logging.WARNING, logger="scldm_scale.data.node_cache"):
        _assert_same(_epoch(loader, 1), want)
    assert "unreadable (truncated" in caplog.text


def test_other_cells_or_genes_get_their_own_cache(atlas, tmp_path):
    cache = tmp_path / "cache"
    a = build_loader(_cfg(atlas, str(cache)), rank=0, world_size=1).dataset.spec.node_cache
    b = build_loader(_cfg(atlas, str(cache), value_filter="split == 'val'"), rank=0, world_size=1)
    c = build_loader(_cfg(atlas, str(cache), min_gene_cells=120), rank=0, world_size=1)
    same = build_loader(_cfg(atlas, str(cache)), rank=0, world_size=1).dataset.spec.node_cache
    paths = {a.path, b.dataset.spec.node_cache.path, c.dataset.spec.node_cache.path}
    assert len(paths) == 3 and same.path == a.path
    # a derived loader with another chunk size cannot use per-chunk records
    assert (
        build_loader(_cfg(atlas, str(cache)), rank=0, world_size=1)
        .derive(chunk_cells=8)
        .dataset.spec.node_cache
        is None
    )


def test_config_rejects_a_non_path():
    with pytest.raises(ValueError, match="data.node_cache_dir"):
        SomaDataConfig(node_cache_dir=3)
