"""Seeding helpers."""

from __future__ import annotations

import random

import numpy as np


def seed_everything(seed: int) -> None:
    """Seed python, numpy and (if importable) torch."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    try:
        import torch
    except ImportError:  # torch-free tools (ingestion) may call this
        return
    torch.manual_seed(seed)
