"""Optimizer and LR scheduler from `OptimConfig`, and `build_engine`: the one place that picks and builds an engine.

`build_engine` applies the model transforms of `distributed/parallelize.py` (activation checkpointing,
compile) and hands AdamW and the LR schedule to the backend named by `engine.name` (imported only then:
`distributed/deepspeed.py` or `distributed/fsdp.py`).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from scldm_scale.config.engine import EngineConfig
from scldm_scale.config.optim import OptimConfig
from scldm_scale.distributed import TrainEngine, get_world_size
from scldm_scale.distributed.parallelize import apply_activation_checkpointing, apply_compile, trainable_names
from scldm_scale.train.schedules import build_schedule


def peak_lr(cfg: OptimConfig, world_size: int) -> float:
    """`optim.lr`, times the world size when `optim.lr_scaling=linear` (as the reference does)."""
    return cfg.lr * (world_size if cfg.lr_scaling == "linear" else 1)


def build_optimizer(params: Iterable[nn.Parameter], cfg: OptimConfig, *, world_size: int = 1) -> torch.optim.AdamW:
    """torch AdamW (works with DTensor shards and under DeepSpeed; fused kernels would JIT-compile there)."""
    return torch.optim.AdamW(
        list(params),
        lr=peak_lr(cfg, world_size),
        betas=tuple(cfg.betas),
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
    )


def build_lr_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, max_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR over `optim.schedule`; its state_dict is JSON-serializable (the factor is rebuilt)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, build_schedule(cfg, max_steps))


def build_engine(
    cfg: EngineConfig,
    model: nn.Module,
    *,
    optim_cfg: OptimConfig,
    max_steps: int,
    precision: str = "fp32",
    device: torch.device | str = "cpu",
    params: Iterable[nn.Parameter] | None = None,
    grad_accum_steps: int = 1,
) -> TrainEngine:
    """Wrap `model` in the engine named by `engine.name`, with AdamW and the configured LR schedule.

    Needs a process group (`scldm_scale.distributed.init_distributed`). Transforms are applied to the
    single-device model first, in order: activation checkpointing, compile (each on the blocks the model
    names, see `distributed/parallelize.py`), then the engine shards it.

    Args:
        cfg: engine section.
        model: finished single-device model (moved to `device`).
        optim_cfg: optimizer, schedule and clip threshold (0 = no clipping, norm still measured).
        max_steps: optimizer steps of the run (schedule length).
        precision: `train.precision`, fp32 or bf16 (bf16 params/compute, fp32 master weights and gradient
            reduction).
        device: this rank's device.
        params: trainable subset; frozen modules (the stage-2 VAE) must be left out. Default: every
            parameter with requires_grad.
        grad_accum_steps: `train.grad_accum_steps`, micro-batches per optimizer step.
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
    world_size = get_world_size()
    kwargs = dict(
        optimizer_factory=lambda ps: build_optimizer(ps, optim_cfg, world_size=world_size),
        scheduler_factory=lambda opt: build_lr_scheduler(opt, optim_cfg, max_steps),
        grad_clip_norm=optim_cfg.grad_clip_norm,
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
