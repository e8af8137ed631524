"""`SomaCellDataset`: one (rank, worker)'s stream of batches, read ahead in threads under a byte budget.

It turns the work pieces of `order.py` into load units (the cells of one block, or of part of one when the
block exceeds the memory allowance), reads each unit with `reader.read_block` in a reading thread, and cuts
the units' permuted cells into `PackedBatch`es with `collate.pack_rows` in a packing thread. It never holds a
dense matrix and never pads (the consumer does, see `collate.unpack_batch`).
"""

from __future__ import annotations

import atexit
import logging
import queue
import threading
import weakref
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from torch.utils.data import IterableDataset, get_worker_info

from scldm_scale.data.collate import PackedBatch, _mix, pack_rows
from scldm_scale.data.context import make_soma_context
from scldm_scale.data.order import EpochOrder, Piece, Slot, layout, take
from scldm_scale.data.reader import CellBlock, read_block

logger = logging.getLogger(__name__)

UNITS_IN_FLIGHT = 2
"""Load units a slot holds at once: the one being batched and the one being read (the prefetch)."""

BATCHES_IN_FLIGHT = 8
"""Packed batches queued ahead of the consumer (small: a few MB)."""

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
    obs_joinids: np.ndarray
    """Sorted soma_joinids of the cells matching the filter; a cell's *position* indexes this array."""
    labels: np.ndarray
    """int64 (n_cells, K) label ids aligned with obs_joinids."""
    var_to_token: np.ndarray
    """var soma_joinid -> token id (0 = not in the vocabulary)."""
    batch_size: int
    chunk_cells: int
    block_chunks: int
    shuffle: bool
    seed: int
    remainder: str
    max_tokens_per_cell: int | None
    unit_cells: int
    """Most cells one load unit holds (from the byte budget, the number of workers and the nnz per cell)."""
    rank: int
    world_size: int
    num_workers: int


@dataclass
class _Unit:
    block: CellBlock
    rows: np.ndarray  # row of each cell in `block`, in stream order
    positions: np.ndarray  # position of each cell, in stream order
    is_padding: bool


class SomaCellDataset(IterableDataset):
    """Iterable of `PackedBatch`es for one rank; under a DataLoader each worker yields its own slot's batches.

    Use through `SomaLoader` (which owns epochs and the resumable state, and unpacks), or with
    `DataLoader(ds, batch_size=None, num_workers=spec.num_workers)` after `set_work(...)`, calling
    `unpack_batch` on what it yields (in the consumer: padded tensors are costly to send between processes).
    """

    def __init__(self, spec: LoaderSpec) -> None:
        self.spec = spec
        self.epoch = 0
        self.pieces: list[Piece] = self.order(0).fresh_pieces()

    def order(self, epoch: int) -> EpochOrder:
        s = self.spec
        return EpochOrder(len(s.obs_joinids), s.chunk_cells, s.block_chunks, s.seed, epoch, s.shuffle)

    def set_work(self, epoch: int, pieces: list[Piece]) -> None:
        """The epoch and the pieces of it still to read (set before each iteration)."""
        self.epoch = epoch
        self.pieces = [tuple(int(v) for v in p) for p in pieces]

    @property
    def total(self) -> int:
        return sum(e - s for _, s, e in self.pieces)

    def slot(self, worker: int) -> Slot:
        s = self.spec
        rows = layout(
            self.total,
            world_size=s.world_size,
            num_workers=s.num_workers,
            batch_size=s.batch_size,
            remainder=s.remainder,
        )
        return rows[s.rank][worker]

    def __iter__(self) -> Iterator[PackedBatch]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if num_workers != max(1, self.spec.num_workers):
            raise ValueError(
                f"data.num_workers={self.spec.num_workers} but the DataLoader runs {num_workers} workers"
            )
        yield from self._batches(self.slot(worker))

    def _units(self, slot: Slot) -> Iterator[tuple[np.ndarray, bool]]:
        """(positions in stream order, is_padding) per load unit of this slot."""
        order = self.order(self.epoch)
        chunk_order = order.chunk_order()
        unit = self.spec.unit_cells
        cache: tuple[int, np.ndarray] | None = None
        pad = slot.num_batches * self.spec.batch_size - slot.real
        pad_pieces = take(self.pieces, slot.pad_start, min(pad, slot.pad_len)) if pad > 0 else []
        for pieces, is_pad in ((take(self.pieces, slot.start, slot.real), False), (pad_pieces, True)):
            positions_l = []
            for b, s, e in pieces:
                if cache is None or cache[0] != b:
                    cache = (b, order.block_positions(b, chunk_order))
                if e - s > unit and not is_pad:
                    _warn_split(e - s, unit)
                for lo in range(s, e, unit):
                    positions_l.append(cache[1][lo : min(e, lo + unit)])
            if is_pad and positions_l:  # a few cells, repeated until the last batch is full
                cells = np.concatenate(positions_l)
                positions_l = [np.resize(cells, pad)]
            for positions in positions_l:
                yield positions, is_pad

    def _read_units(
        self, slot: Slot, out: queue.Queue, stop: threading.Event, room: threading.Semaphore
    ) -> None:
        """Prefetch thread: read each unit, holding at most UNITS_IN_FLIGHT units (`room`)."""
        s = self.spec
        try:
            ctx = make_soma_context(s.uri, s.s3_endpoint_url)
            with _open_x(s, ctx) as X:
                for positions, is_pad in self._units(slot):
                    while not room.acquire(timeout=0.1):
                        if stop.is_set():
                            return
                    if stop.is_set():
                        return
                    sorted_pos = np.unique(positions)
                    block = read_block(X, s.obs_joinids[sorted_pos], s.var_to_token, s.chunk_cells)
                    rows = np.searchsorted(sorted_pos, positions)
                    out.put(_Unit(block, rows, positions, is_pad))
            out.put(None)
        except BaseException as exc:  # handed to the consumer, which re-raises it: never swallowed
            out.put(exc)

    def _pack_units(
        self,
        slot: Slot,
        units: queue.Queue,
        out: queue.Queue,
        stop: threading.Event,
        room: threading.Semaphore,
    ) -> None:
        """Packing thread: cut the units' cells into PackedBatches (a batch may straddle two units)."""
        s = self.spec
        cap_seed = int(_mix(np.array([s.seed * 1_000_003 + self.epoch], np.uint64))[0])
        pending: list[tuple[_Unit, int, int]] = []  # (unit, start, stop) parts of the next batch
        need, emitted, cursor = s.batch_size, 0, 0
        current: _Unit | None = None
        try:
            while emitted < slot.num_batches and not stop.is_set():
                if current is None or cursor == len(current.rows):
                    if current is not None:
                        room.release()
                    item = units.get()
                    if isinstance(item, BaseException):
                        raise item
                    if item is None:
                        raise RuntimeError(f"loader slot ran out of cells after {emitted} batches")
                    current, cursor = item, 0
                n = min(need, len(current.rows) - cursor)
                pending.append((current, cursor, cursor + n))
                cursor += n
                need -= n
                if need == 0:
                    _put(out, self._collate(pending, cap_seed), stop)
                    emitted += 1
                    pending, need = [], s.batch_size
            _put(out, None, stop)
        except BaseException as exc:  # handed to the consumer, which re-raises it: never swallowed
            _put(out, exc, stop)

    def _batches(self, slot: Slot) -> Iterator[PackedBatch]:
        """Three stages overlap: a reading thread, a packing thread, and the consumer (this generator)."""
        if slot.num_batches == 0:
            return
        units: queue.Queue = queue.Queue()
        out: queue.Queue = queue.Queue(maxsize=BATCHES_IN_FLIGHT)
        stop = threading.Event()
        room = threading.Semaphore(UNITS_IN_FLIGHT)
        threads = [
            threading.Thread(target=self._read_units, args=(slot, units, stop, room), daemon=True),
            threading.Thread(target=self._pack_units, args=(slot, units, out, stop, room), daemon=True),
        ]
        for thread in threads:
            _live_prefetch[thread] = stop
            thread.start()
        try:
            for _ in range(slot.num_batches):
                item = out.get()
                if isinstance(item, BaseException):
                    raise item
                assert item is not None, "packing thread ended early"
                yield item
        finally:
            stop.set()
            units.put(None)  # wakes a packer waiting for a unit
            for thread in threads:
                thread.join(timeout=30)

    def _collate(self, pending: list[tuple[_Unit, int, int]], cap_seed: int) -> PackedBatch:
        positions = np.concatenate([u.positions[a:b] for u, a, b in pending])
        is_pad = np.concatenate([np.full(b - a, u.is_padding) for u, a, b in pending])
        parts = [(u.block, u.rows[a:b]) for u, a, b in pending]
        return pack_rows(
            parts,
            self.spec.labels[positions],
            is_pad,
            max_tokens_per_cell=self.spec.max_tokens_per_cell,
            cap_seed=cap_seed,
        )


def _put(q: queue.Queue, item, stop: threading.Event) -> None:
    """Put into a bounded queue unless the consumer has gone."""
    while not stop.is_set():
        try:
            q.put(item, timeout=0.1)
            return
        except queue.Full:
            continue


class _open_x:
    """Context manager opening the experiment and returning its X layer."""

    def __init__(self, spec: LoaderSpec, ctx) -> None:
        import tiledbsoma

        self.exp = tiledbsoma.Experiment.open(spec.uri, context=ctx)
        self.spec = spec

    def __enter__(self):
        return self.exp.ms[self.spec.measurement_name].X[self.spec.layer_name]

    def __exit__(self, *exc) -> None:
        self.exp.close()


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
