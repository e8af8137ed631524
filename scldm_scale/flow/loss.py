"""Flow-matching objective with velocity prediction; the network is any callable v(xt, t, **kwargs).

t ~ U[0, 1], x0 ~ N(0, I), loss = mean over latent entries of (v - ut)^2, averaged over the batch
(reference / SiT `training_losses` with path Linear, prediction velocity).

Shape legend: B cells; trailing latent dims are arbitrary.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from scldm_scale.flow.path import LinearPath


def flow_matching_loss(
    model: Callable[..., torch.Tensor],
    x1: torch.Tensor,
    *,
    t: torch.Tensor | None = None,
    x0: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    path: LinearPath | None = None,
    **model_kwargs,
) -> dict[str, torch.Tensor]:
    """Flow-matching loss on a batch of data latents x1 (B, ...).

    Args:
        model: velocity callable `model(xt, t, **model_kwargs)`, e.g. a DiT with `labels=...`.
        x1: data (B, ...).
        t, x0: optional fixed times (B,) and noise (for tests); drawn with `generator` otherwise.
        path: interpolant (LinearPath by default).

    Returns:
        {"loss": scalar with grad, "mse": per-cell mean squared error (B,), detached}.
    """
    path = path or LinearPath()
    B = x1.shape[0]
    if t is None:
        t = torch.rand(B, generator=generator, device=x1.device, dtype=x1.dtype)
    if x0 is None:
        x0 = torch.randn(x1.shape, generator=generator, device=x1.device, dtype=x1.dtype)
    v = model(path.xt(x0, x1, t), t, **model_kwargs)
    mse_B = (v.float() - path.ut(x0, x1, t).float()).square().flatten(1).mean(-1)
    return {"loss": mse_B.mean(), "mse": mse_B.detach()}
