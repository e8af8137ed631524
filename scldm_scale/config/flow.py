"""Schema of flow matching and sampling. Owned by `scldm_scale/flow/`. Torch-free."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(kw_only=True)
class FlowConfig:
    sampler: Literal["euler", "heun", "dopri5"] = "heun"
    """ODE sampler used for generation."""
    num_steps: int = 50
    """Steps for euler / heun (honoured, unlike the reference code)."""

    def __post_init__(self) -> None:
        if self.num_steps < 1:
            raise ValueError(f"flow.num_steps must be >= 1, got {self.num_steps}")
