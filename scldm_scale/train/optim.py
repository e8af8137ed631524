"""Optimizer and LR scheduler from `OptimConfig`, and `build_engine`, which hands both to an engine."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from scldm_scale.config.engine import EngineConfig
from scldm_scale.config.optim import OptimConfig
from scldm_scale.distributed import TrainEngine, get_world_size
from scldm_scale.distributed import build_engine as _build_engine
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

    Needs a process group (`scldm_scale.distributed.init_distributed`).

    Args:
        cfg: engine section.
        model: finished single-device model (moved to `device`).
        optim_cfg: optimizer, schedule and clip threshold.
        max_steps: optimizer steps of the run (schedule length).
        precision: `train.precision` (fp32 or bf16).
        device: this rank's device.
        params: trainable subset (default: every requires_grad parameter); leave frozen modules out.
        grad_accum_steps: `train.grad_accum_steps`.
    """
    world_size = get_world_size()
    return _build_engine(
        cfg,
        model,
        optimizer_factory=lambda ps: build_optimizer(ps, optim_cfg, world_size=world_size),
        scheduler_factory=lambda opt: build_lr_scheduler(opt, optim_cfg, max_steps),
        grad_clip_norm=optim_cfg.grad_clip_norm,
        grad_accum_steps=grad_accum_steps,
        precision=precision,
        device=device,
        params=params,
    )
