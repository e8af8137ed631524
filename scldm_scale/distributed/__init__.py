"""Process group, collectives, and the data-parallel engines (DeepSpeed ZeRO 0-3, FSDP2) behind `TrainEngine`.

Importing this package imports neither deepspeed nor FSDP; `build_engine` loads the chosen one.
"""

from scldm_scale.distributed.engine import (
    OptimizerFactory,
    SchedulerFactory,
    TrainEngine,
    apply_activation_checkpointing,
    apply_compile,
    build_engine,
    iter_blocks,
)
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
    "build_engine",
    "destroy_distributed",
    "get_rank",
    "get_world_size",
    "init_distributed",
    "iter_blocks",
    "resolve_device",
]
