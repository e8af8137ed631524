"""Seeding helpers."""

from __future__ import annotations

import random

import numpy as np

SEED_STRIDE = 1_000_003
"""Prime that spreads a run's seed before a counter is added (`seed * SEED_STRIDE + epoch`, or + step and
rank), so the derived seeds of different (seed, counter) pairs differ while the counter stays below it."""


def seed_everything(seed: int) -> None:
    """Seed python, numpy and (if importable) torch."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    try:
        import torch
    except ImportError:  # torch-free tools (ingestion) may call this
        return
    torch.manual_seed(seed)
