"""Scale benchmark: stage 1 on 2 ranks streaming from synthetic atlases of 10^5 and 10^6 cells, and the loader's
index memory up to 10^7 cells.

    python benchmarks/scale_bench.py --json benchmarks/out/scale_bench.json
    python benchmarks/scale_bench.py --quick --json /tmp/scale_quick.json       # ~2 min: 10^4 and 3x10^4 cells

Training runs (`--cells-list`, default 10^5 and 10^6 cells x `--genes` 2,000 in `--datasets` 8): a real
`torchrun --standalone --nproc_per_node 2 launchers/train_vae.py` with the debug preset (configs/vae/debug.yaml:
~20k parameters + the gene tables) on every atlas gene (data.min_gene_cells=0), micro-batches of `--batch-size`,
`--steps` optimizer steps, data.seed 0, the default training filter (split == 'train'), `DS_ACCELERATOR=cpu`,
one intra-op thread per rank, no tracking server, no checkpoint before the last step, and rank 0's start-up
library-size pass over `--stats-cells` cells. Per rank:
  * loader_cells_per_s: cells this rank's loader delivered per second of training, steps 2 .. N-1 (not the
    first read, nor the final checkpoint);
  * data_wait_fraction: the share of those seconds the training thread waited on the loader. Near 0, the
    step (even this small model decodes every gene of every cell) sets the pace and loader_cells_per_s is a
    lower bound on what the loader can deliver; near 1, it is the loader's rate;
  * peak_rss_mb / peak_pss_mb / peak_uss_mb / peak_anon_mb: the rank process, sampled from outside (RSS and
    anonymous RSS every 0.1 s; PSS and USS, a page-table walk, every second). RSS counts the pages shared with
    the other rank (torch, TileDB) in full, PSS splits them, USS (private) leaves them out; anonymous RSS is
    what the process allocated itself (heap, tensors, buffers; no library pages). peak_tree_pss_mb adds its
    child processes (loader worker processes, if configured); max_rss_mb is the process's own getrusage peak
    up to the end of training.
The per-rank loader numbers come from the trainer itself: with `SCLDM_SCALE_RANK_STATS=<dir>` in the
environment every rank writes `rank<N>.json` there at the end of training (scldm_scale/train/loop.py); the
MLflow `sys/` metrics are reduced over ranks.

Index-only runs (`--index-cells-list`, default 10^5, 10^6 and 10^7 cells x `--index-genes` 16 in
`--index-datasets` 100; layout census when data_pipelines.synthetic_atlas has it): in a fresh process per atlas
and value filter (None, and the training default split == 'train'), after importing torch, TileDB-SOMA and the
loader, `build_loader(rank=0, world_size=2)` and `--index-batches` batches read. Reported: the growth of
anonymous RSS (the loader's private memory: RssAnon, what the process allocated), RSS and USS from before the
build to after it, after the batches and after the iterator is closed, and to the peak during build + batches
(RSS and RssAnon sampled every 5 ms, USS every 0.25 s: build-time temporaries count), each as MB and as bytes
per atlas cell. USS is reported but not used: it moves by up to 100 MB between identical runs on a shared
machine (library pages count as private while no other process maps them). `--index-repeats` (3) processes
each: loader_private_mb (anonymous, after the batches), peak_private_delta_mb and peak_rss_delta_mb are medians
(every run's beside them), the snapshots those of the run with the median private memory.

Acceptance (`acceptance` in the JSON), between the smallest and largest atlas of each list:
  * rss_ratio: per rank, peak RSS of the largest training run over that of the smallest; pass when within
    10 % (|ratio - 1| <= 0.10);
  * index_growth: per value filter, (private memory at N_max - at N_min) / (N_max - N_min) bytes per cell,
    private memory = anonymous RSS after the batches, once the read-ahead is idle (`settle`: the iterator is
    still open and its decoded units in flight, bounded by the shuffle block and data.memory_budget_mb, count;
    an open TileDB read's tile buffers do not) minus before the build; pass when <= 1 byte per cell.
    The growth of the peak private memory is beside it with its own pass flag; for diagnosis, the growth right
    after the build (the index alone), after the iterator is closed, of the peak RSS and of USS.

Atlases are built once (a subprocess of this script, tqdm bar on stderr) and cached under --cache as
synth_<cells>x<genes>_k<datasets>_s0 (`_census` appended for that layout). Progress goes to stderr; the JSON
to stdout and `--json`.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import inspect
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks._memory import MB, PeakMemory, RankProcesses, anon_bytes, settle  # noqa: E402
from benchmarks._report import emit_json  # noqa: E402

VAE_LAUNCHER = REPO / "launchers" / "train_vae.py"
VAE_PRESET = REPO / "configs" / "vae" / "debug.yaml"
INDEX_BUFFER_CELLS = 16_384
"""Shuffle block of the index-only runs (see `index_one`)."""
RANK_STATS_ENV = "SCLDM_SCALE_RANK_STATS"
"""scldm_scale.train.rank_stats.RANK_STATS_ENV (not imported: the package imports torch)."""
TRAIN_FILTER = "split == 'train'"
INDEX_FILTERS = {"all": None, "train": TRAIN_FILTER}
RSS_TOLERANCE = 0.10
"""Peak RSS per rank of the largest training run may differ from the smallest's by this fraction."""
GROWTH_LIMIT_BYTES = 1.0
"""Loader private memory may grow by this many bytes per atlas cell from the smallest to the largest index run."""
FULL = {
    "cells_list": "100000,1000000",
    "index_cells_list": "100000,1000000,10000000",
    "steps": 60,
    "index_repeats": 3,
}
QUICK = {"cells_list": "10000,30000", "index_cells_list": "10000,30000", "steps": 12, "index_repeats": 1}


def _log(message: str) -> None:
    stamp = datetime.datetime.now().strftime("%H:%M:%S")
    print(f"[scale_bench {stamp}] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------- atlases
def _layout_supported() -> bool:
    from data_pipelines.synthetic_atlas import write_synthetic_atlas

    return "layout" in inspect.signature(write_synthetic_atlas).parameters


def resolve_layout(layout: str) -> str:
    """`auto` -> census when the synthetic atlas writer has layouts, else blocks; census must be supported."""
    if layout == "blocks":
        return layout
    supported = _layout_supported()
    if layout == "auto":
        return "census" if supported else "blocks"
    if not supported:
        raise SystemExit(f"--layout {layout}: data_pipelines.synthetic_atlas has no layout= argument yet")
    return layout


def atlas_path(
    cache: Path, cells: int, genes: int, datasets: int, layout: str, write_chunk: int | None = None
) -> Path:
    """The cache entry: loader_bench's name for the blocks layout, `_<layout>` appended for any other, and
    `_w<cells>` for atlases written in chunks of that many cells (one TileDB fragment per chunk)."""
    name = f"synth_{cells}x{genes}_k{datasets}_s0"
    name = name if layout == "blocks" else f"{name}_{layout}"
    return cache / (name if write_chunk is None else f"{name}_w{write_chunk}")


def ensure_atlas(
    cache: Path, cells: int, genes: int, datasets: int, layout: str, write_chunk: int | None = None
) -> str:
    """Build the atlas once in a subprocess of this script (the writer's tqdm bar on stderr); return its path."""
    uri = atlas_path(cache, cells, genes, datasets, layout, write_chunk)
    if not uri.exists():
        cache.mkdir(parents=True, exist_ok=True)
        _log(f"building {uri.name} ({cells:,} cells x {genes} genes, {datasets} datasets, layout {layout})")
        t0 = time.perf_counter()
        cmd = [sys.executable, __file__, "--build-atlas", str(uri), "--layout", layout]
        cmd += ["--genes", str(genes), "--datasets", str(datasets), "--cells-list", str(cells)]
        cmd += ["--write-chunk-cells", str(write_chunk)] if write_chunk else []
        subprocess.run(cmd, check=True, stdout=sys.stderr, env=_child_env())
        _log(f"built {uri.name} in {time.perf_counter() - t0:.0f} s")
    return str(uri)


def _build_atlas(
    uri: str, cells: int, genes: int, datasets: int, layout: str, write_chunk: int | None
) -> None:
    from data_pipelines.synthetic_atlas import write_synthetic_atlas

    kwargs = {} if layout == "blocks" else {"layout": layout}  # "blocks" works with a writer without layouts
    kwargs.update({"chunk_cells": write_chunk} if write_chunk else {})
    write_synthetic_atlas(  # its tqdm bar goes to stderr (shown when that is a terminal)
        uri, n_cells=cells, n_genes=genes, n_datasets=datasets, seed=0, **kwargs
    )


def _child_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        DS_ACCELERATOR="cpu",
        OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]),
        **extra,
    )
    return env


# ---------------------------------------------------------------------------------------------- training
def _overrides(args: argparse.Namespace, uri: str, run_dir: Path) -> list[str]:
    out = [
        f"data.atlas_uri={uri}",
        "data.seed=0",
        f"data.shuffle_buffer_cells={args.train_buffer_cells}",  # both atlases fill whole blocks (see --help)
        "data.min_gene_cells=0",  # every atlas gene (the debug preset drops those seen in < 20 cells)
        f"data.micro_batch_size={args.batch_size}",
        f"data.library_size_stats_cells={args.stats_cells}",
        f"train.max_steps={args.steps}",
        f"train.run_dir={run_dir}",
        f"train.device={args.device}",
        "train.overwrite=true",
        "train.enable_progress_bar=false",
        "checkpoint.resume=never",
        f"checkpoint.interval_steps={10**9}",
        "tracking.backend=none",
        "tracking.enable_stdout=false",
        "tracking.enable_plots=false",
        "tracking.enable_system_metrics=false",
        f"tracking.log_interval_steps={args.steps}",  # the per-log all-reduce once, at the end
    ]
    out += [] if args.node_cache == "on" else ["data.node_cache_dir=null"]
    return out + ([f"engine.name={args.engine}"] if args.engine else [])


def train_run(args: argparse.Namespace, cells: int, workdir: Path) -> dict:
    """One stage-1 job under torchrun; per rank its loader numbers (its own JSON) and peak memory (sampled)."""
    uri = ensure_atlas(args.cache, cells, args.genes, args.datasets, args.layout)
    run_dir, stats_dir = workdir / f"vae_{cells}", workdir / f"rank_stats_{cells}"
    shutil.rmtree(stats_dir, ignore_errors=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.ranks)]
    cmd += [str(VAE_LAUNCHER), "--config", str(VAE_PRESET), *_overrides(args, uri, run_dir)]
    log_path = workdir / f"vae_{cells}.log"
    _log(f"training {args.steps} steps on {args.ranks} ranks, {cells:,} cells (log: {log_path})")
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=_child_env(**{RANK_STATS_ENV: str(stats_dir)}),
            start_new_session=True,  # its own process group: stopped with all its ranks on any error here
        )
        memory = PeakMemory(RankProcesses(proc.pid), rss_every=0.1, full_every=1.0)
        try:
            code = proc.wait(timeout=args.timeout)
        except BaseException:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            memory.stop()
            raise
        peaks = memory.stop()
    wall = time.perf_counter() - t0
    if code != 0:
        tail = log_path.read_text()[-4000:]
        raise RuntimeError(f"stage-1 run on {cells} cells exited {code}:\n{tail}")
    ranks = {}
    for rank in range(args.ranks):
        own = json.loads((stats_dir / f"rank{rank}.json").read_text())
        none = dict.fromkeys(("rss", "anon", "pss", "uss"))
        peak, tree = peaks.get(str(rank), none), peaks.get(f"{rank}/tree", none)
        ranks[str(rank)] = {
            "loader_cells_per_s": _round(own["steady_cells_per_s"], 1),
            "data_wait_fraction": _round(own["steady_data_wait_fraction"], 4),
            "peak_rss_mb": _round(peak["rss"], 1),
            "peak_pss_mb": _round(peak["pss"], 1),
            "peak_uss_mb": _round(peak["uss"], 1),
            "peak_anon_mb": _round(peak["anon"], 1),
            "peak_tree_pss_mb": _round(tree["pss"], 1),  # with its child processes
            "max_rss_mb": _round(own["max_rss_mb"], 1),  # getrusage: the true peak, this process only
            "end_rss_mb": _round(own["rss_mb"], 1),
            "end_uss_mb": _round(own["uss_mb"], 1),
            "steps": own["steps"],
            "cells": own["cells"],
            "first_step_data_s": _round(own["first_step_data_s"], 3),
            "steady_steps": own["steady_steps"],
            "train_loop_s": _round(own["wall_s"], 2),
        }
    result = {
        "cells": cells,
        "genes": args.genes,
        "datasets": args.datasets,
        "layout": args.layout,
        "atlas": uri,
        "steps": args.steps,
        "wall_s": round(wall, 1),
        "ranks": ranks,
    }
    _log(f"trained on {cells:,} cells in {wall:.0f} s: {json.dumps(ranks)}")
    return result


# ---------------------------------------------------------------------------------------------- index only
def index_one(uri: str, value_filter: str | None, batch_size: int, batches: int) -> dict:
    """In this (fresh) process: memory before, during and after `build_loader` + `batches` batches."""
    import psutil
    import tiledbsoma  # noqa: F401 - imported before the baseline, as are torch and the loader
    import torch  # noqa: F401

    from scldm_scale.config.data import SomaDataConfig
    from scldm_scale.data import build_loader

    me = psutil.Process()

    def snapshot() -> dict[str, float]:
        gc.collect()
        info = me.memory_full_info()
        return {"anon": anon_bytes(me.pid) / MB, "rss": info.rss / MB, "uss": info.uss / MB}

    before = snapshot()
    memory = PeakMemory(lambda: {"self": [me]}, rss_every=0.005, full_every=0.25)
    # Blocks of INDEX_BUFFER_CELLS: every atlas of the list, 10^5 cells included, then holds the same full blocks
    # in flight, so what grows from one atlas to the next is the per-cell state (the index), not read-ahead.
    cfg = SomaDataConfig(
        atlas_uri=uri,
        value_filter=value_filter,
        seed=0,
        micro_batch_size=batch_size,
        shuffle_buffer_cells=INDEX_BUFFER_CELLS,
    )
    t0 = time.perf_counter()
    loader = build_loader(cfg, rank=0, world_size=2)
    build_s = time.perf_counter() - t0
    after_build = snapshot()
    it = iter(loader)
    t0 = time.perf_counter()
    read = sum(1 for _ in zip(range(batches), it))
    batches_s = time.perf_counter() - t0
    settle_s = settle(lambda: anon_bytes(me.pid) / MB)
    after_batches = snapshot()
    del it
    after_close = snapshot()
    peak = memory.stop()["self"]
    selected = loader.num_cells
    with tiledbsoma.Experiment.open(uri) as exp:  # after the measurements: its caches are not the loader's
        n_cells = int(exp.obs.count)
        n_genes = int(exp.ms["RNA"].var.count)

    def delta(state: dict[str, float]) -> dict[str, float]:
        out = {}
        for field in ("anon", "rss", "uss"):
            mb = state[field] - before[field]
            out[f"{field}_delta_mb"] = round(mb, 2)
            out[f"{field}_bytes_per_cell"] = round(mb * MB / n_cells, 3)
        return out

    return {
        "cells": n_cells,
        "genes": n_genes,
        "value_filter": value_filter,
        "selected_cells": selected,
        "batches": read,
        "build_s": round(build_s, 2),
        "batches_s": round(batches_s, 2),
        "settle_s": round(settle_s, 2),
        "before_mb": {k: round(v, 1) for k, v in before.items()},
        "after_build": delta(after_build),
        "after_batches": delta(after_batches),
        "after_close": delta(after_close),
        "peak": delta(peak),
        "loader_private_mb": round(after_batches["anon"] - before["anon"], 2),
        "peak_private_delta_mb": round(peak["anon"] - before["anon"], 2),
        "peak_rss_delta_mb": round(peak["rss"] - before["rss"], 2),
    }


def index_run(args: argparse.Namespace, cells: int, name: str) -> dict:
    """`--index-repeats` fresh processes; the run with the median private memory, and both medians.

    A few MB of the private memory move from run to run (allocator arenas, what the reader holds at the
    moment): over 10^7 - 10^5 cells, 10 MB is already 1 byte per cell.
    """
    uri = ensure_atlas(
        args.cache,
        cells,
        args.index_genes,
        args.index_datasets,
        args.index_layout,
        args.index_write_chunk_cells or None,
    )
    cmd = [sys.executable, __file__, "--index-one", uri, "--value-filter", json.dumps(INDEX_FILTERS[name])]
    cmd += ["--batch-size", str(args.batch_size), "--index-batches", str(args.index_batches)]
    runs = []
    for _ in range(args.index_repeats):
        out = subprocess.run(
            cmd, check=True, capture_output=True, text=True, env=_child_env(), timeout=args.timeout
        )
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    runs.sort(key=lambda r: r["loader_private_mb"])
    result = {"filter": name, **runs[len(runs) // 2]}
    for key in ("loader_private_mb", "peak_private_delta_mb", "peak_rss_delta_mb"):
        result[key] = statistics.median(r[key] for r in runs)
        result[f"{key}_runs"] = [r[key] for r in runs]
    _log(
        f"index {name} {cells:,} cells: private {result['loader_private_mb_runs']} MB, peak private "
        f"+{result['peak_private_delta_mb_runs']} MB, peak RSS +{result['peak_rss_delta_mb_runs']} MB"
    )
    return result


# ---------------------------------------------------------------------------------------------- acceptance
def acceptance(train: list[dict], index: list[dict]) -> dict:
    """The two checks between the smallest and largest atlas of each list (None where not measured)."""
    out: dict = {"rss_ratio": None, "index_growth": None}
    if len(train) >= 2:
        small, large = min(train, key=lambda r: r["cells"]), max(train, key=lambda r: r["cells"])
        per_rank = {}
        for rank, lo in small["ranks"].items():
            hi = large["ranks"][rank]
            ratio = hi["peak_rss_mb"] / lo["peak_rss_mb"]
            per_rank[rank] = {
                "peak_rss_mb": [lo["peak_rss_mb"], hi["peak_rss_mb"]],
                "ratio": round(ratio, 4),
                "max_rss_ratio": _ratio(hi["max_rss_mb"], lo["max_rss_mb"]),
                "pss_ratio": _ratio(hi["peak_pss_mb"], lo["peak_pss_mb"]),
                "uss_ratio": _ratio(hi["peak_uss_mb"], lo["peak_uss_mb"]),
                "pass": abs(ratio - 1) <= RSS_TOLERANCE,
            }
        out["rss_ratio"] = {
            "cells": [small["cells"], large["cells"]],
            "tolerance": RSS_TOLERANCE,
            "per_rank": per_rank,
            "pass": all(r["pass"] for r in per_rank.values()),
        }
    by_filter = {}
    for name in INDEX_FILTERS:
        runs = [r for r in index if r["filter"] == name]
        if len(runs) < 2:
            continue
        small, large = min(runs, key=lambda r: r["cells"]), max(runs, key=lambda r: r["cells"])

        def growth(mb: Callable[[dict], float], small: dict = small, large: dict = large) -> float:
            """Bytes per cell from the small to the large atlas."""
            return round((mb(large) - mb(small)) * MB / (large["cells"] - small["cells"]), 3)

        private = growth(lambda r: r["loader_private_mb"])
        peak = growth(lambda r: r["peak_private_delta_mb"])
        by_filter[name] = {
            "cells": [small["cells"], large["cells"]],
            "private_bytes_per_cell": private,
            "pass": private <= GROWTH_LIMIT_BYTES,
            "peak_private_bytes_per_cell": peak,
            "peak_pass": peak <= GROWTH_LIMIT_BYTES,
            # diagnostics: the index alone, what stays once the iterator is closed, and the RSS / USS views
            "after_build_bytes_per_cell": growth(lambda r: r["after_build"]["anon_delta_mb"]),
            "after_close_bytes_per_cell": growth(lambda r: r["after_close"]["anon_delta_mb"]),
            "peak_rss_bytes_per_cell": growth(lambda r: r["peak_rss_delta_mb"]),
            "after_batches_uss_bytes_per_cell": growth(lambda r: r["after_batches"]["uss_delta_mb"]),
        }
    if by_filter:
        out["index_growth"] = {
            "limit_bytes_per_cell": GROWTH_LIMIT_BYTES,
            "by_filter": by_filter,
            "pass": all(r["pass"] for r in by_filter.values()),
        }
    checks = [c["pass"] for c in out.values() if c is not None]
    out["pass"] = all(checks) if len(checks) == 2 else None  # None: a check was not run
    return out


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 4) if a is not None and b else None


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


# ---------------------------------------------------------------------------------------------- main
def machine() -> dict:
    import psutil

    def version(package: str) -> str | None:
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return None

    git = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    )
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain"], capture_output=True, text=True)
    return {
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "ram_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "python": platform.python_version(),
        "torch": version("torch"),
        "tiledbsoma": version("tiledbsoma"),
        "git_commit": git.stdout.strip() or None,
        "git_dirty": bool(dirty.stdout.strip()),
    }


def _cells(text: str) -> list[int]:
    return [int(float(x)) for x in text.split(",") if x.strip()]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", type=Path, default=None, help="also write the JSON here")
    p.add_argument("--quick", action="store_true", help=f"small check: {QUICK}")
    p.add_argument("--cells-list", default=None, help=f"training atlases (default {FULL['cells_list']})")
    p.add_argument(
        "--index-cells-list", default=None, help=f"index-only atlases ({FULL['index_cells_list']})"
    )
    p.add_argument(
        "--steps", type=int, default=None, help=f"optimizer steps per run (default {FULL['steps']})"
    )
    p.add_argument("--skip-train", action="store_true")
    p.add_argument("--skip-index", action="store_true")
    p.add_argument("--genes", type=int, default=2000)
    p.add_argument("--datasets", type=int, default=8)
    p.add_argument("--layout", default="blocks", choices=["blocks", "census"], help="training atlases")
    p.add_argument("--index-genes", type=int, default=16)
    p.add_argument("--index-datasets", type=int, default=100)
    p.add_argument("--index-layout", default="auto", choices=["auto", "blocks", "census"])
    p.add_argument("--index-batches", type=int, default=4)
    p.add_argument(
        "--index-repeats",
        type=int,
        default=None,
        help="index-only runs per atlas and filter; medians (3; quick 1)",
    )
    p.add_argument("--batch-size", type=int, default=64, help="data.micro_batch_size per rank")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--engine", default=None, help="engine.name (default: the config's)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    p.add_argument(
        "--stats-cells",
        type=int,
        default=10_000,
        help="data.library_size_stats_cells (rank 0's start-up pass)",
    )
    p.add_argument("--timeout", type=float, default=3600, help="seconds per training or index run")
    p.add_argument("--cache", type=Path, default=Path(os.path.expanduser("~/.cache/scldm_scale/bench")))
    p.add_argument(
        "--node-cache",
        choices=("on", "off"),
        default="on",
        help="the training runs' node-local cache (data.node_cache_dir): on (the default, under the workdir) or off",
    )
    p.add_argument("--workdir", type=Path, default=None, help="run dirs and logs (default: a fresh temp dir)")
    p.add_argument("--build-atlas", help=argparse.SUPPRESS)
    p.add_argument("--write-chunk-cells", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument(
        "--index-write-chunk-cells",
        type=int,
        default=1_000_000,
        help="cells per write of the index atlases (one TileDB fragment each): TileDB keeps per-fragment metadata "
        "of an opened array, so an atlas written in 50,000-cell chunks adds ~0.2 MB per fragment and array "
        "(0 = the writer's default)",
    )
    p.add_argument(
        "--train-buffer-cells",
        type=int,
        default=16_384,
        help="data.shuffle_buffer_cells of the training runs: small enough that the 10^5-cell atlas's 80,000 "
        "training cells make more blocks than a rank holds in flight (3 units, one block each), so both runs "
        "buffer the same number of cells. At 32,768 the 10^5 run had 2.4 blocks and buffered less, and rank 0's "
        "peak RSS came out 13-15 %% higher at 10^6 cells for that reason alone",
    )
    p.add_argument("--index-one", help=argparse.SUPPRESS)
    p.add_argument("--value-filter", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    preset = QUICK if args.quick else FULL
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.build_atlas:
        cells = _cells(args.cells_list)[0]
        _build_atlas(args.build_atlas, cells, args.genes, args.datasets, args.layout, args.write_chunk_cells)
        return 0
    if args.index_one:
        result = index_one(args.index_one, json.loads(args.value_filter), args.batch_size, args.index_batches)
        print(json.dumps(result))
        return 0
    args.index_layout = resolve_layout(args.index_layout)
    args.layout = resolve_layout(args.layout)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="scale_bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    # The loaders' node-local cache (on by default) goes under the workdir, removed at the end: nothing of a
    # run is left in the machine's temp dir, and no run finds another's cache.
    node_cache = workdir / "node_cache"
    os.environ["SCLDM_SCALE_NODE_CACHE"] = str(node_cache)
    t0 = time.perf_counter()
    result: dict = {
        "benchmark": "scale_bench",
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "settings": {
            "quick": args.quick,
            "ranks": args.ranks,
            "steps": args.steps,
            "micro_batch_size": args.batch_size,
            "preset": str(VAE_PRESET.relative_to(REPO)),
            "train_value_filter": TRAIN_FILTER,
            "library_size_stats_cells": args.stats_cells,
            "train_atlases": {"genes": args.genes, "datasets": args.datasets, "layout": args.layout},
            "index_atlases": {
                "genes": args.index_genes,
                "datasets": args.index_datasets,
                "layout": args.index_layout,
                "batches": args.index_batches,
                "repeats": args.index_repeats,
            },
            "workdir": str(workdir),
            "node_cache": args.node_cache,
        },
        "train": [],
        "index": [],
    }
    if not args.skip_train:
        for cells in _cells(args.cells_list):
            result["train"].append(train_run(args, cells, workdir))
    if not args.skip_index:
        for cells in _cells(args.index_cells_list):
            for name in INDEX_FILTERS:
                result["index"].append(index_run(args, cells, name))
    shutil.rmtree(node_cache, ignore_errors=True)
    result["acceptance"] = acceptance(result["train"], result["index"])
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    result["machine"]["load_avg_1m_end"] = round(os.getloadavg()[0], 2)
    emit_json(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
