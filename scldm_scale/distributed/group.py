"""Process group set-up and the few collectives the loop needs.

Works under torchrun, the deepspeed launcher (env RANK / WORLD_SIZE / LOCAL_RANK / MASTER_*) and plain
python (no env: a one-process group on an in-memory store, so FSDP2 and DeepSpeed still find a group).
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from scldm_scale.utils import env as _env

logger = logging.getLogger(__name__)

_OWNS_GROUP = False


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job."""

    rank: int
    """Global rank."""
    world_size: int
    """Number of processes."""
    local_rank: int
    """Rank within the node (picks the GPU)."""
    device: torch.device
    """Device this rank computes on."""

    @property
    def is_rank_zero(self) -> bool:
        """True on the rank that writes manifests and logs."""
        return self.rank == 0


def resolve_device(device: str | torch.device = "auto", local_rank: int = 0) -> torch.device:
    """`auto` -> cuda:<local_rank> when CUDA is available, else cpu; `cuda` -> cuda:<local_rank>."""
    device = str(device)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("train.device=cuda but CUDA is not available")
        return torch.device("cuda", local_rank)
    return torch.device(device)


def init_distributed(device: str | torch.device = "auto", timeout_seconds: float = 600) -> DistInfo:
    """Join (or create) the default process group and pick this rank's device.

    Always leaves a process group initialised: nccl on CUDA, gloo on CPU. Without launcher env vars the
    group has one process on an in-memory store. If a group already exists (tests, a caller), it is reused
    and `destroy_distributed` will leave it alone.

    Args:
        device: `auto`, `cpu`, `cuda` or a torch.device.
        timeout_seconds: collective timeout (`engine.collective_timeout_s`): a collective that a peer never
            joins (dead rank, lost node) raises after this long instead of hanging.

    Returns:
        DistInfo(rank, world_size, local_rank, device).
    """
    global _OWNS_GROUP
    local_rank = _env.get_local_rank()
    if dist.is_initialized():
        rank, world_size = dist.get_rank(), dist.get_world_size()
    else:
        rank, world_size = _env.get_rank(), _env.get_world_size()
    dev = resolve_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        timeout = datetime.timedelta(seconds=timeout_seconds)
        if "MASTER_ADDR" in os.environ:
            dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timeout)
        else:
            if world_size != 1:
                raise ValueError(f"WORLD_SIZE={world_size} but MASTER_ADDR is not set; launch with torchrun")
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
            # DeepSpeed insists on launcher env vars even for one process.
            for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
                os.environ.setdefault(key, value)
        _OWNS_GROUP = True
        set_collective_timeout(timeout_seconds)
        logger.info("process group up: backend=%s world_size=%d device=%s", backend, world_size, dev)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


def set_collective_timeout(seconds: float) -> None:
    """Apply `seconds` to every existing process group and make it the default of groups created later.

    Groups made by `new_group` (DeepSpeed's data-parallel group, FSDP meshes) otherwise get torch's own
    default (30 min on gloo, 10 min on NCCL), not the timeout the default group was created with.
    """
    from torch.distributed import distributed_c10d as c10d

    timeout = datetime.timedelta(seconds=seconds)
    c10d.default_pg_timeout = timeout  # read by new_group at call time
    c10d.default_pg_nccl_timeout = timeout
    for group in list(c10d._world.pg_map):
        try:
            c10d._set_pg_timeout(timeout, group)
        except (RuntimeError, AttributeError, ValueError):  # a backend without per-group timeouts
            logger.debug("could not set the timeout of process group %s", group)


def destroy_distributed() -> None:
    """Tear down the process group if `init_distributed` created it."""
    global _OWNS_GROUP
    if _OWNS_GROUP and dist.is_initialized():
        dist.destroy_process_group()
    _OWNS_GROUP = False


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks into a new tensor (the input is left untouched). No host sync."""
    out = tensor.detach().clone()
    if _active():
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean over ranks into a new tensor. No host sync."""
    out = all_reduce_sum(tensor)
    return out / dist.get_world_size() if _active() else out


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    """Max over ranks into a new tensor. No host sync."""
    out = tensor.detach().clone()
    if _active():
        dist.all_reduce(out, op=dist.ReduceOp.MAX)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Return rank `src`'s `obj` on every rank (pickled in memory between our own ranks only)."""
    if not _active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_object(obj: Any, dst: int = 0) -> list[Any] | None:
    """Every rank's `obj` as a list in rank order on rank `dst` (None elsewhere); pickled in memory between
    our own ranks only."""
    if not _active():
        return [obj]
    out = [None] * dist.get_world_size() if dist.get_rank() == dst else None
    dist.gather_object(obj, out, dst=dst)
    return out


def gather_object_all(obj: Any) -> list[Any]:
    """Every rank's `obj` as a list in rank order, on every rank (pickled in memory between our own ranks)."""
    if not _active():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    """Wait for every rank (no-op without a group of size > 1)."""
    if _active():
        dist.barrier()


def get_world_size() -> int:
    """World size of the live group (1 without one)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def get_rank() -> int:
    """Rank in the live group (0 without one)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
