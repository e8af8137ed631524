"""Stage-1 step: the autoencoder's loss on one micro-batch. Pure maths; the loop owns optimisation."""

from __future__ import annotations

import torch
from torch import nn

from scldm_scale.models.output import LossOutput


def vae_step(model: nn.Module, batch: dict[str, torch.Tensor]) -> LossOutput:
    """Reconstruction loss (+ beta KL for the Gaussian posterior) of one batch (DEVELOPERS.md contract).

    Args:
        model: the `TransformerVAE` as the engine exposes it (its `loss` is registered as a forward
            method with FSDP2, so parameters are gathered as for `forward`).
        batch: `gene_ids`, `counts`, `mask`, `library_size`, ... on the model's device.

    Returns:
        `LossOutput(loss, terms)` with terms `nll`, `kl`, `nll_per_gene`.
    """
    return model.loss(batch)
