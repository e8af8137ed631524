"""Generation helper: library-size statistics, end-to-end sampling of counts, EMA by default."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from scldm_scale.config.model import DiTConfig, VAEConfig
from scldm_scale.eval import LibrarySizeStats, generate, sample_latents, sampling_model
from scldm_scale.models import EMA, LatentStats, build_dit, build_vae


def test_library_size_stats_fit_sample_fallback_json():
    rng = np.random.default_rng(0)
    labels = np.array([[1, 1]] * 500 + [[2, 1]] * 500 + [[3, 2]])  # (3, 2) has one cell: global fallback
    log_l = np.concatenate([rng.normal(6.0, 0.2, 500), rng.normal(9.0, 0.5, 500), [7.0]])
    stats = LibrarySizeStats.fit(np.exp(log_l), labels)
    assert set(stats.per_condition) == {"1,1", "2,1"}
    mean, std = stats.per_condition["2,1"]
    assert abs(mean - 9.0) < 0.1 and abs(std - 0.5) < 0.1
    query = torch.tensor([[1, 1]] * 2000 + [[2, 1]] * 2000 + [[3, 2]] * 2000)
    drawn = stats.sample(query, torch.Generator().manual_seed(0)).log()
    assert abs(drawn[:2000].mean() - 6.0) < 0.1 and abs(drawn[2000:4000].mean() - 9.0) < 0.1
    assert abs(drawn[4000:].mean() - stats.global_mean) < 0.1 and abs(drawn[4000:].std() - stats.global_std) < 0.1
    again = LibrarySizeStats.from_json(stats.to_json())
    assert again == stats
    assert torch.equal(again.sample(query, torch.Generator().manual_seed(0)).log(), drawn)
    assert LibrarySizeStats.fit(np.exp(log_l)).sample(None, batch=3).shape == (3,)


def _models(likelihood: str = "nb"):
    torch.manual_seed(0)
    vae = build_vae(VAEConfig(dim=16, latent_dim=4, num_latent_tokens=3, num_layers=1, num_heads=2,
                              num_cross_heads=2, likelihood=likelihood), 30)
    dit = build_dit(DiTConfig(dim=16, num_layers=1, num_heads=2), vae.latent_shape, [2, 3])
    return vae, dit


@pytest.mark.parametrize("likelihood", ["nb", "gaussian"])
def test_generate_counts(likelihood):
    vae, dit = _models(likelihood)
    labels = torch.tensor([[1, 0], [2, 3], [0, 0], [1, 2]])
    stats = LibrarySizeStats(global_mean=np.log(500.0), global_std=0.1, per_condition={"1,0": (np.log(50.0), 0.01)})
    out = generate(dit, vae, labels, library_size_stats=stats, sampler="euler", num_steps=4,
                   guidance_weights=[2.0, 1.0], gene_chunk_size=7, generator=torch.Generator().manual_seed(0))
    counts = out["counts"]
    assert counts.shape == (4, 30) and torch.equal(counts, counts.round()) and (counts >= 0).all()
    assert out["z"].shape == (4, 3, 4)
    assert abs(out["library_size"][0].item() - 50.0) < 2.0
    if likelihood == "nb":
        torch.testing.assert_close(out["mu"].sum(1), out["library_size"], rtol=1e-4, atol=1e-2)
        ratio = counts[1:3].sum(1) / out["library_size"][1:3]
        assert ((ratio > 0.7) & (ratio < 1.3)).all()
    unc = generate(dit, vae, None, num_cells=2, library_size=torch.tensor([10.0, 20.0]), num_steps=2)
    assert unc["counts"].shape == (2, 30)


def test_sampling_uses_ema_and_latent_stats():
    vae, dit = _models()
    ema = EMA(dit, decay=0.5)
    with torch.no_grad():
        for p in dit.parameters():
            p.add_(0.1)
    assert sampling_model(dit, ema) is ema.module and sampling_model(dit, ema, use_ema=False) is dit
    kw = dict(sampler="heun", num_steps=3)
    a = sample_latents(sampling_model(dit, ema), None, 2, generator=torch.Generator().manual_seed(0), **kw)
    b = sample_latents(dit, None, 2, generator=torch.Generator().manual_seed(0), **kw)
    assert not torch.allclose(a, b)
    stats = LatentStats(shift=1.0, scale=2.0)
    c = sample_latents(sampling_model(dit, ema), None, 2, generator=torch.Generator().manual_seed(0),
                       latent_stats=stats, **kw)
    torch.testing.assert_close(c, a * 2.0 + 1.0)
    assert LatentStats.from_dict(LatentStats.fit(torch.randn(100, 3, 4) * 3 + 1).to_dict()).scale > 2.5
