"""Schema of the optimizer and learning-rate schedule. Torch-free."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(kw_only=True)
class OptimConfig:
    lr: float = 1e-3
    """Peak learning rate."""
    betas: list[float] = None  # type: ignore[assignment]
    """AdamW betas; default (0.9, 0.95) as in the reference VAE."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    schedule: Literal["wsd", "cosine", "constant"] = "wsd"
    """warmup-stable-decay (stage 1 reference) or warmup + cosine (stage 2 reference)."""
    warmup_fraction: float = 0.1
    """Fraction of train.max_steps spent warming up."""
    grad_clip_norm: float = 10.0
    """Gradient clipping by global norm; 0 disables."""

    def __post_init__(self) -> None:
        if self.betas is None:
            self.betas = [0.9, 0.95]
        if self.lr <= 0:
            raise ValueError(f"optim.lr must be > 0, got {self.lr}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"optim.betas must be two values in [0, 1), got {self.betas}")
        if not 0 <= self.warmup_fraction < 1:
            raise ValueError(f"optim.warmup_fraction must be in [0, 1), got {self.warmup_fraction}")
