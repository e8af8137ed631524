"""`python -m scldm_scale.checkpoint verify PATH...`: check checkpoints against their meta.json file tables.

One verdict line per checkpoint: `OK`, `UNVERIFIED` (written before checksums: nothing to check against)
or `BAD` with every bad file and what is wrong with it. A PATH is a checkpoint directory, or a run_dir (or
its checkpoints/) meaning every published checkpoint in it, oldest first.

Exit codes: 0 when no checkpoint is BAD, 1 when at least one is, 2 on usage errors or when a PATH holds no
checkpoint. Torch-free and single-process: no process group, nothing unpickled.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from scldm_scale.checkpoint.layout import META_FILE, list_checkpoints
from scldm_scale.checkpoint.manifest import VerifyResult, verify_checkpoint

EXIT_BAD = 1
"""At least one checkpoint failed verification."""
EXIT_USAGE = 2
"""Bad arguments, or a PATH without checkpoints."""


def _targets(path: Path) -> list[Path]:
    """The checkpoint directories a PATH names (empty when none)."""
    if (path / META_FILE).is_file():
        return [path]
    run_dir = path.parent if path.name == "checkpoints" and not list_checkpoints(path) else path
    return [ckpt for _, ckpt in list_checkpoints(run_dir)]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m scldm_scale.checkpoint", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    verify = commands.add_parser("verify", help="check sizes and sha256 checksums of every file of checkpoints")
    verify.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="checkpoint directory or run_dir")
    verify.add_argument("--json", action="store_true", help="print one JSON list of results instead of lines")
    verify.add_argument("--digest", help="expected manifest digest (sha256 of meta.json); needs one checkpoint")
    verify.add_argument("--quiet", action="store_true", help="print only the BAD verdicts")
    return parser


def verify_paths(paths: list[Path], expected_digest: str | None = None) -> list[VerifyResult] | str:
    """Results for every checkpoint the paths name, or an error message (no checkpoint / digest misuse)."""
    targets = []
    for path in paths:
        found = _targets(path)
        if not found:
            return f"no checkpoint at {path} (expected {META_FILE} or checkpoints/step-*)"
        targets.extend(found)
    if expected_digest is not None and len(targets) != 1:
        return f"--digest needs exactly one checkpoint, got {len(targets)}"
    return [verify_checkpoint(ckpt, expected_digest=expected_digest) for ckpt in targets]


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code."""
    args = _parser().parse_args(argv)
    results = verify_paths(args.paths, args.digest)
    if isinstance(results, str):
        print(f"error: {results}", file=sys.stderr)
        return EXIT_USAGE
    if args.json:
        print(json.dumps([r.to_json() for r in results], indent=1))
    else:
        for result in results:
            if args.quiet and result.ok:
                continue
            print(result.summary())
            for warning in [] if args.quiet else result.warnings:
                print(f"  warning: {warning}")
    return EXIT_BAD if any(not r.ok for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
