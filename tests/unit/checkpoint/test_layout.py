"""Checkpoint layout without a process group: naming, latest, resolve, publish, retention, RNG round trip."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from scldm_scale.checkpoint import (
    apply_retention,
    checkpoint_name,
    latest_checkpoint,
    list_checkpoints,
    resolve_checkpoint,
    rng_state,
    set_rng_state,
)
from scldm_scale.checkpoint.layout import META_FILE, publish, remove_stale_tmp


def _fake(run, step, published=True):
    name = checkpoint_name(step) + ("" if published else ".tmp")
    path = run / "checkpoints" / name
    path.mkdir(parents=True)
    (path / META_FILE).write_text(json.dumps({"step": step}))
    return path


def test_latest_ignores_tmp_and_unfinished(tmp_path):
    run = tmp_path / "run"
    _fake(run, 10)
    _fake(run, 30, published=False)
    (run / "checkpoints" / checkpoint_name(20)).mkdir()  # no meta.json: never finished
    assert [s for s, _ in list_checkpoints(run)] == [10]
    assert latest_checkpoint(run).name == "step-00000010"


def test_resolve_checkpoint(tmp_path):
    run = tmp_path / "run"
    a, b = _fake(run, 1), _fake(run, 2)
    assert resolve_checkpoint(run) == b
    assert resolve_checkpoint(run / "checkpoints") == b
    assert resolve_checkpoint(a) == a
    with pytest.raises(FileNotFoundError):
        resolve_checkpoint(tmp_path / "nothing")


def test_publish_is_a_rename_and_replaces_same_step(tmp_path):
    run = tmp_path / "run"
    old = _fake(run, 5)
    tmp = _fake(run, 5, published=False)
    (tmp / "new").write_text("x")
    publish(tmp, old)
    assert (old / "new").is_file() and not tmp.exists()
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-00000005"]


def test_retention_keeps_latest_k_and_stale_tmp_is_removed(tmp_path):
    run = tmp_path / "run"
    for step in (1, 2, 3, 4):
        _fake(run, step)
    stale = _fake(run, 5, published=False)
    deleted = apply_retention(run, keep_latest_k=2)
    assert [p.name for p in deleted] == ["step-00000001", "step-00000002"]
    assert [s for s, _ in list_checkpoints(run)] == [3, 4]
    remove_stale_tmp(run)
    assert not stale.exists()


def test_rng_round_trip_through_weights_only_load(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    torch.save(rng_state(), tmp_path / "rng.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected
