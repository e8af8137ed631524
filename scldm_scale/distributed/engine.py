"""The `TrainEngine` protocol the loop talks to, and the factory types an engine is built with.

Protocol only: the backends (`distributed/deepspeed.py`, `distributed/fsdp.py`) implement it, the model
transforms they share are in `distributed/parallelize.py`, and `scldm_scale.train.build_engine` is the one
place that picks an engine. This module imports neither backend (an import-linter contract checks it).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from torch import nn

OptimizerFactory = Callable[[list[nn.Parameter]], torch.optim.Optimizer]
"""Builds the optimizer over the (possibly sharded) trainable parameters."""
SchedulerFactory = Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]
"""Builds the LR scheduler over the optimizer the engine actually steps."""


@runtime_checkable
class TrainEngine(Protocol):
    """What the training loop needs from a data-parallel engine.

    One optimizer step is: for each micro-batch `loss = step_fn(engine.model, batch)`, then
    `engine.backward(loss)` (inside `engine.no_sync()` for all but the last micro-batch); then
    `norm = engine.clip_grad_norm(engine.grad_clip_norm)`; then `engine.step()` or `engine.skip_step()`.
    `backward` divides the loss by the accumulation steps itself: pass the micro-batch mean loss.

    Checkpoint I/O (`save` / `load`) is collective and writes the engine's own sharded format under a
    directory; `checkpoint/` adds the manifest, JSON state and atomic publication around it.
    """

    name: str
    """Engine name as in `engine.name` (zero0..3, fsdp2)."""
    model: nn.Module
    """The module to call in `step_fn` (a DeepSpeed engine or the fully_shard-ed root)."""
    device: torch.device
    """Where batches must go."""
    grad_clip_norm: float
    """Configured clip threshold (0 = no clipping, norm still measured)."""
    grad_accum_steps: int
    """Micro-batches per optimizer step."""
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler
    """Stepped once per optimizer step, skipped steps included (LR follows the step count)."""

    @property
    def lr(self) -> float:
        """Current learning rate of the first parameter group."""

    def backward(self, loss: torch.Tensor) -> None:
        """Back-propagate `loss / grad_accum_steps`."""

    def no_sync(self) -> AbstractContextManager:
        """Context for non-final accumulation micro-batches: no gradient reduction."""

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        """Global L2 norm of the (reduced) gradients, equal on every rank; clips to `max_norm` if > 0."""

    def step(self) -> None:
        """Optimizer step, LR scheduler step, gradients cleared."""

    def skip_step(self) -> None:
        """Drop this step's gradients without touching weights or optimizer state; LR scheduler steps."""

    def zero_grad(self) -> None:
        """Clear gradients."""

    def local_params(self) -> dict[str, torch.Tensor]:
        """Trainable parameters as this rank stores them (full, DTensor shard or ZeRO-3 partition).

        Elementwise maths on these (EMA) is correct under every engine; `gather_full` consolidates.
        """

    def gather_full(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Collective: full fp32 CPU tensors of a dict shaped like `local_params()` (same on every rank)."""

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Collective: consolidated fp32 CPU state dict of the model (params and buffers), every rank."""

    def save(self, path: Path, *, tensors: dict[str, dict[str, torch.Tensor]]) -> None:
        """Collective: write model + optimizer shards and extra `local_params`-shaped tensors under `path`."""

    def load(self, path: Path, *, tensors: dict[str, dict[str, torch.Tensor]]) -> None:
        """Collective: restore what `save` wrote (any world size), filling `tensors` in place."""
