"""`SomaCellDataset`: the slot streams of `stream.py` as a torch IterableDataset (one slot per DataLoader worker).

`SomaLoader` uses it for DataLoader worker processes (`data.worker_processes=true`); use it directly with
`DataLoader(ds, batch_size=None, num_workers=spec.num_workers)` after `set_work(...)` (without it, the whole of
epoch 0), calling `collate.unpack_batch` on what it yields (in the consumer: padded tensors are costly to send
between processes).
"""

from __future__ import annotations

from collections.abc import Iterator

from torch.utils.data import IterableDataset, get_worker_info

from scldm_scale.data.order import EpochOrder, Piece
from scldm_scale.data.packed import PackedBatch
from scldm_scale.data.stream import LoaderSpec, iter_slot


class SomaCellDataset(IterableDataset):
    """Iterable of `PackedBatch`es for one rank; under a DataLoader each worker yields its own slot's batches."""

    def __init__(self, spec: LoaderSpec) -> None:
        self.spec = spec
        self.epoch = 0
        self.pieces: list[Piece] | None = None  # work of `epoch` still to read; None = the whole epoch

    def order(self, epoch: int) -> EpochOrder:
        return self.spec.order(epoch)

    def set_work(self, epoch: int, pieces: list[Piece]) -> None:
        """The epoch and the pieces of it still to read (set before each iteration)."""
        self.epoch = epoch
        self.pieces = [tuple(int(v) for v in p) for p in pieces]

    def __iter__(self) -> Iterator[PackedBatch]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if num_workers != max(1, self.spec.num_workers):
            raise ValueError(
                f"data.num_workers={self.spec.num_workers} but the DataLoader runs {num_workers} workers"
            )
        pieces = self.pieces if self.pieces is not None else self.order(self.epoch).fresh_pieces()
        for rb in iter_slot(self.spec, self.epoch, pieces, worker):
            yield rb.pack()
