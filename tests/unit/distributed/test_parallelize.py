"""Model transforms applied before sharding, without a process group: activation checkpointing keeps
parameter names and gradients; blocks are the ModuleLists the model names in `block_lists`; frozen parameters stay out."""

from __future__ import annotations

import torch
from torch import nn

from scldm_scale.distributed import apply_activation_checkpointing, iter_blocks
from scldm_scale.distributed.parallelize import clean_name, trainable_names


class Net(nn.Module):
    block_lists = ("blocks",)

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(3, 5)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(5, 5), nn.GELU()) for _ in range(3))
        self.out = nn.Linear(5, 1)

    def forward(self, x):
        h = self.inp(x)
        for block in self.blocks:
            h = h + block(h)
        return self.out(h).sum()


def test_blocks_are_module_list_elements():
    assert [name for name, _ in iter_blocks(Net())] == ["blocks.0", "blocks.1", "blocks.2"]


def test_activation_checkpointing_keeps_names_and_gradients():
    x = torch.randn(4, 3)
    ref = Net()
    ref(x).backward()
    net = Net()
    assert apply_activation_checkpointing(net) == 3
    net(x).backward()
    assert set(net.state_dict()) == set(ref.state_dict())  # checkpoints stay interchangeable
    ref_grads = {n: p.grad for n, p in ref.named_parameters()}
    for name, p in net.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[clean_name(name)])


def test_trainable_names_respects_frozen_subset():
    net = Net()
    net.inp.requires_grad_(False)
    assert "inp.weight" not in trainable_names(net, None)
    assert trainable_names(net, [net.out.weight]) == ["out.weight"]


def test_compiled_blocks_match_eager_and_keep_names():
    """`engine.enable_compile`: torch.compile (inductor, CPU) of each block gives the eager loss and gradients."""
    from scldm_scale.config.model import VAEConfig
    from scldm_scale.distributed import apply_compile
    from scldm_scale.models import build_vae

    cfg = VAEConfig(dim=16, latent_dim=8, num_latent_tokens=4, num_layers=2, num_heads=2, num_cross_heads=2)
    gen = torch.Generator().manual_seed(0)
    gene_ids = torch.stack([torch.randperm(30, generator=gen)[:7] + 1 for _ in range(3)])
    counts = torch.randint(1, 20, (3, 7), generator=gen).float()
    batch = {"gene_ids": gene_ids, "counts": counts, "mask": torch.ones(3, 7, dtype=torch.bool)}
    batch["library_size"] = counts.sum(1)
    models = []
    for compiled in (False, True):
        torch.manual_seed(0)
        vae = build_vae(cfg, 30)
        if compiled:
            assert apply_compile(vae) > 0
        vae.loss(batch).loss.backward()
        models.append(vae)
    eager, comp = models
    assert set(comp.state_dict()) == set(eager.state_dict())
    torch.testing.assert_close(comp.loss(batch).loss, eager.loss(batch).loss, rtol=1e-4, atol=1e-4)
    for (name, p), q in zip(eager.named_parameters(), comp.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-3, atol=1e-5, msg=name)
