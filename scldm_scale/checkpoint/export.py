"""Consolidate a sharded checkpoint on one process: `load_model_weights` and `export_safetensors`.

No process group is needed. DCP checkpoints (FSDP2) are read tensor by tensor from their metadata
(`no_dist`); DeepSpeed checkpoints go through `deepspeed.utils.zero_to_fp32`, which handles every ZeRO
stage and any saved world size.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from scldm_scale.checkpoint.io import read_meta
from scldm_scale.checkpoint.layout import MODEL, resolve_checkpoint
from scldm_scale.distributed.deepspeed import DS_DIR, DS_TAG
from scldm_scale.distributed.deepspeed import TENSORS_FILE as DS_TENSORS_FILE
from scldm_scale.distributed.fsdp import DCP_DIR


def _load_dcp(path: Path, prefix: str) -> dict[str, torch.Tensor]:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = FileSystemReader(str(path))
    metadata = reader.read_metadata()
    # Only tensors under `prefix`: the optimizer's param_groups are pickled objects and are never read.
    state = {
        key: torch.empty(md.size, dtype=md.properties.dtype)
        for key, md in metadata.state_dict_metadata.items()
        if key.startswith(prefix + ".") and isinstance(md, TensorStorageMetadata)
    }
    if not state:
        raise KeyError(f"no '{prefix}' tensors in DCP checkpoint {path}")
    dcp.load(state, storage_reader=reader, no_dist=True)
    return {key[len(prefix) + 1 :]: value for key, value in state.items()}


def _load_deepspeed(path: Path, which: str, engine: str) -> dict[str, torch.Tensor]:
    if which == MODEL and engine != "zero0":
        from scldm_scale.distributed.deepspeed import import_deepspeed

        import_deepspeed()
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return dict(get_fp32_state_dict_from_zero_checkpoint(str(path / DS_DIR), tag=DS_TAG))
    from safetensors.torch import load_file

    flat = load_file(str(path / DS_TENSORS_FILE))
    out = {key.split("/", 1)[1]: value for key, value in flat.items() if key.startswith(which + "/")}
    if not out:
        raise KeyError(f"no '{which}' tensors in {path / DS_TENSORS_FILE}")
    return out


def load_model_weights(path: str | Path, *, which: str = MODEL) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Full fp32 weights and manifest from a run_dir, a checkpoint dir or an exported `.safetensors`.

    Works on one process without a process group, whatever engine and world size wrote the checkpoint;
    this is how stage 2 loads the stage-1 autoencoder.

    Args:
        path: run_dir (latest checkpoint), checkpoint directory, or a file written by `export_safetensors`.
        which: MODEL (default) or EMA (the EMA shadow, keyed like the trainable parameters).

    Returns:
        (state_dict of fp32 CPU tensors, meta.json contents; the caller's manifest is under "manifest").
    """
    path = Path(path)
    if path.is_file() and path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            meta = json.loads(fh.metadata()["meta"])
            state = {key: fh.get_tensor(key) for key in fh.keys()}
        return state, meta
    ckpt = resolve_checkpoint(path)
    meta = read_meta(ckpt)
    if meta["engine"] == "fsdp2":
        state = _load_dcp(ckpt / DCP_DIR, which)
    else:
        state = _load_deepspeed(ckpt, which, meta["engine"])
    return {key: value.float() for key, value in state.items()}, meta


def export_safetensors(ckpt_dir: str | Path, out_path: str | Path, *, which: str = MODEL) -> Path:
    """Write one consolidated fp32 safetensors file plus `<stem>.manifest.json` next to it.

    The manifest is also embedded in the safetensors metadata (key "meta"), so the file alone suffices.

    Returns:
        `out_path`.
    """
    from safetensors.torch import save_file

    state, meta = load_model_weights(ckpt_dir, which=which)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(meta, indent=1, sort_keys=True)
    tmp = out_path.with_name(out_path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp), metadata={"meta": text, "which": which})
    tmp.replace(out_path)
    out_path.with_name(out_path.stem + ".manifest.json").write_text(text)
    return out_path
