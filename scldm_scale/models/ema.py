"""Exponential moving average of a module's weights (reference: ema-pytorch, beta 0.9999), single-device.

The EMA copy is what generation samples with by default (the reference sampled with the raw weights).
Under FSDP / ZeRO the trainer gathers full weights before calling `update`; nothing here is distributed.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA(nn.Module):
    """Shadow copy `ema.module` updated as  p_ema <- decay * p_ema + (1 - decay) * p.

    Args:
        model: the module to track (its weights are copied at construction).
        decay: EMA decay in [0, 1).
        update_after_step: before this many calls to `update`, the shadow is a plain copy.
        update_every: average only every this many calls (the reference used 10).
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, update_after_step: int = 0, update_every: int = 1):
        super().__init__()
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = decay
        self.update_after_step = update_after_step
        self.update_every = update_every
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Call once per optimizer step, after `optimizer.step()`."""
        self.num_updates += 1
        step = int(self.num_updates)
        if step <= self.update_after_step:
            self.copy_from(model)
            return
        if step % self.update_every != 0:
            return
        ema_params = dict(self.module.named_parameters())
        for name, param in model.named_parameters():
            ema_params[name].lerp_(param.detach().to(ema_params[name].dtype), 1.0 - self.decay)
        ema_buffers = dict(self.module.named_buffers())
        for name, buf in model.named_buffers():
            ema_buffers[name].copy_(buf)

    @torch.no_grad()
    def copy_from(self, model: nn.Module) -> None:
        """Set the shadow weights equal to `model`'s."""
        self.module.load_state_dict(model.state_dict())

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)
