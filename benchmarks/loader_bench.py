"""Loader benchmark: scldm_scale's SOMA loader vs tiledbsoma_ml.ExperimentDataset vs a sequential scan of X.

    python benchmarks/loader_bench.py --cells 200000 --json benchmarks/out/loader.json

Each loader runs `--repeats` times (interleaved: scan, scldm_scale, tiledbsoma_ml, scan, ...) and every metric is
the median over its runs: on a shared 2-core machine single runs move by +-20%.

The atlas is synthetic (`data_pipelines.synthetic_atlas`): N cells x 2,000 genes in 8 datasets stored one after
another, built once and cached under --cache. Each loader runs one epoch over all cells with batches of 256
in its own process (RSS is per loader and tiledbsoma_ml's spawn start method stays out of the others).
Per loader: cells_per_s (steady state, after the first batch), first_batch_s (from construction), peak_rss_mb
(the process and its workers, sampled every 50 ms; PSS beside it), rss_before_mb (the process before the loader
is built: interpreter, torch, TileDB-SOMA), loader_rss_mb (peak_rss_mb - rss_before_mb: what the loader adds,
the quantity `data.memory_budget_mb` bounds), cells_per_cpu_s (whole epoch over user + system
CPU seconds: comparable on a loaded machine), epoch_cells_per_s (whole epoch, first batch included),
shuffle_quality (mean entropy of dataset_id within a batch
over that of uniformly random batches of the same size; 1.0 is as good as random).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from scldm_scale.config.data import SomaDataConfig  # noqa: E402  (dataclasses only: no torch)


def _entropy(ids: np.ndarray, k: int) -> float:
    p = np.bincount(ids, minlength=k) / len(ids)
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


class _RssPeak:
    """Peak memory of this process plus its workers, sampled in a thread.

    RSS (from /proc/PID/statm: microseconds) every 50 ms. RSS counts pages shared by forked workers (torch,
    TileDB libraries) once per process; PSS (Linux) splits them among the sharers, so the PSS sum is the memory
    the process tree really holds. PSS needs a page-table walk (/proc/PID/smaps_rollup: ~10 ms of kernel CPU
    that also stalls the sampled process's mmap/munmap), so it is sampled every second only: sampling it every
    50 ms took ~20% of a core from the loaders measured.
    """

    PSS_EVERY = 20

    def __init__(self) -> None:
        import psutil

        self.proc = psutil.Process()
        self.peak_rss = 0
        self.peak_pss = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _sample(self, pss: bool) -> tuple[int, int]:
        rss = total_pss = 0
        for p in [self.proc, *self.proc.children(recursive=True)]:
            try:
                if pss:
                    info = p.memory_full_info()
                    total_pss += getattr(info, "pss", info.rss)
                else:
                    info = p.memory_info()
            except Exception:  # a worker that just exited
                continue
            rss += info.rss
        return rss, total_pss

    def _run(self) -> None:
        tick = 0
        while not self._stop.is_set():
            rss, pss = self._sample(pss=tick % self.PSS_EVERY == 0)
            self.peak_rss, self.peak_pss = max(self.peak_rss, rss), max(self.peak_pss, pss)
            tick += 1
            time.sleep(0.05)

    def stop(self) -> tuple[float, float]:
        self._stop.set()
        self._t.join()
        return self.peak_rss / 2**20, self.peak_pss / 2**20


def _cpu_seconds() -> float:
    """User + system CPU of this process and its finished workers (robust to a shared, loaded machine)."""
    import resource

    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def _obs_dataset(uri: str) -> tuple[np.ndarray, int]:
    import tiledbsoma

    with tiledbsoma.Experiment.open(uri) as exp:
        t = exp.obs.read(column_names=["soma_joinid", "dataset_id"]).concat().to_pandas()
    codes = t["dataset_id"].astype("category").cat.codes.to_numpy()
    out = np.zeros(int(t["soma_joinid"].max()) + 1, np.int64)
    out[t["soma_joinid"].to_numpy()] = codes
    return out, int(codes.max()) + 1


def _batches_scldm(uri: str, batch_size: int, workers: str, budget_mb: int):
    from scldm_scale.config.data import SomaDataConfig
    from scldm_scale.data import build_loader

    cfg = SomaDataConfig(
        atlas_uri=uri,
        value_filter=None,
        micro_batch_size=batch_size,
        seed=0,
        label_columns=["dataset_id"],
        num_workers=int(workers.rstrip("p")),
        worker_processes=workers.endswith("p"),
        memory_budget_mb=budget_mb,
    )
    for batch in build_loader(cfg, rank=0, world_size=1):
        yield batch["soma_joinid"].numpy()


def _batches_tiledbsoma_ml(uri: str, batch_size: int, workers: str, budget_mb: int):
    import tiledbsoma
    from tiledbsoma_ml import ExperimentDataset, experiment_dataloader

    with tiledbsoma.Experiment.open(uri) as exp, exp.axis_query("RNA") as query:
        ds = ExperimentDataset(query, layer_name="raw", batch_size=batch_size, shuffle=True, seed=0)
        for _X, obs in experiment_dataloader(ds, num_workers=int(workers.rstrip("p"))):
            yield obs["soma_joinid"].to_numpy()


SCAN_CELLS = 8192
"""Cells per contiguous read of the sequential scan (32 batches: the steady state is measurable)."""


def _batches_scan(uri: str, batch_size: int, workers: str, budget_mb: int):
    """Read X in storage order, contiguous slices of SCAN_CELLS, no decode: the storage ceiling."""
    import tiledbsoma

    with tiledbsoma.Experiment.open(uri) as exp:
        X = exp.ms["RNA"].X["raw"]
        n = X.shape[0]
        for lo in range(0, n, SCAN_CELLS):
            hi = min(n, lo + SCAN_CELLS)
            for _ in X.read(coords=(slice(lo, hi - 1),)).tables():
                pass
            for b in range(lo, hi, batch_size):
                yield np.arange(b, min(b + batch_size, hi))


LOADERS = {
    "scldm_scale": _batches_scldm,
    "tiledbsoma_ml": _batches_tiledbsoma_ml,
    "sequential_scan": _batches_scan,
}


IMPORTS = {
    "scldm_scale": ["torch", "tiledbsoma", "scldm_scale.data"],
    "tiledbsoma_ml": ["torch", "tiledbsoma", "tiledbsoma_ml"],
    "sequential_scan": ["tiledbsoma"],
}


def run_one(name: str, uri: str, batch_size: int, workers: str, budget_mb: int) -> dict:
    import importlib

    for module in IMPORTS[name]:  # process start-up is not the loader's first batch
        importlib.import_module(module)
    import psutil

    dataset, k = _obs_dataset(uri)
    rss_before = psutil.Process().memory_info().rss / 2**20
    rss = _RssPeak()
    cpu0 = _cpu_seconds()
    t0 = time.perf_counter()
    first = None
    cells_after_first = 0
    ent = []
    for joinids in LOADERS[name](uri, batch_size, workers, budget_mb):
        if first is None:
            first = time.perf_counter()
        else:
            cells_after_first += len(joinids)
        ent.append(_entropy(dataset[joinids], k))
    end = time.perf_counter()
    cpu = _cpu_seconds() - cpu0
    peak_rss, peak_pss = rss.stop()
    rng = np.random.default_rng(0)
    rand = np.mean(
        [_entropy(dataset[rng.choice(len(dataset), batch_size, replace=False)], k) for _ in range(500)]
    )
    return {
        "cells_per_s": round(cells_after_first / max(end - first, 1e-9), 1),
        "first_batch_s": round(first - t0, 3),
        "epoch_cells_per_s": round(len(dataset) / (end - t0), 1),
        "peak_rss_mb": round(peak_rss, 1),
        "rss_before_mb": round(rss_before, 1),
        "loader_rss_mb": round(peak_rss - rss_before, 1),
        "peak_pss_mb": round(peak_pss, 1),
        "shuffle_quality": round(float(np.mean(ent) / rand), 4),
        "cells_per_cpu_s": round(len(dataset) / max(cpu, 1e-9), 1),
        "num_workers": workers,
        "batches": len(ent),
    }


def _median(runs: list[dict]) -> dict:
    """Per numeric metric, the median over the runs (the runs' cells/s listed beside it)."""
    out = dict(runs[0])
    for key, value in runs[0].items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = float(np.median([r[key] for r in runs]))
    out["cells_per_s_runs"] = [r["cells_per_s"] for r in runs]
    return out


def ensure_atlas(cache: Path, cells: int, genes: int, datasets: int) -> str:
    uri = cache / f"synth_{cells}x{genes}_k{datasets}_s0"
    if not uri.exists():
        from data_pipelines.synthetic_atlas import write_synthetic_atlas

        cache.mkdir(parents=True, exist_ok=True)
        write_synthetic_atlas(str(uri), n_cells=cells, n_genes=genes, n_datasets=datasets, seed=0)
    return str(uri)


def _child(name: str, uri: str, args: argparse.Namespace, workers: str) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--one",
        name,
        "--atlas",
        uri,
        "--batch-size",
        str(args.batch_size),
        "--workers",
        workers,
        "--budget-mb",
        str(args.budget_mb),
    ]
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cells", type=int, default=200_000)
    p.add_argument("--genes", type=int, default=2000)
    p.add_argument("--datasets", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument(
        "--budget-mb", type=int, default=1024, help="data.memory_budget_mb of the scldm_scale loader"
    )
    p.add_argument(
        "--workers",
        default=str(SomaDataConfig.num_workers),
        help="scldm_scale workers of the headline runs (N threads, Np processes; default: the config default)",
    )
    p.add_argument(
        "--tiledbsoma-ml-workers",
        default="0",
        help="DataLoader workers of tiledbsoma_ml (default 0, its fastest here: 1 spawned worker halves it)",
    )
    p.add_argument(
        "--rss-workers",
        default="0,1,2,2p",
        help="scldm_scale workers checked against the budget (N: threads, Np: DataLoader processes)",
    )
    p.add_argument("--cache", type=Path, default=Path(os.path.expanduser("~/.cache/scldm_scale/bench")))
    p.add_argument("--json", type=Path, default=None)
    p.add_argument(
        "--repeats", type=int, default=3, help="runs per loader (interleaved); each metric is the median"
    )
    p.add_argument("--one", choices=sorted(LOADERS), help=argparse.SUPPRESS)
    p.add_argument("--atlas", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(run_one(args.one, args.atlas, args.batch_size, args.workers, args.budget_mb)))
        return 0
    uri = ensure_atlas(args.cache, args.cells, args.genes, args.datasets)
    result: dict = {"cells": args.cells, "repeats": args.repeats, "loaders": {}}
    names = ("sequential_scan", "scldm_scale", "tiledbsoma_ml")
    runs: dict[str, list[dict]] = {name: [] for name in names}
    for rep in range(args.repeats):  # interleaved, so drift of a shared machine hits every loader alike
        for name in names:
            workers = args.workers if name == "scldm_scale" else args.tiledbsoma_ml_workers
            runs[name].append(_child(name, uri, args, workers))
            print(name, rep, runs[name][-1], file=sys.stderr, flush=True)
    for name in names:
        result["loaders"][name] = _median(runs[name])
    s = result["loaders"]
    result["ratios"] = {
        "scldm_scale_over_tiledbsoma_ml": round(
            s["scldm_scale"]["cells_per_s"] / s["tiledbsoma_ml"]["cells_per_s"], 3
        ),
        "scldm_scale_over_sequential_scan": round(
            s["scldm_scale"]["cells_per_s"] / s["sequential_scan"]["cells_per_s"], 3
        ),
        "per_repeat_over_scan": [
            round(a["cells_per_s"] / b["cells_per_s"], 3)
            for a, b in zip(runs["scldm_scale"], runs["sequential_scan"], strict=True)
        ],
        "per_repeat_over_tiledbsoma_ml": [
            round(a["cells_per_s"] / b["cells_per_s"], 3)
            for a, b in zip(runs["scldm_scale"], runs["tiledbsoma_ml"], strict=True)
        ],
    }
    budget = {"memory_budget_mb": args.budget_mb, "runs": {}}
    for w in [x for x in args.rss_workers.split(",") if x != ""]:
        r = _child("scldm_scale", uri, args, w)
        keys = (
            "cells_per_s",
            "first_batch_s",
            "peak_rss_mb",
            "peak_pss_mb",
            "rss_before_mb",
            "loader_rss_mb",
        )
        budget["runs"][w] = {k: r[k] for k in keys}
        budget["runs"][w]["loader_rss_within_budget"] = r["loader_rss_mb"] <= args.budget_mb
        print("scldm_scale workers", w, r, file=sys.stderr, flush=True)
    result["scldm_scale_memory"] = budget
    text = json.dumps(result, indent=2)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
