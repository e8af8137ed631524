"""Collective integrity steps of save / load: failing together, hashing and verifying split across ranks,
the free-space check before a save.

`together`, `hash_checkpoint`, `verify_collective` and `require_valid` are collective. A rank that fails
inside a phase still joins the phase's closing `agree_on_errors`, so all ranks raise the same `PeerFailure`
(naming the failed rank) instead of one rank raising while the others wait in the next collective.
"""

from __future__ import annotations

import errno
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from scldm_scale.checkpoint.layout import META_FILE, checkpoints_root, latest_checkpoint
from scldm_scale.checkpoint.manifest import (
    VerifyResult,
    assign_files,
    check_files,
    checkpoint_size,
    hash_files,
    list_files,
    read_file_table,
    unexpected_files,
)
from scldm_scale.distributed.faults import PeerFailure, agree_on_errors
from scldm_scale.distributed.group import (
    broadcast_object,
    gather_object,
    gather_object_all,
    get_rank,
    get_world_size,
)

logger = logging.getLogger(__name__)

T = TypeVar("T")


class CheckpointError(PeerFailure):
    """A checkpoint is unusable (corrupt, incomplete) or none is; raised on every rank alike."""


def own_failure(exc: BaseException) -> BaseException | None:
    """This rank's own part of an exception: DCP raises one `CheckpointException` on every rank listing the
    ranks that failed; a rank not in that list did not fail itself (None), a listed one gets its original error."""
    failures = getattr(exc, "failures", None)
    if type(exc).__name__ != "CheckpointException" or not isinstance(failures, dict) or not failures:
        return exc
    mine = failures.get(get_rank())
    if mine is None:
        return None
    return mine[0] if isinstance(mine, tuple) else mine


def together(what: str, fn: Callable[[], T], *, rank0_only: bool = False) -> T | None:
    """Run `fn` on every rank (or rank 0 only), then agree: if it raised anywhere, `PeerFailure` everywhere.

    Returns:
        `fn()`'s value (None on ranks that did not run it).
    """
    out, error = None, None
    if not rank0_only or get_rank() == 0:
        try:
            out = fn()
        except BaseException as exc:  # DCP's CheckpointException is a BaseException
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
            error = own_failure(exc)
    agree_on_errors(error, what=what)
    return out


def hash_checkpoint(ckpt_dir: Path) -> dict[str, dict[str, Any]] | None:
    """File table of every file under `ckpt_dir` but meta.json; each rank hashes its share (collective).

    Returns:
        The table on rank 0, None elsewhere.
    """
    listing = broadcast_object(together(f"listing {ckpt_dir}", lambda: list_files(ckpt_dir), rank0_only=True))
    share = assign_files(listing, get_world_size())[get_rank()]
    mine = together(f"hashing {ckpt_dir}", lambda: hash_files(ckpt_dir, share))
    tables = gather_object(mine)
    if tables is None:
        return None
    return {name: entry for table in tables for name, entry in sorted(table.items())}


def verify_collective(ckpt_dir: str | Path, *, expected_digest: str | None = None) -> VerifyResult:
    """`verify_checkpoint` with the hashing split across ranks (collective); the same result on every rank.

    Rank 0 reads meta.json and broadcasts the file table; each rank re-reads and hashes its share from disk.
    """
    ckpt_dir = Path(ckpt_dir)
    rank = get_rank()
    part = VerifyResult(path=ckpt_dir)
    table = read_file_table(ckpt_dir, part, expected_digest) if rank == 0 else None
    table = broadcast_object(table)
    if table is not None:
        share = assign_files(sorted((name, entry["size"]) for name, entry in table.items()), get_world_size())[rank]
        try:
            problems = check_files(ckpt_dir, table, share)
        except Exception as exc:  # noqa: BLE001 - reported, so that no rank leaves the collective early
            problems = [f"rank {rank} could not check its files: {type(exc).__name__}: {exc}"]
        for problem in problems:
            part.add_problem(problem)
        if rank == 0:
            part.warnings.extend(unexpected_files(ckpt_dir, table))
    parts = gather_object_all(part)
    result = parts[0]
    for other in parts[1:]:
        for problem in other.problems:
            result.add_problem(problem)
    result.problems.sort(key=lambda text: (not text.startswith(META_FILE), text))  # as verify_checkpoint orders them
    result.path = ckpt_dir
    result.verified = table is not None and result.ok
    return result


def require_valid(ckpt_dir: Path) -> VerifyResult:
    """`verify_collective`, raising `CheckpointError` on every rank when the checkpoint is bad (collective)."""
    result = verify_collective(ckpt_dir)
    if not result.ok:
        raise CheckpointError(f"checkpoint {ckpt_dir} failed verification: " + "; ".join(result.problems))
    return result


def check_free_space(run_dir: str | Path, name: str) -> None:
    """Raise OSError(ENOSPC) when the checkpoints directory has less free space than the latest checkpoint's
    size: the new checkpoint needs its own full size, the old one is deleted only after the new one verifies.

    No check before the first checkpoint of a run (nothing to measure). Rank 0 only, not collective.
    """
    previous = latest_checkpoint(run_dir)
    if previous is None:
        return
    root = checkpoints_root(run_dir)
    needed = checkpoint_size(previous)
    free = shutil.disk_usage(root).free
    if free < needed:
        raise OSError(
            errno.ENOSPC,
            f"not enough free space for checkpoint {name} in {root}: {free:,} bytes free, {needed:,} bytes needed "
            f"(the size of {previous.name}, which is kept until the new checkpoint verifies)",
        )
