"""Schema of the data section: which SOMA experiment, which cells, how they are batched.

Owned by the loader (`scldm_scale/data/`). Torch-free.
"""

from __future__ import annotations

from dataclasses import dataclass, field

DEMO_ATLAS = "demo"


@dataclass(kw_only=True)
class SomaDataConfig:
    atlas_uri: str = DEMO_ATLAS
    """SOMA experiment: a local path, an s3:// URI, or "demo" for the embedded demo atlas (built on first use)."""
    s3_endpoint_url: str | None = None
    """Endpoint override for s3:// URIs (e.g. a local S3-compatible server)."""
    measurement_name: str = "RNA"
    """SOMA measurement holding X."""
    layer_name: str = "raw"
    """X layer with integer counts."""
    value_filter: str | None = "split == 'train'"
    """obs query for training cells (SOMA value_filter syntax)."""
    val_value_filter: str | None = "split == 'val'"
    """obs query for validation cells; None disables validation."""
    label_columns: list[str] = field(default_factory=lambda: ["dataset_id", "cell_type"])
    """obs columns turned into integer label ids (0 is reserved for unknown / null)."""
    micro_batch_size: int = 64
    """Cells per micro-batch per rank."""
    max_tokens_per_cell: int | None = None
    """Cap on expressed genes per cell; longer cells are subsampled (and flagged). None = no cap."""
    shuffle: bool = True
    """Two-level shuffle (chunk permutation + shuffle buffer); False reads sequentially."""
    seed: int = 0
    """Shuffle seed; the order is a pure function of (seed, epoch)."""
    num_workers: int = 0
    """DataLoader worker processes per rank."""

    def __post_init__(self) -> None:
        if self.micro_batch_size < 1:
            raise ValueError(f"data.micro_batch_size must be >= 1, got {self.micro_batch_size}")
        if self.num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0, got {self.num_workers}")
        if self.max_tokens_per_cell is not None and self.max_tokens_per_cell < 1:
            raise ValueError(f"data.max_tokens_per_cell must be >= 1 or null, got {self.max_tokens_per_cell}")
