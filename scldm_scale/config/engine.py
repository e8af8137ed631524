"""Schema of the parallel engine (DeepSpeed ZeRO or FSDP2). Torch-free."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(kw_only=True)
class EngineConfig:
    name: Literal["zero0", "zero1", "zero2", "zero3", "fsdp2"] = "zero0"
    """Data-parallel engine: DeepSpeed ZeRO stage 0-3, or PyTorch FSDP2 (`fully_shard`)."""
    enable_activation_checkpointing: bool = False
    """Recompute each block's activations in backward (blocks = elements of the model's nn.ModuleLists)."""
    enable_compile: bool = False
    """torch.compile each block in place (FQNs unchanged, so checkpoints stay interchangeable)."""
    fsdp_reshard_after_forward: bool = True
    """FSDP2: free unsharded params after forward (ZeRO-3 like); False keeps them until backward (ZeRO-2 like)."""
    zero_bucket_size: int = 50_000_000
    """DeepSpeed: elements per reduce / all-gather bucket (reduce_bucket_size, allgather_bucket_size)."""
    zero_reshardable_checkpoints: bool = True
    """DeepSpeed ZeRO-1/2/3: also store full fp32 params + Adam moments (rank 0) so a resume may change world size."""
    collective_timeout_s: float = 600.0
    """Seconds a collective waits for a peer before it fails (a dead rank on another node, a hung save). Also
    the bound on how long the surviving ranks of a multi-node job hang before exiting non-zero."""
    zero_overlap_comm: bool = False
    """DeepSpeed ZeRO-1/2/3: overlap gradient reduction with backward (worth it on GPUs)."""

    def __post_init__(self) -> None:
        if not self.collective_timeout_s > 0:
            raise ValueError(f"engine.collective_timeout_s must be > 0 seconds, got {self.collective_timeout_s}")
        if self.zero_bucket_size < 1:
            raise ValueError(f"engine.zero_bucket_size must be >= 1, got {self.zero_bucket_size}")
