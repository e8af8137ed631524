"""Local atlases: the inter-process lock, the staging copy and its durable, atomic publish.

A writer works in `.<name>.staging-<uuid>` beside the atlas (the published atlas hard-linked in: TileDB never
rewrites a file, it only adds files), fsyncs every new file and every directory of the staging tree, swaps it
in with one rename (renameat2 RENAME_EXCHANGE on Linux, else two renames undone by `_recover` after a crash)
and fsyncs the parent directory. After a crash or power loss the published atlas is the old one or the new
one, complete. s3:// URIs have no rename: they rely on the commit protocol alone (`_commit.py`).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import logging
import os
import shutil
import sys
import uuid
from collections.abc import Iterator

from scldm_scale.utils.fsync import fsync_path

logger = logging.getLogger(__name__)

_held_locks: dict[str, tuple[int, int]] = {}


def _sidecar(path: str, kind: str) -> str:
    parent, name = os.path.split(os.path.abspath(path))
    return os.path.join(parent, f".{name}.{kind}")


@contextlib.contextmanager
def atlas_lock(path: str) -> Iterator[None]:
    """Exclusive inter-process lock (fcntl.flock on `.<name>.lock` beside the atlas); re-entrant per process."""
    key = os.path.abspath(path)
    if key in _held_locks:
        fd, depth = _held_locks[key]
        _held_locks[key] = (fd, depth + 1)
        try:
            yield
        finally:
            fd, depth = _held_locks[key]
            _held_locks[key] = (fd, depth - 1)
        return
    os.makedirs(os.path.dirname(key), exist_ok=True)
    fd = os.open(_sidecar(key, "lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        _held_locks[key] = (fd, 1)
        try:
            yield
        finally:
            del _held_locks[key]
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _fsync_tree(root: str, skip: set[str]) -> None:
    """fsync every file under `root` except the relative paths in `skip` (hard links to published, already
    durable files), then every directory, children before parents (each directory's entries are durable)."""
    for dirpath, _, files in os.walk(root, topdown=False):
        for name in files:
            full = os.path.join(dirpath, name)
            if os.path.relpath(full, root) not in skip and not os.path.islink(full):
                fsync_path(full, strict=True)
        fsync_path(dirpath, strict=True)


def _exchange(a: str, b: str) -> bool:
    """Atomically swap two directories with Linux renameat2(RENAME_EXCHANGE); False if unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, a.encode(), at_fdcwd, b.encode(), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(err, f"renameat2({a!r}, {b!r}, RENAME_EXCHANGE) failed: {os.strerror(err)}")


def _recover(path: str) -> None:
    """Undo what a crashed writer left behind: restore a half-swapped atlas, delete stale staging dirs."""
    parent, name = os.path.split(os.path.abspath(path))
    leftovers = [
        e for e in os.listdir(parent) if e.startswith(f".{name}.staging-") or e.startswith(f".{name}.old-")
    ]
    for entry in sorted(leftovers):
        full = os.path.join(parent, entry)
        if entry.startswith(f".{name}.old-") and not os.path.exists(path):
            # Crash between the two renames of the fallback swap: the old atlas is the last complete one.
            logger.warning("restoring %s from interrupted publish %s", path, full)
            os.rename(full, path)
            fsync_path(parent, strict=True)
        else:
            logger.warning("removing leftover staging directory %s", full)
            shutil.rmtree(full, ignore_errors=True)


def _link_tree(src: str, dst: str) -> set[str]:
    """Copy a directory tree as hard links (TileDB never rewrites an existing file: new writes add files).

    Returns the relative paths that are hard links (already durable); empty when the tree had to be copied.
    """
    linked: set[str] = set()

    def link(s: str, d: str) -> None:
        os.link(s, d)
        linked.add(os.path.relpath(d, dst))

    try:
        shutil.copytree(src, dst, copy_function=link)
    except OSError as exc:  # a filesystem without hard links (or across devices): plain copy
        logger.info("hard links unavailable (%s); copying %s", exc, src)
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(src, dst)
        return set()
    return linked


def _publish(staging: str, path: str) -> None:
    parent, name = os.path.split(os.path.abspath(path))
    if not os.path.exists(path):
        os.rename(staging, path)
    elif _exchange(staging, path):
        shutil.rmtree(staging)  # now holds the previous atlas
    else:
        backup = os.path.join(parent, f".{name}.old-{uuid.uuid4().hex}")
        os.rename(path, backup)
        os.rename(staging, path)  # a crash between these two renames is undone by _recover
        shutil.rmtree(backup)
    fsync_path(parent, strict=True)


@contextlib.contextmanager
def staged_atlas(uri: str) -> Iterator[str]:
    """Yield the URI to write to; for local paths a staging copy that is published atomically on success.

    Local paths: under the atlas lock, the existing atlas (if any) is hard-linked into
    `.<name>.staging-<uuid>` beside it; the caller writes there; on a clean exit the staging tree is fsynced
    (new files and every directory) and swapped in with one atomic rename (renameat2 RENAME_EXCHANGE on
    Linux), then the parent directory is fsynced. On any exception, or a crash at any point, the published
    atlas is either the old one or the new one, never a mix. s3:// URIs are yielded unchanged: there the
    commit protocol (`_commit.py`) hides what a failed ingest wrote.
    """
    if uri.startswith("s3://"):
        yield uri
        return
    path = os.path.abspath(uri)
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{uri}: atlas path exists and is not a directory")
    with atlas_lock(path):
        _recover(path)
        staging = _sidecar(path, f"staging-{uuid.uuid4().hex}")
        linked = _link_tree(path, staging) if os.path.exists(path) else set()
        try:
            yield staging
            _fsync_tree(staging, linked)
            _publish(staging, path)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
