"""Start-up checks on `train.run_dir`: one directory shared by every rank, owned by one run.

- Shared: rank 0 writes a probe file with a random token; every rank must read the same token back. A
  run_dir on node-local disk passes on one node and fails at the first resume on many; this fails at once.
- Owned: a job that does not resume from this run_dir (checkpoint.resume=never, or a path elsewhere) must
  not write into a run_dir that holds another run's checkpoints: retention would delete them (or the new
  ones), and same-step saves would overwrite them. It is refused unless `train.overwrite=true`, which moves
  the old checkpoints to `<run_dir>/archive/<UTC time>/` (nothing is deleted).
"""

from __future__ import annotations

import datetime
import logging
import os
import secrets
import shutil
from pathlib import Path

from scldm_scale.checkpoint import checkpoints_root, list_checkpoints
from scldm_scale.config import ConfigError
from scldm_scale.distributed import barrier, broadcast_object
from scldm_scale.distributed.faults import agree_on_errors

logger = logging.getLogger(__name__)

PROBE_PREFIX = ".shared-probe-"
ARCHIVE_DIR = "archive"
"""Where `train.overwrite=true` moves an earlier run's checkpoints."""
OWNED_FILES = ("mlflow_pending.jsonl",)
"""Run-specific files moved along with the checkpoints."""


class RunDirError(ConfigError):
    """The run_dir cannot be used as configured (the message says why and what to do); launchers print it as
    one `error:` line and exit 2."""


def check_shared(run_dir: str | Path, rank: int) -> None:
    """Collective: every rank sees the file rank 0 wrote into `run_dir`, or every rank raises `RunDirError`."""
    run_dir = Path(run_dir).resolve()
    token, error = None, None
    if rank == 0:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            token = secrets.token_hex(8)
            (run_dir / f"{PROBE_PREFIX}{token}").write_text(token)
        except OSError as exc:
            error = f"cannot write into train.run_dir={run_dir}: {exc}"
    token = broadcast_object(token)
    mine = error
    if token is not None and rank != 0:
        probe = run_dir / f"{PROBE_PREFIX}{token}"
        try:
            seen = probe.read_text()
        except OSError:
            seen = None
        if seen != token:
            mine = (
                f"train.run_dir={run_dir} is not the directory rank 0 wrote to ({probe.name} is missing here, "
                f"host {os.uname().nodename}): every rank must see one shared file system path"
            )
    try:
        agree_on_errors(mine, what="checking that train.run_dir is shared")
    except RuntimeError as exc:  # PeerFailure: every rank raises the same message
        raise RunDirError(str(exc)) from None
    finally:
        barrier()
        if rank == 0 and token is not None:
            (run_dir / f"{PROBE_PREFIX}{token}").unlink(missing_ok=True)


def claim(run_dir: str | Path, resume: str, *, overwrite: bool, rank: int) -> Path | None:
    """Collective: refuse (or, with overwrite, archive) another run's checkpoints in `run_dir`.

    Args:
        run_dir: `train.run_dir`.
        resume: `checkpoint.resume` (auto, never or a path).
        overwrite: `train.overwrite`.
        rank: this rank (rank 0 inspects and moves; every rank raises the same error).

    Returns:
        The archive folder the old checkpoints went to, or None when nothing was moved.

    Raises:
        RunDirError: the run_dir holds another run's checkpoints and overwrite is off.
    """
    outcome: tuple[str | None, str | None] = (None, None)
    if rank == 0:
        outcome = _claim_rank0(Path(run_dir), resume, overwrite)
    archived, error = broadcast_object(outcome)
    if error:
        raise RunDirError(error)
    return Path(archived) if archived else None


def _claim_rank0(run_dir: Path, resume: str, overwrite: bool) -> tuple[str | None, str | None]:
    found = list_checkpoints(run_dir)
    if not found or _resumes_from(run_dir, resume):
        return None, None
    newest = found[-1][1]
    if not overwrite:
        return None, (
            f"train.run_dir={run_dir} already holds another run's checkpoints ({len(found)}, newest {newest.name}) "
            f"and checkpoint.resume={resume} does not continue it. Continue it with checkpoint.resume=auto, pick "
            "a new train.run_dir, or set train.overwrite=true to move the old checkpoints to "
            f"{run_dir / ARCHIVE_DIR}/<time>/"
        )
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    dest = run_dir / ARCHIVE_DIR / stamp
    dest.mkdir(parents=True, exist_ok=False)
    shutil.move(str(checkpoints_root(run_dir)), str(dest / checkpoints_root(run_dir).name))
    for name in OWNED_FILES:
        if (run_dir / name).exists():
            shutil.move(str(run_dir / name), str(dest / name))
    logger.warning("train.overwrite=true: moved %d checkpoints of the earlier run to %s", len(found), dest)
    return str(dest), None


def _resumes_from(run_dir: Path, resume: str) -> bool:
    """True when `checkpoint.resume` continues the run that lives in `run_dir`."""
    if resume == "auto":
        return True
    if resume == "never":
        return False
    try:
        Path(resume).resolve().relative_to(run_dir.resolve())
    except ValueError:
        return False
    return True
