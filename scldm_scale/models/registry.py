"""Builders used by the trainer, and parameter counting for the size presets in configs/{vae,ldm}/*.yaml.

`count_parameters` builds on the meta device, so a 270M-parameter preset is counted without allocating it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from scldm_scale.config.model import DiTConfig, VAEConfig
from scldm_scale.models.dit.model import DiT
from scldm_scale.models.vae.model import TransformerVAE


def build_vae(cfg: VAEConfig, num_genes: int) -> TransformerVAE:
    """Stage-1 autoencoder for a vocabulary of `num_genes` genes (token ids 1..num_genes).

    Raises:
        ValueError: `model.num_genes` is set and disagrees with the data's vocabulary.
    """
    if cfg.num_genes is not None and cfg.num_genes != num_genes:
        raise ValueError(f"model.num_genes={cfg.num_genes} but the data vocabulary has {num_genes} genes")
    if num_genes < 1:
        raise ValueError(f"num_genes must be >= 1, got {num_genes}")
    return TransformerVAE(cfg, num_genes)


def build_dit(cfg: DiTConfig, latent_shape: Sequence[int], label_cardinalities: Sequence[int]) -> DiT:
    """Stage-2 DiT for latents of shape (M, L) and label columns with K_j categories each."""
    if len(latent_shape) != 2:
        raise ValueError(f"latent_shape must be (num_latent_tokens, latent_dim), got {tuple(latent_shape)}")
    if any(k < 0 for k in label_cardinalities):
        raise ValueError(f"label cardinalities must be >= 0, got {list(label_cardinalities)}")
    return DiT(cfg, latent_shape, label_cardinalities)


def num_parameters(module: nn.Module) -> int:
    """Trainable and frozen parameters of a module."""
    return sum(p.numel() for p in module.parameters())


def count_vae_parameters(cfg: VAEConfig, num_genes: int) -> int:
    """Parameters of `build_vae(cfg, num_genes)`, counted on the meta device (no memory)."""
    with torch.device("meta"):
        return num_parameters(TransformerVAE(cfg, num_genes))


def count_dit_parameters(cfg: DiTConfig, latent_shape: Sequence[int], label_cardinalities: Sequence[int]) -> int:
    """Parameters of `build_dit(...)`, counted on the meta device."""
    with torch.device("meta"):
        return num_parameters(DiT(cfg, latent_shape, label_cardinalities))
