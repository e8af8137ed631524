"""Quality benchmark: train both scLDM stages with the brain10k presets, then score them with the evaluation
protocol on brain10k's test split (3 seeds), beside scVI trained on the same cells for the same wall time.

    pip install -e ".[bench]" -c constraints/cpu.txt      # scvi-tools, for the peer
    python benchmarks/quality_bench.py --json benchmarks/out/quality_bench.json

Writes the evaluation JSON (docs/evaluation.md) with `generation.scvi` beside scLDM, plus `bench`: wall times,
the scVI model, the settings and the acceptance checks of the quality issue. The report (UMAP, per-condition
bars) goes to `<work>/eval-test/`. Budget: <= 35 min on 2 idle CPU cores (benchmarks/README.md, quality preset).
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TEST_FILTER = "split == 'test' and dataset_id == 'brain10k'"
STAGES = {"stage1": ("train_vae.py", "configs/vae/brain10k.yaml"), "stage2": ("train_ldm.py", "configs/ldm/brain10k.yaml")}


def _train(stage: str, args: argparse.Namespace, work: Path, tracking: str) -> float:
    """Run one training stage as its own process (as a user would); its wall time in seconds."""
    launcher, preset = STAGES[stage]
    shutil.rmtree(work / stage, ignore_errors=True)  # a fresh run each time (a run_dir holds one run)
    cmd = [sys.executable, str(REPO / "launchers" / launcher), "--config", str(REPO / preset),
           f"train.run_dir={work / stage}", f"tracking.uri={tracking}", "checkpoint.resume=never",
           "train.enable_progress_bar=false"]
    if stage == "stage2":
        cmd.append(f"stage1.checkpoint={work / 'stage1'}")
    cmd += getattr(args, f"{stage}_override")
    print(f"[quality_bench] {stage}: {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    with open(work / f"{stage}.log", "w") as log:
        proc = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode:
        raise SystemExit(f"{stage} failed (exit {proc.returncode}); see {work / f'{stage}.log'}")
    return time.perf_counter() - t0


def acceptance(result: dict) -> dict:
    """The quality issue's checks, on the means over seeds."""
    gen, summ = result["generation"], result["summary"]
    sc, base = gen["scldm"], gen["gaussian_baseline"]
    out = {f"beats_baseline_{m}": bool(sc[m]["mean"] < base[m]["mean"]) for m in ("w2", "mmd2_unbiased", "fd", "energy")}
    out["fd_within_2x_floor"] = bool(summ["scldm"]["fd_over_floor"] <= 2)
    out["energy_within_2x_floor"] = bool(summ["scldm"]["energy_over_floor"] <= 2)
    out["knn_at_least_90pct_of_real"] = bool(summ["scldm"]["knn_acc_over_real"] >= 0.9)
    if "scvi" in gen:
        for m in ("fd", "energy"):
            out[f"matches_scvi_{m}"] = bool(sc[m]["mean"] <= gen["scvi"][m]["mean"])
            out[f"scldm_over_scvi_{m}"] = float(sc[m]["mean"] / gen["scvi"][m]["mean"])
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", required=True, help="write the result JSON here")
    p.add_argument("--work", default="runs/quality-bench", help="run dirs, logs, MLflow store and report")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--no-scvi", action="store_true", help="skip the scVI peer (no `bench` extra installed)")
    p.add_argument("--scvi-seconds", type=float, default=None,
                   help="scVI's training wall time; default: both scLDM stages' wall time together")
    p.add_argument("--stage1-override", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--stage2-override", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--skip-training", action="store_true", help="reuse the trained stages in --work")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from scldm_scale.config.eval import EvaluateConfig, ModelSourceConfig, ProtocolConfig
    from scldm_scale.config.tracking import TrackingConfig
    from scldm_scale.eval.loading import load_stage2
    from scldm_scale.eval.run import run_evaluate

    t_start = time.perf_counter()
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    tracking = f"sqlite:///{work / 'mlflow.db'}"
    times_path = work / "train_seconds.json"
    if args.skip_training:
        seconds = json.loads(times_path.read_text())
    else:
        seconds = {stage: round(_train(stage, args, work, tracking), 1) for stage in STAGES}
        times_path.write_text(json.dumps(seconds))
    train_total = seconds["stage1"] + seconds["stage2"]

    external, scvi_info = {}, None
    if not args.no_scvi:
        sys.path.insert(0, str(Path(__file__).parent))
        from scvi_peer import ScviPeer

        peer = ScviPeer(load_stage2(work / "stage2"), seconds=args.scvi_seconds or train_total)
        external["scvi"] = peer
        scvi_info = peer.describe()

    t_eval = time.perf_counter()
    cfg = EvaluateConfig(
        model=ModelSourceConfig(checkpoint=str(work / "stage2")),
        protocol=ProtocolConfig(value_filter=TEST_FILTER, seeds=[int(s) for s in args.seeds.split(",")]),
        out_dir=str(work / "eval-test"),
        compare_weights=True,  # scldm_raw beside scldm (EMA)
        tracking=TrackingConfig(uri=tracking, experiment_name="quality-bench"),
    )
    result = run_evaluate(cfg, external=external)
    eval_seconds = time.perf_counter() - t_eval
    result["bench"] = {
        "train_seconds": {**seconds, "total": round(train_total, 1)},
        "evaluate_seconds": round(eval_seconds, 1),
        "total_seconds": round(time.perf_counter() - t_start, 1),
        "scvi": scvi_info,
        "presets": {stage: preset for stage, (_, preset) in STAGES.items()},
        "overrides": {"stage1": args.stage1_override, "stage2": args.stage2_override},
        "machine": {"host": platform.node(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    result["bench"]["acceptance"] = acceptance(result)
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=float))
    print(json.dumps({"summary": result["summary"], "bench": result["bench"]}, indent=1, default=float))
    return result


if __name__ == "__main__":
    main()
