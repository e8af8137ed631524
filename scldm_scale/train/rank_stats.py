"""Per-rank numbers of one `Trainer.train()` call for benchmarks (`RANK_STATS_ENV`): the logged `sys/` metrics
are reduced over ranks, a scale benchmark needs each rank's own loader rate, data wait and memory."""

from __future__ import annotations

import json
import time
from pathlib import Path

from scldm_scale.utils.env import get_rank, get_world_size

RANK_STATS_ENV = "SCLDM_SCALE_RANK_STATS"
"""When set to a directory, every rank writes `rank<N>.json` there at the end of `train()`."""


class RankStats:
    """This rank's own numbers over one `train()` call (`RANK_STATS_ENV`). A step runs from its first `next()`
    on the loader to the next step's; "steady" covers steps 2 .. N-1 (not the loader's first read, nor the
    final checkpoint)."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.steps = self.cells = 0
        self.data_seconds = self.first_data_seconds = 0.0
        self.last = (0, 0.0)  # cells, data seconds of the latest step
        self.steady_cells, self.steady_data_seconds = 0, 0.0
        self.steady_start = self.steady_end = 0.0

    def add(self, cells: int, data_seconds: float) -> None:
        fetch_start = time.perf_counter() - data_seconds
        if self.steps == 1:
            self.steady_start, self.first_data_seconds = fetch_start, self.data_seconds
        elif self.steps >= 2:  # the previous step (2 .. N-1) ended where this one's fetch began
            self.steady_cells += self.last[0]
            self.steady_data_seconds += self.last[1]
        self.steady_end = fetch_start
        self.steps += 1
        self.cells += cells
        self.data_seconds += data_seconds
        self.last = (cells, data_seconds)

    def write(self, out_dir: Path) -> None:
        import resource

        import psutil

        steady_s = self.steady_end - self.steady_start if self.steps > 2 else 0.0
        mem = psutil.Process().memory_full_info()
        stats = {
            "rank": get_rank(),
            "world_size": get_world_size(),
            "steps": self.steps,
            "cells": self.cells,
            "wall_s": time.perf_counter() - self.start,
            "data_s": self.data_seconds,
            "first_step_data_s": self.first_data_seconds,
            "steady_steps": max(0, self.steps - 2),
            "steady_s": steady_s,
            "steady_cells_per_s": self.steady_cells / steady_s if steady_s > 0 else None,
            "steady_data_wait_fraction": self.steady_data_seconds / steady_s if steady_s > 0 else None,
            "rss_mb": mem.rss / 2**20,
            "uss_mb": mem.uss / 2**20,
            "pss_mb": getattr(mem, "pss", mem.rss) / 2**20,
            "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10,  # Linux: KiB
        }
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / f"rank{stats['rank']}.json").write_text(json.dumps(stats, indent=2))


