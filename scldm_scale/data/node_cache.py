"""Node-local decoded cache: cells read from SOMA once, served from local disk in later epochs (numpy only).

The first epoch streams from SOMA as always; every cell a reader decodes is also appended to that process's
segment files on local disk, and where it went is recorded in per-cell tables shared by the node. Later
epochs gather stored cells from the (page-cached) segments instead of querying TileDB, and read only the rest
from SOMA. The epoch order is untouched, so batches are identical with the cache on, off or half filled; it is
a speed layer only (benchmarks/README.md, loader section). Cells are addressed one by one, so a unit that is
part of a block (a block over the memory budget), a chunk cut by a slot boundary or a partly stored unit all
work the same way.

Layout of `<node_cache_dir>/<key>/` (the key hashes the atlas snapshot, layer, selected cells, vocabularies and
the machine's boot id, so a re-ingested or differently filtered atlas gets its own directory, and a cache
never outlives a reboot that may have lost unflushed writes):
- `cells.i64`: per cell position, 0 = not stored, else `(segment << 40) | index of its first value`;
  `lengths.u32`: its stored tokens; `labels.bin`: its label ids (K per cell). Memory-mapped files shared by
  the node's ranks and worker processes: 12 B + K label bytes per cell, file-backed (counted once per node,
  not per rank, and only for the pages touched). A cell's entry is written after its values and length, as
  one aligned 8-byte store.
- `tok-NNNNNN.bin` / `cnt-NNNNNN.bin`: the tokens and float32 counts appended by one process (created with
  O_EXCL: one writer each).
- `meta.json`: what the key was made of (for people; never read back to decide anything).

A cell whose values lie beyond its segment's end (a truncated or foreign file) is a miss: its unit's stored
cells are read from SOMA again and stored again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass

import numpy as np

from scldm_scale.data.reader import TokenMap, read_labels_dtype

logger = logging.getLogger(__name__)

CACHE_ENV = "SCLDM_SCALE_NODE_CACHE"
"""Root used by `data.node_cache_dir: auto` when set (else `<tmpdir>/scldm_scale_node_cache`)."""
FORMAT = 2
_OFFSET_BITS = 40
_OFFSET_MASK = (1 << _OFFSET_BITS) - 1
RESERVE_FRACTION = 0.1
"""The cache is on only if its full size leaves this fraction of the disk (and at least `RESERVE_MIN_BYTES`)
free; a writer stops appending when the disk gets that full."""
RESERVE_MIN_BYTES = 1 << 30
GATHER_CELLS = 4096
"""Cells gathered from the segments at a time (bounds the temporaries of `NodeCache.gather`)."""


def _reserve(usage) -> int:
    """Bytes of a disk (`shutil.disk_usage`) the cache leaves free."""
    return max(RESERVE_MIN_BYTES, int(RESERVE_FRACTION * usage.total))


def resolve_root(setting: str | None) -> str | None:
    """The cache root of `data.node_cache_dir` ("auto": $SCLDM_SCALE_NODE_CACHE or the temp dir; None: off)."""
    if setting is None:
        return None
    if setting == "auto":
        return os.environ.get(CACHE_ENV) or os.path.join(tempfile.gettempdir(), "scldm_scale_node_cache")
    return os.path.expanduser(setting)


@dataclass(frozen=True)
class CacheLayout:
    """What a cache directory holds: derived from the loader's spec, the same on every rank (picklable)."""

    path: str
    n_cells: int
    token_dtype: str
    label_dtype: str
    n_labels: int

    def table_sizes(self) -> dict[str, int]:
        """Bytes of each per-cell table file."""
        label_bytes = self.n_labels * np.dtype(self.label_dtype).itemsize
        return {
            "cells.i64": 8 * self.n_cells,
            "lengths.u32": 4 * self.n_cells,
            "labels.bin": label_bytes * self.n_cells,
        }


def cache_key(parts: dict) -> str:
    """A short hash of the JSON of `parts` (the cache directory's name)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def boot_id() -> str:
    """This boot of the machine (Linux), so that no cache outlives a crash that lost page-cache writes."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return "unknown"


def estimate_bytes(nnz: float, layout: CacheLayout) -> int:
    """Bytes the whole cache takes once every cell is stored (`nnz`: the selection's stored non-zeros)."""
    return int(nnz * (np.dtype(layout.token_dtype).itemsize + 4) + sum(layout.table_sizes().values()))


def prepare(
    root: str, key: str, meta: dict, layout_args: dict, need_bytes: int
) -> tuple[CacheLayout | None, str]:
    """The cache layout under `root/key` if the disk has room for `need_bytes` (else None), and why, in words.

    The first process creates the directory with its (sparse) tables under a temporary name and renames it into
    place, so every rank at once may call this and all find it whole.
    """
    path = os.path.join(root, key)
    try:
        os.makedirs(root, exist_ok=True)
    except OSError as exc:
        return None, f"cannot create {root}: {exc}"
    usage = shutil.disk_usage(root)
    used = _dir_bytes(path) if os.path.isdir(path) else 0
    reserve = _reserve(usage)
    if need_bytes - used > usage.free - reserve:
        return None, (
            f"{path} needs {need_bytes / 2**30:.2f} GiB but its disk has {usage.free / 2**30:.2f} GiB free "
            f"(keeping {reserve / 2**30:.2f} GiB)"
        )
    layout = CacheLayout(path=path, **layout_args)
    sizes = layout.table_sizes()
    if not os.path.isdir(path):
        try:
            tmp = tempfile.mkdtemp(dir=root, prefix=f".{key}-")
            for name, size in sizes.items():
                with open(os.path.join(tmp, name), "wb") as f:
                    f.truncate(size)
            with open(os.path.join(tmp, "meta.json"), "w") as f:
                json.dump({**meta, **layout_args}, f, indent=1, default=str)
        except OSError as exc:
            return None, f"cannot create a cache under {root}: {exc}"
        try:
            os.rename(tmp, path)
        except OSError:  # another process got there first: keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
    for name, size in sizes.items():
        file = os.path.join(path, name)
        if not os.path.isfile(file) or os.path.getsize(file) != size:
            return None, f"{file} is missing or not {size} bytes: delete {path}"
    return layout, f"{path} ({need_bytes / 2**30:.2f} GiB when full, {used / 2**30:.2f} GiB stored)"


def _dir_bytes(path: str) -> int:
    return sum(e.stat().st_blocks * 512 for e in os.scandir(path) if e.is_file())


class NodeCache:
    """One process's handle on a cache directory: looks cells up, gathers them, appends new ones."""

    @classmethod
    def open(cls, layout: CacheLayout | None) -> NodeCache | None:
        """The handle, or None (with a warning: the loader then reads every cell from the atlas) when the
        directory can no longer be opened, e.g. deleted since the loader was built."""
        if layout is None:
            return None
        try:
            return cls(layout)
        except (OSError, ValueError) as exc:
            logger.warning(
                "node cache %s cannot be opened (%s); reading every cell from the atlas", layout.path, exc
            )
            return None

    def __init__(self, layout: CacheLayout) -> None:
        self.layout = layout
        n, k = layout.n_cells, layout.n_labels
        self.cells = np.memmap(os.path.join(layout.path, "cells.i64"), np.int64, "r+", shape=(n,))
        self.lengths = np.memmap(os.path.join(layout.path, "lengths.u32"), np.uint32, "r+", shape=(n,))
        self._label = np.dtype(layout.label_dtype)
        self.labels = (
            np.memmap(os.path.join(layout.path, "labels.bin"), self._label, "r+", shape=(n, k))
            if n * k
            else np.zeros((n, k), self._label)
        )
        self._token = np.dtype(layout.token_dtype)
        self._maps: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._seg: int | None = None
        self._fds: tuple[int, int] | None = None
        self._end = 0  # values in this process's segment
        self._since_check = 0
        self.writable = True

    def stored_mask(self, positions: np.ndarray) -> np.ndarray:
        """bool per cell position: stored."""
        return self.cells[positions] != 0

    def gather(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
        """(token counts, tokens, counts, labels) of stored cells `positions`, in that order; None (and the
        cells' entries cleared) if any of them does not read back."""
        entry = self.cells[positions]
        lengths = self.lengths[positions].astype(np.int64)
        seg, first = entry >> _OFFSET_BITS, entry & _OFFSET_MASK
        out_start = np.zeros(len(positions), np.int64)
        np.cumsum(lengths[:-1], out=out_start[1:])
        total = int(lengths.sum())
        tok = np.empty(total, self._token)
        val = np.empty(total, np.float32)
        segs = np.unique(seg).tolist()
        maps = {}
        for sg in segs:
            mask = seg == sg
            ends = first[mask] + lengths[mask]
            maps[sg] = self._segment(sg, int(ends.max())) if sg else None
            if maps[sg] is None:
                return self._bad(positions, f"segment {sg} is missing or shorter than its cells")
        # GATHER_CELLS cells at a time: the int64 value indices stay a few MB, not 8 B per value of the unit
        # (fresh memory of that size cost more in page faults than the gather itself)
        for lo in range(0, len(positions), GATHER_CELLS):
            hi = min(len(positions), lo + GATHER_CELLS)
            for sg in segs:
                idx = lo + (np.arange(hi - lo) if len(segs) == 1 else np.flatnonzero(seg[lo:hi] == sg))
                ln = lengths[idx]
                n = int(ln.sum())
                if n == 0:
                    continue
                within = np.cumsum(ln) - ln  # each cell's first value within this piece
                src = np.repeat(first[idx] - within, ln) + np.arange(n)
                if len(segs) == 1:  # the cells' values are one contiguous stretch of the output
                    start = int(out_start[lo])
                    np.take(maps[sg][0], src, out=tok[start : start + n])
                    np.take(maps[sg][1], src, out=val[start : start + n])
                else:
                    dst = np.repeat(out_start[idx] - within, ln) + np.arange(n)
                    tok[dst], val[dst] = maps[sg][0][src], maps[sg][1][src]
        return lengths, tok, val, np.asarray(self.labels[positions])

    def _segment(self, seg: int, need: int) -> tuple[np.ndarray, np.ndarray] | None:
        """Read-only maps of segment `seg`'s tokens and counts covering at least `need` values (None: shorter)."""
        maps = self._maps.get(seg)
        if maps is None or len(maps[0]) < need:
            try:
                n = min(
                    os.path.getsize(self._path("tok", seg)) // self._token.itemsize,
                    os.path.getsize(self._path("cnt", seg)) // 4,
                )
            except OSError:
                return None
            if n < need:
                return None
            maps = (
                np.memmap(self._path("tok", seg), self._token, "r", shape=(n,)),
                np.memmap(self._path("cnt", seg), np.float32, "r", shape=(n,)),
            )
            self._maps[seg] = maps
        return maps

    def _bad(self, positions: np.ndarray, why: str) -> None:
        self.cells[positions] = 0  # stored again by the next reader of them
        logger.warning(
            "node cache %s: %d cells unreadable (%s); reading them from the atlas",
            self.layout.path,
            len(positions),
            why,
        )
        return None

    def store(
        self,
        positions: np.ndarray,
        lengths: np.ndarray,
        tokens: np.ndarray,
        counts: np.ndarray,
        labels: np.ndarray,
    ) -> None:
        """Append cells (their token counts, tokens and counts one cell after another, label ids) and publish
        them; stops storing, with a warning, when the disk gets nearly full."""
        if not self.writable or not len(positions):
            return
        nnz = len(tokens)
        try:
            tok_fd, cnt_fd = self._writer()
            if self._end + nnz >= 1 << _OFFSET_BITS:
                return self._stop("segment full")
            self._since_check += nnz
            if self._since_check > 1 << 22:  # statvfs every ~4M values
                self._since_check = 0
                usage = shutil.disk_usage(self.layout.path)
                if usage.free < _reserve(usage):
                    return self._stop("the disk is nearly full")
            tok = np.ascontiguousarray(tokens, self._token)
            cnt = np.ascontiguousarray(counts, np.float32)
            for fd, arr in ((tok_fd, tok), (cnt_fd, cnt)):
                written = os.pwrite(fd, arr, self._end * arr.itemsize)
                if written != arr.nbytes:
                    return self._stop(f"short write ({written} of {arr.nbytes} bytes)")
        except OSError as exc:
            return self._stop(str(exc))
        lengths = np.asarray(lengths, np.int64)
        firsts = self._end + np.cumsum(lengths) - lengths
        self.lengths[positions] = lengths
        if self.layout.n_labels:
            self.labels[positions] = labels
        self.cells[positions] = (self._seg << _OFFSET_BITS) | firsts  # published last
        self._end += nnz

    def _writer(self) -> tuple[int, int]:
        if self._fds is None:
            for seg in range(1, 1 << 23):
                try:
                    tok = os.open(self._path("tok", seg), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                except FileExistsError:
                    continue
                self._fds = (tok, os.open(self._path("cnt", seg), os.O_WRONLY | os.O_CREAT, 0o644))
                self._seg = seg
                break
            else:
                raise OSError("no free segment number")
        return self._fds

    def _stop(self, why: str) -> None:
        self.writable = False
        logger.warning(
            "node cache %s: no longer storing cells (%s); reading them from the atlas", self.layout.path, why
        )

    def _path(self, kind: str, seg: int) -> str:
        return os.path.join(self.layout.path, f"{kind}-{seg:06d}.bin")

    def close(self) -> None:
        if self._fds is not None:
            for fd in self._fds:
                os.close(fd)
            self._fds = None
        self._maps.clear()
        for table in (self.cells, self.lengths, self.labels):
            if isinstance(table, np.memmap):
                table.flush()


def layout_for(spec, version: str, setting: str | None) -> CacheLayout | None:
    """The cache of a loader's cells (`spec`: its `LoaderSpec`; `version`: what identifies the atlas's data;
    `setting`: `data.node_cache_dir`), or None when off or the disk lacks room; logged either way."""
    root = resolve_root(setting)
    if root is None:
        logger.info("node-local cache off (data.node_cache_dir=null): every epoch reads from %s", spec.uri)
        return None
    if spec.n_cells == 0:
        return None
    vocabs = [[v.column, v.categories] for v in spec.label_vocabs]
    uri = spec.uri if "://" in spec.uri else os.path.abspath(spec.uri)
    meta = {
        "format": FORMAT,
        "uri": uri,
        "measurement": spec.measurement_name,
        "layer": spec.layer_name,
        "version": version,
        "n_cells": spec.n_cells,
        "obs_joinids_sha1": spec.index.sha1,
        "boot_id": boot_id(),
        "var_to_token_sha1": hashlib.sha1(
            np.ascontiguousarray(spec.var_to_token, np.int64).tobytes()
        ).hexdigest(),
        "label_vocabs_sha1": hashlib.sha1(json.dumps(vocabs).encode()).hexdigest(),
    }
    labels = read_labels_dtype(spec.label_vocabs)
    layout_args = {
        "n_cells": spec.n_cells,
        "token_dtype": TokenMap(spec.var_to_token).dtype.str,
        "label_dtype": labels.str,
        "n_labels": len(spec.label_vocabs),
    }
    sizes = np.minimum(spec.chunk_cells, spec.n_cells - np.arange(len(spec.chunk_nnz)) * spec.chunk_cells)
    nnz = float((np.asarray(spec.chunk_nnz, np.float64) * sizes).sum())
    need = estimate_bytes(nnz, CacheLayout(path="", **layout_args))
    layout, why = prepare(root, cache_key(meta), meta, layout_args, need)
    if layout is None:
        logger.info("node-local cache off: %s; every epoch reads from %s", why, spec.uri)
    else:
        logger.info("node-local cache on: %s", why)
    return layout
