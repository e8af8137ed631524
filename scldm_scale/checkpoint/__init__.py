"""Checkpoints: layout, state keys, atomic save / load / resume, retention, export, stage-1 weight loading.

`deepspeed` may be imported here (lazily) for consolidation; engine shards are written by the engines.
"""

from scldm_scale.checkpoint.export import export_safetensors, load_model_weights
from scldm_scale.checkpoint.io import (
    code_version,
    load_checkpoint,
    load_latest,
    read_meta,
    reseed,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from scldm_scale.checkpoint.layout import (
    DATALOADER,
    EMA,
    LR_SCHEDULER,
    MODEL,
    OPTIMIZER,
    RNG,
    TRAIN_STATE,
    apply_retention,
    checkpoint_name,
    checkpoints_root,
    latest_checkpoint,
    list_checkpoints,
    resolve_checkpoint,
)

__all__ = [
    "DATALOADER",
    "EMA",
    "LR_SCHEDULER",
    "MODEL",
    "OPTIMIZER",
    "RNG",
    "TRAIN_STATE",
    "apply_retention",
    "checkpoint_name",
    "checkpoints_root",
    "code_version",
    "export_safetensors",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "load_latest",
    "load_model_weights",
    "read_meta",
    "reseed",
    "resolve_checkpoint",
    "rng_state",
    "save_checkpoint",
    "set_rng_state",
]
