"""Save, load and resume through a `TrainEngine`; RNG states; the manifest.

All functions here are collective: every rank calls them with the same arguments. Only rank 0 writes
JSON, the manifest and publishes; every rank writes its engine shards and its own RNG file.
Nothing is unpickled: JSON, safetensors and `torch.load(weights_only=True)` (DeepSpeed's own shard
files excepted, which only DeepSpeed reads).
"""

from __future__ import annotations

import datetime
import functools
import json
import logging
import random
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import torch

from scldm_scale.checkpoint.layout import (
    LR_SCHEDULER,
    META_FILE,
    STATE_FILE,
    TMP_SUFFIX,
    TRAIN_STATE,
    apply_retention,
    checkpoint_name,
    checkpoints_root,
    latest_checkpoint,
    publish,
    remove_stale_tmp,
    resolve_checkpoint,
)
from scldm_scale.distributed import TrainEngine, barrier, broadcast_object, get_rank, get_world_size

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
"""Bumped when the layout changes incompatibly."""


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """git sha of the source tree (suffixed `-dirty` with local changes), or `unknown`."""
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=here, capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return sha + ("-dirty" if dirty else "")


def read_meta(ckpt_dir: str | Path) -> dict[str, Any]:
    """The manifest (`meta.json`) of a checkpoint."""
    return json.loads((Path(ckpt_dir) / META_FILE).read_text())


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=1, sort_keys=True, default=_json_default))


def _json_default(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor) and obj.numel() == 1:
        return obj.item()
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"checkpoint state must be JSON-serializable, got {type(obj).__name__}")


def rng_state() -> dict[str, Any]:
    """This process's RNG states (torch CPU / CUDA, python, numpy) as tensors and ints."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Inverse of `rng_state`."""
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_state = state["numpy"]
    keys = np_state["keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, np_state["pos"], np_state["has_gauss"], np_state["cached"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def reseed(seed: int, step: int, rank: int) -> None:
    """Deterministic fresh RNG streams for (seed, step, rank): used when the world size changed."""
    derived = (seed * 1_000_003 + step * 10_007 + rank) % (2**63 - 1)
    random.seed(derived)
    np.random.seed(derived % (2**32))
    torch.manual_seed(derived)


def save_checkpoint(
    engine: TrainEngine,
    run_dir: str | Path,
    step: int,
    *,
    extra_state: dict[str, Any],
    manifest: dict[str, Any],
    tensors: dict[str, dict[str, torch.Tensor]] | None = None,
    keep_latest_k: int | None = None,
) -> Path:
    """Write and atomically publish `<run_dir>/checkpoints/step-XXXXXXXX/` (collective).

    Args:
        engine: the engine (writes model + optimizer shards in its own format).
        run_dir: run directory.
        step: optimizer steps completed.
        extra_state: JSON-serializable state, written by rank 0 (use the key constants: DATALOADER,
            TRAIN_STATE, EMA scalars...). The LR scheduler state is added here from the engine.
        manifest: caller's manifest (config yaml text, gene vocabulary, library-size stats, MLflow run id);
            stored in meta.json next to step, cells seen, world size, engine and code version.
        tensors: extra engine-layout tensors (e.g. `{EMA: ema.tensors()}`), sharded like the model.
        keep_latest_k: if given, delete older checkpoints after publishing.

    Returns:
        The published checkpoint directory.
    """
    rank = get_rank()
    final_dir = checkpoints_root(run_dir) / checkpoint_name(step)
    tmp_dir = final_dir.with_name(final_dir.name + TMP_SUFFIX)
    if rank == 0:
        remove_stale_tmp(run_dir)
        tmp_dir.mkdir(parents=True)
    barrier()
    engine.save(tmp_dir, tensors=tensors or {})
    (tmp_dir / "rng").mkdir(exist_ok=True)
    torch.save(rng_state(), tmp_dir / "rng" / f"rank-{rank:05d}.pt")
    if rank == 0:
        state = dict(extra_state)
        state[LR_SCHEDULER] = engine.lr_scheduler.state_dict()
        _write_json(tmp_dir / STATE_FILE, state)
        train_state = extra_state.get(TRAIN_STATE, {})
        meta = {
            "format_version": FORMAT_VERSION,
            "step": step,
            "cells_seen": train_state.get("cells_seen"),
            "world_size": get_world_size(),
            "engine": engine.name,
            "code_version": code_version(),
            "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "manifest": manifest,
        }
        _write_json(tmp_dir / META_FILE, meta)
    barrier()  # every rank's shards are on disk before rank 0 publishes
    if rank == 0:
        publish(tmp_dir, final_dir)
        if keep_latest_k is not None:
            apply_retention(run_dir, keep_latest_k)
        logger.info("checkpoint published: %s", final_dir)
    barrier()
    return final_dir


def load_checkpoint(
    engine: TrainEngine,
    ckpt_dir: str | Path,
    *,
    tensors: dict[str, dict[str, torch.Tensor]] | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Restore engine shards, LR scheduler and RNG from a checkpoint (collective); return its JSON state.

    Works at any world size: shards reshard through the engine's format. RNG states are restored when
    the world size matches; otherwise every rank is reseeded from (seed, step, rank) and a warning says so.

    Args:
        engine: an engine built like the one that saved (same model, optimizer and engine name).
        ckpt_dir: a checkpoint directory, or a run_dir (its latest checkpoint).
        tensors: engine-layout tensors to fill in place, keyed as when saved (e.g. `{EMA: ema.tensors()}`).
        seed: base seed for reseeding when the world size changed.

    Returns:
        The JSON state saved as `extra_state` (plus LR_SCHEDULER), with the manifest under "meta".
    """
    ckpt_dir = resolve_checkpoint(ckpt_dir)
    meta = read_meta(ckpt_dir)
    if meta["engine"] != engine.name:
        raise ValueError(
            f"checkpoint {ckpt_dir} was written by engine {meta['engine']}, cannot resume with engine.name={engine.name}; "
            "use load_model_weights to start a new run from its weights"
        )
    engine.load(ckpt_dir, tensors=tensors or {})
    state = json.loads((ckpt_dir / STATE_FILE).read_text())
    scheduler = engine.lr_scheduler
    scheduler.load_state_dict(state[LR_SCHEDULER])
    # Engines that rebuild optimizer state without its param_groups would keep step-0 LRs until the next
    # scheduler step; the scheduler's last LRs are the saved ones.
    for group, lr in zip(scheduler.optimizer.param_groups, scheduler.get_last_lr()):
        group["lr"] = lr
    rank, world_size = get_rank(), get_world_size()
    if meta["world_size"] == world_size:
        set_rng_state(torch.load(ckpt_dir / "rng" / f"rank-{rank:05d}.pt", weights_only=True))
    else:
        reseed(seed, meta["step"], rank)
        if rank == 0:
            logger.warning(
                "checkpoint world size %d != current %d: RNG reseeded from (seed=%d, step=%d, rank)",
                meta["world_size"], world_size, seed, meta["step"],
            )
    state["meta"] = meta
    logger.info("resumed from %s (step %d)", ckpt_dir, meta["step"])
    return state


def load_latest(
    engine: TrainEngine,
    run_dir: str | Path,
    *,
    tensors: dict[str, dict[str, torch.Tensor]] | None = None,
    seed: int = 0,
) -> dict[str, Any] | None:
    """`load_checkpoint` of the run's latest published checkpoint, or None when there is none (collective).

    Rank 0 picks the checkpoint and broadcasts it, so every rank loads the same one.
    """
    found = latest_checkpoint(run_dir) if get_rank() == 0 else None
    latest = broadcast_object(str(found) if found is not None else None)
    if latest is None:
        return None
    return load_checkpoint(engine, latest, tensors=tensors, seed=seed)
