"""The commit protocol of an atlas: every write runs at its own TileDB timestamp and is published last.

A writer picks a timestamp T above every earlier write (`next_timestamp`), records it as the experiment's
`scldm_scale.write_timestamp` before anything else (`begin_write`), writes obs, X and var at T, and finally
records `scldm_scale.committed_timestamp` = T with the rest of its metadata in one metadata write (`commit`).
Readers open the experiment at the committed timestamp (`open_committed`; the loader does the same in
`scldm_scale.data.context`), so whatever a failed or killed writer left after it (obs rows, X entries, var rows,
grown shapes) is invisible. The next writer deletes those leftovers at T - 1 (`_atlas.discard_uncommitted`),
before its own writes at T, so they stay invisible after its commit too. The protocol runs the same on s3://
URIs and on local paths (there inside the staging copy of `_staging.py`). An atlas written before the protocol
(neither key) is read, and appended to, at its latest state.

Writers must not run concurrently on one atlas: local paths are serialized by the lock of `_staging.py`;
s3:// has no lock, so run one ingest per atlas at a time.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import tiledbsoma

META_WRITE = "scldm_scale.write_timestamp"
"""Experiment metadata: TileDB timestamp (ms) of the latest write started (committed or not)."""
META_COMMITTED = "scldm_scale.committed_timestamp"
"""Experiment metadata: TileDB timestamp (ms) of the latest committed write; readers open the atlas at it.
Same key as `scldm_scale.data.context.COMMITTED_TIMESTAMP_KEY` (tested)."""


@dataclass(frozen=True)
class CommitInfo:
    """The two commit keys of an atlas (both None: written before the protocol, or not created yet)."""

    committed: int | None = None
    last_write: int | None = None

    @property
    def never_committed(self) -> bool:
        """A write started but none ever committed: the atlas's creation was interrupted."""
        return self.committed is None and self.last_write is not None

    @property
    def has_leftovers(self) -> bool:
        """A write started after the last commit and never committed: its data must be discarded."""
        return self.last_write is not None and self.last_write != self.committed


def never_committed_error(uri: str) -> ValueError:
    return ValueError(
        f"{uri}: no write to this atlas was ever committed (its creation was interrupted: metadata key "
        f"{META_WRITE!r} without {META_COMMITTED!r}); delete it and ingest again"
    )


def _as_int(value) -> int | None:
    return None if value is None else int(value)


def read_commit(uri: str, ctx: tiledbsoma.SOMATileDBContext) -> CommitInfo:
    """The commit keys of the experiment at `uri`, read at its latest state."""
    with tiledbsoma.Experiment.open(uri, context=ctx) as exp:
        meta = exp.metadata
        return CommitInfo(_as_int(meta.get(META_COMMITTED)), _as_int(meta.get(META_WRITE)))


def open_committed(
    uri: str, ctx: tiledbsoma.SOMATileDBContext, info: CommitInfo | None = None
) -> tiledbsoma.Experiment:
    """Open the experiment for reading at its last commit (the latest state for a pre-protocol atlas).

    Raises:
        ValueError: the atlas was never committed (`never_committed_error`).
    """
    info = read_commit(uri, ctx) if info is None else info
    if info.never_committed:
        raise never_committed_error(uri)
    return tiledbsoma.Experiment.open(uri, context=ctx, tiledb_timestamp=info.committed)


def next_timestamp(info: CommitInfo) -> int:
    """A write timestamp (ms) above the atlas's every earlier write (also with a clock behind theirs), and
    at least 2 above it, so that a discard at T - 1 is newer than every leftover."""
    now = time.time_ns() // 1_000_000
    return max(now, (info.last_write or 0) + 2, (info.committed or 0) + 2)


def begin_write(uri: str, ctx: tiledbsoma.SOMATileDBContext, timestamp: int) -> None:
    """Record that a write at `timestamp` starts (before any of its data: the next writer then knows that
    everything it left is at or below this timestamp)."""
    with tiledbsoma.Experiment.open(uri, "w", context=ctx, tiledb_timestamp=timestamp) as exp:
        exp.metadata[META_WRITE] = timestamp


def commit(uri: str, ctx: tiledbsoma.SOMATileDBContext, timestamp: int, metadata: dict) -> None:
    """Publish the write at `timestamp`: `metadata` and the committed timestamp, in one metadata write that
    TileDB stores as one object (written whole or not at all), after all of the write's data."""
    with tiledbsoma.Experiment.open(uri, "w", context=ctx, tiledb_timestamp=timestamp) as exp:
        for key, value in metadata.items():
            exp.metadata[key] = value
        exp.metadata[META_WRITE] = timestamp
        exp.metadata[META_COMMITTED] = timestamp
