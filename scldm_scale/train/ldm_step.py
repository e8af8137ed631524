"""Stage-2 step: flow-matching loss of the DiT on latents of one micro-batch. Pure maths.

Latents come either from the latent cache (`batch["latents"]`) or from the frozen autoencoder, encoded
here under `no_grad` (the reference re-encodes every batch). Notation of `flow/path.py`: x1 data latents.

Shape legend: B cells, M latent tokens, L latent dim, K label columns.
"""

from __future__ import annotations

import torch
from torch import nn

from scldm_scale.data.latent_cache import LATENTS
from scldm_scale.flow.loss import flow_matching_loss
from scldm_scale.models.latent import LatentStats
from scldm_scale.models.output import LossOutput


@torch.no_grad()
def encode_latents(vae: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Posterior means (B, M, L) of the frozen autoencoder (the deterministic encoder's output)."""
    return vae.encode(batch["gene_ids"], batch["counts"], batch["mask"]).mean.float()


def ldm_step(
    dit: nn.Module,
    batch: dict[str, torch.Tensor],
    *,
    vae: nn.Module | None = None,
    latent_stats: LatentStats | None = None,
    generator: torch.Generator | None = None,
) -> LossOutput:
    """Flow-matching loss with velocity prediction on x1 = (normalised) data latents.

    Args:
        dit: the velocity network `dit(xt, t, labels=...)` (as the engine exposes it).
        batch: a cached-latent batch (`latents`, `labels`) or a token batch (`gene_ids`, `counts`, `mask`,
            `labels`) to encode with `vae`.
        vae: frozen autoencoder; required when the batch has no `latents`.
        latent_stats: scalar shift / scale applied before the DiT sees the latents (None = as encoded).
        generator: noise and time generator (tests).

    Returns:
        `LossOutput(loss, {"fm_mse": ...})`.
    """
    if LATENTS in batch:
        x1_BML = batch[LATENTS].float()
    elif vae is not None:
        x1_BML = encode_latents(vae, batch)
    else:
        raise ValueError("ldm_step needs batch['latents'] (latent cache) or the frozen vae")
    if latent_stats is not None:
        x1_BML = latent_stats.normalize(x1_BML)
    out = flow_matching_loss(dit, x1_BML, generator=generator, labels=batch.get("labels"))
    return LossOutput(loss=out["loss"], terms={"fm_mse": out["mse"].mean()})
