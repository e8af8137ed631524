"""Schema of the training loop. Torch-free."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(kw_only=True)
class TrainConfig:
    max_steps: int = 200
    """Optimizer steps (not micro-batches)."""
    run_dir: str = "runs/vae-demo"
    """Where checkpoints and the resolved config go."""
    grad_accum_steps: int = 1
    """Micro-batches per optimizer step."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """bf16 = mixed precision (fp32 master weights)."""
    seed: int = 0
    """Model-init and dropout seed."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto = cuda when available."""

    def __post_init__(self) -> None:
        if self.max_steps < 1:
            raise ValueError(f"train.max_steps must be >= 1, got {self.max_steps}")
        if self.grad_accum_steps < 1:
            raise ValueError(f"train.grad_accum_steps must be >= 1, got {self.grad_accum_steps}")
