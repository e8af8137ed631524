"""Streaming SOMA loader for scLDM: global two-level shuffle, balanced ranks, bounded memory, exact elastic resume.

Stages, from the atlas to a batch (cells are addressed by *position* = index into the sorted obs joinids that
match `data.value_filter`):

1. Chunks (`order.py`). Positions are cut into contiguous runs of `data.shuffle_chunk_cells`. Contiguous
   reads are ~10x faster than random-id reads in TileDB-SOMA, so a chunk is the unit of IO. Larger chunks read
   faster but mix datasets less (atlases store each dataset's cells together, as Census does).
2. Blocks (`order.py`). The chunk list is permuted by (seed, epoch) and cut into blocks of
   `data.shuffle_buffer_cells // data.shuffle_chunk_cells` chunks; each block's cells are permuted by
   (seed, epoch, block). The epoch sequence is the blocks one after another: a pure function of (seed, epoch)
   and the data, independent of world size and workers. A block is the shuffle buffer: a batch draws cells
   from all its chunks, so larger blocks give better-mixed batches for more memory. `shuffle=False` makes
   one chunk per block, unpermuted: a sequential scan.
3. Partition (`order.py`). The epoch left to read is a list of pieces (block, start, end). It is cut into one
   contiguous range per rank, each the same number of batches (`data.remainder`: "pad" repeats a rank's last
   cells, flagged `is_padding`; "drop" leaves at most world_size * micro_batch_size - 1 cells unread), then
   per worker (rank batch j comes from worker j % num_workers, as in a DataLoader's round robin).
   Ranges are disjoint; a block straddling two ranges is read by both (a bounded overlap of one block each).
4. Reading (`stream.py`, `reader.py`). A worker reads its pieces block by block in a reading thread: the block's
   cells in joinid order with one point read per `read_cells` (measured as cheap per cell as a sequential
   scan, and 1.3-1.5x cheaper than a slice read per chunk), decoded with vectorised numpy into a token CSR
   (uint16 tokens up to 65,535 genes; genes outside the vocabulary dropped; library size summed). The next X
   read runs in a pool thread while the current one is decoded. At most three blocks are held per worker;
   a block larger than the worker's share of `data.memory_budget_mb` (the model in `budget.unit_sizes`,
   calibrated on measured read memory) is read in parts, so memory stays bounded whatever the number of
   workers (at the price of re-reading that block's chunks). With the node-local cache on (`node_cache.py`,
   `data.node_cache_dir`), the reading thread also stores each cell it decoded on local disk, and reads
   stored cells from there in later epochs (same cells, same order: only where they come from changes).
5. Batches (`packed.py`, `collate.py`). Consecutive cells of the stream become a `RowBatch` (references to
   block rows), gathered once into a `PackedBatch` (numpy, unpadded) by the worker and padded by the consumer
   into the batch dict of DEVELOPERS.md (plus `is_padding`): tokens padded to the batch's longest cell, with a
   mask; `data.max_tokens_per_cell` subsamples longer cells by a hash of (seed, joinid, gene), so the choice
   does not depend on the layout, and sends the whole cells along as the decoder's target (`target_*`). Workers are threads of the training process by default (TileDB and numpy
   release the GIL; one budget bounds them); `data.worker_processes` runs them as DataLoader processes.

Resume (`loader.py`): ranks yield batches in lockstep, so after k batches the cells consumed by every rank
and worker are known; `SomaLoader.state_dict()` stores the pieces left (plain JSON). `load_state_dict()`
re-partitions exactly those cells over the new world size and workers: nothing lost, nothing repeated.
"""

from scldm_scale.data.collate import unpack_batch
from scldm_scale.data.context import make_soma_context
from scldm_scale.data.dataset import SomaCellDataset
from scldm_scale.data.loader import (
    SomaLoader,
    build_gene_vocab,
    build_label_vocabs,
    build_loader,
    open_experiment,
)
from scldm_scale.data.obs import read_label_ids
from scldm_scale.data.order import EpochOrder
from scldm_scale.data.packed import PackedBatch
from scldm_scale.data.reader import CellBlock, read_block
from scldm_scale.data.stats import LibrarySizeStats, LogNormalFit, library_size_stats
from scldm_scale.data.stream import LoaderSpec, iter_slot
from scldm_scale.data.vocab import PAD_TOKEN, UNKNOWN_LABEL, GeneVocab, LabelVocab

__all__ = [
    "PAD_TOKEN",
    "UNKNOWN_LABEL",
    "CellBlock",
    "EpochOrder",
    "GeneVocab",
    "LabelVocab",
    "LoaderSpec",
    "PackedBatch",
    "SomaCellDataset",
    "SomaLoader",
    "build_gene_vocab",
    "build_label_vocabs",
    "build_loader",
    "iter_slot",
    "LibrarySizeStats",
    "LogNormalFit",
    "library_size_stats",
    "read_label_ids",
    "make_soma_context",
    "open_experiment",
    "read_block",
    "unpack_batch",
]
