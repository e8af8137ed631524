"""Flow matching: path endpoints and target, the loss, and each sampler recovering a 2-D Gaussian mixture,
both with the exact marginal velocity of the mixture and with a small network trained by the loss."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from scldm_scale.flow import LinearPath, flow_matching_loss, sample_ode

MEANS = torch.tensor([[4.0, 4.0], [-4.0, 4.0], [4.0, -4.0], [-4.0, -4.0]])
STD = 0.5


def _mixture(n: int, gen: torch.Generator) -> torch.Tensor:
    k = torch.randint(0, len(MEANS), (n,), generator=gen)
    return MEANS[k] + STD * torch.randn(n, 2, generator=gen)


def _mixture_error(samples: torch.Tensor) -> float:
    """Distance to the mixture: share of samples farther than 4 std from every mode, plus the largest
    deviation of a mode's share from 1/4 and of the within-mode std from STD (relative). 0 = perfect."""
    d = torch.cdist(samples, MEANS)
    nearest = d.argmin(1)
    far = (d.min(1).values > 4 * STD).float().mean().item()
    shares = torch.bincount(nearest, minlength=len(MEANS)).float() / len(samples)
    resid = samples - MEANS[nearest]
    spread = abs(resid.std().item() - STD) / STD
    return far + (shares - 0.25).abs().max().item() + spread


def _exact_velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """E[x1 - x0 | xt = x] for the mixture: per component m + (t s^2 - (1 - t)) / v (x - t m), v = t^2 s^2 + (1-t)^2."""
    t = t[:, None, None]
    var = t**2 * STD**2 + (1 - t) ** 2
    diff = x[:, None, :] - t * MEANS[None]  # B K 2
    logw = -(diff**2).sum(-1, keepdim=True) / (2 * var)  # equal weights and variances: no other terms
    w = torch.softmax(logw, dim=1)
    u = MEANS[None] + (t * STD**2 - (1 - t)) / var * diff
    return (w * u).sum(1)


def test_path_endpoints_and_target():
    path = LinearPath()
    x0, x1 = torch.randn(4, 3, 2), torch.randn(4, 3, 2)
    torch.testing.assert_close(path.xt(x0, x1, torch.zeros(4)), x0)
    torch.testing.assert_close(path.xt(x0, x1, torch.ones(4)), x1)
    t = torch.rand(4)
    eps = 1e-3
    finite = (path.xt(x0, x1, t + eps) - path.xt(x0, x1, t - eps)) / (2 * eps)
    torch.testing.assert_close(path.ut(x0, x1, t), finite, atol=1e-3, rtol=1e-3)


def test_loss_is_zero_for_the_true_conditional_velocity():
    gen = torch.Generator().manual_seed(0)
    x1, x0, t = torch.randn(6, 2), torch.randn(6, 2), torch.rand(6)
    perfect = lambda xt, tt: x1 - x0  # noqa: E731
    assert flow_matching_loss(perfect, x1, t=t, x0=x0)["loss"].item() == 0.0
    out = flow_matching_loss(lambda xt, tt: torch.zeros_like(xt), x1, generator=gen)
    assert out["loss"].item() > 0 and out["mse"].shape == (6,)


@pytest.mark.parametrize("method,steps", [("euler", 100), ("heun", 30), ("dopri5", 0)])
def test_samplers_recover_mixture_with_exact_field(method, steps):
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(400, 2, generator=gen)
    samples = sample_ode(_exact_velocity, x0, method, steps, atol=1e-5, rtol=1e-5)
    assert _mixture_error(samples) < 0.2
    assert _mixture_error(x0) > 0.5  # the untrained (zero) field fails the threshold


def test_trained_network_recovers_mixture():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    net = nn.Sequential(nn.Linear(3, 128), nn.SiLU(), nn.Linear(128, 128), nn.SiLU(), nn.Linear(128, 2))

    def model(xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return net(torch.cat([xt, t[:, None]], dim=-1))

    x0 = torch.randn(400, 2, generator=gen)
    untrained = sample_ode(model, x0, "heun", 20)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(500):
        loss = flow_matching_loss(model, _mixture(256, gen), generator=gen)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    threshold = 0.4
    assert _mixture_error(untrained) > threshold
    for method, steps in (("euler", 50), ("heun", 20), ("dopri5", 0)):
        samples = sample_ode(model, x0, method, steps, atol=1e-4, rtol=1e-4)
        assert _mixture_error(samples) < threshold, method


def test_unknown_sampler_raises():
    with pytest.raises(ValueError, match="flow.sampler"):
        sample_ode(_exact_velocity, torch.zeros(2, 2), "rk4")
