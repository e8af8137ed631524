"""Schema of the data section: which SOMA experiment, which cells, how they are batched.

Owned by the loader (`scldm_scale/data/`). Torch-free.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

DEMO_ATLAS = "demo"
DEFAULT_LABEL_COLUMNS = ("dataset_id", "cell_type")
"""What `data.label_columns: null` (the default) uses: those of these columns the atlas obs has."""


@dataclass(kw_only=True)
class SomaDataConfig:
    atlas_uri: str = DEMO_ATLAS
    """SOMA experiment: a local path, an s3:// URI, or "demo" for the embedded demo atlas (built on first use)."""
    s3_endpoint_url: str | None = None
    """Endpoint override for s3:// URIs (e.g. a local S3-compatible server)."""
    s3_verify_tls: bool = True
    """Verify the TLS certificate of https S3 endpoints; false only for a trusted private endpoint."""
    measurement_name: str = "RNA"
    """SOMA measurement holding X."""
    layer_name: str = "raw"
    """X layer with integer counts."""
    value_filter: str | None = "split == 'train'"
    """obs query for training cells (SOMA value_filter syntax; data_pipelines.ingest writes `split`); None =
    every cell."""
    val_value_filter: str | None = "split == 'val'"
    """obs query for validation cells; None disables validation."""
    label_columns: list[str] | None = None
    """obs columns turned into integer label ids (0 is reserved for unknown / null); None = auto: dataset_id
    and cell_type, those the atlas has (resolved when the loader opens it). A listed column must exist."""
    min_gene_cells: int = 0
    """Keep only genes seen (non-zero count) in at least this many cells; 0 keeps all."""
    min_gene_cells_scope: Literal["atlas", "train"] = "atlas"
    """Where `min_gene_cells` counts: "atlas" reads var `n_cells` (free; written at ingestion, counts every
    cell); "train" counts over the training cells (`value_filter`) in one pass over their X at start-up, which
    drops the genes of the atlas's other datasets (a subset run decodes only its own genes; minutes on a large
    atlas)."""
    micro_batch_size: int = 64
    """Cells per micro-batch per rank."""
    max_tokens_per_cell: int | None = None
    """Cap on expressed genes per cell; longer cells are subsampled (and flagged). None = no cap."""
    shuffle: bool = True
    """Two-level shuffle (chunk permutation + shuffle buffer); False reads sequentially."""
    seed: int | None = None
    """Shuffle seed; the order is a pure function of (seed, epoch). Required when shuffling on > 1 rank."""
    shuffle_chunk_cells: int = 512
    """Contiguous cells per read chunk (first shuffle level: chunks are permuted). Larger reads a little faster
    but mixes worse: atlases store datasets, donors and cell types in runs (benchmarks/README.md, loader)."""
    shuffle_buffer_cells: int = 131072
    """Cells shuffled together (second level: a block of 256 chunks at the defaults); rounded down to whole
    chunks. A block larger than the memory budget allows is read in parts, still mixing all its chunks."""
    remainder: Literal["pad", "drop"] = "pad"
    """Equal batches on every rank: "pad" repeats cells (flagged `is_padding`), "drop" drops the tail."""
    memory_budget_mb: int = 1024
    """Memory the loader's buffers may take per rank (MiB, all workers together): units held and read ahead,
    and TileDB's read buffers. Not counted: the interpreter and libraries, and forked worker processes' copies."""
    num_workers: int = 1
    """Reader workers per rank, each streaming its own share and packing its batches ahead; the training thread
    only pads them (0: it packs too; the partition and resume state of 0 and 1 are the same). Threads of the
    training process by default (TileDB reads and numpy release the GIL; the budget bounds them all)."""
    worker_processes: bool = False
    """Run the workers as torch DataLoader processes instead of threads (each forked process also holds a copy
    of the trainer's pages, which the budget does not bound)."""
    prefetch_factor: int = 4
    """Batches each DataLoader worker process reads ahead (`worker_processes=true` only; threads queue 4)."""
    node_cache_dir: str | None = "auto"
    """Node-local decoded cache: the first epoch also stores the cells it reads on local disk, later epochs
    read them from there instead of the atlas (same order, same batches). "auto": $SCLDM_SCALE_NODE_CACHE, else
    <tmpdir>/scldm_scale_node_cache; null: off. On only when the disk has room for every cell (it keeps 10 % of
    the disk, at least 1 GiB, free); the loader logs which."""
    library_size_stats_cells: int = 100_000
    """Cells (a seeded shuffled sample) behind the per-label log-library-size statistics that every checkpoint
    manifest carries for generation; 0 = every training cell (one full pass, slow on an atlas)."""

    def __post_init__(self) -> None:
        if self.node_cache_dir is not None and (not isinstance(self.node_cache_dir, str) or not self.node_cache_dir):
            raise ValueError(f"data.node_cache_dir must be a directory, 'auto' or null, got {self.node_cache_dir!r}")
        if not isinstance(self.s3_verify_tls, bool):
            raise ValueError(f"data.s3_verify_tls must be true or false, got {self.s3_verify_tls!r}")
        if self.micro_batch_size < 1:
            raise ValueError(f"data.micro_batch_size must be >= 1, got {self.micro_batch_size}")
        if self.num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0, got {self.num_workers}")
        if self.max_tokens_per_cell is not None and self.max_tokens_per_cell < 1:
            raise ValueError(f"data.max_tokens_per_cell must be >= 1 or null, got {self.max_tokens_per_cell}")
        if self.min_gene_cells < 0:
            raise ValueError(f"data.min_gene_cells must be >= 0, got {self.min_gene_cells}")
        if self.min_gene_cells_scope not in ("atlas", "train"):
            raise ValueError(f"data.min_gene_cells_scope must be 'atlas' or 'train', got {self.min_gene_cells_scope!r}")
        if self.shuffle_chunk_cells < 1:
            raise ValueError(f"data.shuffle_chunk_cells must be >= 1, got {self.shuffle_chunk_cells}")
        if self.shuffle_buffer_cells < self.shuffle_chunk_cells:
            raise ValueError(
                f"data.shuffle_buffer_cells must be >= data.shuffle_chunk_cells, got "
                f"{self.shuffle_buffer_cells} < {self.shuffle_chunk_cells}"
            )
        if self.remainder not in ("pad", "drop"):
            raise ValueError(f"data.remainder must be 'pad' or 'drop', got {self.remainder!r}")
        if self.library_size_stats_cells < 0:
            raise ValueError(
                f"data.library_size_stats_cells must be >= 0, got {self.library_size_stats_cells}"
            )
        if self.prefetch_factor < 1:
            raise ValueError(f"data.prefetch_factor must be >= 1, got {self.prefetch_factor}")
        if self.memory_budget_mb < 1:
            raise ValueError(f"data.memory_budget_mb must be >= 1, got {self.memory_budget_mb}")
        if self.label_columns is not None and len(set(self.label_columns)) != len(self.label_columns):
            raise ValueError(f"data.label_columns has duplicates: {self.label_columns}")
