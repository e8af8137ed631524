"""Models name their blocks (`block_lists`), the units of activation checkpointing, compile and FSDP2
sharding: the autoencoder's encoder and decoder blocks, the DiT's transformer blocks (not its label tables).
A model that names none is refused with a message saying what to declare. No process group."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from scldm_scale.config.model import DiTConfig, VAEConfig
from scldm_scale.distributed import apply_activation_checkpointing, apply_compile, iter_blocks
from scldm_scale.distributed.parallelize import clean_name
from scldm_scale.models import build_dit, build_vae


def _vae(**kw) -> nn.Module:
    torch.manual_seed(0)
    cfg = VAEConfig(dim=16, latent_dim=8, num_latent_tokens=4, num_layers=2, num_heads=2, num_cross_heads=2, **kw)
    return build_vae(cfg, 30)


def _dit(**kw) -> nn.Module:
    torch.manual_seed(0)
    return build_dit(DiTConfig(dim=16, num_layers=3, num_heads=2, **kw), (4, 8), [3, 2])


def _wrapped(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if type(m).__name__ == "CheckpointWrapper"]


@pytest.mark.parametrize("kw", [{}, {"likelihood": "gaussian", "posterior": "gaussian", "shared_embedding": False}])
def test_vae_blocks_are_the_encoder_and_decoder_blocks(kw):
    vae = _vae(**kw)
    blocks = ["encoder.blocks.0", "encoder.blocks.1", "decoder.blocks.0", "decoder.blocks.1"]
    assert [name for name, _ in iter_blocks(vae)] == blocks
    keys = list(vae.state_dict())
    assert apply_activation_checkpointing(vae) == 4
    assert sorted(_wrapped(vae)) == sorted(blocks)
    assert list(vae.state_dict()) == keys  # checkpoints stay interchangeable


@pytest.mark.parametrize("kw", [{}, {"label_embedding": "combination", "guidance": "joint"}])
def test_dit_blocks_are_its_transformer_blocks_not_the_label_tables(kw):
    dit = _dit(**kw)
    assert [name for name, _ in iter_blocks(dit)] == ["blocks.0", "blocks.1", "blocks.2"]
    keys = list(dit.state_dict())
    x, t, y = torch.randn(2, 4, 8), torch.rand(2), torch.tensor([[1, 2], [0, 1]])
    dit.eval()
    ref = dit(x, t, y)
    assert apply_activation_checkpointing(dit) == 3
    assert apply_activation_checkpointing(dit) == 0  # idempotent
    assert _wrapped(dit) == ["blocks.0", "blocks.1", "blocks.2"]
    assert all(type(table).__name__ == "Embedding" for table in dit.y_embedder.tables)
    assert list(dit.state_dict()) == keys
    assert [clean_name(n) for n, _ in dit.named_parameters()] == [n for n, _ in _dit(**kw).named_parameters()]
    torch.testing.assert_close(dit(x, t, y), ref)


class _Undeclared(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(3, 3) for _ in range(2))


def test_a_model_that_names_no_blocks_is_refused():
    for transform in (lambda m: list(iter_blocks(m)), apply_activation_checkpointing, apply_compile):
        with pytest.raises(TypeError, match="_Undeclared does not name its blocks: set the class attribute block_lists"):
            transform(_Undeclared())


@pytest.mark.parametrize(
    ("lists", "match"),
    [("layers", "tuple of names"), (("missing",), "'missing', which it has not"), (("layers.0",), "Linear, not an")],
)
def test_bad_block_lists_are_refused(lists, match):
    model = _Undeclared()
    model.block_lists = lists
    with pytest.raises(TypeError, match=match):
        list(iter_blocks(model))


def test_a_model_without_blocks_is_compiled_whole():
    model = _Undeclared()
    model.block_lists = ()
    assert list(iter_blocks(model)) == []
    assert apply_compile(model) == 1
