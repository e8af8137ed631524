"""Checkpoints: layout, state keys, verified save / load / resume, retention, export, stage-1 weight loading.

`deepspeed` may be imported here (lazily) for consolidation; engine shards are written by the engines.
Names are imported on first use, so `python -m scldm_scale.checkpoint verify` does not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from scldm_scale.checkpoint.export import export_safetensors, load_model_weights
    from scldm_scale.checkpoint.integrity import CheckpointError, verify_collective
    from scldm_scale.checkpoint.io import (
        FORMAT_VERSION,
        VERIFICATION,
        code_version,
        load_checkpoint,
        load_latest,
        read_meta,
        save_checkpoint,
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
        resume_candidate,
    )
    from scldm_scale.checkpoint.manifest import VerifyResult, manifest_digest, verify_checkpoint
    from scldm_scale.checkpoint.rng import reseed, rng_state, set_rng_state

_WHERE = {
    "export": ("export_safetensors", "load_model_weights"),
    "integrity": ("CheckpointError", "verify_collective"),
    "io": ("FORMAT_VERSION", "VERIFICATION", "code_version", "load_checkpoint", "load_latest", "read_meta",
           "save_checkpoint"),
    "layout": ("DATALOADER", "EMA", "LR_SCHEDULER", "MODEL", "OPTIMIZER", "RNG", "TRAIN_STATE", "apply_retention",
               "checkpoint_name", "checkpoints_root", "latest_checkpoint", "list_checkpoints", "resolve_checkpoint",
               "resume_candidate"),
    "manifest": ("VerifyResult", "manifest_digest", "verify_checkpoint"),
    "rng": ("reseed", "rng_state", "set_rng_state"),
}
_MODULE_OF = {name: module for module, names in _WHERE.items() for name in names}

__all__ = [
    "CheckpointError",
    "DATALOADER",
    "EMA",
    "FORMAT_VERSION",
    "LR_SCHEDULER",
    "MODEL",
    "OPTIMIZER",
    "RNG",
    "TRAIN_STATE",
    "VERIFICATION",
    "VerifyResult",
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
    "manifest_digest",
    "read_meta",
    "reseed",
    "resolve_checkpoint",
    "resume_candidate",
    "rng_state",
    "save_checkpoint",
    "set_rng_state",
    "verify_checkpoint",
    "verify_collective",
]


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
