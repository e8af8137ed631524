"""Evaluate a trained scLDM against the atlas cells of one split (docs/evaluation.md).

    python launchers/evaluate.py --json runs/eval.json                     # runs/ldm-demo against split test
    python launchers/evaluate.py model.checkpoint=runs/ldm-x protocol.split=val protocol.seeds=[0,1,2,3,4]
    python launchers/evaluate.py model.mlflow_run_id=<stage-2 run> compare_weights=true
    python launchers/evaluate.py model.checkpoint=runs/vae-demo    # a stage-1 run: ceiling, reconstruction, baselines

Generation (per condition, 3 seeds) beside the real floor, a Gaussian-latent baseline and the stage-1
ceiling; reconstruction; embedding classifiers. JSON, PNGs in the report folder and an MLflow run of its own.
Settings: `key=value` (see `scldm_scale/config/eval.py::EvaluateConfig`) or a YAML file with `--config`.
"""

from __future__ import annotations

import argparse
import json
import sys

from _cli import cli_main

from scldm_scale.config import load_config
from scldm_scale.config.eval import EvaluateConfig
from scldm_scale.eval.run import run_evaluate


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog="Overrides: key=value")
    parser.add_argument("--config", action="append", default=[], help="YAML file of EvaluateConfig fields")
    parser.add_argument("--json", default=None, help="also write the result JSON here")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args, overrides = parser.parse_known_args(argv)
    cfg = load_config(EvaluateConfig, args.config, overrides + ([f"json={args.json}"] if args.json else []))
    result = run_evaluate(cfg)
    if result is not None:
        print(json.dumps(result["summary"], indent=1))
        print(f"report: {result['report_dir']}  mlflow run: {result['mlflow_run_id']}")


if __name__ == "__main__":
    cli_main(main, sys.argv[1:])
