"""Loader benchmark: scldm_scale's SOMA loader vs tiledbsoma_ml.ExperimentDataset vs a sequential scan of X.

    python benchmarks/loader_bench.py --json benchmarks/out/loader.json
    python benchmarks/loader_bench.py --quick --layouts default          # ~2 min smoke run

Atlases (synthetic, `data_pipelines.synthetic_atlas`, 2,000 genes, built once and cached under --cache,
named as benchmarks/scale_bench.py names them, `_census` appended for that layout): `default`, --cells cells
in --datasets equal datasets stored one after another; `census`, --census-cells cells in --census-datasets
datasets of log-normal size, cells sorted by donor and cell type within a dataset (obs: dataset_id,
cell_type, donor_id, assay, tissue, ...), the layout where chunked reads mix worst. A layout whose atlas
cannot be built is reported as {"error": ...}.

Loaders, each in its own process (RSS is per loader; tiledbsoma_ml's spawn start method stays out of the
others), every one with batches of --batch-size:
  * scldm_scale: `build_loader(SomaDataConfig(...))` with the config defaults (chunk `shuffle_chunk_cells`,
    shuffle buffer `shuffle_buffer_cells`, `num_workers` worker threads) and seed 0, memory budget --budget-mb,
    and its node-local cache on (the default) in a fresh directory per run: epoch 1 streams from SOMA and fills
    it, the warm epoch reads from it, as epochs after the first do in training (node_cache_mb: its size);
  * scldm_scale_stream: the same with the cache off (`node_cache_dir=None`): every epoch streams from SOMA;
  * tiledbsoma_ml: `ExperimentDataset(query, layer_name="raw", batch_size=..., shuffle=True, seed=0)` at its
    defaults (`shuffle_chunk_size`=64, `io_batch_size`=65,536), 0 DataLoader workers;
  * tiledbsoma_ml_chunk<C>: the same with `shuffle_chunk_size` C = scldm_scale's default chunk
    (`SomaDataConfig.shuffle_chunk_cells`: the same contiguous IO unit), `io_batch_size` 65,536 (or the next
    multiple of C);
  * sequential_scan: X read in storage order, SCAN_CELLS cells per read (a slice read where the cells are
    contiguous, a point read of the sorted joinids under a filter), no decode. A ceiling only on reading
    (and not decoding) a page-cached atlas: every loader decodes, and on object storage the picture differs.
Filters (--filters): `none` (every cell) and `train` (`split == 'train'`, the training default: 80% of the
cells drawn per cell, so a chunk of contiguous positions is many short runs of joinids). tiledbsoma_ml gets
it as `exp.axis_query(obs_query=AxisQuery(value_filter=...))`, the scan reads only the matching joinids.

Speed (per loader, layout and filter; the median of --repeats runs, interleaved loader by loader so the drift
of a shared machine hits all alike). The clock starts before the loader is built, and two whole epochs run in
the same process:
  * warm_cells_per_s: cells of epoch 2 / its wall time, after `set_epoch(1)` (the headline; JIT compilation,
    imports and the OS page cache are done, and the epoch is whole: no window opened after a first batch);
  * epoch1_cells_per_s: cells of epoch 1 / wall time from before construction (start-up included);
  * first_batch_s, build_s: from before construction to the first batch / to the built loader;
  * warm_cells_per_cpu_s, epoch1_cells_per_cpu_s: cells over user + system CPU seconds of the process and its
    finished workers in that epoch (comparable on a loaded machine);
  * reshuffled: epoch 2's first batch differs from epoch 1's (tiledbsoma_ml 0.1.0 stores `set_epoch` but
    seeds its shuffle with `seed` alone, so both its epochs have the same order);
  * peak_rss_mb (process and workers, sampled every 50 ms; PSS every second), rss_before_mb (before the
    loader is built), loader_rss_mb (the difference: what `data.memory_budget_mb` bounds).
ratios: scldm_scale over each other loader, warm, epoch 1 and per CPU second, with per-repeat warm ratios.

Mixing (`scldm_scale.data.mixing`, from the first repeat, computed after the timing stops; its module
docstring has the details): every score is relative to random batches of the same sizes over the same cells
(1.0 = as mixed as a uniform shuffle, ~0 = a sequential read):
  * entropy_<label>: per-batch entropy of dataset_id, and of cell_type / donor_id (mixing within a dataset);
  * runs_ratio: distinct storage runs of RUN_CELLS joinids per batch, (runs - 1) / (random - 1); runs and
    runs_random beside it;
  * lag1: cosine similarity of consecutive batches' dataset_id histograms, raw, with lag1_random and
    lag1_score = (1 - lag1) / (1 - lag1_random); lag_far (batches half the epoch apart) and serial_score =
    (1 - lag1) / (1 - lag_far): ~0 when consecutive steps are more alike than distant ones. A score is null
    where its reference batches are all alike (e.g. 8 equal datasets in global batches of 1,024).
Three views: `one_rank` (the timed epoch 2 on one rank), `rank` (every rank's micro-batches when run as one of
--world-size ranks; lag-1 within a rank) and `global_<W>` (batch t of every rank concatenated: what the
optimiser steps on). The W ranks run one after another in one process, each for its whole epoch 2 (1 after
`set_epoch(1)`): scldm_scale via `build_loader(cfg, rank=r, world_size=W)` with seed 0; tiledbsoma_ml reads
RANK and WORLD_SIZE from the environment before it asks torch.distributed
(`tiledbsoma_ml._distributed.get_distributed_rank_and_world_size`), so they are set, as torchrun sets them,
while each rank's dataset is built and iterated (the dataset's rank / world_size are checked). tiledbsoma_ml
gives each rank a contiguous share of the query's joinids and shuffles within it; the scan gives each rank a
contiguous share too.

Memory budget (scldm_scale_memory): scldm_scale with each of --rss-workers (N threads, Np DataLoader processes)
on the first layout, no filter: peak RSS and PSS against `data.memory_budget_mb`.

JSON: {"config": {...}, "layouts": {<layout>: {"cells", "datasets", "atlas", "filters": {<filter>:
{"value_filter", "loaders": {<loader>: {speed medians..., "warm_cells_per_s_runs", "mixing": {"one_rank":
report, "ranks": {"world_size", "rank": report, "global": report}}}}, "ratios": {"scldm_scale_over_<loader>":
{"warm", "epoch1", "warm_per_cpu_s", "warm_per_repeat"}}}}, "mixing_table": {<filter>: {<loader>: {"one_rank",
"rank", "global_<W>": {scores}}}}} or {"error"}}, "scldm_scale_memory": {...}} (report: `mixing_report`).
"""

from __future__ import annotations

import argparse
import contextlib
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
from benchmarks._report import emit_json  # noqa: E402
from scldm_scale.config.data import SomaDataConfig  # noqa: E402  (dataclasses only: no torch)

CHUNK = SomaDataConfig.shuffle_chunk_cells
"""scldm_scale's default chunk (cells per contiguous read), the shuffle_chunk_size of tiledbsoma_ml_chunk*."""
RUN_CELLS = 2048
"""Storage run of the mixing metrics: distinct runs of this many consecutive joinids per batch (fixed, so the
number does not move with the loaders' chunk sizes)."""
FILTERS = {"none": None, "train": "split == 'train'"}
MIX_LABELS = ("dataset_id", "cell_type", "donor_id")
"""obs columns whose per-batch entropy is reported (those the atlas has)."""
SCAN_CELLS = 8192
"""Cells per read of the sequential scan."""
LOADERS = (
    "sequential_scan",
    "scldm_scale",
    "scldm_scale_stream",
    "tiledbsoma_ml",
    f"tiledbsoma_ml_chunk{CHUNK}",
)
OURS = ("scldm_scale", "scldm_scale_stream")
IMPORTS = {
    "scldm_scale": ["torch", "tiledbsoma", "scldm_scale.data"],
    "scldm_scale_stream": ["torch", "tiledbsoma", "scldm_scale.data"],
    "tiledbsoma_ml": ["torch", "tiledbsoma", "tiledbsoma_ml"],
    "sequential_scan": ["tiledbsoma"],
}


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


# -- loaders: `epoch(e)` yields each batch's soma_joinids (padding left out) -------------------------------


class _Scldm:
    """scldm_scale's loader; `cache`: its node-local cache on, in a fresh directory removed on close (so that
    epoch 1 fills it and the warm epoch reads from it, as in a training run), else off."""

    def __init__(
        self, uri: str, opts: argparse.Namespace, value_filter: str | None, rank: int, world: int, cache: bool
    ):
        import tempfile

        from scldm_scale.data import build_loader

        self.cache_dir = tempfile.mkdtemp(prefix="loader_bench_cache_") if cache else None
        self.extra: dict = {}

        cfg = SomaDataConfig(
            atlas_uri=uri,
            value_filter=value_filter,
            micro_batch_size=opts.batch_size,
            seed=0,
            num_workers=int(opts.workers.rstrip("p")),
            worker_processes=opts.workers.endswith("p"),
            memory_budget_mb=opts.budget_mb,
            node_cache_dir=self.cache_dir,
        )
        self.loader = build_loader(cfg, rank=rank, world_size=world)
        if cache and self.loader.dataset.spec.node_cache is None:
            raise RuntimeError(f"the node-local cache is off in {self.cache_dir} (no room?)")

    def epoch(self, e: int):
        self.loader.set_epoch(e)
        for batch in self.loader:
            ids = batch["soma_joinid"].numpy()
            pad = batch.get("is_padding")
            yield ids[~pad.numpy().astype(bool)] if pad is not None else ids.copy()

    def close(self) -> None:
        if self.cache_dir is not None:
            import shutil

            size = sum(f.stat().st_size for f in Path(self.cache_dir).rglob("*") if f.is_file())
            self.extra["node_cache_mb"] = round(size / 2**20, 1)
            shutil.rmtree(self.cache_dir, ignore_errors=True)


@contextlib.contextmanager
def _torchrun_env(rank: int, world: int):
    """RANK / WORLD_SIZE as torchrun sets them (what tiledbsoma_ml reads first); unchanged for one rank."""
    if world == 1:
        yield
        return
    saved = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE")}
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world))
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class _TiledbsomaMl:
    def __init__(
        self,
        uri: str,
        opts: argparse.Namespace,
        value_filter: str | None,
        rank: int,
        world: int,
        chunk: int | None = None,
    ):
        import tiledbsoma
        from tiledbsoma_ml import ExperimentDataset, experiment_dataloader

        self.rank, self.world = rank, world
        self.exp = tiledbsoma.Experiment.open(uri)
        obs_query = tiledbsoma.AxisQuery(value_filter=value_filter) if value_filter else None
        self.query = self.exp.axis_query("RNA", obs_query=obs_query)
        # io_batch_size must be a multiple of the chunk: the default 65,536, or the next multiple
        extra = {"shuffle_chunk_size": chunk, "io_batch_size": -(-(2**16) // chunk) * chunk} if chunk else {}
        with _torchrun_env(rank, world):
            self.ds = ExperimentDataset(
                self.query, layer_name="raw", batch_size=opts.batch_size, shuffle=True, seed=0, **extra
            )
            if (self.ds.rank, self.ds.world_size) != (rank, world):
                raise RuntimeError(
                    f"tiledbsoma_ml saw rank {self.ds.rank}/{self.ds.world_size}, not {rank}/{world}"
                )
        self.dl = experiment_dataloader(self.ds, num_workers=int(opts.tiledbsoma_ml_workers))

    def epoch(self, e: int):
        with _torchrun_env(self.rank, self.world):
            self.ds.set_epoch(e)
            for _X, obs in self.dl:
                yield obs["soma_joinid"].to_numpy().copy()

    def close(self) -> None:
        self.query.close()
        self.exp.close()


class _Scan:
    """X in storage order: SCAN_CELLS cells per read; a rank of W reads its contiguous share (equal shares)."""

    def __init__(self, uri: str, opts: argparse.Namespace, value_filter: str | None, rank: int, world: int):
        import tiledbsoma

        self.batch_size = opts.batch_size
        self.exp = tiledbsoma.Experiment.open(uri)
        self.X = self.exp.ms["RNA"].X["raw"]
        obs = self.exp.obs.read(value_filter=value_filter, column_names=["soma_joinid"]).concat()
        ids = np.sort(obs.column("soma_joinid").to_numpy())
        share = len(ids) // world
        self.ids = ids[rank * share : (rank + 1) * share] if world > 1 else ids

    def epoch(self, e: int):
        for lo in range(0, len(self.ids), SCAN_CELLS):
            part = self.ids[lo : lo + SCAN_CELLS]
            contiguous = int(part[-1] - part[0]) == len(part) - 1
            coords = slice(int(part[0]), int(part[-1])) if contiguous else part
            for _ in self.X.read(coords=(coords,)).tables():
                pass
            for b in range(0, len(part), self.batch_size):
                yield part[b : b + self.batch_size]

    def close(self) -> None:
        self.exp.close()


def _make(
    name: str, uri: str, opts: argparse.Namespace, value_filter: str | None, rank: int = 0, world: int = 1
):
    if name in OURS:  # the mixing pass (world > 1) runs without the cache: the order is the same either way
        return _Scldm(uri, opts, value_filter, rank, world, cache=name == "scldm_scale" and world == 1)
    if name == "sequential_scan":
        return _Scan(uri, opts, value_filter, rank, world)
    if name == "tiledbsoma_ml":
        return _TiledbsomaMl(uri, opts, value_filter, rank, world)
    if name.startswith("tiledbsoma_ml_chunk"):
        return _TiledbsomaMl(
            uri, opts, value_filter, rank, world, chunk=int(name.removeprefix("tiledbsoma_ml_chunk"))
        )
    raise ValueError(name)


# -- one loader in its own process ------------------------------------------------------------------------


def _obs_labels(uri: str) -> dict[str, np.ndarray]:
    """Int codes (0 = null) per joinid of the MIX_LABELS columns the atlas obs has."""
    import pandas as pd
    import tiledbsoma

    with tiledbsoma.Experiment.open(uri) as exp:
        cols = [c for c in MIX_LABELS if c in exp.obs.schema.names]
        t = exp.obs.read(column_names=["soma_joinid", *cols]).concat().to_pandas()
    joinids = t["soma_joinid"].to_numpy()
    out = {}
    for c in cols:
        table = np.zeros(int(joinids.max()) + 1, np.int64)
        table[joinids] = pd.factorize(t[c].astype(str).where(t[c].notna()))[0] + 1
        out[c] = table
    return out


def _mixing(name: str, uri: str, opts: argparse.Namespace, value_filter: str | None, batches: list) -> dict:
    """Mixing of the timed epoch (one rank) and of an un-timed epoch 1 on --world-size ranks."""
    from scldm_scale.data.mixing import mixing_report, rank_mixing_report

    labels = _obs_labels(uri)
    out = {"one_rank": mixing_report(batches, labels, run_cells=RUN_CELLS)}
    if opts.world_size > 1:
        per_rank = []
        for r in range(opts.world_size):
            loader = _make(name, uri, opts, value_filter, rank=r, world=opts.world_size)
            per_rank.append(list(loader.epoch(1)))
            loader.close()
        out["ranks"] = rank_mixing_report(per_rank, labels, run_cells=RUN_CELLS)
    return out


def run_one(name: str, uri: str, opts: argparse.Namespace) -> dict:
    import importlib

    for module in IMPORTS[name.split("_chunk")[0]]:  # process start-up is not the loader's first batch
        importlib.import_module(module)
    import psutil

    value_filter = FILTERS[opts.filter]
    rss_before = psutil.Process().memory_info().rss / 2**20
    rss = _RssPeak()
    cpu0, t0 = _cpu_seconds(), time.perf_counter()
    loader = _make(name, uri, opts, value_filter)
    built = time.perf_counter()
    first_at, first_ids, cells1 = None, None, 0
    for ids in loader.epoch(0):
        if first_at is None:
            first_at, first_ids = time.perf_counter(), ids
        cells1 += len(ids)
    cpu1, t1 = _cpu_seconds(), time.perf_counter()
    batches, cells2 = [], 0
    for ids in loader.epoch(1):
        batches.append(ids)
        cells2 += len(ids)
    cpu2, t2 = _cpu_seconds(), time.perf_counter()
    peak_rss, peak_pss = rss.stop()
    loader.close()
    out = {
        "warm_cells_per_s": round(cells2 / max(t2 - t1, 1e-9), 1),
        "epoch1_cells_per_s": round(cells1 / max(t1 - t0, 1e-9), 1),
        "first_batch_s": round(first_at - t0, 3),
        "build_s": round(built - t0, 3),
        "warm_epoch_s": round(t2 - t1, 3),
        "epoch1_s": round(t1 - t0, 3),
        "warm_cells_per_cpu_s": round(cells2 / max(cpu2 - cpu1, 1e-9), 1),
        "epoch1_cells_per_cpu_s": round(cells1 / max(cpu1 - cpu0, 1e-9), 1),
        "peak_rss_mb": round(peak_rss, 1),
        "rss_before_mb": round(rss_before, 1),
        "loader_rss_mb": round(peak_rss - rss_before, 1),
        "peak_pss_mb": round(peak_pss, 1),
        "cells": cells2,
        "batches": len(batches),
        "reshuffled": bool(len(batches) and not np.array_equal(first_ids, batches[0])),
        "workers": opts.workers if name in OURS else opts.tiledbsoma_ml_workers,
        **getattr(loader, "extra", {}),
    }
    if cells1 != cells2:
        out["epoch1_cells"] = cells1
    if opts.mixing:
        out["mixing"] = _round(_mixing(name, uri, opts, value_filter, batches))
    return out


# -- the parent: atlases, interleaved repeats, medians, ratios ---------------------------------------------


def _round(x, digits: int = 4):
    if isinstance(x, float):
        return round(x, digits)
    if isinstance(x, dict):
        return {k: _round(v, digits) for k, v in x.items()}
    if isinstance(x, list):
        return [_round(v, digits) for v in x]
    return x


def _median(runs: list[dict]) -> dict:
    """Per numeric metric, the median over the runs (the runs' warm cells/s listed beside it)."""
    out = dict(runs[0])
    for key, value in runs[0].items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = float(np.median([r[key] for r in runs]))
    out["warm_cells_per_s_runs"] = [r["warm_cells_per_s"] for r in runs]
    return out


def atlas_path(cache: Path, layout: str, cells: int, genes: int, datasets: int) -> Path:
    """The cache entry, shared with benchmarks/scale_bench.py: `synth_<cells>x<genes>_k<datasets>_s0` for the
    default layout, `_<layout>` appended for any other."""
    name = f"synth_{cells}x{genes}_k{datasets}_s0"
    return cache / (name if layout == "default" else f"{name}_{layout}")


def ensure_atlas(cache: Path, layout: str, cells: int, genes: int, datasets: int) -> str:
    uri = atlas_path(cache, layout, cells, genes, datasets)
    if not uri.exists():
        from data_pipelines.synthetic_atlas import write_synthetic_atlas

        cache.mkdir(parents=True, exist_ok=True)
        print(f"building {uri} ...", file=sys.stderr, flush=True)
        extra = {} if layout == "default" else {"layout": layout}  # "default": the writer's ("blocks")
        write_synthetic_atlas(str(uri), n_cells=cells, n_genes=genes, n_datasets=datasets, seed=0, **extra)
    return str(uri)


def _child(
    name: str, uri: str, args: argparse.Namespace, *, workers: str, filt: str, mixing: bool = False
) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--one",
        name,
        "--atlas",
        uri,
        "--filter",
        filt,
        "--batch-size",
        str(args.batch_size),
        "--workers",
        workers,
        "--tiledbsoma-ml-workers",
        args.tiledbsoma_ml_workers,
        "--budget-mb",
        str(args.budget_mb),
        "--world-size",
        str(args.world_size),
    ]
    if mixing:
        cmd.append("--mixing")
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"{name} ({filt}) failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _summary(report: dict) -> dict:
    """One mixing report as a table row: the scores relative to random, and the raw lag-1."""
    row = {f"entropy_{k}": v["entropy_ratio"] for k, v in report["labels"].items()}
    row["runs_ratio"] = report["storage_runs"]["ratio"]
    row["runs"] = report["storage_runs"]["runs"]
    row["runs_random"] = report["storage_runs"]["runs_random"]
    if report.get("lag1"):
        lag = report["lag1"]
        row.update({k: lag[k] for k in ("lag1", "lag1_random", "lag_far")})
        row.update(lag1_score=lag["score"], serial_score=lag["serial_score"])
    return row


def _ratios(loaders: dict, runs: dict) -> dict:
    """Each of OURS over every other loader (scldm_scale over scldm_scale_stream included)."""
    out: dict = {}
    for ours in (n for n in OURS if n in loaders):
        s = loaders[ours]
        for other in (n for n in loaders if n != ours and not (ours == "scldm_scale_stream" and n in OURS)):
            out[f"{ours}_over_{other}"] = {
                "warm": round(s["warm_cells_per_s"] / loaders[other]["warm_cells_per_s"], 3),
                "epoch1": round(s["epoch1_cells_per_s"] / loaders[other]["epoch1_cells_per_s"], 3),
                "warm_per_cpu_s": round(
                    s["warm_cells_per_cpu_s"] / loaders[other]["warm_cells_per_cpu_s"], 3
                ),
                "warm_per_repeat": [
                    round(a["warm_cells_per_s"] / b["warm_cells_per_s"], 3)
                    for a, b in zip(runs[ours], runs[other], strict=True)
                ],
            }
    return out


def _bench_layout(uri: str, args: argparse.Namespace, names: list[str]) -> dict:
    out: dict = {"filters": {}, "mixing_table": {}}
    for filt in args.filters:
        runs: dict[str, list[dict]] = {name: [] for name in names}
        for rep in range(args.repeats):  # interleaved, so drift of a shared machine hits every loader alike
            for name in names:
                workers = args.workers if name in OURS else args.tiledbsoma_ml_workers
                r = _child(name, uri, args, workers=workers, filt=filt, mixing=rep == 0)
                runs[name].append(r)
                brief = {k: v for k, v in r.items() if k != "mixing"}
                print(f"{Path(uri).name} {filt} {name} #{rep}", brief, file=sys.stderr, flush=True)
        loaders = {name: _median(runs[name]) for name in names}  # mixing: from the first repeat
        out["filters"][filt] = {
            "value_filter": FILTERS[filt],
            "loaders": loaders,
            "ratios": _ratios(loaders, runs),
        }
        table = {}
        for name in names:
            m = loaders[name]["mixing"]
            table[name] = {"one_rank": _summary(m["one_rank"])}
            if "ranks" in m:
                table[name]["rank"] = _summary(m["ranks"]["rank"])
                table[name][f"global_{m['ranks']['world_size']}"] = _summary(m["ranks"]["global"])
        out["mixing_table"][filt] = table
        print(json.dumps({filt: table}, indent=1), file=sys.stderr, flush=True)
    return out


def _csv(text: str) -> list[str]:
    return [x for x in text.split(",") if x]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layouts", type=_csv, default=["default", "census"])
    p.add_argument("--cells", type=int, default=200_000, help="cells of the default layout")
    p.add_argument("--datasets", type=int, default=8, help="datasets of the default layout")
    p.add_argument("--census-cells", type=int, default=4_000_000, help="cells of the census layout")
    p.add_argument("--census-datasets", type=int, default=600, help="datasets of the census layout")
    p.add_argument("--genes", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--filters", type=_csv, default=list(FILTERS), help="of: " + ", ".join(FILTERS))
    p.add_argument("--loaders", type=_csv, default=list(LOADERS), help="of: " + ", ".join(LOADERS))
    p.add_argument("--world-size", type=int, default=4, help="ranks of the mixing pass (global batch)")
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
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 20,000 cells (census layout 60,000), 1 repeat, budget check with 1 worker only",
    )
    p.add_argument("--one", help=argparse.SUPPRESS)
    p.add_argument("--atlas", help=argparse.SUPPRESS)
    p.add_argument("--filter", default="none", choices=sorted(FILTERS), help=argparse.SUPPRESS)
    p.add_argument("--mixing", action="store_true", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    p = _parser()
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(run_one(args.one, args.atlas, args)))
        return 0
    if args.quick:
        args.cells, args.census_cells, args.repeats, args.rss_workers = 20_000, 60_000, 1, "1"
    bad = [x for x in args.filters if x not in FILTERS] + [x for x in args.loaders if x not in LOADERS]
    if bad:
        p.error(f"unknown filters / loaders: {bad}")
    names = [n for n in LOADERS if n in args.loaders]
    result: dict = {
        "config": {
            "batch_size": args.batch_size,
            "genes": args.genes,
            "repeats": args.repeats,
            "world_size": args.world_size,
            "scldm_scale_workers": args.workers,
            "tiledbsoma_ml_workers": args.tiledbsoma_ml_workers,
            "memory_budget_mb": args.budget_mb,
            "chunk_cells": CHUNK,
            "run_cells": RUN_CELLS,
            "loaders": names,
        },
        "layouts": {},
    }
    first_uri = None
    for layout in args.layouts:
        cells, datasets = (
            (args.cells, args.datasets) if layout == "default" else (args.census_cells, args.census_datasets)
        )
        entry: dict = {"cells": cells, "datasets": datasets}
        try:
            uri = ensure_atlas(args.cache, layout, cells, args.genes, datasets)
        except Exception as exc:  # e.g. a writer without this layout
            entry["error"] = f"atlas: {type(exc).__name__}: {exc}"
            result["layouts"][layout] = entry
            print(layout, entry["error"], file=sys.stderr, flush=True)
            continue
        first_uri = first_uri or uri
        entry["atlas"] = uri
        entry.update(_bench_layout(uri, args, names))
        result["layouts"][layout] = entry
    if first_uri is not None:
        budget = {"memory_budget_mb": args.budget_mb, "atlas": first_uri, "runs": {}}
        for w in [x for x in args.rss_workers.split(",") if x != ""]:
            r = _child("scldm_scale", first_uri, args, workers=w, filt="none")
            keys = (
                "warm_cells_per_s",
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
    emit_json(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
