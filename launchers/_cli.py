"""Command line shared by the launchers: repeatable `--config`, ignored `--local_rank`, key=value overrides."""

from __future__ import annotations

import argparse
from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


def parse(argv: list[str] | None, stage: str, description: str) -> tuple[list[str], list[str]]:
    """Return (config files, dotlist overrides); no --config means `configs/<stage>/demo.yaml`."""
    parser = argparse.ArgumentParser(
        description=description, epilog="Overrides: key=value, e.g. train.max_steps=10"
    )
    parser.add_argument("--config", action="append", default=[], help="YAML file; repeat to layer several")
    # The deepspeed launcher passes --local_rank; LOCAL_RANK in the environment is what is read.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args, overrides = parser.parse_known_args(argv)
    return args.config or [str(CONFIG_DIR / stage / "demo.yaml")], overrides
