"""Durability helpers: fsync a file or a directory entry (so a rename or an unlink survives a power loss)."""

from __future__ import annotations

import os
from pathlib import Path


def fsync_path(path: str | Path, *, strict: bool = False) -> None:
    """fsync `path`, a file or a directory (opened read-only: Linux allows fsync on that).

    Args:
        strict: raise an OSError instead of ignoring it (some file systems refuse to fsync directories).
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        if strict:
            raise
        return
    try:
        os.fsync(fd)
    except OSError:
        if strict:
            raise
    finally:
        os.close(fd)
