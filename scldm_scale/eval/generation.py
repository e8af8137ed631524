"""Generation through the prior and the decoder: latents by flow-matching ODE (with CFG), then NB parameters,
then integer counts, with library sizes drawn from per-condition log-normal statistics of the training data.

Uses the EMA weights of the DiT by default (the reference sampled with the raw weights). Single-device; the
caller loops over batches of conditions.

Shape legend: B cells, K label columns, G genes, M latent tokens, L latent dim.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from scldm_scale.flow.samplers import sample_ode
from scldm_scale.models.dit.model import DiT
from scldm_scale.models.ema import EMA
from scldm_scale.models.latent import LatentStats
from scldm_scale.models.vae.likelihood import sample_nb
from scldm_scale.models.vae.model import TransformerVAE


def _key(row: Sequence[int]) -> str:
    return ",".join(str(int(v)) for v in row)


@dataclass
class LibrarySizeStats:
    """Mean / std of natural-log library size per label combination, plus a global fit (JSON-able).

    A condition is the full row of label ids (B, K); a row never seen in training (or seen in fewer than
    `min_cells` cells) falls back to the global statistics. With K = 0 only the global fit exists.
    """

    global_mean: float = 0.0
    global_std: float = 1.0
    per_condition: dict[str, tuple[float, float]] = field(default_factory=dict)
    min_cells: int = 2

    @classmethod
    def fit(cls, library_size, labels=None, min_cells: int = 2) -> LibrarySizeStats:
        """Fit from library sizes (N,) and labels (N, K) (tensors or arrays; labels None = global only)."""
        log_l = np.log(np.clip(np.asarray(library_size, dtype=np.float64), 1.0, None))
        stats = cls(float(log_l.mean()), float(log_l.std()), {}, min_cells)
        if labels is None:
            return stats
        labels = np.asarray(labels, dtype=np.int64).reshape(len(log_l), -1)
        rows, inverse = np.unique(labels, axis=0, return_inverse=True)
        for i, row in enumerate(rows):
            vals = log_l[inverse.reshape(-1) == i]
            if len(vals) >= min_cells:
                stats.per_condition[_key(row)] = (float(vals.mean()), float(vals.std()))
        return stats

    def params(self, labels_BK: torch.Tensor | None, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) of log library size per row, (B,) each, float64 on CPU."""
        mean = torch.full((batch,), self.global_mean, dtype=torch.float64)
        std = torch.full((batch,), self.global_std, dtype=torch.float64)
        if labels_BK is None or labels_BK.shape[-1] == 0:
            return mean, std
        rows, inverse = torch.unique(labels_BK.cpu(), dim=0, return_inverse=True)
        for i, row in enumerate(rows.tolist()):
            hit = self.per_condition.get(_key(row))
            if hit is not None:
                mean[inverse == i], std[inverse == i] = hit
        return mean, std

    def sample(self, labels_BK: torch.Tensor | None, generator: torch.Generator | None = None,
               batch: int | None = None) -> torch.Tensor:
        """Draw library sizes exp(N(mu_c, sd_c)) per row, (B,) float32 on CPU."""
        B = batch if labels_BK is None else labels_BK.shape[0]
        mean, std = self.params(labels_BK, B)
        eps = torch.randn(B, generator=generator, dtype=torch.float64)
        return (mean + std * eps).exp().float()

    def to_json(self) -> str:
        return json.dumps({"global_mean": self.global_mean, "global_std": self.global_std,
                           "per_condition": self.per_condition, "min_cells": self.min_cells})

    @classmethod
    def from_json(cls, text: str) -> LibrarySizeStats:
        d = json.loads(text)
        per = {k: (float(v[0]), float(v[1])) for k, v in d["per_condition"].items()}
        return cls(d["global_mean"], d["global_std"], per, d.get("min_cells", 2))


def sampling_model(dit: DiT, ema: EMA | None = None, use_ema: bool = True) -> nn.Module:
    """The network to sample with: the EMA copy when given and `use_ema`, else the raw DiT."""
    return ema.module if (ema is not None and use_ema) else dit


@torch.no_grad()
def sample_latents(
    dit: nn.Module,
    labels: torch.Tensor | None,
    num_cells: int | None = None,
    *,
    sampler: str = "heun",
    num_steps: int = 50,
    guidance_weights: Sequence[float] | None = None,
    strategy: str | None = None,
    atol: float = 1e-5,
    rtol: float = 1e-5,
    latent_stats: LatentStats | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Latents (B, M, L) from noise by the ODE; labels (B, K) or None for unconditional (num_cells given)."""
    was_training = dit.training
    dit.eval()
    device = next(dit.parameters()).device
    B = labels.shape[0] if labels is not None else num_cells
    if B is None:
        raise ValueError("sample_latents needs labels or num_cells")
    x0 = torch.randn((B, dit.num_tokens, dit.latent_dim), generator=generator, device="cpu").to(device)
    labels = labels.to(device) if labels is not None else None

    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return dit.forward_with_guidance(x, t, labels, guidance_weights, strategy)

    z = sample_ode(velocity, x0, sampler, num_steps, atol, rtol)
    dit.train(was_training)
    return latent_stats.denormalize(z) if latent_stats is not None else z


@torch.no_grad()
def generate(
    dit: nn.Module,
    vae: TransformerVAE,
    labels: torch.Tensor | None,
    *,
    num_cells: int | None = None,
    library_size_stats: LibrarySizeStats | None = None,
    library_size: torch.Tensor | None = None,
    gene_ids: torch.Tensor | None = None,
    gene_chunk_size: int | None = None,
    generator: torch.Generator | None = None,
    **sample_kwargs,
) -> dict[str, torch.Tensor]:
    """Generate cells: latents -> decoder parameters -> integer counts.

    Args:
        dit: velocity network; pass `sampling_model(dit, ema)` to use the EMA weights (the default choice).
        vae: frozen stage-1 model.
        labels: (B, K) conditions (0 = free attribute), or None for unconditional generation of `num_cells`.
        library_size_stats: draws library sizes per condition; or give `library_size` (B,) directly.
        gene_ids: genes to decode ((G,) ids); None = the whole vocabulary.
        gene_chunk_size: decoder gene chunk (bounds memory at large vocabularies).
        generator: CPU generator for noise, library sizes and count sampling.
        **sample_kwargs: sampler, num_steps, guidance_weights, strategy, atol, rtol, latent_stats.

    Returns:
        {"z", "library_size", "counts"} plus the decoder parameters ("mu", "theta" for NB; "mean" for the
        Gaussian head, whose counts are the rounded mean reconstruction expm1(mean) L / target_sum, no noise).
    """
    vae.eval()
    z = sample_latents(dit, labels, num_cells, generator=generator, **sample_kwargs)
    if library_size is None:
        if library_size_stats is None:
            raise ValueError("generate needs library_size_stats or library_size")
        library_size = library_size_stats.sample(labels, generator, batch=z.shape[0])
    library_size = library_size.to(z.device)
    params = vae.decode(z, library_size, gene_ids=gene_ids, gene_chunk_size=gene_chunk_size)
    if "mu" in params:
        cpu_gen = generator if (generator is None or z.device.type == "cpu") else None
        counts = sample_nb(params["mu"], params["theta"], cpu_gen)
    else:
        scale = library_size.unsqueeze(-1) / vae.cfg.gaussian_target_sum
        counts = (torch.expm1(params["mean"]).clamp_min(0) * scale).round()
    return {"z": z, "library_size": library_size, "counts": counts, **params}
