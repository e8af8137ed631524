"""Node-local decoded cache: cells read from SOMA once, served from local disk in later epochs (numpy only).

The first epoch streams from SOMA as always; every whole chunk (`data.shuffle_chunk_cells` consecutive cell
positions) a reader decodes is also appended to that process's segment file on local disk, and its offset is
published in a per-node chunk table. Later epochs read cached chunks back with two `pread`s each instead of a
TileDB query, and only the rest from SOMA. The epoch order is untouched, so batches are identical with the cache
on, off or half filled; it is a speed layer only (benchmarks/README.md, loader section).

Layout of `<node_cache_dir>/<key>/` (the key hashes the atlas snapshot, layer, selected cells, vocabularies and
chunk size, so a re-ingested or differently filtered atlas gets its own directory):
- `chunks.i64`: one int64 per chunk, 0 = not cached, else `(segment << 40) | offset`; a memory-mapped file
  shared by the node's ranks and worker processes (8 bytes per chunk: 0.016 B per cell at 512 cells a chunk).
  An aligned 8-byte store is atomic, and a reader publishes a chunk only after its record is written.
- `seg-NNNNNN.bin`: records appended by one process (file created with O_EXCL: one writer each). A record is a
  16-byte header (magic, cells, non-zeros), then the cells' token counts (uint32), tokens, counts (float32)
  and label ids, each padded to 8 bytes.
- `meta.json`: what the key was made of (for people; never read back to decide anything).

A record that does not read back whole (a truncated or foreign file) is a miss: the chunk comes from SOMA again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import struct
import tempfile
from dataclasses import dataclass

import numpy as np

from scldm_scale.data.reader import TokenMap, read_labels_dtype

logger = logging.getLogger(__name__)

CACHE_ENV = "SCLDM_SCALE_NODE_CACHE"
"""Root used by `data.node_cache_dir: auto` when set (else `<tmpdir>/scldm_scale_node_cache`)."""
FORMAT = 1
_MAGIC = 0x5C1D_CAC1
_HEADER = struct.Struct("<IIq")  # magic, cells, non-zeros
_OFFSET_BITS = 40
RESERVE_FRACTION = 0.1
"""The cache is on only if its full size leaves this fraction of the disk (and at least `RESERVE_MIN_BYTES`)
free; a writer stops appending when the disk gets that full."""
RESERVE_MIN_BYTES = 1 << 30


def _pad8(nbytes: int) -> int:
    return -(-nbytes // 8) * 8


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
    chunk_cells: int
    token_dtype: str
    label_dtype: str
    n_labels: int

    @property
    def n_chunks(self) -> int:
        return -(-self.n_cells // self.chunk_cells)

    def chunk_len(self, chunk: int) -> int:
        return min(self.chunk_cells, self.n_cells - chunk * self.chunk_cells)


def cache_key(parts: dict) -> str:
    """A short hash of the JSON of `parts` (the cache directory's name)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def estimate_bytes(chunk_nnz: np.ndarray, layout: CacheLayout) -> int:
    """Bytes the whole cache takes once every chunk is stored (from the measured non-zeros per chunk)."""
    sizes = np.minimum(layout.chunk_cells, layout.n_cells - np.arange(layout.n_chunks) * layout.chunk_cells)
    nnz = float((np.asarray(chunk_nnz, np.float64) * sizes).sum())
    per_nnz = np.dtype(layout.token_dtype).itemsize + 4
    per_cell = 4 + layout.n_labels * np.dtype(layout.label_dtype).itemsize
    return int(nnz * per_nnz + layout.n_cells * per_cell + layout.n_chunks * (_HEADER.size + 32))


def prepare(
    root: str, key: str, meta: dict, layout_args: dict, need_bytes: int
) -> tuple[CacheLayout | None, str]:
    """The cache layout under `root/key` if the disk has room for `need_bytes` (else None), and why, in words.

    Creates the directory and its chunk table (a sparse file) the first time; safe to run on every rank at
    once (the table is created under a temporary name and linked into place).
    """
    path = os.path.join(root, key)
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        return None, f"cannot create {path}: {exc}"
    usage = shutil.disk_usage(path)
    used = _dir_bytes(path)
    reserve = max(RESERVE_MIN_BYTES, int(RESERVE_FRACTION * usage.total))
    if need_bytes - used > usage.free - reserve:
        return None, (
            f"{path} needs {need_bytes / 2**30:.2f} GiB but its disk has {usage.free / 2**30:.2f} GiB free "
            f"(keeping {reserve / 2**30:.2f} GiB)"
        )
    layout = CacheLayout(path=path, **layout_args)
    table = os.path.join(path, "chunks.i64")
    if not os.path.exists(table):
        fd, tmp = tempfile.mkstemp(dir=path, prefix=".chunks-")
        try:
            os.ftruncate(fd, layout.n_chunks * 8)
            os.close(fd)
            try:
                os.link(tmp, table)  # fails if another process got there first: keep theirs
            except FileExistsError:
                pass
        finally:
            os.unlink(tmp)
        with open(os.path.join(path, "meta.json"), "w") as f:
            json.dump({**meta, **layout_args}, f, indent=1, default=str)
    if os.path.getsize(table) != layout.n_chunks * 8:
        return (
            None,
            f"{table} has {os.path.getsize(table)} bytes, expected {layout.n_chunks * 8}: delete {path}",
        )
    return layout, f"{path} ({need_bytes / 2**30:.2f} GiB when full, {used / 2**30:.2f} GiB stored)"


def _dir_bytes(path: str) -> int:
    total = 0
    for entry in os.scandir(path):
        if entry.is_file():
            total += entry.stat().st_blocks * 512
    return total


class NodeCache:
    """One process's handle on a cache directory: looks chunks up, reads them, appends new ones."""

    def __init__(self, layout: CacheLayout) -> None:
        self.layout = layout
        self.table = np.memmap(
            os.path.join(layout.path, "chunks.i64"), np.int64, "r+", shape=(layout.n_chunks,)
        )
        self._token = np.dtype(layout.token_dtype)
        self._label = np.dtype(layout.label_dtype)
        self._readers: dict[int, int] = {}
        self._seg: int | None = None
        self._fd: int | None = None
        self._end = 0
        self.writable = True
        self.hits = self.misses = self.stored = 0

    # -- lookup and read -------------------------------------------------------------------------------
    def cached(self, chunks: np.ndarray) -> np.ndarray:
        """bool per chunk id: stored."""
        return self.table[chunks] != 0

    def read(self, chunk: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
        """(token counts per cell, tokens, counts, labels (cells, K)) of a stored chunk; None if unreadable."""
        entry = int(self.table[chunk])
        if entry == 0:
            return None
        seg, offset = entry >> _OFFSET_BITS, entry & ((1 << _OFFSET_BITS) - 1)
        try:
            fd = self._reader(seg)
            head = os.pread(fd, _HEADER.size, offset)
            if len(head) != _HEADER.size:
                return self._bad(chunk, "truncated header")
            magic, cells, nnz = _HEADER.unpack(head)
            if magic != _MAGIC or cells != self.layout.chunk_len(chunk) or nnz < 0:
                return self._bad(chunk, "header does not match")
            sizes = self._sizes(cells, nnz)
            body = os.pread(fd, sum(sizes), offset + _HEADER.size)
        except OSError as exc:
            return self._bad(chunk, str(exc))
        if len(body) != sum(sizes):
            return self._bad(chunk, "truncated record")
        at = np.cumsum([0, *sizes])
        lengths = np.frombuffer(body, np.uint32, cells, at[0])
        tokens = np.frombuffer(body, self._token, nnz, at[1])
        counts = np.frombuffer(body, np.float32, nnz, at[2])
        labels = np.frombuffer(body, self._label, cells * self.layout.n_labels, at[3])
        if int(lengths.sum(dtype=np.int64)) != nnz:
            return self._bad(chunk, "token counts do not add up")
        self.hits += 1
        return lengths, tokens, counts, labels.reshape(cells, self.layout.n_labels)

    def _sizes(self, cells: int, nnz: int) -> list[int]:
        return [
            _pad8(4 * cells),
            _pad8(self._token.itemsize * nnz),
            _pad8(4 * nnz),
            _pad8(self._label.itemsize * cells * self.layout.n_labels),
        ]

    def _reader(self, seg: int) -> int:
        if seg not in self._readers:
            self._readers[seg] = os.open(self._seg_path(seg), os.O_RDONLY)
        return self._readers[seg]

    def _bad(self, chunk: int, why: str) -> None:
        self.misses += 1
        self.table[chunk] = 0  # stored again by the next reader of it
        logger.warning(
            "node cache %s: chunk %d unreadable (%s); reading it from the atlas", self.layout.path, chunk, why
        )
        return None

    # -- append ----------------------------------------------------------------------------------------
    def write(
        self, chunk: int, lengths: np.ndarray, tokens: np.ndarray, counts: np.ndarray, labels: np.ndarray
    ) -> None:
        """Append one whole chunk's cells (in position order) and publish it; stops quietly when the disk fills."""
        if not self.writable or self.table[chunk] != 0:
            return
        cells, nnz = len(lengths), len(tokens)
        if cells != self.layout.chunk_len(chunk):
            raise ValueError(f"chunk {chunk}: {cells} cells, expected {self.layout.chunk_len(chunk)}")
        parts = [
            np.ascontiguousarray(lengths, np.uint32),
            np.ascontiguousarray(tokens, self._token),
            np.ascontiguousarray(counts, np.float32),
            np.ascontiguousarray(labels, self._label),
        ]
        buffers: list = [_HEADER.pack(_MAGIC, cells, nnz)]
        for part, size in zip(parts, self._sizes(cells, nnz), strict=True):
            buffers += [part, bytes(size - part.nbytes)]
        nbytes = _HEADER.size + sum(self._sizes(cells, nnz))
        try:
            fd = self._writer()
            if self._end + nbytes >= 1 << _OFFSET_BITS:
                self._stop("segment full")
                return
            if not self._room(nbytes):
                self._stop("the disk is nearly full")
                return
            written = os.pwritev(fd, buffers, self._end)  # the arrays' own buffers: no copy
            if written != nbytes:
                self._stop(f"short write ({written} of {nbytes} bytes)")
                return
        except OSError as exc:
            self._stop(str(exc))
            return
        self.table[chunk] = (self._seg << _OFFSET_BITS) | self._end
        self._end += nbytes
        self.stored += 1

    def _room(self, nbytes: int) -> bool:
        if self.stored % 64:  # statvfs every 64 records
            return True
        usage = shutil.disk_usage(self.layout.path)
        return usage.free - nbytes > max(RESERVE_MIN_BYTES, int(RESERVE_FRACTION * usage.total))

    def _writer(self) -> int:
        if self._fd is None:
            for seg in range(1, 1 << 23):
                try:
                    self._fd = os.open(self._seg_path(seg), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                except FileExistsError:
                    continue
                self._seg = seg
                break
            else:
                raise OSError("no free segment number")
        return self._fd

    def _stop(self, why: str) -> None:
        self.writable = False
        logger.warning(
            "node cache %s: no longer storing chunks (%s); reading them from the atlas", self.layout.path, why
        )

    def _seg_path(self, seg: int) -> str:
        return os.path.join(self.layout.path, f"seg-{seg:06d}.bin")

    def close(self) -> None:
        for fd in [*self._readers.values(), *([self._fd] if self._fd is not None else [])]:
            os.close(fd)
        self._readers.clear()
        self._fd = None
        self.table.flush()
        del self.table


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
        "chunk_cells": spec.chunk_cells,
        "var_to_token_sha1": hashlib.sha1(
            np.ascontiguousarray(spec.var_to_token, np.int64).tobytes()
        ).hexdigest(),
        "label_vocabs_sha1": hashlib.sha1(json.dumps(vocabs).encode()).hexdigest(),
    }
    labels = read_labels_dtype(spec.label_vocabs)
    layout_args = {
        "n_cells": spec.n_cells,
        "chunk_cells": spec.chunk_cells,
        "token_dtype": TokenMap(spec.var_to_token).dtype.str,
        "label_dtype": labels.str,
        "n_labels": len(spec.label_vocabs),
    }
    need = estimate_bytes(spec.chunk_nnz, CacheLayout(path="", **layout_args))
    layout, why = prepare(root, cache_key(meta), meta, layout_args, need)
    if layout is None:
        logger.info("node-local cache off: %s; every epoch reads from %s", why, spec.uri)
    else:
        logger.info("node-local cache on: %s", why)
    return layout
