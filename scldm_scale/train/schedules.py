"""Learning-rate schedules as multiplicative factors of the peak LR (for `torch.optim.lr_scheduler.LambdaLR`).

As in the authors' public scLDM code: stage 1 uses warmup-stable-decay, warming up linearly from lr/100 over
10% of the steps, holding, then decaying with 1 - sqrt to 0.1 lr over the last 10%; stage 2 warms up over
10% and follows a cosine from lr to 0.1 lr. Torch-free: factors are plain functions of the step index.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from scldm_scale.config.optim import OptimConfig

Schedule = Callable[[int], float]
"""step (0-based optimizer step) -> factor of the peak LR."""


def _warmup(step: int, warmup_steps: int, start_ratio: float) -> float:
    return start_ratio + (1.0 - start_ratio) * step / warmup_steps


def wsd(
    max_steps: int,
    *,
    warmup_steps: int,
    decay_steps: int,
    warmup_start_ratio: float = 0.01,
    min_lr_ratio: float = 0.1,
    decay_type: str = "sqrt",
) -> Schedule:
    """Warmup-stable-decay: linear warmup, constant 1, then decay to `min_lr_ratio` at `max_steps`.

    Decay shapes over progress s in [0, 1]: sqrt `1 - sqrt(s)`, linear `1 - s`, cosine `(1 + cos(pi s)) / 2`,
    each mapped onto [min_lr_ratio, 1].
    """
    if warmup_steps + decay_steps > max_steps:
        raise ValueError(f"wsd: warmup_steps + decay_steps must be <= max_steps, got {warmup_steps}+{decay_steps}")
    shapes = {
        "sqrt": lambda s: 1.0 - math.sqrt(s),
        "linear": lambda s: 1.0 - s,
        "cosine": lambda s: 0.5 * (1.0 + math.cos(math.pi * s)),
    }
    if decay_type not in shapes:
        raise ValueError(f"optim.decay_type must be one of {sorted(shapes)}, got {decay_type!r}")
    shape = shapes[decay_type]
    decay_start = max_steps - decay_steps

    def factor(step: int) -> float:
        if step < warmup_steps:
            return _warmup(step, warmup_steps, warmup_start_ratio)
        if step < decay_start or decay_steps == 0:
            return 1.0
        progress = min(1.0, (step - decay_start) / decay_steps)
        return min_lr_ratio + (1.0 - min_lr_ratio) * shape(progress)

    return factor


def cosine(max_steps: int, *, warmup_steps: int, warmup_start_ratio: float = 0.01, min_lr_ratio: float = 0.1) -> Schedule:
    """Linear warmup, then cosine from 1 to `min_lr_ratio` at `max_steps`."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return _warmup(step, warmup_steps, warmup_start_ratio)
        progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def constant(max_steps: int, *, warmup_steps: int = 0, warmup_start_ratio: float = 0.01) -> Schedule:
    """Linear warmup, then 1."""

    def factor(step: int) -> float:
        return _warmup(step, warmup_steps, warmup_start_ratio) if step < warmup_steps else 1.0

    return factor


def build_schedule(cfg: OptimConfig, max_steps: int) -> Schedule:
    """The schedule named by `optim.schedule`, with warmup = round(warmup_fraction * max_steps)."""
    warmup_steps = int(round(cfg.warmup_fraction * max_steps))
    if cfg.schedule == "wsd":
        decay_steps = min(int(round(cfg.decay_fraction * max_steps)), max_steps - warmup_steps)
        return wsd(
            max_steps,
            warmup_steps=warmup_steps,
            decay_steps=decay_steps,
            warmup_start_ratio=cfg.warmup_start_ratio,
            min_lr_ratio=cfg.min_lr_ratio,
            decay_type=cfg.decay_type,
        )
    if cfg.schedule == "cosine":
        return cosine(
            max_steps, warmup_steps=warmup_steps, warmup_start_ratio=cfg.warmup_start_ratio, min_lr_ratio=cfg.min_lr_ratio
        )
    if cfg.schedule == "constant":
        return constant(max_steps, warmup_steps=warmup_steps, warmup_start_ratio=cfg.warmup_start_ratio)
    raise ValueError(f"optim.schedule must be wsd, cosine or constant, got {cfg.schedule!r}")
