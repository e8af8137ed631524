"""DiT: adaLN-Zero identity at init, label tables and dropout, CFG formulas (hand-made field and DiT)."""

from __future__ import annotations

import pytest
import torch

from scldm_scale.config.model import DiTConfig
from scldm_scale.models import build_dit, guided_velocity
from scldm_scale.models.dit import DiTBlock

CARDS = [3, 4]


def _dit(**kw):
    torch.manual_seed(0)
    return build_dit(DiTConfig(dim=32, num_layers=2, num_heads=4, **kw), (4, 6), CARDS)


def _perturb(model: torch.nn.Module) -> None:
    """Give the zero-initialised layers non-zero weights so the field depends on the labels."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))


def test_adaln_zero_block_is_identity_at_init():
    dit = _dit()
    x = torch.randn(2, 4, 6)
    h = dit.x_embedder(x) + dit.pos_embed
    c = dit.t_embedder(torch.rand(2)) + dit.y_embedder(torch.tensor([[1, 2], [0, 3]]))
    for blk in dit.blocks:
        assert isinstance(blk, DiTBlock)
        torch.testing.assert_close(blk(h, c), h)
    _perturb(dit.blocks[0])
    assert not torch.allclose(dit.blocks[0](h, c), h)  # the check above can fail
    assert torch.count_nonzero(dit(x, torch.rand(2), torch.tensor([[1, 2], [0, 3]]))) == 0


def _hand_field(xt, t, labels):
    """v = x * (1 + t) + sum_j a_j(y_j) with a_j(0) = 0: a hand-made conditional field."""
    table = torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0], [0.0, -1.0, 5.0, 7.0, 11.0]])
    shift = sum(table[j][labels[:, j]] for j in range(labels.shape[1]))
    return xt * (1 + t[:, None, None]) + shift[:, None, None] ** 2


def test_guidance_formulas_on_hand_made_field():
    xt, t = torch.randn(3, 4, 6), torch.rand(3)
    y = torch.tensor([[1, 2], [3, 0], [2, 4]])
    null = torch.zeros_like(y)
    v_null, v_y = _hand_field(xt, t, null), _hand_field(xt, t, y)
    v1 = _hand_field(xt, t, torch.stack([y[:, 0], null[:, 1]], 1))
    v2 = _hand_field(xt, t, torch.stack([null[:, 0], y[:, 1]], 1))
    w = [1.5, 0.5]
    torch.testing.assert_close(guided_velocity(_hand_field, xt, t, y, w, "additive"),
                               v_null + 1.5 * (v1 - v_null) + 0.5 * (v2 - v_null))
    torch.testing.assert_close(guided_velocity(_hand_field, xt, t, y, w, "joint"), v_null + 1.0 * (v_y - v_null))
    torch.testing.assert_close(guided_velocity(_hand_field, xt, t, y, [2.0, 3.0], "joint"),
                               v_null + 2.5 * (v_y - v_null))
    for strategy in ("joint", "additive"):
        torch.testing.assert_close(guided_velocity(_hand_field, xt, t, y, [0.0, 0.0], strategy), v_null)
    torch.testing.assert_close(guided_velocity(_hand_field, xt, t, y, [1.0, 1.0], "joint"), v_y)
    with pytest.raises(ValueError, match="flow.guidance_weights"):
        guided_velocity(_hand_field, xt, t, y, [1.0], "additive")


@pytest.mark.parametrize("kw", [dict(guidance="additive"), dict(guidance="joint", label_embedding="combination")])
def test_dit_guidance_weight_zero_and_one(kw):
    dit = _dit(**kw).eval()
    _perturb(dit)
    xt, t = torch.randn(3, 4, 6), torch.rand(3)
    y = torch.tensor([[1, 0], [2, 0], [3, 0]])  # one attribute set: additive w=1 is the conditional field
    w0 = dit.forward_with_guidance(xt, t, y, [0.0, 0.0])
    w1 = dit.forward_with_guidance(xt, t, y, [1.0, 1.0])
    torch.testing.assert_close(w0, dit(xt, t, torch.zeros_like(y)), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(w1, dit(xt, t, y), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(w0, w1)


def test_combination_ids_and_dropout():
    dit = _dit(guidance="joint", label_embedding="combination")
    emb = dit.y_embedder
    assert emb.tables[0].num_embeddings == 4 * 5
    ids = emb.combination_ids(torch.tensor([[0, 0], [1, 0], [0, 1], [3, 4]]))
    assert ids.tolist() == [0, 1, 4, 19]
    torch.manual_seed(0)
    labels = torch.ones(4000, 2, dtype=torch.long)
    joint = emb.drop(labels, 0.3, joint=True)
    assert torch.equal(joint[:, 0], joint[:, 1]) and abs((joint[:, 0] == 0).float().mean() - 0.3) < 0.03
    indep = emb.drop(labels, 0.3, joint=False)
    assert (indep[:, 0] != indep[:, 1]).any()
    with pytest.raises(ValueError, match="model.max_combinations"):
        build_dit(DiTConfig(guidance="joint", label_embedding="combination", max_combinations=10), (4, 6), CARDS)


def test_dit_trains_and_rejects_bad_labels():
    dit = _dit().train()
    v = dit(torch.randn(5, 4, 6), torch.rand(5), torch.randint(0, 3, (5, 2)))
    v.square().mean().backward()
    assert v.shape == (5, 4, 6)
    with pytest.raises(ValueError, match="columns"):
        dit(torch.randn(5, 4, 6), torch.rand(5), torch.zeros(5, 3, dtype=torch.long))
    uncond = build_dit(DiTConfig(dim=32, num_heads=4), (4, 6), [])
    assert uncond(torch.randn(2, 4, 6), torch.rand(2), None).shape == (2, 4, 6)
