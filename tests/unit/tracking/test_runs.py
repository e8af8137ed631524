"""Reading runs back to compare them, and run names: real MLflow on a SQLite file, no mocks.

Cheapest first: names and table files (no mlflow), then queries of a store written by `build_logger`.
"""

from __future__ import annotations

import csv
import dataclasses
import random
import shutil
from datetime import datetime
from pathlib import Path

import pytest

from scldm_scale.config import TrackingConfig
from scldm_scale.tracking import (
    RunSummary,
    build_logger,
    comparison_table,
    default_run_name,
    find_runs,
    metric_history,
    write_table,
)

NOW = datetime(2026, 12, 3, 7, 12, 0)


@pytest.mark.parametrize(
    ("stage", "run_dir", "expected"),
    [
        ("vae", "runs/vae-demo", "vae-demo-20261203-071200"),
        ("vae", "runs/my_vae", "vae-my_vae-20261203-071200"),
        ("ldm", "/shared/runs/ldm-base/", "ldm-base-20261203-071200"),
        ("eval", "runs/ldm-demo", "eval-ldm-demo-20261203-071200"),
        ("vae", "runs/vae", "vae-20261203-071200"),
        ("ldm", "", "ldm-20261203-071200"),
    ],
)
def test_default_run_name(stage, run_dir, expected):
    assert default_run_name(stage, run_dir, now=NOW) == expected


def _summary(
    run_id: str, params: dict[str, str], metrics: dict[str, float], stage: str = "vae"
) -> RunSummary:
    return RunSummary(run_id, f"{stage}-{run_id}", "FINISHED", None, stage, params, metrics, {})


def test_comparison_table_keeps_differing_params_and_the_table_files_parse_back(tmp_path: Path):
    runs = [
        _summary(
            "a" * 32, {"lr": "0.001", "seed": "0", "x|y": "2"}, {"train/loss": 1.5, "sys/cells_per_second": 12345.6}
        ),
        _summary("b" * 32, {"lr": "0.0001", "seed": "0", "x|y": "1", "only_b": "7"},
                 {"train/loss": 0.25, "eval/fd": 138.0, "eval/fd_std": 0.5}),
    ]
    columns, rows = comparison_table(runs)
    assert columns == [
        "name", "run_id", "stage", "status", "param:lr", "param:x|y",
        "train/loss", "sys/cells_per_second", "eval/fd",
    ]  # fmt: skip  (only_b: one run has it; eval/fd_std: means only)
    assert rows[0] == ["vae-" + "a" * 32, "a" * 8, "vae", "FINISHED", "0.001", "2", "1.5", "12345.6", "-"]
    assert rows[1][4:] == ["0.0001", "1", "0.25", "-", "138"]

    with write_table(columns, rows, tmp_path / "t.csv").open(newline="") as fh:
        assert list(csv.reader(fh)) == [columns, *rows]
    lines = write_table(columns, rows, tmp_path / "sub" / "t.md").read_text().splitlines()
    parsed = [[c.strip().replace("\\|", "|") for c in line.strip("|").split(" | ")] for line in lines]
    assert parsed[0] == columns and set(parsed[1]) == {"---"} and parsed[2:] == rows
    with pytest.raises(ValueError, match=r"\.csv or \.md.*t\.txt"):
        write_table(columns, rows, tmp_path / "t.txt")


# ---- a real store: three runs written through the project's own logger
def _log_run(
    uri: str, run_dir: Path, experiment: str, stage: str, lr: str, losses: list[float], **extra
) -> str:
    cfg = TrackingConfig(
        uri=uri, experiment_name=experiment, enable_system_metrics=False, enable_stdout=False
    )
    tracker = build_logger(cfg, spill_dir=str(run_dir), tags={"scldm.stage": stage})
    tracker.log_params({"optim.lr": lr, "train.seed": 0, "data.atlas_uri": "demo"})
    for step, loss in enumerate(losses):
        tracker.log_metrics({"train/loss": loss, "sys/cells_per_second": 1000.0 + step}, step=step * 10)
    if extra:
        tracker.log_metrics(extra, step=len(losses) * 10)
    tracker.close()
    return tracker.run_id


@pytest.fixture(scope="module")
def store(tmp_path_factory, mlflow_template_db) -> tuple[str, list[str]]:
    root = tmp_path_factory.mktemp("store")
    shutil.copy(mlflow_template_db, root / "mlruns.db")  # a migrated store (conftest.py)
    uri = f"sqlite:///{root / 'mlruns.db'}"
    random.seed(0)  # as seed_everything does before the tracker opens: names must not come from it
    ids = [
        _log_run(uri, root / "runs" / "vae-demo", "exp", "vae", "0.001", [2.0, 1.5, 1.2]),
        _log_run(uri, root / "runs" / "my_vae", "exp", "vae", "0.0003", [2.1, 1.4, 0.9]),
        _log_run(uri, root / "runs" / "ldm-demo", "other", "ldm", "0.0001", [1.0, 0.8], **{"eval/fd": 138.0}),
    ]
    return uri, ids


def test_new_runs_get_meaningful_names_not_mlflows_random_ones(store, tmp_path: Path):
    uri, ids = store
    names = [r.name for r in find_runs(uri, ids)]
    assert names[0].startswith("vae-demo-2") and names[1].startswith("vae-my_vae-2")
    assert names[2].startswith("ldm-demo-2")
    # tracking.run_name wins for a new run; a resumed run keeps the name it was given
    cfg = TrackingConfig(uri=uri, experiment_name="named", enable_system_metrics=False, enable_stdout=False)
    named = build_logger(dataclasses.replace(cfg, run_name="mine"), tags={"scldm.stage": "vae"})
    named.close()
    resumed = build_logger(cfg, run_id=ids[0], spill_dir=str(tmp_path / "vae-other"))
    resumed.close()
    assert [r.name for r in find_runs(uri, [named.run_id, ids[0]])] == ["mine", names[0]]


def test_find_runs_by_id_and_by_experiment(store):
    uri, ids = store
    by_id = find_runs(uri, [ids[2], ids[0], ids[2]])
    assert [r.run_id for r in by_id] == [ids[2], ids[0]]
    ldm = by_id[0]
    assert (ldm.stage, ldm.status, ldm.params["optim.lr"]) == ("ldm", "FINISHED", "0.0001")
    assert ldm.metrics["train/loss"] == 0.8 and ldm.metrics["eval/fd"] == 138.0
    assert ldm.start_time is not None and ldm.tags["scldm.stage"] == "ldm"
    assert {r.run_id for r in find_runs(uri, experiment="exp")} == set(ids[:2])
    assert len(find_runs(uri, experiment="exp", max_runs=1)) == 1
    assert metric_history(uri, ids[1], "train/loss") == [(0, 2.1), (10, 1.4), (20, 0.9)]
    assert metric_history(uri, ids[1], "never/logged") == []


def test_find_runs_errors_name_the_run_or_experiment_and_the_uri(store, tmp_path: Path):
    uri, ids = store
    with pytest.raises(ValueError, match=rf"no run 'deadbeef' at '{uri}'"):
        find_runs(uri, ["deadbeef"])
    with pytest.raises(ValueError, match=rf"no experiment 'nope' at '{uri}'"):
        find_runs(uri, experiment="nope")
    with pytest.raises(ValueError, match="not in experiment 'exp'"):
        find_runs(uri, [ids[2]], experiment="exp")
    with pytest.raises(ValueError, match="no run 'deadbeef'"):
        metric_history(uri, "deadbeef", "train/loss")
    missing = f"sqlite:///{tmp_path / 'absent.db'}"
    with pytest.raises(ValueError, match="no MLflow store"):
        find_runs(missing, experiment="exp")
    assert not (tmp_path / "absent.db").exists()


def test_comparison_table_of_real_runs(store):
    uri, ids = store
    columns, rows = comparison_table(find_runs(uri, ids))
    assert [c for c in columns if c.startswith("param:")] == ["param:optim.lr"]  # seed, atlas identical
    assert columns[-3:] == ["train/loss", "sys/cells_per_second", "eval/fd"]
    assert [row[columns.index("train/loss")] for row in rows] == ["1.2", "0.9", "0.8"]
    assert [row[-1] for row in rows] == ["-", "-", "138"]
    assert [row[1] for row in rows] == [i[:8] for i in ids]
