"""Save, load and resume through a `TrainEngine`, with verified checkpoints (docs/checkpoints.md).

All functions here are collective: every rank calls them with the same arguments. Every rank writes its
engine shards and its own RNG file and hashes its share of the files; rank 0 writes the JSON state and
meta.json (with the file table: sizes and sha256), publishes, and applies retention once the published
checkpoint re-verifies from disk. A write error on any rank fails the save on every rank (`PeerFailure`
naming the rank) and removes the `.tmp` directory. Loads verify first, so a corrupt file is named before
any engine reads it. Nothing is unpickled here: JSON, safetensors and `torch.load(weights_only=True)`
(DeepSpeed's own shard files and DCP's metadata excepted, which the engines read).
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import json
import logging
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from scldm_scale.checkpoint.integrity import (
    CheckpointError,
    check_free_space,
    hash_checkpoint,
    require_valid,
    together,
    verify_collective,
)
from scldm_scale.checkpoint.layout import (
    LR_SCHEDULER,
    META_FILE,
    STATE_FILE,
    TMP_SUFFIX,
    TRAIN_STATE,
    apply_retention,
    checkpoint_name,
    checkpoints_root,
    list_checkpoints,
    publish,
    remove_stale_tmp,
    resolve_checkpoint,
)
from scldm_scale.checkpoint.manifest import FILES_KEY, VerifyResult
from scldm_scale.checkpoint.rng import reseed, rng_state, set_rng_state
from scldm_scale.distributed import TrainEngine, barrier, broadcast_object, get_rank, get_world_size
from scldm_scale.distributed.faults import PeerFailure

logger = logging.getLogger(__name__)

FORMAT_VERSION = 2
"""Bumped when the layout changes (2: meta.json lists every file with its size and sha256)."""
VERIFICATION = "verification"
"""Key of the state returned by the loads: checkpoint, digest, verified, skipped (newer bad checkpoints)."""

__all__ = [
    "FORMAT_VERSION", "VERIFICATION", "code_version", "load_checkpoint", "load_latest", "read_meta", "reseed",
    "rng_state", "save_checkpoint", "set_rng_state",
]


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
    text = json.dumps(obj, indent=1, sort_keys=True, default=_json_default)
    with _naming(path):
        path.write_text(text)


@contextlib.contextmanager
def _naming(path: Path) -> Iterator[None]:
    """Add the file name to an OSError raised while writing it (a full disk reports none)."""
    try:
        yield
    except OSError as exc:
        if exc.filename is not None:
            raise
        raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc


def _json_default(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor) and obj.numel() == 1:
        return obj.item()
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"checkpoint state must be JSON-serializable, got {type(obj).__name__}")


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
    """Write, publish and verify `<run_dir>/checkpoints/step-XXXXXXXX/` (collective).

    Args:
        engine: the engine (writes model + optimizer shards in its own format).
        run_dir: run directory.
        step: optimizer steps completed.
        extra_state: JSON-serializable state, written by rank 0 (use the key constants: DATALOADER,
            TRAIN_STATE, EMA scalars...). The LR scheduler state is added here from the engine.
        manifest: caller's manifest (config yaml text, gene vocabulary, library-size stats, MLflow run id);
            stored in meta.json next to step, cells seen, world size, engine, code version and file table.
        tensors: extra engine-layout tensors (e.g. `{EMA: ema.tensors()}`), sharded like the model.
        keep_latest_k: if given, delete older checkpoints once the new one verified.

    Returns:
        The published checkpoint directory.

    Raises:
        PeerFailure: on every rank, naming the rank(s) and error, when the free space is below the latest
            checkpoint's size or a write failed anywhere; the `.tmp` directory is removed, nothing published.
        CheckpointError: on every rank when the published checkpoint does not re-verify from disk; older
            checkpoints are all kept.
    """
    rank = get_rank()
    final_dir = checkpoints_root(run_dir) / checkpoint_name(step)
    tmp_dir = final_dir.with_name(final_dir.name + TMP_SUFFIX)
    name = final_dir.name
    state = dict(extra_state)
    state[LR_SCHEDULER] = engine.lr_scheduler.state_dict()
    try:
        together(f"preparing checkpoint {name}", lambda: _prepare(run_dir, tmp_dir, name), rank0_only=True)
        together(f"writing checkpoint {name}", lambda: _write_files(engine, tmp_dir, tensors or {}, state))
        table = hash_checkpoint(tmp_dir)
        meta = _meta(engine, step, extra_state, manifest, table) if rank == 0 else None
        together(f"publishing checkpoint {name}", lambda: _publish(tmp_dir, final_dir, meta), rank0_only=True)
    except PeerFailure:
        if rank == 0:
            shutil.rmtree(tmp_dir, ignore_errors=True)
        barrier()  # the .tmp directory is gone on every rank's return
        raise
    result = verify_collective(final_dir)
    if not result.ok:
        raise CheckpointError(
            f"checkpoint {final_dir} failed verification right after it was written: {'; '.join(result.problems)}; "
            "retention skipped (older checkpoints kept; resume=auto skips this one)"
        )
    if keep_latest_k is not None:
        together(f"retention after {name}", lambda: apply_retention(run_dir, keep_latest_k), rank0_only=True)
    if rank == 0:
        logger.info("checkpoint published and verified: %s (%d files)", final_dir, result.files)
    return final_dir


def _prepare(run_dir: str | Path, tmp_dir: Path, name: str) -> None:
    """Rank 0, before anything is written: drop stale .tmp dirs, check the free space, create the .tmp dir."""
    remove_stale_tmp(run_dir)
    checkpoints_root(run_dir).mkdir(parents=True, exist_ok=True)
    check_free_space(run_dir, name)
    tmp_dir.mkdir()


def _write_files(engine: TrainEngine, tmp_dir: Path, tensors: dict, state: dict[str, Any]) -> None:
    """Every rank: engine shards and its RNG file; rank 0 also state.json."""
    rank = get_rank()
    engine.save(tmp_dir, tensors=tensors)
    rng_file = tmp_dir / "rng" / f"rank-{rank:05d}.pt"
    with _naming(rng_file):
        rng_file.parent.mkdir(exist_ok=True)
        torch.save(rng_state(), rng_file)
    if rank == 0:
        _write_json(tmp_dir / STATE_FILE, state)


def _meta(engine: TrainEngine, step: int, extra_state: dict, manifest: dict, table: dict | None) -> dict[str, Any]:
    train_state = extra_state.get(TRAIN_STATE, {})
    return {
        "format_version": FORMAT_VERSION,
        "step": step,
        "cells_seen": train_state.get("cells_seen"),
        "world_size": get_world_size(),
        "engine": engine.name,
        "code_version": code_version(),
        "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "manifest": manifest,
        FILES_KEY: table,
    }


def _publish(tmp_dir: Path, final_dir: Path, meta: dict[str, Any]) -> None:
    _write_json(tmp_dir / META_FILE, meta)
    publish(tmp_dir, final_dir)


def load_checkpoint(
    engine: TrainEngine,
    ckpt_dir: str | Path,
    *,
    tensors: dict[str, dict[str, torch.Tensor]] | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Verify, then restore engine shards, LR scheduler and RNG from a checkpoint (collective).

    The files are checked against meta.json first (hashing split across ranks), so a corrupt or missing
    file raises `CheckpointError` on every rank, naming it, before any engine reads it. A checkpoint written
    before checksums loads with a warning. Works at any world size: shards reshard through the engine's
    format. RNG states are restored when the world size matches; otherwise every rank is reseeded from
    (seed, step, rank) and a warning says so.

    Args:
        engine: an engine built like the one that saved (same model, optimizer and engine name).
        ckpt_dir: a checkpoint directory, or a run_dir (its latest checkpoint, which must verify).
        tensors: engine-layout tensors to fill in place, keyed as when saved (e.g. `{EMA: ema.tensors()}`).
        seed: base seed for reseeding when the world size changed.

    Returns:
        The JSON state saved as `extra_state` (plus LR_SCHEDULER), with the manifest under "meta" and
        the verification verdict under VERIFICATION.
    """
    ckpt_dir = resolve_checkpoint(ckpt_dir)
    result = require_valid(ckpt_dir)
    return _restore(engine, ckpt_dir, tensors or {}, seed, result, skipped=[])


def load_latest(
    engine: TrainEngine,
    run_dir: str | Path,
    *,
    tensors: dict[str, dict[str, torch.Tensor]] | None = None,
    seed: int = 0,
) -> dict[str, Any] | None:
    """`load_checkpoint` of the run's newest checkpoint that verifies, or None when there is none (collective).

    Checkpoints are verified newest first (collectively, so every rank loads the same one); one that fails
    is skipped with a warning naming its bad files (listed under VERIFICATION["skipped"] in the result).

    Raises:
        CheckpointError: checkpoints exist but none verifies (starting over silently would discard them).
    """
    found = [str(path) for _, path in reversed(list_checkpoints(run_dir))] if get_rank() == 0 else None
    candidates = broadcast_object(found)
    skipped: list[VerifyResult] = []
    for path in map(Path, candidates or []):
        result = verify_collective(path)
        if result.ok:
            return _restore(engine, path, tensors or {}, seed, result, skipped)
        if get_rank() == 0:
            logger.warning("resume: skipping checkpoint %s, it failed verification: %s", path, "; ".join(result.problems))
        skipped.append(result)
    if not skipped:
        return None
    detail = " | ".join(f"{r.path.name}: {'; '.join(r.problems)}" for r in skipped)
    raise CheckpointError(
        f"no checkpoint in {checkpoints_root(run_dir)} verifies ({detail}); repair or move them away, "
        "or set checkpoint.resume=never train.overwrite=true to start over (they are moved to <run_dir>/archive/)"
    )


def _restore(
    engine: TrainEngine, ckpt_dir: Path, tensors: dict, seed: int, result: VerifyResult, skipped: list[VerifyResult]
) -> dict[str, Any]:
    rank, world_size = get_rank(), get_world_size()
    if rank == 0 and result.warnings:
        logger.warning("checkpoint %s: %s", ckpt_dir, "; ".join(result.warnings))
    meta = read_meta(ckpt_dir)
    if meta["engine"] != engine.name:
        raise ValueError(
            f"checkpoint {ckpt_dir} was written by engine {meta['engine']}, cannot resume with engine.name={engine.name}; "
            "use load_model_weights to start a new run from its weights"
        )
    engine.load(ckpt_dir, tensors=tensors)
    state = json.loads((ckpt_dir / STATE_FILE).read_text())
    scheduler = engine.lr_scheduler
    scheduler.load_state_dict(state[LR_SCHEDULER])
    # Engines that rebuild optimizer state without its param_groups would keep step-0 LRs until the next
    # scheduler step; the scheduler's last LRs are the saved ones.
    for group, lr in zip(scheduler.optimizer.param_groups, scheduler.get_last_lr()):
        group["lr"] = lr
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
    state[VERIFICATION] = {
        "checkpoint": str(ckpt_dir), "digest": result.digest, "verified": result.verified,
        "skipped": [{"checkpoint": str(r.path), "problems": r.problems} for r in skipped],
    }
    logger.info("resumed from %s (step %d)", ckpt_dir, meta["step"])
    return state
