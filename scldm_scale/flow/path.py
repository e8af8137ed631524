"""The linear interpolant of flow matching (SiT `ICPlan`; scLDM stage 2).

Notation (fixed for the package): x0 noise ~ N(0, I), x1 data, t in [0, 1] with t = 0 noise and t = 1 data,
xt = alpha_t x1 + sigma_t x0 with alpha_t = t, sigma_t = 1 - t, and target velocity ut = d xt / dt = x1 - x0.
Pure tensor maths; knows nothing of networks.
"""

from __future__ import annotations

import torch


class LinearPath:
    """alpha_t = t, sigma_t = 1 - t (rectified flow / SiT Linear)."""

    @staticmethod
    def alpha(t: torch.Tensor) -> torch.Tensor:
        return t

    @staticmethod
    def sigma(t: torch.Tensor) -> torch.Tensor:
        return 1 - t

    @staticmethod
    def d_alpha(t: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(t)

    @staticmethod
    def d_sigma(t: torch.Tensor) -> torch.Tensor:
        return -torch.ones_like(t)

    @staticmethod
    def _expand(t_B: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return t_B.reshape(-1, *([1] * (x.dim() - 1)))

    def xt(self, x0: torch.Tensor, x1: torch.Tensor, t_B: torch.Tensor) -> torch.Tensor:
        """Point on the path at times t (B,) for noise x0 and data x1 (B, ...)."""
        t = self._expand(t_B, x1)
        return self.alpha(t) * x1 + self.sigma(t) * x0

    def ut(self, x0: torch.Tensor, x1: torch.Tensor, t_B: torch.Tensor) -> torch.Tensor:
        """Target velocity d xt / dt (constant in t for the linear path)."""
        t = self._expand(t_B, x1)
        return self.d_alpha(t) * x1 + self.d_sigma(t) * x0
