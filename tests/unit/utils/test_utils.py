"""utils: rank info from the environment, logging set-up, seeding."""

from __future__ import annotations

import logging

import numpy as np
import torch

from scldm_scale.utils import get_local_rank, get_rank, get_world_size, is_rank_zero, seed_everything
from scldm_scale.utils import logging as ulog


def test_rank_info_defaults_without_launcher(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    assert (get_rank(), get_world_size(), get_local_rank(), is_rank_zero()) == (0, 1, 0, True)


def test_rank_info_reads_launcher_env(monkeypatch):
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert (get_rank(), get_world_size(), get_local_rank(), is_rank_zero()) == (3, 4, 1, False)


def test_nonzero_rank_logs_warnings_only(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(ulog, "_CONFIGURED", False)
    ulog.setup_logging()
    log = logging.getLogger("scldm_scale")
    assert log.level == logging.WARNING
    assert "[rank1]" in log.handlers[0].formatter._fmt
    monkeypatch.setattr(ulog, "_CONFIGURED", False)
    monkeypatch.setenv("RANK", "0")
    ulog.setup_logging()
    assert logging.getLogger("scldm_scale").level == logging.INFO


def test_seed_everything_is_reproducible():
    seed_everything(5)
    a = (np.random.rand(3), torch.rand(3))
    seed_everything(5)
    b = (np.random.rand(3), torch.rand(3))
    assert np.array_equal(a[0], b[0]) and torch.equal(a[1], b[1])
