"""Where stage 1's wall time buys the most quality: the brain10k stage-1 preset and variants of its width, depth
and batch size, each trained on the same number of cells and scored at every checkpoint by the evaluation protocol
(the stage-1 ceiling against the real floor, on brain10k's test split).

    python benchmarks/stage1_curve.py --json benchmarks/out/stage1_curve.json
    python benchmarks/stage1_curve.py --json out.json --variant wide=model.dim=64 --cells 64000

Each variant runs `launchers/train_vae.py --config configs/vae/brain10k.yaml` with its overrides for the same
number of training cells (`--cells`; steps = cells / batch), and checkpoints `--points` times. Every checkpoint is scored with `launchers/evaluate.py` (one seed): FD, energy and W2 of the
stage-1 ceiling over the real floor's, kNN condition accuracy over real cells', held-out NB NLL and Pearson
per gene. Its x-axis is the wall time at which the checkpoint was written, from the run's start; the curves
go to `<work>/stage1_curve.png`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PRESET = "configs/vae/brain10k.yaml"
PRESET_BATCH = 64
"""data.micro_batch_size of the preset."""
TEST_FILTER = "split == 'test' and dataset_id == 'brain10k'"
VARIANTS = {
    "preset": [],
    "wide_d64": ["model.dim=64"],
    "deep_l4": ["model.num_layers=4"],
    "batch_256": ["data.micro_batch_size=256", "optim.lr=4.0e-3"],
    "log1p": ["model.count_transform=log1p"],
}
"""Default variants: the preset, 2x width, 2x depth, 4x batch (lr x2), and the count-blind input of the
authors' code (`log1p`, the A/B of the count-aware encoder at equal steps and seed). Padding is already to each batch's
longest cell (the loader never pads to a fixed length), so it is not a variant."""


def _run(cmd: list[str], log: Path) -> None:
    with open(log, "a") as f:
        proc = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode:
        raise SystemExit(f"failed (exit {proc.returncode}): {' '.join(cmd)}; see {log}")


def _train(run_dir: Path, overrides: list[str], steps: int, interval: int, log: Path) -> float:
    shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run each time (a run_dir holds one run)
    cmd = [sys.executable, str(REPO / "launchers" / "train_vae.py"), "--config", str(REPO / PRESET), *overrides,
           f"train.run_dir={run_dir}", f"train.max_steps={steps}", f"checkpoint.interval_steps={interval}",
           "checkpoint.keep_latest_k=100", "checkpoint.resume=never", "train.enable_progress_bar=false",
           "tracking.backend=none"]
    t0 = time.time()
    _run(cmd, log)
    return t0


def _score(ckpt: Path, out: Path, log: Path) -> dict:
    cmd = [sys.executable, str(REPO / "launchers" / "evaluate.py"), f"model.checkpoint={ckpt}",
           f"protocol.value_filter={TEST_FILTER}", "protocol.seeds=[0]", "umap=false", f"out_dir={out}",
           "tracking.backend=none"]
    _run(cmd, log)
    r = json.loads((out / "evaluation.json").read_text())
    s = r["summary"]["stage1_ceiling"]
    return {**{k: round(v, 4) for k, v in s.items()},
            "nll": round(r["reconstruction"]["nll"], 2), "pearson_gene": round(r["reconstruction"]["pearson_gene"], 4)}


def _batch(overrides: list[str]) -> int:
    for o in overrides:
        if o.startswith("data.micro_batch_size="):
            return int(o.split("=", 1)[1])
    return PRESET_BATCH


def plot(result: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("fd_over_floor", "ceiling FD / floor"), ("energy_over_floor", "ceiling energy / floor"),
              ("knn_acc_over_real", "ceiling kNN acc. / real"), ("nll", "test NB NLL per cell")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.4))
    for ax, (key, title) in zip(axes, panels):
        for name, v in result["variants"].items():
            pts = v["points"]
            ax.plot([p["minutes"] for p in pts], [p[key] for p in pts], marker="o", label=name)
        ax.set_title(title)
        ax.set_xlabel("training minutes (2 CPU cores)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", required=True)
    p.add_argument("--work", default="runs/stage1-curve")
    p.add_argument("--cells", type=int, default=64_000, help="training cells per variant (8 epochs of brain10k)")
    p.add_argument("--points", type=int, default=3, help="checkpoints scored per variant")
    p.add_argument("--variant", action="append", default=[], metavar="NAME=KEY=VALUE[,KEY=VALUE]",
                   help="replace the default variants")
    args = p.parse_args(argv)
    variants = VARIANTS
    if args.variant:
        variants = {}
        for v in args.variant:
            name, _, ov = v.partition("=")
            variants[name] = [o for o in ov.split(",") if o]
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    result = {"cells": args.cells, "preset": PRESET, "variants": {}}
    for name, overrides in variants.items():
        vdir = work / name
        vdir.mkdir(exist_ok=True)
        interval = max(1, args.cells // _batch(overrides) // args.points)
        steps = interval * args.points
        print(f"[stage1_curve] {name}: {steps} steps", file=sys.stderr, flush=True)
        final = vdir / "run" / "checkpoints" / f"step-{steps:08d}"
        if final.exists():  # trained by an earlier call: reuse it
            t0 = json.loads((vdir / "started.json").read_text())["t0"]
        else:
            t0 = _train(vdir / "run", overrides, steps, interval, vdir / "train.log")
            (vdir / "started.json").write_text(json.dumps({"t0": t0}))
        points = []
        for ckpt in sorted((vdir / "run" / "checkpoints").glob("step-*")):
            meta = json.loads((ckpt / "meta.json").read_text())
            written = datetime.datetime.fromisoformat(meta["created_utc"]).timestamp()
            points.append({"step": meta["step"], "cells_seen": meta["cells_seen"],
                           "minutes": round((written - t0) / 60, 2),
                           **_score(ckpt, vdir / f"eval-{meta['step']}", vdir / "eval.log")})
            print(f"[stage1_curve] {name}: {points[-1]}", file=sys.stderr, flush=True)
        result["variants"][name] = {"overrides": overrides, "steps": steps, "points": points}
    result["machine"] = {"host": platform.node(), "cpus": os.cpu_count()}
    result["plot"] = str(plot(result, work / "stage1_curve.png"))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
