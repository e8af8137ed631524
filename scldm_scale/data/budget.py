"""The loader's memory model: how many cells a load unit and an X read may hold under `data.memory_budget_mb`.

Units are sized per shuffle block from the block's measured non-zeros per cell (`cells.CellSelection.chunk_nnz`:
the atlas's per-cell `nnz` obs column summed per chunk, or a sample spread over the whole atlas), so a block of
dense cells gets smaller units than a block of sparse ones and every worker stays within its share.
"""

from __future__ import annotations

UNITS_IN_FLIGHT = 3
"""Load units a slot holds at once: the one being batched, one decoded and queued or being decoded, and one
whose first read has started."""
UNIT_BYTES_PER_NNZ = 8
"""Measured bytes per non-zero of a read unit held in memory (uint16 token + float32 count + allocator slack)."""
READ_BYTES_PER_NNZ = 38
"""Measured peak bytes per non-zero of one X read in flight: its arrow result (int64 row and column, float32
value) and TileDB's own tile buffers (reads of 4k-65k cells, benchmarks/README.md)."""
READS_IN_FLIGHT = 2
"""X reads a worker has in flight: one decoded while the next is read (`stream._read_units`)."""
BYTES_PER_CELL = 64
"""Per-cell arrays of a unit (joinid, indptr, position, library size, labels and their obs read)."""
READS_PER_UNIT = (1, 2, 4, 8)
"""Reads a whole block may be cut into before the block itself is split: fewer reads cost TileDB less CPU."""


def unit_sizes(
    budget_mb: int, num_workers: int, nnz: float, batch_size: int, block_cells: int
) -> tuple[int, int]:
    """(unit_cells, read_cells) for a block of `block_cells` cells of `nnz` non-zeros each (on average).

    A whole block per unit when it fits the worker's share of the budget, read in as few reads as fit. When a
    block does not fit, units are parts of it (its chunks are then read once per part). Never below one batch.
    """
    share = budget_mb * 2**20 / max(1, num_workers)
    unit_per_cell = nnz * UNITS_IN_FLIGHT * UNIT_BYTES_PER_NNZ + BYTES_PER_CELL
    read_per_cell = nnz * READ_BYTES_PER_NNZ * READS_IN_FLIGHT
    unit = max(batch_size, block_cells)
    for reads in READS_PER_UNIT:
        read = -(-unit // reads)
        if unit * unit_per_cell + read * read_per_cell <= share:
            return unit, read
    most = READS_PER_UNIT[-1]
    unit = max(batch_size, int(share / (unit_per_cell + read_per_cell / most)))
    return unit, max(1, unit // most)


READ_BUDGET_SHARE = 8
"""TileDB may hold this fraction (1/8) of a worker's share of the budget per query (`read_budget_mb`). At 1/4
(256 MiB with one worker) a rank's peak RSS grew by 15 % from a 10^5- to a 10^6-cell atlas on the scale run:
a shuffled block's chunks share fewer X tiles in the larger atlas, so TileDB fills more of its budget. At 1/8
it grew by 7-9 %, at the same loader speed (benchmarks/README.md, scale and loader sections)."""
MIN_READ_BUDGET_MB = 64


def read_budget_mb(spec) -> int:  # a LoaderSpec or a SomaDataConfig (both carry the two fields)
    """`sm.mem.total_budget` of a worker's X and obs reads: an eighth of its share of `data.memory_budget_mb`
    (at least 64 MiB), so TileDB's buffers do not grow with the fragments a shuffled read spans."""
    share = spec.memory_budget_mb / max(1, spec.num_workers)
    return int(max(MIN_READ_BUDGET_MB, share / READ_BUDGET_SHARE))
