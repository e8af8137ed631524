"""Likelihoods of the autoencoder: negative binomial (mean / inverse-dispersion, scVI form), the Gaussian
(L2) head on log1p-normalised counts, the Gaussian posterior KL, and count sampling.

Shape legend: B cells, G genes, D width.
"""

from __future__ import annotations

import torch
from torch import nn

EPS = 1e-8


def nb_log_prob(x: torch.Tensor, mu: torch.Tensor, theta: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """Elementwise NB log-likelihood with mean mu and inverse dispersion theta (scVI `log_nb_positive`).

    log p = theta (log theta - log(theta + mu)) + x (log mu - log(theta + mu))
            + lgamma(x + theta) - lgamma(theta) - lgamma(x + 1).
    Equals torch.distributions.NegativeBinomial(total_count=theta, probs=mu / (mu + theta)).log_prob(x).
    """
    log_theta_mu = torch.log(theta + mu + eps)
    return (
        theta * (torch.log(theta + eps) - log_theta_mu)
        + x * (torch.log(mu + eps) - log_theta_mu)
        + torch.lgamma(x + theta)
        - torch.lgamma(theta)
        - torch.lgamma(x + 1)
    )


def gaussian_kl(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """Elementwise KL(N(mean, exp(logvar)) || N(0, 1))."""
    return 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar)


def sample_nb(mu: torch.Tensor, theta: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Integer NB draws by Gamma-Poisson: lambda ~ Gamma(theta, theta / mu), x ~ Poisson(lambda).

    torch.distributions.Gamma takes no generator, so the Gamma draw uses torch._standard_gamma on a
    generator-seeded path: Gamma(theta) / rate, with rate = theta / mu.
    """
    shape = theta.expand_as(mu).contiguous()
    gamma = torch._standard_gamma(shape) if generator is None else _standard_gamma_seeded(shape, generator)
    lam = gamma * mu / shape.clamp_min(EPS)
    return torch.poisson(lam.clamp_min(0), generator=generator)


def _standard_gamma_seeded(shape: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    # torch._standard_gamma has no generator argument; fork the global RNG seeded from `generator`.
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device).item())
    devices = [shape.device] if shape.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        return torch._standard_gamma(shape)


def normalized_log1p(x_BG: torch.Tensor, library_size_B: torch.Tensor, target_sum: float) -> torch.Tensor:
    """log1p(target_sum * x / library_size): the Gaussian head's target space."""
    return torch.log1p(target_sum * x_BG / library_size_B.clamp_min(1.0).unsqueeze(-1))


class NBHead(nn.Module):
    """NB parameters from per-gene decoder states.

    mean = softmax over the decoded genes of Linear(D -> 1)(h_g), times the library size, so the means sum
    to the library size (reference). Inverse dispersion theta = exp(w): w per gene from an embedding
    initialised to 1 (dispersion="gene"), or a second output of the Linear (dispersion="cell_gene").
    """

    def __init__(self, num_genes: int, dim: int, dispersion: str = "gene"):
        super().__init__()
        self.dispersion = dispersion
        self.proj = nn.Linear(dim, 1 if dispersion == "gene" else 2)
        if dispersion == "gene":
            self.log_theta = nn.Embedding(num_genes + 1, 1)

    def logits(self, h_BGD: torch.Tensor, gene_ids_BG: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Unnormalised mean logits and log theta for one chunk of genes."""
        out = self.proj(h_BGD)
        if self.dispersion == "gene":
            return out[..., 0], self.log_theta(gene_ids_BG)[..., 0]
        return out[..., 0], out[..., 1]

    @staticmethod
    def finalize(
        logits_BG: torch.Tensor, log_theta_BG: torch.Tensor, library_size_B: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Softmax over all decoded genes (done after chunking, so it is exact)."""
        mu_BG = torch.softmax(logits_BG.float(), dim=-1) * library_size_B.float().unsqueeze(-1)
        return {"mu": mu_BG, "theta": log_theta_BG.float().exp()}


class GaussianHead(nn.Module):
    """Gaussian head: LN -> Linear(D -> 1) = mean of log1p(target_sum * x / library_size) (reference c45be8c).

    The loss is the plain sum of squared errors; decoding uses the mean (no unit-variance noise).
    """

    def __init__(self, dim: int, eps: float = 1e-8):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.proj = nn.Linear(dim, 1)

    def logits(self, h_BGD: torch.Tensor, gene_ids_BG: torch.Tensor) -> tuple[torch.Tensor, None]:
        return self.proj(self.norm(h_BGD))[..., 0], None

    @staticmethod
    def finalize(mean_BG: torch.Tensor, _unused: None, library_size_B: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"mean": mean_BG.float()}
