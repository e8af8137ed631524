"""On-disk layout of checkpoints, state keys, atomic publication and retention.

    <run_dir>/checkpoints/step-00001000/      one published checkpoint
        meta.json                             manifest + file table: size, sha256 (written last, before the rename)
        state.json                            rank-0 JSON state: train state, loader, LR scheduler, EMA scalars
        rng/rank-00000.pt                     per-rank RNG states (tensors and ints only)
        dcp/ | deepspeed/ + tensors.safetensors   engine shards
    <run_dir>/checkpoints/step-00001000.tmp/  being written; never read; removed on failure or by the next save

A checkpoint is published by one `os.rename` of its finished `.tmp` directory, so a crash while writing
leaves the previous checkpoint as the latest. Retention runs only after the new checkpoint verified
(docs/checkpoints.md).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

from scldm_scale.utils.fsync import fsync_path

logger = logging.getLogger(__name__)

MODEL = "model"
"""Model weights (engine shards)."""
EMA = "ema"
"""EMA shadow weights (engine shards) and scalars (state.json)."""
OPTIMIZER = "optimizer"
"""Optimizer state (engine shards)."""
LR_SCHEDULER = "lr_scheduler"
"""LR scheduler state (state.json)."""
DATALOADER = "dataloader"
"""Global, world-size independent loader state from rank 0 (state.json)."""
TRAIN_STATE = "train_state"
"""Step, cells seen, skipped steps, epoch, seed (state.json)."""
RNG = "rng"
"""Per-rank RNG states (rng/rank-*.pt)."""

CHECKPOINTS_DIR = "checkpoints"
"""Sub-directory of a run_dir holding checkpoints."""
META_FILE = "meta.json"
"""Manifest file name."""
STATE_FILE = "state.json"
"""Rank-0 JSON state file name."""
TMP_SUFFIX = ".tmp"
"""Suffix of a checkpoint being written."""
_STEP_RE = re.compile(r"^step-(\d{8,})$")


def checkpoint_name(step: int) -> str:
    """`step-00001000`."""
    return f"step-{step:08d}"


def checkpoints_root(run_dir: str | Path) -> Path:
    """`<run_dir>/checkpoints`."""
    return Path(run_dir) / CHECKPOINTS_DIR


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """Published checkpoints of a run as (step, path), oldest first."""
    root = checkpoints_root(run_dir)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _STEP_RE.match(child.name)
        if match and (child / META_FILE).is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The published checkpoint with the highest step, or None."""
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def resume_candidate(resume: str, run_dir: str | Path) -> Path | None:
    """The checkpoint `checkpoint.resume` points at, for reading its manifest before the engine exists.

    `never` -> None; a path -> that checkpoint (None when there is none: the loader reports it); `auto` ->
    the newest checkpoint of `run_dir` whose meta.json parses. Every checkpoint of one run carries the same
    run identity and stage-1 pin, so a newest one with damaged shards (skipped later by `load_latest`)
    still answers correctly; its files are not hashed here.
    """
    if resume == "never":
        return None
    if resume != "auto":
        try:
            return resolve_checkpoint(resume)
        except FileNotFoundError:
            return None
    for _, path in reversed(list_checkpoints(run_dir)):
        try:
            json.loads((path / META_FILE).read_text())
        except (OSError, ValueError):
            logger.warning("checkpoint %s: unreadable %s, looking at the previous one", path, META_FILE)
            continue
        return path
    return None


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory -> itself; a run_dir (or its checkpoints/) -> its latest published checkpoint.

    Raises:
        FileNotFoundError: nothing loadable at `path`.
    """
    path = Path(path)
    if (path / META_FILE).is_file():
        return path
    for run_dir in (path, path.parent if path.name == CHECKPOINTS_DIR else None):
        if run_dir is not None:
            latest = latest_checkpoint(run_dir)
            if latest is not None:
                return latest
    raise FileNotFoundError(f"no published checkpoint at {path} (expected meta.json or {CHECKPOINTS_DIR}/step-*)")


def remove_stale_tmp(run_dir: str | Path) -> None:
    """Delete unfinished `.tmp` checkpoints left by a crash (rank 0, before writing a new one)."""
    root = checkpoints_root(run_dir)
    if root.is_dir():
        for child in root.iterdir():
            if child.name.endswith(TMP_SUFFIX) and child.is_dir():
                logger.warning("removing unfinished checkpoint %s", child)
                shutil.rmtree(child, ignore_errors=True)


def fsync_tree(path: Path) -> None:
    """fsync every file and directory under `path` (so the rename publishes durable data)."""
    for dirpath, _, filenames in os.walk(path):
        for name in filenames:
            with open(os.path.join(dirpath, name), "rb") as fh:
                os.fsync(fh.fileno())
        fsync_dir(Path(dirpath))


def fsync_dir(path: Path) -> None:
    """fsync a directory entry (no-op where the OS does not allow it)."""
    fsync_path(path)


def publish(tmp_dir: Path, final_dir: Path) -> None:
    """Atomically turn a finished `.tmp` directory into a published checkpoint (rank 0 only)."""
    fsync_tree(tmp_dir)
    if final_dir.exists():  # re-saving the same step after a resume: replace it
        old = final_dir.with_name(final_dir.name + ".old" + TMP_SUFFIX)
        os.rename(final_dir, old)
        shutil.rmtree(old, ignore_errors=True)
    os.rename(tmp_dir, final_dir)
    fsync_dir(final_dir.parent)


def apply_retention(run_dir: str | Path, keep_latest_k: int) -> list[Path]:
    """Delete all but the newest `keep_latest_k` published checkpoints; returns the deleted paths."""
    found = list_checkpoints(run_dir)
    doomed = [path for _, path in found[: max(0, len(found) - keep_latest_k)]]
    for path in doomed:
        # Unpublish first (rename), so a crash mid-delete never leaves a half checkpoint that looks valid.
        trash = path.with_name(path.name + ".del" + TMP_SUFFIX)
        os.rename(path, trash)
        shutil.rmtree(trash, ignore_errors=True)
    return doomed
