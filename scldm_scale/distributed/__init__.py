"""Process group, collectives, and the data-parallel engines (DeepSpeed ZeRO 0-3, FSDP2) behind `TrainEngine`.

Modules: `engine` (the `TrainEngine` protocol), `parallelize` (blocks, activation checkpointing, compile),
`deepspeed` / `fsdp` (the backends), `group` (process group, collectives), `faults` (failing together).
Importing this package imports neither deepspeed nor FSDP; `scldm_scale.train.build_engine` loads the chosen one.
"""

from scldm_scale.distributed.engine import OptimizerFactory, SchedulerFactory, TrainEngine
from scldm_scale.distributed.group import (
    DistInfo,
    all_reduce_max,
    all_reduce_mean,
    all_reduce_sum,
    barrier,
    broadcast_object,
    destroy_distributed,
    gather_object,
    gather_object_all,
    get_rank,
    get_world_size,
    init_distributed,
    resolve_device,
)
from scldm_scale.distributed.parallelize import apply_activation_checkpointing, apply_compile, iter_blocks

__all__ = [
    "DistInfo",
    "OptimizerFactory",
    "SchedulerFactory",
    "TrainEngine",
    "all_reduce_max",
    "all_reduce_mean",
    "all_reduce_sum",
    "apply_activation_checkpointing",
    "apply_compile",
    "barrier",
    "broadcast_object",
    "gather_object",
    "gather_object_all",
    "destroy_distributed",
    "get_rank",
    "get_world_size",
    "init_distributed",
    "iter_blocks",
    "resolve_device",
]
