"""benchmarks/scale_bench.py: the index-only path end to end on the session's synthetic atlas (JSON shape, one
fresh process per value filter), the acceptance arithmetic, and the trainer's per-rank stats it reads
(`SCLDM_SCALE_RANK_STATS`). The training path (torchrun, 2 ranks) is what `--quick` runs by hand."""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("scale_bench", REPO / "benchmarks" / "scale_bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_index_only_reads_the_cached_atlas_and_reports_both_filters(bench, synthetic_atlas, tmp_path):
    # The session atlas is named as the bench caches a blocks atlas: found, not rebuilt.
    cache = Path(synthetic_atlas).parent
    assert bench.atlas_path(cache, 2000, 200, 4, "blocks") == Path(synthetic_atlas)
    out = tmp_path / "scale.json"
    args = ["--skip-train", "--index-cells-list", "2000", "--index-genes", "200", "--index-datasets", "4"]
    args += ["--index-layout", "blocks", "--index-repeats", "2"]
    args += ["--cache", str(cache), "--workdir", str(tmp_path / "w")]
    assert bench.main([*args, "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["train"] == [] and result["machine"]["cpus"] >= 1
    by_filter = {r["filter"]: r for r in result["index"]}
    assert set(by_filter) == {"all", "train"}
    assert by_filter["all"]["selected_cells"] == 2000 > by_filter["train"]["selected_cells"] > 0
    for run in by_filter.values():
        assert run["cells"] == 2000 and run["genes"] == 200 and run["batches"] == 4
        # The sampled peak covers the build; private memory is the anonymous memory after the batches.
        assert run["peak"]["anon_delta_mb"] >= run["after_build"]["anon_delta_mb"] > 0
        assert run["after_batches"]["anon_delta_mb"] in run["loader_private_mb_runs"]  # the median run's
        assert len(run["peak_private_delta_mb_runs"]) == len(run["peak_rss_delta_mb_runs"]) == 2
    # One atlas size: no growth to compute, so no verdict.
    assert result["acceptance"]["index_growth"] is None and result["acceptance"]["pass"] is None


def test_acceptance_compares_the_smallest_and_largest_atlas(bench):
    def train(cells, rss):
        fields = ("peak_rss_mb", "max_rss_mb", "peak_pss_mb", "peak_uss_mb")
        return {"cells": cells, "ranks": {"0": dict.fromkeys(fields, rss)}}

    def index(cells, name, private_mb, peak_mb):
        states = {s: {"anon_delta_mb": private_mb} for s in ("after_build", "after_close")}
        return {
            "cells": cells,
            "filter": name,
            "loader_private_mb": private_mb,
            "peak_private_delta_mb": peak_mb,
            "peak_rss_delta_mb": peak_mb,
            "after_batches": {"uss_delta_mb": 0.0},
            **states,
        }

    mb = 2**20
    runs = [index(10**5, "all", 50.0, 60.0), index(10**7, "all", 50.0 + 0.5 * (10**7 - 10**5) / mb, 61.0)]
    runs += [index(10**5, "train", 50.0, 60.0), index(10**7, "train", 50.0 + 3 * (10**7 - 10**5) / mb, 60.0)]
    out = bench.acceptance([train(10**6, 1080.0), train(10**5, 1000.0)], runs)
    assert out["rss_ratio"]["cells"] == [10**5, 10**6]
    assert out["rss_ratio"]["per_rank"]["0"]["ratio"] == pytest.approx(1.08) and out["rss_ratio"]["pass"]
    growth = out["index_growth"]["by_filter"]
    assert growth["all"]["private_bytes_per_cell"] == pytest.approx(0.5) and growth["all"]["pass"]
    assert growth["train"]["private_bytes_per_cell"] == pytest.approx(3.0) and not growth["train"]["pass"]
    assert growth["all"]["peak_pass"] and growth["train"]["peak_pass"]
    assert growth["train"]["after_build_bytes_per_cell"] == pytest.approx(3.0)
    assert out["index_growth"]["pass"] is False and out["pass"] is False
    assert bench.acceptance([train(10**5, 1000.0), train(10**6, 1120.0)], [])["rss_ratio"]["pass"] is False


def test_rank_stats_cover_steps_two_to_n_minus_one(bench, tmp_path):
    from scldm_scale.train.rank_stats import RANK_STATS_ENV, RankStats

    assert RANK_STATS_ENV == bench.RANK_STATS_ENV
    stats = RankStats()
    for step in range(4):
        time.sleep(0.02)  # a step's compute
        stats.add(64, 0.5 if step == 0 else 0.01)  # the first read is slow; later ones are not
    stats.write(tmp_path)
    got = json.loads((tmp_path / "rank0.json").read_text())  # no process group: rank 0 of 1
    assert (got["rank"], got["world_size"], got["steps"], got["cells"]) == (0, 1, 4, 256)
    assert got["steady_steps"] == 2
    assert got["first_step_data_s"] == 0.5 and got["data_s"] == pytest.approx(0.53)
    assert 0.03 < got["steady_s"] < 1.0  # steps 2 and 3: the first read is left out
    assert got["steady_cells_per_s"] == pytest.approx(128 / got["steady_s"])
    assert 0 < got["steady_data_wait_fraction"] < 1 and got["max_rss_mb"] >= got["rss_mb"] * 0.5
