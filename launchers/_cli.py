"""Command line shared by the launchers: repeatable `--config`, ignored `--local_rank`, key=value overrides,
and `cli_main`, which turns a configuration error into one `error:` line and exit status 2."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

from scldm_scale.config import ConfigError

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
CONFIG_ERROR_EXIT = 2
"""Exit status of a launcher stopped by a `ConfigError` (as argparse exits on a bad command line)."""
PEER_EXIT_DELAY_SECONDS = 1.0
"""Other ranks wait this long before exiting: torchrun / deepspeed kill the whole job when the first rank
exits, which could otherwise stop rank 0 before it has printed the error."""


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


def cli_main(main: Callable[[list[str]], object], argv: list[str] | None = None) -> None:
    """Run `main(argv or sys.argv[1:])` and exit with its result's `exit_code` if it has one (75 after a stop
    signal); a `ConfigError` prints `error: <message>` (one line, no traceback,
    on rank 0 only: env RANK unset or "0") and exits with status 2 on every rank. Other errors propagate.

    The config and atlas checks run on every rank before any collective, so every rank raises the same
    ConfigError and none waits on another; under torchrun / deepspeed the launcher then stops the job
    (a rank still in its exit delay ends by its SIGTERM: still non-zero).
    """
    try:
        result = main(argv or sys.argv[1:])
    except ConfigError as exc:
        if os.environ.get("RANK", "0") == "0":
            message = " ".join(str(exc).splitlines())
            print(f"error: {message}", file=sys.stderr, flush=True)
        else:
            time.sleep(PEER_EXIT_DELAY_SECONDS)
        sys.exit(CONFIG_ERROR_EXIT)
    code = getattr(result, "exit_code", 0)
    if code:  # e.g. 75: stopped by SIGTERM / SIGUSR1 after a checkpoint; run it again to continue
        sys.exit(code)
