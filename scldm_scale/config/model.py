"""Schema of the two networks: the stage-1 transformer autoencoder and the stage-2 DiT.

Owned by `scldm_scale/models/`. Torch-free. Size presets live in configs/{vae,ldm}/*.yaml.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(kw_only=True)
class VAEConfig:
    num_genes: int | None = None
    """Gene vocabulary size without padding; None = taken from the data's vocabulary at start-up."""
    dim: int = 32
    """Token width d."""
    latent_dim: int = 16
    """Latent width D per latent token."""
    num_latent_tokens: int = 16
    """m, the number of MCAB inducing points."""
    num_layers: int = 2
    """Self-attention blocks in encoder and in decoder (each)."""
    num_heads: int = 4
    """Self-attention heads."""
    num_cross_heads: int = 4
    """MCAB heads."""

    def __post_init__(self) -> None:
        for key in ("dim", "latent_dim", "num_latent_tokens", "num_layers", "num_heads", "num_cross_heads"):
            if getattr(self, key) < 1:
                raise ValueError(f"model.{key} must be >= 1, got {getattr(self, key)}")


@dataclass(kw_only=True)
class DiTConfig:
    dim: int = 64
    """Hidden width H."""
    num_layers: int = 2
    """adaLN-Zero blocks."""
    num_heads: int = 4
    """Attention heads."""
    guidance: Literal["joint", "additive"] = "additive"
    """Multi-attribute classifier-free guidance strategy."""

    def __post_init__(self) -> None:
        for key in ("dim", "num_layers", "num_heads"):
            if getattr(self, key) < 1:
                raise ValueError(f"model.{key} must be >= 1, got {getattr(self, key)}")
