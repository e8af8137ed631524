"""One logging setup for the package: a rank prefix, non-zero ranks at WARNING."""

from __future__ import annotations

import logging
import sys

from scldm_scale.utils.env import get_rank

_CONFIGURED = False


def setup_logging(level: int = logging.INFO) -> None:
    """Configure the root `scldm_scale` logger once per process."""
    global _CONFIGURED
    if _CONFIGURED:
        return
    rank = get_rank()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"[rank{rank}] %(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    for name in ("scldm_scale", "data_pipelines"):
        log = logging.getLogger(name)
        log.handlers[:] = [handler]
        log.setLevel(level if rank == 0 else logging.WARNING)
        log.propagate = False
    _CONFIGURED = True
