"""Model transforms applied before sharding, without a process group: activation checkpointing keeps
parameter names and gradients; block discovery follows nn.ModuleLists; frozen parameters stay out."""

from __future__ import annotations

import torch
from torch import nn

from scldm_scale.distributed import apply_activation_checkpointing, iter_blocks
from scldm_scale.distributed.engine import clean_name, trainable_names


class Net(nn.Module):
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
