"""Read finished (or running) MLflow runs back to compare them, and name new runs meaningfully.

Queries only: nothing here writes to a run. mlflow is imported inside the functions that query (it takes
seconds to import), so `default_run_name` and the table helpers stay cheap for every entry point.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

STAGE_TAG = "scldm.stage"
"""Run tag: the stage that wrote the run (`vae`, `ldm`, `eval`)."""
MISSING = "-"
"""Table cell of a value a run does not have."""
LOSS_PREFIXES = ("train/loss", "train/nll", "val/")
"""Metrics shown as final losses in the comparison table."""
THROUGHPUT_KEYS = ("sys/cells_per_second", "sys/step_time")
"""Throughput metrics of the table (`sys/step_time` only when some run logged it)."""
TABLE_SUFFIXES = (".csv", ".md")
"""File types `write_table` writes."""
_EPOCH = datetime.fromtimestamp(0, tz=timezone.utc)


def default_run_name(stage: str, run_dir: str, now: datetime | None = None) -> str:
    """`<stage>-<preset>-<YYYYmmdd-HHMMSS>`: the run_dir's basename without a leading `<stage>-`.

    `("vae", "runs/vae-demo")` -> `vae-demo-20261203-071200`; `("vae", "runs/my_vae")` ->
    `vae-my_vae-20261203-071200`. An empty run_dir gives `<stage>-<time>`.

    Args:
        stage: `vae`, `ldm`, `eval`, ...
        run_dir: the job's run folder (only its basename is used).
        now: the time stamped into the name; None = the local time now.
    """
    stage = stage or "run"
    preset = Path(run_dir).resolve().name if run_dir else ""
    preset = "" if preset == stage else preset.removeprefix(f"{stage}-")
    stamp = (now or datetime.now()).strftime("%Y%m%d-%H%M%S")
    return "-".join(p for p in (stage, preset, stamp) if p)


@dataclass
class RunSummary:
    """What the comparison needs of one MLflow run."""

    run_id: str
    """MLflow run id (32 hex digits)."""
    name: str
    """MLflow run name."""
    status: str
    """RUNNING, FINISHED, FAILED or KILLED."""
    start_time: datetime | None
    """When the run was opened (UTC); None when MLflow has no start time."""
    stage: str
    """The `scldm.stage` tag; empty when the run has none."""
    params: dict[str, str] = field(default_factory=dict)
    """Every logged param."""
    metrics: dict[str, float] = field(default_factory=dict)
    """Last value of every logged metric."""
    tags: dict[str, str] = field(default_factory=dict)
    """Every tag (MLflow's own `mlflow.*` ones included)."""


def _client(uri: str) -> MlflowClient:
    """A client of `uri`; a SQLite file that does not exist is an error (MLflow would create it)."""
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).exists():
        raise ValueError(f"no MLflow store at {uri!r} (the file does not exist)")
    # A query tool should not hang for minutes on an unreachable server; the user's settings win.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    from mlflow.tracking import MlflowClient  # slow to import: only when a query is made

    return MlflowClient(tracking_uri=uri)


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


def _get_run(client: MlflowClient, uri: str, run_id: str) -> Any:
    try:
        return client.get_run(run_id)
    except Exception as exc:  # noqa: BLE001 - every lookup failure becomes one message naming the run
        raise ValueError(f"no run {run_id!r} at {uri!r} ({_first_line(exc)})") from exc


def _experiment_id(client: MlflowClient, uri: str, experiment: str) -> str:
    try:
        exp = client.get_experiment_by_name(experiment)
    except Exception as exc:  # noqa: BLE001 - an unreachable store is reported as a bad --uri
        raise ValueError(f"cannot read experiment {experiment!r} at {uri!r} ({_first_line(exc)})") from exc
    if exp is None or exp.lifecycle_stage == "deleted":
        raise ValueError(f"no experiment {experiment!r} at {uri!r}")
    return exp.experiment_id


def _summary(run: Any) -> RunSummary:
    info, data = run.info, run.data
    start = datetime.fromtimestamp(info.start_time / 1000, tz=timezone.utc) if info.start_time else None
    return RunSummary(
        run_id=info.run_id,
        name=info.run_name or "",
        status=info.status,
        start_time=start,
        stage=data.tags.get(STAGE_TAG, ""),
        params=dict(data.params),
        metrics=dict(data.metrics),
        tags=dict(data.tags),
    )


def find_runs(
    uri: str, run_ids: list[str] | None = None, experiment: str | None = None, max_runs: int = 50
) -> list[RunSummary]:
    """The runs to compare: the given ids (in that order), else the latest runs of an experiment.

    Args:
        uri: MLflow tracking URI (`sqlite:///mlruns.db`, `http://host:5000`).
        run_ids: runs to fetch; with `experiment` too, each must belong to it.
        experiment: experiment name; used alone, its `max_runs` most recent runs, oldest first.
        max_runs: most runs returned from an experiment.

    Raises:
        ValueError: a run id or experiment that is not at `uri` (the message names both), an
            experiment without runs, neither run ids nor experiment, or `max_runs < 1`.
    """
    if max_runs < 1:
        raise ValueError(f"max_runs must be >= 1, got {max_runs}")
    if not run_ids and not experiment:
        raise ValueError("give run ids or an experiment name")
    client = _client(uri)
    exp_id = _experiment_id(client, uri, experiment) if experiment else None
    if run_ids:
        runs = [_get_run(client, uri, rid) for rid in dict.fromkeys(run_ids)]
        for run in runs:
            if exp_id is not None and run.info.experiment_id != exp_id:
                raise ValueError(f"run {run.info.run_id!r} at {uri!r} is not in experiment {experiment!r}")
        return [_summary(r) for r in runs]
    try:
        found = client.search_runs(
            [exp_id], max_results=max_runs, order_by=["attributes.start_time DESC", "attributes.run_id"]
        )
    except Exception as exc:  # noqa: BLE001 - reported as one line naming the store
        raise ValueError(f"cannot list runs of {experiment!r} at {uri!r} ({_first_line(exc)})") from exc
    if not found:
        raise ValueError(f"experiment {experiment!r} at {uri!r} has no runs")
    return sorted((_summary(r) for r in found), key=lambda s: (s.start_time or _EPOCH, s.run_id))


def metric_history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    """Every logged value of one metric of one run as `[(step, value), ...]`, by step (empty if never logged).

    Raises:
        ValueError: the run is not at `uri`.
    """
    client = _client(uri)
    _get_run(client, uri, run_id)
    points = sorted(client.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp))
    return [(int(m.step), float(m.value)) for m in points]


def _format(value: float | str | None) -> str:
    if value is None:
        return MISSING
    if isinstance(value, str):
        return value
    if value != value or abs(value) == float("inf"):  # NaN / inf print as such
        return str(value)
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return f"{value:.1f}" if abs(value) >= 1000 else f"{value:.4g}"


def comparison_table(runs: list[RunSummary]) -> tuple[list[str], list[list[str]]]:
    """One row per run: who it is, the params that differ, final losses, throughput, `eval/*` scores.

    Columns: `name`, `run_id` (first 8 characters), `stage`, `status`, then `param:<key>` for each param that
    at least two runs have and whose value differs between runs (a param of one run only, e.g. of another
    stage, says nothing in a comparison), the last value of each `train/loss*`, `train/nll*` and `val/*`
    metric, `sys/cells_per_second` (and `sys/step_time` when logged), and every `eval/*` metric (means; the
    `_std` companions stay in MLflow).
    Keys are sorted within each group; a value a run does not have is `-`.

    Returns:
        (column names, rows of strings).
    """
    param_keys = sorted({k for r in runs for k in r.params})
    differing = [
        k for k in param_keys
        if sum(k in r.params for r in runs) >= 2 and len({r.params.get(k) for r in runs}) > 1
    ]
    metric_keys = sorted({k for r in runs for k in r.metrics})
    losses = [k for k in metric_keys if k.startswith(LOSS_PREFIXES)]
    throughput = [k for k in THROUGHPUT_KEYS if k == THROUGHPUT_KEYS[0] or k in metric_keys]
    scores = [k for k in metric_keys if k.startswith("eval/") and not k.endswith("_std")]
    columns = ["name", "run_id", "stage", "status", *(f"param:{k}" for k in differing)]
    columns += [*losses, *throughput, *scores]
    rows = []
    for r in runs:
        row = [r.name or MISSING, r.run_id[:8], r.stage or MISSING, r.status]
        row += [_format(r.params.get(k)) for k in differing]
        row += [_format(r.metrics.get(k)) for k in (*losses, *throughput, *scores)]
        rows.append(row)
    return columns, rows


def _markdown_cell(text: str) -> str:
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def write_table(columns: list[str], rows: list[list[str]], path: str | Path) -> Path:
    """Write the table as CSV (`.csv`) or a Markdown pipe table (`.md`).

    Raises:
        ValueError: any other file suffix.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in TABLE_SUFFIXES:
        raise ValueError(f"table file must end with .csv or .md, got {str(path)!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".csv":
        with path.open("w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(columns)
            writer.writerows(rows)
        return path
    lines = [columns, ["---"] * len(columns), *rows]
    path.write_text("".join("| " + " | ".join(map(_markdown_cell, line)) + " |\n" for line in lines))
    return path
