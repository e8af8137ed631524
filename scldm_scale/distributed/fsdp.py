"""PyTorch FSDP2 engine: `fully_shard` per block then the root, AdamW over DTensor shards, DCP checkpoints.

The only module that imports `fully_shard`. Sharded state (model, optimizer, EMA) goes through
`torch.distributed.checkpoint`, so a checkpoint written at one world size loads at any other.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor

from scldm_scale.config.engine import EngineConfig
from scldm_scale.distributed.engine import OptimizerFactory, SchedulerFactory
from scldm_scale.distributed.parallelize import clean_name, iter_blocks

logger = logging.getLogger(__name__)

DCP_DIR = "dcp"
"""Sub-directory of a checkpoint holding the DCP files."""
FORWARD_METHODS = ("encode", "decode", "loss")
"""Root methods other than forward that step functions may call; registered so FSDP2 unshards for them.
(The DiT's `forward_with_guidance` is not one: generation runs on a single-device copy of the weights.)"""


class FSDPEngine:
    """`TrainEngine` over FSDP2. See `scldm_scale.distributed.engine.TrainEngine` for the contract."""

    name = "fsdp2"

    def __init__(
        self,
        cfg: EngineConfig,
        model: nn.Module,
        *,
        optimizer_factory: OptimizerFactory,
        scheduler_factory: SchedulerFactory,
        grad_clip_norm: float,
        grad_accum_steps: int,
        precision: str,
        device: torch.device,
        trainable: list[str],
    ) -> None:
        self.device = device
        self.grad_clip_norm = grad_clip_norm
        self.grad_accum_steps = grad_accum_steps
        # Explicit mesh: the default would pick CUDA on a GPU box even for a CPU run.
        self.mesh = init_device_mesh(device.type, (dist.get_world_size(),))
        self.model = _shard(model.to(device), self.mesh, cfg, precision)
        wanted = set(trainable)
        self._params = {clean_name(n): p for n, p in self.model.named_parameters() if clean_name(n) in wanted}
        self.optimizer = optimizer_factory(list(self._params.values()))
        self.lr_scheduler = scheduler_factory(self.optimizer)

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.grad_accum_steps).backward()

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        # Gradients accumulate unsharded and unreduced until the final micro-batch (torchtitan style).
        self.model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            self.model.set_requires_gradient_sync(True)

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        params = list(self._params.values())
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return torch.zeros((), device=self.device)
        total = torch.nn.utils.get_total_norm(grads, norm_type=2.0, error_if_nonfinite=False, foreach=True)
        if isinstance(total, DTensor):
            total = total.full_tensor()  # partial sums of squares -> one global norm on every rank
        if max_norm > 0:
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, total, foreach=True)
        return total

    def step(self) -> None:
        self.optimizer.step()
        self.lr_scheduler.step()
        self.zero_grad()

    def skip_step(self) -> None:
        self.zero_grad()
        self.lr_scheduler.step()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def local_params(self) -> dict[str, torch.Tensor]:
        return dict(self._params)

    def gather_full(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        for name, t in tensors.items():
            full = t.full_tensor() if isinstance(t, DTensor) else t
            out[name] = _copy_fp32_cpu(full)
        return out

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        opts = StateDictOptions(full_state_dict=True, cpu_offload=False)
        state = get_model_state_dict(self.model, options=opts)
        return {k: _copy_fp32_cpu(v) for k, v in state.items()}

    def _state(self, tensors: dict[str, dict[str, torch.Tensor]]) -> dict:
        return {
            "model": get_model_state_dict(self.model),
            "optimizer": get_optimizer_state_dict(self.model, self.optimizer),
            **tensors,
        }

    def save(self, path: Path, *, tensors: dict[str, dict[str, torch.Tensor]]) -> None:
        dcp.save(self._state(tensors), checkpoint_id=str(Path(path) / DCP_DIR))

    def load(self, path: Path, *, tensors: dict[str, dict[str, torch.Tensor]]) -> None:
        state = self._state(tensors)
        # DCP reshards on read: the target DTensors' placements decide which slices this rank loads.
        dcp.load(state, checkpoint_id=str(Path(path) / DCP_DIR))
        set_model_state_dict(self.model, state["model"])
        set_optimizer_state_dict(self.model, self.optimizer, state["optimizer"])


def _shard(model: nn.Module, mesh, cfg: EngineConfig, precision: str) -> nn.Module:
    """fully_shard each block the model names (`block_lists`), then the root (embeddings, heads, the rest)."""
    mp = None
    if precision == "bf16":
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    kwargs = {"mesh": mesh, "reshard_after_forward": cfg.fsdp_reshard_after_forward}
    if mp is not None:
        kwargs["mp_policy"] = mp
    for _, block in iter_blocks(model):
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    for method in FORWARD_METHODS:
        if callable(getattr(model, method, None)):
            register_fsdp_forward_method(model, method)
    return model


def _copy_fp32_cpu(t: torch.Tensor) -> torch.Tensor:
    """A detached fp32 CPU copy: never an alias of a live parameter (1-rank full_tensor() returns the shard)."""
    return t.detach().to(device="cpu", dtype=torch.float32, copy=True)
