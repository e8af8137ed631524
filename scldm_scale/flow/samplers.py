"""ODE samplers from noise (t = 0) to data (t = 1): fixed-step Euler and Heun, adaptive dopri5 (torchdiffeq).

The number of steps given is the number used (the reference ignored it). Velocity callables take
(x (B, ...), t (B,)) and return dx/dt; guidance is folded into the callable by the caller.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _t(value: float | torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return torch.full((x.shape[0],), float(value), device=x.device, dtype=x.dtype)


@torch.no_grad()
def euler(velocity: Velocity, x0: torch.Tensor, num_steps: int) -> torch.Tensor:
    """Explicit Euler on a uniform grid of `num_steps` steps (num_steps evaluations)."""
    x, dt = x0, 1.0 / num_steps
    for i in range(num_steps):
        x = x + dt * velocity(x, _t(i * dt, x))
    return x


@torch.no_grad()
def heun(velocity: Velocity, x0: torch.Tensor, num_steps: int) -> torch.Tensor:
    """Heun's second-order method (explicit trapezoid), 2 evaluations per step."""
    x, dt = x0, 1.0 / num_steps
    for i in range(num_steps):
        t0, t1 = i * dt, (i + 1) * dt
        v0 = velocity(x, _t(t0, x))
        x_pred = x + dt * v0
        x = x + 0.5 * dt * (v0 + velocity(x_pred, _t(t1, x)))
    return x


@torch.no_grad()
def dopri5(velocity: Velocity, x0: torch.Tensor, atol: float = 1e-5, rtol: float = 1e-5) -> torch.Tensor:
    """Adaptive Dormand-Prince 5(4) via torchdiffeq.odeint, t from 0 to 1 (reference sampler)."""
    from torchdiffeq import odeint

    def f(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return velocity(x, t.to(x.dtype).expand(x.shape[0]))

    t_span = torch.tensor([0.0, 1.0], device=x0.device, dtype=x0.dtype)
    return odeint(f, x0, t_span, method="dopri5", atol=atol, rtol=rtol)[-1]


def sample_ode(
    velocity: Velocity,
    x0: torch.Tensor,
    method: str = "heun",
    num_steps: int = 50,
    atol: float = 1e-5,
    rtol: float = 1e-5,
) -> torch.Tensor:
    """Integrate dx/dt = velocity(x, t) from x0 at t = 0 to t = 1 with `method` in euler / heun / dopri5."""
    if method == "euler":
        return euler(velocity, x0, num_steps)
    if method == "heun":
        return heun(velocity, x0, num_steps)
    if method == "dopri5":
        return dopri5(velocity, x0, atol, rtol)
    raise ValueError(f"flow.sampler must be euler, heun or dopri5, got {method!r}")
