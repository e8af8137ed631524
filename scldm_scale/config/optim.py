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
    eps: float = 1e-8
    """AdamW epsilon."""
    schedule: Literal["wsd", "cosine", "constant"] = "wsd"
    """warmup-stable-decay (stage 1 reference) or warmup + cosine (stage 2 reference)."""
    warmup_fraction: float = 0.1
    """Fraction of train.max_steps spent warming up."""
    warmup_start_ratio: float = 0.01
    """LR at step 0 as a fraction of the peak (reference WSD warms up from lr/100)."""
    decay_fraction: float = 0.1
    """WSD only: fraction of train.max_steps spent in the final decay."""
    decay_type: Literal["sqrt", "linear", "cosine"] = "sqrt"
    """WSD only: decay shape (reference: 1 - sqrt)."""
    min_lr_ratio: float = 0.1
    """Final LR as a fraction of the peak (reference: 0.1 for both WSD and cosine)."""
    lr_scaling: Literal["none", "linear"] = "none"
    """linear = multiply the peak LR by the world size, as the reference does."""
    grad_clip_norm: float = 10.0
    """Gradient clipping by global norm; 0 disables."""

    def __post_init__(self) -> None:
        if self.betas is None:
            self.betas = [0.9, 0.95]
        if self.lr <= 0:
            raise ValueError(f"optim.lr must be > 0, got {self.lr}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"optim.betas must be two values in [0, 1), got {self.betas}")
        if self.weight_decay < 0:
            raise ValueError(f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        if self.eps <= 0:
            raise ValueError(f"optim.eps must be > 0, got {self.eps}")
        if not 0 <= self.warmup_fraction < 1:
            raise ValueError(f"optim.warmup_fraction must be in [0, 1), got {self.warmup_fraction}")
        if not 0 < self.warmup_start_ratio <= 1:
            raise ValueError(f"optim.warmup_start_ratio must be in (0, 1], got {self.warmup_start_ratio}")
        if not 0 <= self.decay_fraction <= 1:
            raise ValueError(f"optim.decay_fraction must be in [0, 1], got {self.decay_fraction}")
        if self.schedule == "wsd" and self.warmup_fraction + self.decay_fraction > 1:
            raise ValueError(
                "optim.warmup_fraction + optim.decay_fraction must be <= 1 for schedule=wsd, "
                f"got {self.warmup_fraction} + {self.decay_fraction}"
            )
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.grad_clip_norm < 0:
            raise ValueError(f"optim.grad_clip_norm must be >= 0 (0 disables), got {self.grad_clip_norm}")
