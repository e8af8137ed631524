"""Per-rank RNG states (torch CPU / CUDA, python, numpy) as tensors and ints, so `torch.load(weights_only=True)`
reads them back; deterministic reseeding when the world size changed."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

from scldm_scale.utils.seed import SEED_STRIDE


def rng_state() -> dict[str, Any]:
    """This process's RNG states (torch CPU / CUDA, python, numpy) as tensors and ints."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Inverse of `rng_state`."""
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_state = state["numpy"]
    keys = np_state["keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, np_state["pos"], np_state["has_gauss"], np_state["cached"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def reseed(seed: int, step: int, rank: int) -> None:
    """Deterministic fresh RNG streams for (seed, step, rank): used when the world size changed."""
    derived = (seed * SEED_STRIDE + step * 10_007 + rank) % (2**63 - 1)
    random.seed(derived)
    np.random.seed(derived % (2**32))
    torch.manual_seed(derived)
