"""Schema of flow matching, EMA and sampling. Owned by `scldm_scale/flow/`. Torch-free."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass(kw_only=True)
class FlowConfig:
    sampler: Literal["euler", "heun", "dopri5"] = "heun"
    """ODE sampler used for generation."""
    num_steps: int = 50
    """Steps for euler / heun (honoured, unlike the reference code); heun costs 2 evaluations per step."""
    atol: float = 1e-5
    """dopri5 absolute tolerance (reference: 1e-5)."""
    rtol: float = 1e-5
    """dopri5 relative tolerance (reference: 1e-5)."""
    guidance_weights: list[float] = field(default_factory=list)
    """CFG weight per label column (0 = unconditional, 1 = conditional); empty = 1.0 for every column."""
    ema_decay: float = 0.9999
    """EMA decay of the DiT weights (reference: 0.9999)."""
    ema_update_after_step: int = 0
    """Optimizer steps before the EMA starts tracking (copied verbatim until then; reference: 10,000)."""
    ema_update_every: int = 1
    """Update the EMA every this many optimizer steps, with decay ** every (same horizon; reference: 10)."""
    ema_decay_ramp: bool = True
    """Ramp the decay as min(ema_decay, (1 + t) / (10 + t)), so the initial weights fade within the first
    steps (without it, 500 steps at 0.995 leave 8% of the untrained weights in the average)."""
    use_ema_for_sampling: bool = True
    """Sample with the EMA weights (the reference samples with the raw weights)."""
    latent_normalization: Literal["none", "standardize"] = "none"
    """Stage-2 latents: as encoded (reference, already LayerNorm-ed) or standardised with a scalar
    shift/scale fitted on training latents (models.LatentStats)."""

    def __post_init__(self) -> None:
        if self.num_steps < 1:
            raise ValueError(f"flow.num_steps must be >= 1, got {self.num_steps}")
        for key in ("atol", "rtol"):
            if getattr(self, key) <= 0:
                raise ValueError(f"flow.{key} must be > 0, got {getattr(self, key)}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"flow.ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.ema_update_after_step < 0:
            raise ValueError(f"flow.ema_update_after_step must be >= 0, got {self.ema_update_after_step}")
        if self.ema_update_every < 1:
            raise ValueError(f"flow.ema_update_every must be >= 1, got {self.ema_update_every}")
        if any(w < 0 for w in self.guidance_weights):
            raise ValueError(f"flow.guidance_weights must be >= 0, got {self.guidance_weights}")
