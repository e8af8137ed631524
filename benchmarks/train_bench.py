"""Training-step benchmark: stage 1 and stage 2 per engine on 2 ranks, and stage 2 with vs without the latent cache.

    python benchmarks/train_bench.py --json benchmarks/out/train_bench.json            # spawns 2 gloo ranks
    torchrun --nproc_per_node 2 benchmarks/train_bench.py --json out.json             # or under torchrun

Every job is a real `run_vae` / `run_ldm` (debug presets, a slice of the demo atlas, no tracking server)
logging every step; throughput is the median over steps after `--warmup` of the trainer's own
`sys/cells_per_second` (global, all ranks). ZeRO-2/3 and FSDP2 are reported relative to ZeRO-0.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ENGINES = ("zero0", "zero1", "zero2", "zero3", "fsdp2")
DATA = [
    "data.value_filter=split == 'train' and dataset_id != 'brain10k'",
    "data.min_gene_cells=300",
    "data.seed=0",
]


def _overrides(args: argparse.Namespace, engine: str, run_dir: Path) -> list[str]:
    return [
        *DATA,
        f"engine.name={engine}",
        f"train.run_dir={run_dir}",
        f"train.max_steps={args.steps}",
        "train.enable_progress_bar=false",
        "checkpoint.resume=never",
        "train.overwrite=true",  # each repetition starts a new run in the same run_dir
        f"checkpoint.interval_steps={10**6}",
        "tracking.backend=none",
        "tracking.enable_stdout=false",
        "tracking.log_interval_steps=1",
        "tracking.enable_plots=false",
    ]


def _throughput(history: dict, warmup: int) -> dict[str, float]:
    cps = [v for step, v in history["sys/cells_per_second"] if step > warmup]
    median = statistics.median(cps)
    return {
        "cells_per_s": median,
        "cells_per_s_per_rank": median / int(os.environ.get("WORLD_SIZE", "1")),
        "samples": len(cps),
    }


def bench(args: argparse.Namespace) -> dict | None:
    """Run every job on this rank; rank 0 returns the results."""
    from scldm_scale.config import LDMExperimentConfig, VAEExperimentConfig, load_config
    from scldm_scale.train.run import run_ldm, run_vae

    vae_cfg, ldm_cfg = REPO / "configs/vae/debug.yaml", REPO / "configs/ldm/debug.yaml"
    root = Path(args.workdir)
    out: dict = {"stage1": {}, "stage2": {}, "stage2_latent_cache": {}}
    for engine in ENGINES:
        s1 = root / engine / "s1"
        res = run_vae(load_config(VAEExperimentConfig, [vae_cfg], _overrides(args, engine, s1)))
        out["stage1"][engine] = _throughput(res.history, args.warmup) if res.history else None
        for mode in ("always", "never") if engine == "zero0" else ("always",):
            t0 = time.perf_counter()
            ldm = load_config(
                LDMExperimentConfig,
                [ldm_cfg],
                [
                    *_overrides(args, engine, root / engine / f"s2-{mode}"),
                    f"stage1.checkpoint={s1}",
                    f"latent_cache.mode={mode}",
                    "eval.enable_at_end=false",
                ],
            )
            res = run_ldm(ldm)
            wall = time.perf_counter() - t0
            if res.history:
                result = {**_throughput(res.history, args.warmup), "job_wall_s": wall}
                if mode == "always":
                    out["stage2"][engine] = result
                if engine == "zero0":
                    out["stage2_latent_cache"]["cache" if mode == "always" else "on_the_fly"] = dict(
                        result
                    )  # a copy: stage2 entries get relative_to_zero0
    if int(os.environ.get("RANK", "0")) != 0:
        return None
    for stage in ("stage1", "stage2"):
        base = out[stage]["zero0"]["cells_per_s"]
        for res in out[stage].values():
            res["relative_to_zero0"] = res["cells_per_s"] / base
    cache = out["stage2_latent_cache"]
    cache["speedup_cache_vs_on_the_fly"] = cache["cache"]["cells_per_s"] / cache["on_the_fly"]["cells_per_s"]
    return out


def _worker(rank: int, world_size: int, port: int, args: argparse.Namespace) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
    )
    main_rank(args)


def main_rank(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    torch.set_num_threads(args.threads)
    # One process group for all jobs: run_* reuse a group they did not create and leave it up.
    dist.init_process_group("gloo")
    try:
        result = bench(args)
    finally:
        dist.destroy_process_group()
    if result is not None:
        payload = {
            "benchmark": "train_bench",
            "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": {
                "host": platform.node(),
                "cpus": os.cpu_count(),
                "load_avg_1m": os.getloadavg()[0],
                "torch": torch.__version__,
                "device": "cuda" if torch.cuda.is_available() else "cpu",
            },
            "settings": {
                "world_size": int(os.environ.get("WORLD_SIZE", "1")),
                "steps": args.steps,
                "warmup": args.warmup,
                "threads_per_rank": args.threads,
                "data": DATA,
                "presets": ["configs/vae/debug.yaml", "configs/ldm/debug.yaml"],
            },
            **result,
        }
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(payload, indent=2))
        print(json.dumps(payload, indent=2))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", required=True, help="output file")
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per job")
    parser.add_argument("--warmup", type=int, default=2, help="steps left out of the median")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads per rank")
    parser.add_argument("--world-size", type=int, default=2, help="ranks to spawn when not under torchrun")
    parser.add_argument("--workdir", default=None, help="run dirs (default: a fresh temp dir)")
    args = parser.parse_args(argv)
    if args.workdir is None:
        import tempfile

        args.workdir = tempfile.mkdtemp(prefix="train_bench-")
    if "WORLD_SIZE" in os.environ:  # under torchrun / deepspeed
        main_rank(args)
        return
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(
        _worker, args=(args.world_size, port, args), nprocs=args.world_size, start_method="spawn"
    )


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
