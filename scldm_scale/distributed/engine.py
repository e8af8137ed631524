"""The `TrainEngine` protocol the loop talks to, and `build_engine`, the only place that picks an engine.

Parallelism is applied to a finished single-device model in a fixed order (torchtitan's
`parallelize.py`): activation checkpointing, compile, then sharding (FSDP2 or DeepSpeed ZeRO).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from scldm_scale.config.engine import EngineConfig

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


def iter_blocks(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Blocks = elements of every outermost `nn.ModuleList` (transformer layers); units of AC and sharding."""
    seen: set[str] = set()
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and not any(name.startswith(s + ".") for s in seen):
            seen.add(name)
            for idx, block in enumerate(module):
                yield f"{name}.{idx}", block


def apply_activation_checkpointing(model: nn.Module) -> int:
    """Wrap every block in a non-reentrant checkpoint wrapper (FQNs stay loadable). Returns the count."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    count = 0
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and not name.count("_checkpoint_wrapped_module"):
            for idx in range(len(module)):
                if type(module[idx]).__name__ != "CheckpointWrapper":
                    module[idx] = checkpoint_wrapper(module[idx])
                    count += 1
    return count


def apply_compile(model: nn.Module) -> int:
    """`torch.compile` each block in place (`nn.Module.compile` keeps parameter names). Returns the count."""
    blocks = [block for _, block in iter_blocks(model)] or [model]
    for block in blocks:
        block.compile()
    return len(blocks)


def clean_name(name: str) -> str:
    """Parameter name without activation-checkpoint / compile wrapper segments (the checkpoint key)."""
    return name.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", "")


def trainable_names(model: nn.Module, params: Iterable[nn.Parameter] | None) -> list[str]:
    """Names of the parameters to optimize: `params` (identity match) or every `requires_grad` one."""
    if params is None:
        return [n for n, p in model.named_parameters() if p.requires_grad]
    wanted = {id(p) for p in params}
    names = [n for n, p in model.named_parameters() if id(p) in wanted]
    if len(names) != len(wanted):
        raise ValueError("build_engine(params=...) contains tensors that are not parameters of the model")
    return names


def build_engine(
    cfg: EngineConfig,
    model: nn.Module,
    *,
    optimizer_factory: OptimizerFactory,
    scheduler_factory: SchedulerFactory,
    grad_clip_norm: float,
    grad_accum_steps: int = 1,
    precision: str = "fp32",
    device: torch.device | str = "cpu",
    params: Iterable[nn.Parameter] | None = None,
) -> TrainEngine:
    """Wrap a finished single-device model in the configured engine (needs a process group).

    Most callers want `scldm_scale.train.build_engine`, which supplies the optimizer and LR schedule
    from `OptimConfig`.

    Args:
        cfg: engine section.
        model: the full model on any device; it is moved to `device`.
        optimizer_factory: builds the optimizer over the trainable (possibly sharded) parameters.
        scheduler_factory: builds the LR scheduler over that optimizer.
        grad_clip_norm: clip threshold, 0 = off.
        grad_accum_steps: micro-batches per optimizer step.
        precision: fp32 or bf16 (bf16 params/compute, fp32 master weights and gradient reduction).
        device: this rank's device.
        params: trainable subset; frozen modules (the stage-2 VAE) must be left out. Default: every
            parameter with requires_grad.
    """
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"train.precision must be fp32 or bf16, got {precision!r}")
    device = torch.device(device)
    names = trainable_names(model, params)
    if not names:
        raise ValueError("build_engine: the model has no trainable parameters")
    if cfg.enable_activation_checkpointing:
        apply_activation_checkpointing(model)
    if cfg.enable_compile:
        apply_compile(model)
    kwargs = dict(
        optimizer_factory=optimizer_factory,
        scheduler_factory=scheduler_factory,
        grad_clip_norm=grad_clip_norm,
        grad_accum_steps=grad_accum_steps,
        precision=precision,
        device=device,
        trainable=names,
    )
    if cfg.name == "fsdp2":
        from scldm_scale.distributed.fsdp import FSDPEngine

        return FSDPEngine(cfg, model, **kwargs)
    if cfg.name in ("zero0", "zero1", "zero2", "zero3"):
        from scldm_scale.distributed.deepspeed import DeepSpeedEngine

        return DeepSpeedEngine(cfg, model, stage=int(cfg.name[-1]), **kwargs)
    raise ValueError(f"engine.name must be one of zero0, zero1, zero2, zero3, fsdp2; got {cfg.name!r}")
