"""Small shared helpers: environment rank info, logging, seeding, fsync. No torch.distributed."""

from scldm_scale.utils.env import get_local_rank, get_rank, get_world_size, is_rank_zero
from scldm_scale.utils.fsync import fsync_path
from scldm_scale.utils.logging import setup_logging
from scldm_scale.utils.seed import SEED_STRIDE, seed_everything

__all__ = [
    "SEED_STRIDE",
    "fsync_path",
    "get_local_rank",
    "get_rank",
    "get_world_size",
    "is_rank_zero",
    "seed_everything",
    "setup_logging",
]
