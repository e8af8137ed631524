"""Rank, world size and local rank from the environment (torchrun / deepspeed set them).

No torch.distributed import: `data/` must learn its place without the process group.
"""

from __future__ import annotations

import os


def get_rank() -> int:
    """Global rank (0 when not launched by torchrun / deepspeed)."""
    return int(os.environ.get("RANK", "0"))


def get_world_size() -> int:
    """Number of processes in the job."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def get_local_rank() -> int:
    """Rank within this node."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_rank_zero() -> bool:
    """True on the process that writes logs, trackers and manifests."""
    return get_rank() == 0
