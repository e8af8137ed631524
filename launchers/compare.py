"""Compare MLflow runs side by side: differing params, final losses, throughput and eval scores.

    python launchers/compare.py                                      # latest runs of experiment scldm_scale
    python launchers/compare.py RUN_ID RUN_ID --out table.md --plot loss.png
    python launchers/compare.py --experiment scldm_scale --uri http://mlflow:5000 --out runs.csv

Queries and table in `scldm_scale.tracking` (runs.py), the plot in `scldm_scale.eval.plots`; errors print
one `error: ...` line and exit 2.
"""

from __future__ import annotations

import argparse
import sys

from rich.console import Console
from rich.measure import Measurement
from rich.table import Column, Table

from scldm_scale import tracking


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Compare MLflow runs of scldm_scale.")
    parser.add_argument("run_ids", nargs="*", metavar="RUN_ID", help="runs to compare")
    parser.add_argument("--experiment", help="experiment (default scldm_scale when no RUN_ID is given)")
    parser.add_argument("--uri", default="sqlite:///mlruns.db", help="MLflow tracking URI")
    parser.add_argument("--out", help="also write the table to a .md or .csv file")
    parser.add_argument("--plot", help="PNG overlaying --metric of every run against step")
    parser.add_argument("--metric", default="train/loss", help="metric of --plot (default train/loss)")
    parser.add_argument("--max-runs", type=int, default=50, help="most runs taken from an experiment")
    args = parser.parse_args(argv)
    if not args.run_ids and not args.experiment:
        args.experiment = "scldm_scale"
    return args


def render(columns: list[str], rows: list[list[str]], console: Console) -> Table:
    """One row per run; transposed (one column per run) when that is narrower and rows do not fit."""

    def table(header: list[str], body: list[list[str]]) -> Table:
        out = Table(*(Column(h, overflow="fold") for h in header), header_style="bold")
        for line in body:
            out.add_row(*line)
        return out

    def width(t: Table) -> int:
        return Measurement.get(console, console.options.update_width(100_000), t).maximum

    wide = table(columns, rows)
    if width(wide) <= console.width:
        return wide
    fields = [[c, *(r[i] for r in rows)] for i, c in enumerate(columns) if i > 1]
    tall = table(["", *(f"{r[0]}\n{r[1]}" for r in rows)], fields)
    return tall if width(tall) < width(wide) else wide


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    try:
        runs = tracking.find_runs(args.uri, args.run_ids, args.experiment, max_runs=args.max_runs)
        columns, rows = tracking.comparison_table(runs)
        if args.out:
            tracking.write_table(columns, rows, args.out)
        if args.plot:
            curves = {
                f"{r.name} ({r.run_id[:8]})": tracking.metric_history(args.uri, r.run_id, args.metric)
                for r in runs
            }
            if not any(curves.values()):
                raise ValueError(f"--plot: no run logged {args.metric!r}")
            from scldm_scale.eval.plots import plot_loss_overlay  # brings torch (scldm_scale.eval): on use

            plot_loss_overlay(curves, args.plot, title=f"{args.metric}, {len(runs)} runs", ylabel=args.metric)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    console = Console()
    console.print(render(columns, rows, console))
    for label, path in (("table", args.out), ("plot", args.plot)):
        if path:
            console.print(f"{label}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
