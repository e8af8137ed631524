"""`launchers/compare.py` on a real SQLite MLflow store: as users run it (a subprocess), and its error lines."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from scldm_scale.config import TrackingConfig
from scldm_scale.tracking import build_logger
from tests.integration._launch import COMPARE, REPO


def _log_run(root: Path, preset: str, lr: str, losses: list[float]) -> str:
    cfg = TrackingConfig(
        uri=f"sqlite:///{root / 'mlruns.db'}", enable_system_metrics=False, enable_stdout=False
    )
    tracker = build_logger(cfg, spill_dir=str(root / "runs" / preset), tags={"scldm.stage": "vae"})
    tracker.log_params({"optim.lr": lr, "train.seed": 0})
    for step, loss in enumerate(losses):
        tracker.log_metrics({"train/loss": loss, "sys/cells_per_second": 500.0}, step=step)
    tracker.log_metrics({"eval/fd": 100.0 + len(losses)}, step=len(losses))
    tracker.close()
    return tracker.run_id


def _compare_module():
    """The launcher as a module, to check its error paths in-process (mlflow is imported already)."""
    spec = importlib.util.spec_from_file_location("compare_launcher", COMPARE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> tuple[Path, list[str]]:
    """Two runs of experiment scldm_scale in `<root>/mlruns.db`, written by the project's own logger."""
    root = tmp_path_factory.mktemp("compare")
    return root, [
        _log_run(root, "vae-a", "0.001", [2.0, 1.0, 0.5]),
        _log_run(root, "vae-b", "0.01", [3.0, 2.5]),
    ]


def test_compare_prints_the_table_writes_it_and_plots(store):
    tmp_path, ids = store
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    env["COLUMNS"] = "200"
    # Defaults: --uri sqlite:///mlruns.db in the working directory, experiment scldm_scale.
    cmd = [sys.executable, COMPARE, "--out", "x.md", "--plot", "y.png"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)

    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "y.png").read_bytes()[:4] == b"\x89PNG"
    for run_id in ids:
        assert run_id[:8] in proc.stdout
    assert "vae-a-" in proc.stdout and "param:optim.lr" in proc.stdout and "eval/fd" in proc.stdout
    md = (tmp_path / "x.md").read_text().splitlines()
    assert len(md) == 4 and md[0].startswith("| name | run_id | stage | status | param:optim.lr | train/loss")
    assert "| 0.5 |" in md[2] and "| 2.5 |" in md[3]


def test_compare_errors_are_one_line_and_exit_2(store, capsys):
    uri = f"sqlite:///{store[0] / 'mlruns.db'}"
    compare = _compare_module()
    cases = {
        ("deadbeef", "--uri", uri): f"error: no run 'deadbeef' at '{uri}'",
        ("--experiment", "empty", "--uri", uri): "error: no experiment 'empty'",
        ("--uri", uri, "--out", str(store[0] / "t.txt")): "error: table file must end with .csv or .md",
        ("--uri", uri, "--plot", "p.png", "--metric", "nope"): "error: --plot: no run logged 'nope'",
    }
    for argv, message in cases.items():
        assert compare.main(list(argv)) == 2
        captured = capsys.readouterr()
        assert captured.out == "" and captured.err.count("\n") == 1 and captured.err.startswith(message)
