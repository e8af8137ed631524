"""Exponential moving average of the trainable parameters, under any engine.

The shadow lives where the engine keeps parameters (`engine.local_params()`): full tensors for ZeRO-0/1/2,
DTensor shards for FSDP2, flat partitions for ZeRO-3. The update is elementwise, so it is exact on shards
and costs no communication; `full_state_dict()` consolidates (collective). The shadow is fp32 whatever the
training precision. Checkpoints store it through the engine, so it reshards like the model.
"""

from __future__ import annotations

import torch

from scldm_scale.distributed import TrainEngine


class EMA:
    """p_ema <- d * p_ema + (1 - d) * p, with d = `decay` (or its ramp), after optimizer steps.

    Args:
        engine: the engine whose trainable parameters are tracked.
        decay: in [0, 1); the reference stage-2 EMA uses 0.9999.
        warmup_steps: for the first this many updates the shadow is a plain copy.
        update_every: average every this many steps only, with d ** update_every, so the averaging horizon in
            steps is the same as updating every step (cheaper when the shadow is large).
        ramp: d_t = min(decay, (1 + t) / (10 + t)) at the t-th step after the warm-up, so the initial weights
            fade within the first steps instead of holding (decay ** steps) of the average: with decay 0.995
            and no ramp, 500 steps leave 8% of the untrained weights in the shadow; with the ramp, ~0.
    """

    def __init__(self, engine: TrainEngine, decay: float = 0.9999, warmup_steps: int = 0, update_every: int = 1,
                 ramp: bool = False) -> None:
        if not 0 <= decay < 1:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        if update_every < 1:
            raise ValueError(f"EMA update_every must be >= 1, got {update_every}")
        self.engine = engine
        self.decay = decay
        self.warmup_steps = warmup_steps
        self.update_every = update_every
        self.ramp = ramp
        self.num_updates = 0
        self.shadow = {n: t.detach().float().clone() for n, t in engine.local_params().items()}

    def current_decay(self) -> float:
        """d at the current step (after the warm-up)."""
        t = self.num_updates - self.warmup_steps
        return min(self.decay, (1 + t) / (10 + t)) if self.ramp else self.decay

    @torch.no_grad()
    def update(self) -> None:
        """Call once per optimizer step, after `engine.step()`."""
        self.num_updates += 1
        if self.num_updates <= self.warmup_steps:
            weight = 1.0
        elif (self.num_updates - self.warmup_steps) % self.update_every:
            return
        else:
            weight = 1.0 - self.current_decay() ** self.update_every
        for name, param in self.engine.local_params().items():
            self.shadow[name].lerp_(param.detach().float(), weight)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The shadow tensors (engine layout); checkpoints save and load them in place."""
        return self.shadow

    def state_dict(self) -> dict[str, int | float]:
        """JSON part of the state (the tensors go through `tensors()`)."""
        return {"num_updates": self.num_updates, "decay": self.decay}

    def load_state_dict(self, state: dict) -> None:
        """Restore the JSON part."""
        self.num_updates = int(state["num_updates"])

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Collective: consolidated fp32 CPU EMA weights keyed like the model's parameters."""
        return self.engine.gather_full(self.shadow)
