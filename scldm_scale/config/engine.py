"""Schema of the parallel engine (DeepSpeed ZeRO or FSDP2). Torch-free."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(kw_only=True)
class EngineConfig:
    name: Literal["zero0", "zero1", "zero2", "zero3", "fsdp2"] = "zero0"
    """Data-parallel engine."""
