"""Stage-2 latent normalisation: an optional scalar shift / scale fitted on encoded training latents.

The encoder output is already LayerNorm-ed per latent token (reference: zero mean, unit variance over the
L channels), so "none" is the reference behaviour. "standardize" subtracts the global mean and divides by
the global std of the training latents (as LDMs do with a VAE scale factor); the DiT then learns on
`normalize(z)` and generation maps samples back with `denormalize` before decoding. JSON-able.

Shape legend: B cells, M latent tokens, L latent dim.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch


@dataclass
class LatentStats:
    """Scalar shift and scale: z_norm = (z - shift) / scale."""

    shift: float = 0.0
    scale: float = 1.0

    @classmethod
    def fit(cls, z_BML: torch.Tensor) -> LatentStats:
        """Fit on a sample of encoded training latents."""
        z = z_BML.detach().double()
        return cls(shift=float(z.mean()), scale=float(z.std().clamp_min(1e-6)))

    def normalize(self, z_BML: torch.Tensor) -> torch.Tensor:
        return (z_BML - self.shift) / self.scale

    def denormalize(self, z_BML: torch.Tensor) -> torch.Tensor:
        return z_BML * self.scale + self.shift

    def to_dict(self) -> dict[str, float]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, float]) -> LatentStats:
        return cls(**d)
