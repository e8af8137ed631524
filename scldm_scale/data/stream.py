"""One (rank, worker)'s stream of `RowBatch`es, read ahead in threads under a byte budget (numpy only).

The work pieces of `order.py` become load units (the cells of one block, or of part of one when the block
exceeds the worker's memory allowance). A reading thread reads each unit in joinid order, one point read per
`read_cells` cells (sized per block, `LoaderSpec.unit_plan`), the next read running in a pool thread while it decodes the current one; its labels come
from one obs read of the same cells; the consumer
cuts the unit's stream order into `RowBatch`es (references to rows, gathered once when packed). At most
`UNITS_IN_FLIGHT` units exist per worker. `iter_slot` is one worker; `iter_workers` runs `spec.num_workers` of
them in threads and interleaves their batches in the DataLoader's round-robin order.
"""

from __future__ import annotations

import atexit
import logging
import queue
import threading
import weakref
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from scldm_scale.data.budget import UNITS_IN_FLIGHT, read_budget_mb, unit_sizes
from scldm_scale.data.context import make_soma_context
from scldm_scale.data.index import CellIndex
from scldm_scale.data.node_cache import CacheLayout, NodeCache
from scldm_scale.data.order import EpochOrder, Piece, Slot, layout, take
from scldm_scale.data.packed import PackedBatch, RowBatch, mix64
from scldm_scale.data.reader import (
    CellBlock,
    TokenMap,
    assemble,
    decode_group,
    read_group,
    read_labels,
    read_labels_dtype,
    reading,
    split_groups,
)
from scldm_scale.data.vocab import LabelVocab
from scldm_scale.utils.seed import SEED_STRIDE

logger = logging.getLogger(__name__)

_live_prefetch: weakref.WeakKeyDictionary[threading.Thread, threading.Event] = weakref.WeakKeyDictionary()


@atexit.register
def _stop_prefetch_threads() -> None:
    """Let prefetch threads of abandoned iterators leave TileDB before the process exits (else C++ aborts)."""
    for thread, stop in list(_live_prefetch.items()):
        stop.set()
        thread.join(timeout=60)


@dataclass(frozen=True)
class LoaderSpec:
    """Everything a worker needs to read its share (picklable; no open SOMA handle)."""

    uri: str
    s3_endpoint_url: str | None
    measurement_name: str
    layer_name: str
    index: CellIndex
    """The cells matching the filter: a cell's *position* -> its soma_joinid (ascending in position)."""
    label_vocabs: tuple[LabelVocab, ...]
    """One vocabulary per label column, in the batches' `labels` order (labels are read with each unit)."""
    chunk_nnz: np.ndarray
    """float32 mean stored non-zeros per cell of each chunk (sizes the load units, `budget.unit_sizes`)."""
    var_to_token: np.ndarray
    """var soma_joinid -> token id (0 = not in the vocabulary)."""
    batch_size: int
    chunk_cells: int
    block_chunks: int
    shuffle: bool
    seed: int
    remainder: str
    max_tokens_per_cell: int | None
    memory_budget_mb: int
    """`data.memory_budget_mb`: what a rank's workers may hold together (units, reads)."""
    rank: int
    world_size: int
    num_workers: int
    s3_verify_tls: bool = True
    """Verify the TLS certificate of an https S3 endpoint (`data.s3_verify_tls`)."""
    tiledb_timestamp: int | None = None
    """TileDB timestamp (ms) the atlas is read at: the committed snapshot the loader was built from."""
    node_cache: CacheLayout | None = None
    """The node-local decoded cache (`node_cache.py`) the readers fill and serve from; None: off."""

    @property
    def n_cells(self) -> int:
        return len(self.index)

    def order(self, epoch: int) -> EpochOrder:
        return EpochOrder(self.n_cells, self.chunk_cells, self.block_chunks, self.seed, epoch, self.shuffle)

    def unit_plan(
        self, order: EpochOrder, block: int, chunk_order: np.ndarray | None = None
    ) -> tuple[int, int]:
        """(unit_cells, read_cells) of `block`: from its chunks' measured nnz and the worker's budget share."""
        chunks = order.block_chunk_ids(block, chunk_order)
        cells = order.block_len(block, chunk_order)
        sizes = np.minimum(self.chunk_cells, self.n_cells - chunks * self.chunk_cells)
        nnz = float((self.chunk_nnz[chunks] * sizes).sum() / max(1, cells)) if len(chunks) else 1.0
        return unit_sizes(self.memory_budget_mb, self.num_workers, max(nnz, 1.0), self.batch_size, cells)

    def slot(self, pieces: list[Piece], worker: int) -> Slot:
        total = sum(e - s for _, s, e in pieces)
        rows = layout(
            total,
            world_size=self.world_size,
            num_workers=self.num_workers,
            batch_size=self.batch_size,
            remainder=self.remainder,
        )
        return rows[self.rank][worker]


@dataclass
class _Unit:
    block: CellBlock  # cells in joinid order
    labels: np.ndarray  # (cells, K) label ids of the block's rows
    rows: np.ndarray  # row of each cell of the stream in `block`
    positions: np.ndarray  # position of each cell of the stream
    is_padding: bool


def cap_seed(spec: LoaderSpec, epoch: int) -> int:
    """Seed of the token cap's gene subsampling in `epoch`."""
    return int(mix64(np.array([spec.seed * SEED_STRIDE + epoch], np.uint64))[0])


def _units(
    spec: LoaderSpec, epoch: int, pieces: list[Piece], slot: Slot
) -> Iterator[tuple[np.ndarray, bool, int]]:
    """(positions in stream order, is_padding, cells per X read) per load unit of this slot, one block's
    positions at a time (never the whole slot's: that would be 8 B per cell of the rank's share)."""
    order = spec.order(epoch)
    chunk_order = order.chunk_order()
    cache: tuple[int, np.ndarray, int, int] | None = None

    def block(b: int) -> tuple[int, np.ndarray, int, int]:
        nonlocal cache
        if cache is None or cache[0] != b:
            cache = (b, order.block_positions(b, chunk_order), *spec.unit_plan(order, b, chunk_order))
        return cache

    for b, s, e in take(pieces, slot.start, slot.real):
        _, block_pos, unit, read = block(b)
        if e - s > unit:
            _warn_split(e - s, unit)
        for lo in range(s, e, unit):
            yield block_pos[lo : min(e, lo + unit)], False, read
    pad = slot.num_batches * spec.batch_size - slot.real
    if pad > 0:  # a few cells (fewer than a batch), repeated until the last batch is full
        positions_l, reads = [], []
        for b, s, e in take(pieces, slot.pad_start, min(pad, slot.pad_len)):
            _, block_pos, _, read = block(b)
            positions_l.append(block_pos[s:e])
            reads.append(read)
        if positions_l:
            yield np.resize(np.concatenate(positions_l), pad), True, min(reads)


@dataclass
class _Plan:
    positions: np.ndarray
    is_padding: bool
    rows: np.ndarray
    """Row of each position in the unit's block: the cells read from SOMA come first, then the cached ones."""
    joinids: np.ndarray
    """The cells read from SOMA, ascending."""
    groups: list[np.ndarray]
    soma_positions: np.ndarray
    """Positions of `joinids`."""
    cached: np.ndarray
    """Positions (ascending) of the cells the node cache serves."""


def _plan(
    spec: LoaderSpec, positions: np.ndarray, is_pad: bool, read_cells: int, cache: NodeCache | None = None
) -> _Plan:
    if is_pad:  # padding repeats cells: read each once
        sorted_pos = np.unique(positions)
        rows = np.searchsorted(sorted_pos, positions)
    else:  # distinct cells: one argsort gives both (numpy's hash-based unique + a binary search cost 10x more)
        order = np.argsort(positions, kind="stable")
        sorted_pos = positions[order]
        rows = np.empty(len(positions), np.int64)
        rows[order] = np.arange(len(positions))
    cached = sorted_pos[:0]
    if cache is not None and len(sorted_pos):
        stored = cache.stored_mask(sorted_pos)
        if stored.any():
            soma = np.flatnonzero(~stored)
            block_row = np.empty(len(sorted_pos), np.int64)  # SOMA cells first, then the cached ones
            block_row[soma] = np.arange(len(soma))
            block_row[stored] = np.arange(len(soma), len(sorted_pos))
            rows = block_row[rows]
            cached = sorted_pos[stored]
            sorted_pos = sorted_pos[soma]
    joinids = spec.index.joinids(sorted_pos)
    return _Plan(positions, is_pad, rows, joinids, split_groups(joinids, read_cells), sorted_pos, cached)


def _from_cache(spec: LoaderSpec, plan: _Plan, cache: NodeCache, fetch) -> tuple[tuple, np.ndarray]:
    """(decoded part, labels) of the plan's cached cells; if they do not read back whole, from SOMA instead
    (`fetch(joinids) -> (part, labels)`)."""
    got = cache.gather(plan.cached)
    if got is None:
        return fetch(spec.index.joinids(plan.cached))
    lengths, tok, val, labels = got
    return (lengths, tok, val), labels


def _store(cache: NodeCache, positions: np.ndarray, block: CellBlock, labels: np.ndarray) -> None:
    """Store the unit's cells read from SOMA (`positions`: the block's first rows) in the node cache."""
    n = len(positions)
    if n:
        end = block.indptr[n]
        cache.store(
            positions, np.diff(block.indptr[: n + 1]), block.tokens[:end], block.counts[:end], labels[:n]
        )


def _read_units(
    spec: LoaderSpec, epoch: int, pieces: list[Piece], slot: Slot, out: queue.Queue, stop, room
) -> None:
    """Prefetch thread: read and decode each unit, holding at most UNITS_IN_FLIGHT units (`room`).

    The next X read (of this unit, or the next unit's first when there is room) runs in a pool thread while
    this thread decodes the current one, so TileDB never waits for numpy: at most two reads are in flight.
    Every TileDB query (X groups and the unit's obs labels) runs in that one pool thread: two concurrent
    queries on one opened experiment crashed TileDB (a segfault in CI). With the node cache, a unit's stored
    cells are gathered from it while its first X read runs, and the cells read from SOMA are stored after.
    """
    try:
        with reading():  # no Arrow memory release in this process meanwhile (`reader.release_arrow_memory`)
            _read_all(spec, epoch, pieces, slot, out, stop, room)
    except Exception as exc:  # handed to the consumer, which re-raises it: never swallowed
        err = RuntimeError(f"loader reading {spec.uri!r} (rank {spec.rank}) failed: {exc}")
        err.__cause__ = exc
        out.put(err)
    except BaseException as exc:
        out.put(exc)


def _read_all(
    spec: LoaderSpec, epoch: int, pieces: list[Piece], slot: Slot, out: queue.Queue, stop, room
) -> None:
    """The body of `_read_units` (its errors are handed to the consumer there)."""
    import tiledbsoma

    tokens = TokenMap(spec.var_to_token)
    ctx = make_soma_context(
        spec.uri, spec.s3_endpoint_url, verify_tls=spec.s3_verify_tls, read_budget_mb=read_budget_mb(spec)
    )
    with (
        tiledbsoma.Experiment.open(spec.uri, context=ctx, tiledb_timestamp=spec.tiledb_timestamp) as exp,
        ThreadPoolExecutor(1, thread_name_prefix="scldm-read") as pool,
    ):
        X = exp.ms[spec.measurement_name].X[spec.layer_name]
        cache = NodeCache.open(spec.node_cache)

        def fetch(joinids: np.ndarray):  # cached cells that did not read back: from SOMA, now
            table = pool.submit(read_group, X, joinids).result()
            labels = pool.submit(read_labels, exp.obs, joinids, spec.label_vocabs).result()
            return decode_group(table, joinids, tokens), labels

        def start_next():  # plan the next unit; start its first read if there is room (never block: the
            item = next(units, None)  # consumer awaits the current unit)
            nxt = _plan(spec, *item, cache) if item is not None else None
            if nxt is None or not room.acquire(blocking=False):
                return nxt, False, None
            return nxt, True, pool.submit(read_group, X, nxt.groups[0]) if nxt.groups else None

        try:
            units = _units(spec, epoch, pieces, slot)
            item = next(units, None)
            cur = _plan(spec, *item, cache) if item is not None else None
            pending, held = None, False  # held: cur's room is taken (and its first read started)
            while cur is not None:
                if not held:
                    if not _acquire(room, stop):
                        return
                    if cur.groups:
                        pending = pool.submit(read_group, X, cur.groups[0])
                nxt, held, labels = None, False, None
                if not cur.groups:  # all from the cache: the next unit's first read runs meanwhile
                    nxt, held, pending = start_next()
                cached = _from_cache(spec, cur, cache, fetch) if len(cur.cached) else None
                parts = []
                for i, group in enumerate(cur.groups):
                    table = pending.result()
                    pending = None
                    if i + 1 < len(cur.groups):
                        pending = pool.submit(read_group, X, cur.groups[i + 1])
                    else:  # the labels, then the next unit's first read: one TileDB query at a time
                        labels = pool.submit(read_labels, exp.obs, cur.joinids, spec.label_vocabs)
                        nxt, held, pending = start_next()
                    parts.append(decode_group(table, group, tokens))
                    del table
                if stop.is_set():
                    return
                unit_labels = (
                    labels.result()
                    if labels is not None
                    else np.zeros((0, len(spec.label_vocabs)), read_labels_dtype(spec.label_vocabs))
                )
                joinids = cur.joinids
                if cached is not None:  # the cached cells follow those read from SOMA
                    joinids = np.concatenate([joinids, spec.index.joinids(cur.cached)])
                    parts.append(cached[0])
                    unit_labels = np.concatenate([unit_labels, cached[1]])
                block = assemble(joinids, parts, tokens.dtype)
                if cache is not None:
                    _store(cache, cur.soma_positions, block, unit_labels)
                out.put(_Unit(block, unit_labels, cur.rows, cur.positions, cur.is_padding))
                cur = nxt
        finally:
            if cache is not None:
                cache.close()
    out.put(None)


def _acquire(room: threading.Semaphore, stop: threading.Event) -> bool:
    while not room.acquire(timeout=0.1):
        if stop.is_set():
            return False
    return not stop.is_set()


def iter_slot(spec: LoaderSpec, epoch: int, pieces: list[Piece], worker: int) -> Iterator[RowBatch]:
    """The batches of `worker`'s slot of `pieces` (the work left of `epoch`) on `spec.rank`."""
    slot = spec.slot(pieces, worker)
    if slot.num_batches == 0:
        return
    units: queue.Queue = queue.Queue()
    stop = threading.Event()
    room = threading.Semaphore(UNITS_IN_FLIGHT)
    thread = threading.Thread(
        target=_read_units, args=(spec, epoch, pieces, slot, units, stop, room), daemon=True
    )
    _live_prefetch[thread] = stop
    thread.start()
    current: _Unit | None = None
    cursor = 0
    try:
        for emitted in range(slot.num_batches):
            parts, labels, flags = [], [], []
            need = spec.batch_size
            while need:
                if current is None or cursor == len(current.positions):
                    if current is not None:
                        current = None
                        room.release()
                    item = units.get()
                    if isinstance(item, BaseException):
                        raise item
                    if item is None:
                        raise RuntimeError(f"loader slot ran out of cells after {emitted} batches")
                    current, cursor = item, 0
                n = min(need, len(current.positions) - cursor)
                parts.append((current.block, current.rows[cursor : cursor + n]))
                labels.append(current.labels[current.rows[cursor : cursor + n]])
                flags.append(np.full(n, current.is_padding))
                cursor += n
                need -= n
            yield RowBatch(
                parts,
                labels[0] if len(labels) == 1 else np.concatenate(labels),
                flags[0] if len(flags) == 1 else np.concatenate(flags),
            )
    finally:
        stop.set()
        room.release()  # wakes a reader waiting for room
        thread.join(timeout=30)


_warned_split = False


def _warn_split(piece_cells: int, unit_cells: int) -> None:
    global _warned_split
    if not _warned_split:
        _warned_split = True
        logger.warning(
            "a shuffle block of %d cells exceeds the %d cells one worker may hold under data.memory_budget_mb; "
            "it is read in parts (more IO). Lower data.shuffle_buffer_cells or data.num_workers, or raise the budget",
            piece_cells,
            unit_cells,
        )


def iter_workers(spec: LoaderSpec, epoch: int, pieces: list[Piece], depth: int = 4) -> Iterator[PackedBatch]:
    """The rank's batches from `spec.num_workers` worker threads, each streaming (and packing) its own slot.

    Batch j of the rank comes from worker j % num_workers, as with a DataLoader, so the resume state and the
    partition are the same with threads or processes. Each worker queues at most `depth` packed batches.
    """
    nw = max(1, spec.num_workers)
    queues = [queue.Queue(maxsize=depth) for _ in range(nw)]
    stop = threading.Event()

    def run(worker: int) -> None:
        q = queues[worker]
        try:
            stream = iter_slot(spec, epoch, pieces, worker)
            try:
                for rb in stream:
                    if not _offer(q, rb.pack(), stop):
                        return
            finally:
                stream.close()
        except BaseException as exc:  # handed to the consumer, which re-raises it: never swallowed
            _offer(q, exc, stop)

    threads = [
        threading.Thread(target=run, args=(w,), daemon=True, name=f"scldm-worker-{w}") for w in range(nw)
    ]
    for thread in threads:
        _live_prefetch[thread] = stop
        thread.start()
    total = sum(spec.slot(pieces, w).num_batches for w in range(nw))
    try:
        for j in range(total):
            item = queues[j % nw].get()
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=30)


def _offer(q: queue.Queue, item, stop: threading.Event) -> bool:
    """Put into a bounded queue unless the consumer has gone (then False)."""
    while not stop.is_set():
        try:
            q.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False
