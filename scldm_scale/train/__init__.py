"""Training: optimizer, LR schedules, EMA, the `Trainer` loop, and (lazily) the stage entry points.

The distributed core (`build_engine`, `Trainer`, `EMA`, schedules) is imported eagerly; the stage modules
(`run_vae` / `run_ldm`, `vae_step` / `ldm_step`) are resolved on first access so this package imports
even where they pull heavier dependencies.
"""

from __future__ import annotations

import importlib
from typing import Any

from scldm_scale.train.ema import EMA
from scldm_scale.train.loop import StepOutput, Trainer, TrainResult
from scldm_scale.train.optim import build_engine, build_lr_scheduler, build_optimizer, peak_lr
from scldm_scale.train.schedules import build_schedule, constant, cosine, wsd

_LAZY = {
    "run_vae": "scldm_scale.train.run",
    "run_ldm": "scldm_scale.train.run",
    "vae_step": "scldm_scale.train.vae_step",
    "ldm_step": "scldm_scale.train.ldm_step",
}

__all__ = [
    "EMA",
    "StepOutput",
    "TrainResult",
    "Trainer",
    "build_engine",
    "build_lr_scheduler",
    "build_optimizer",
    "build_schedule",
    "constant",
    "cosine",
    "ldm_step",
    "peak_lr",
    "run_ldm",
    "run_vae",
    "vae_step",
    "wsd",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'scldm_scale.train' has no attribute {name!r}")
