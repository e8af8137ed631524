"""MLflow durability against a real `mlflow server` that is down at start, SIGKILLed mid-run and restarted.

One server process per module (SQLite store under a temp dir, fixed port so that a restart keeps the URI),
started, killed and restarted by the tests themselves. The offline-start test runs first, while the server is
still down, so the module starts the server only twice (each start takes seconds).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from scldm_scale.config import TrackingConfig
from scldm_scale.tracking import RUN_KEY_TAG, build_logger
from tests.distributed._helpers import free_port

pytestmark = [pytest.mark.integration]

mlflow = pytest.importorskip("mlflow")


class MlflowServerProcess:
    """`mlflow server` on 127.0.0.1:`port` with the SQLite store `root/server.db`; start, SIGKILL, restart."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self) -> None:
        """Start the server in its own process group (returns at once; see `wait_ready`)."""
        assert self.proc is None, "already running"
        cmd = [
            sys.executable, "-m", "mlflow", "server",
            "--host", "127.0.0.1",
            "--port", str(self.port),
            "--workers", "1",
            "--backend-store-uri", f"sqlite:///{self.root}/server.db",
            "--artifacts-destination", str(self.root / "artifacts"),
        ]  # fmt: skip
        self.starts += 1
        log = open(self.root / f"server-{self.starts}.log", "w")  # noqa: SIM115 - the child holds it
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no job runner: faster start
        self.proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        log.close()

    def ready(self) -> bool:
        """True when /health answers 200."""
        try:
            with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as resp:
                return resp.status == 200
        except OSError:
            return False

    def wait_ready(self, timeout: float = 150) -> None:
        """Block until /health answers (raise when the server died or is too slow)."""
        deadline = time.monotonic() + timeout
        while not self.ready():
            assert self.proc is not None
            if self.proc.poll() is not None:
                log = (self.root / f"server-{self.starts}.log").read_text()[-2000:]
                raise RuntimeError(f"mlflow server exited with {self.proc.returncode}:\n{log}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"mlflow server at {self.uri} not ready after {timeout} s")
            time.sleep(0.25)

    def kill(self) -> None:
        """SIGKILL the server and its workers (its whole process group), as a crash would."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=30)
        self.proc = None


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The module's server, not started yet; killed at the end whatever state the tests left it in."""
    srv = MlflowServerProcess(tmp_path_factory.mktemp("mlflow_server"))
    yield srv
    srv.kill()


def _cfg(uri: str, experiment: str) -> TrackingConfig:
    return TrackingConfig(
        uri=uri,
        experiment_name=experiment,
        request_timeout_seconds=2,
        request_max_retries=0,
        retry_interval_seconds=0.2,
        enable_system_metrics=False,
        enable_stdout=False,
    )


def _only_run(uri: str, experiment: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert len(runs) == 1, [r.info.run_id for r in runs]
    return client, runs[0]


def test_a_job_started_while_the_server_is_down_and_its_resume_share_one_run(server, tmp_path):
    server.kill()  # down at start (the first test of the module: not started yet)
    run_key, cfg = uuid.uuid4().hex, _cfg(server.uri, "offline-start")
    first = build_logger(cfg, run_key=run_key, spill_dir=str(tmp_path), tags={"scldm.stage": "vae"})
    first.log_params({"train.max_steps": 10})
    for step in range(1, 6):
        first.log_metrics({"train/loss": 1.0 / step}, step=step)
    first.close("KILLED")
    assert first.run_id is None and (tmp_path / "mlflow_pending.jsonl").exists()

    server.start()
    server.wait_ready()
    resumed = build_logger(cfg, run_id=None, run_key=run_key, spill_dir=str(tmp_path))
    for step in range(6, 11):
        resumed.log_metrics({"train/loss": 1.0 / step}, step=step)
    resumed.close()

    client, run = _only_run(server.uri, "offline-start")
    assert run.info.run_id == resumed.run_id and run.data.tags[RUN_KEY_TAG] == run_key
    assert run.data.tags["scldm.stage"] == "vae" and run.data.params == {"train.max_steps": "10"}
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert sorted(steps) == list(range(1, 11))
    assert run.info.status == "FINISHED" and not (tmp_path / "mlflow_pending.jsonl").exists()


def test_metrics_logged_across_a_server_crash_and_restart_are_stored_once(server, tmp_path):
    if server.proc is None:
        server.start()
    server.wait_ready()
    cfg = _cfg(server.uri, "server-crash")
    lg = build_logger(cfg, run_key=uuid.uuid4().hex, spill_dir=str(tmp_path))
    spill = tmp_path / "mlflow_pending.jsonl"
    step = 0

    def log_some(n: int, pause: float = 0.0) -> None:
        nonlocal step
        for _ in range(n):
            step += 1
            lg.log_metrics({"train/loss": 1.0 / step, "train/lr": 1e-3}, step=step)
            time.sleep(pause)

    log_some(20)
    killer = threading.Timer(0.2, server.kill)  # lands at any point, possibly mid-request
    killer.start()
    log_some(30, pause=0.02)
    killer.join()
    log_some(10)  # the server is down now: records go to the spill file at once
    assert spill.exists() and lg.run_id is not None

    server.start()
    while not server.ready():  # training goes on while the server restarts
        log_some(1, pause=0.25)
        assert server.proc.poll() is None, "mlflow server died on restart"
    log_some(10)
    assert not spill.exists(), "the spill file goes once the server stored everything"
    lg.close()

    client, run = _only_run(server.uri, "server-crash")
    for key in ("train/loss", "train/lr"):
        steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
        assert sorted(steps) == list(range(1, step + 1)), key
    assert run.info.status == "FINISHED"


def test_the_launcher_started_with_the_server_down_resumes_into_one_run(server, demo_atlas, tmp_path):
    """End to end: train 4 steps while the server is down, start it, resume to 8: one run, steps 1..8 once each."""
    from tests.integration._launch import SMALL_DATA, VAE, VAE_DEBUG, launch_env, run

    server.kill()
    run_dir = tmp_path / "run"
    cmd = [
        sys.executable, VAE, "--config", VAE_DEBUG, *SMALL_DATA,
        f"train.run_dir={run_dir}", f"tracking.uri={server.uri}", "tracking.experiment_name=launcher-offline",
        "tracking.log_interval_steps=1", "tracking.request_timeout_seconds=1", "tracking.request_max_retries=0",
        "tracking.retry_interval_seconds=0.5", "tracking.enable_system_metrics=false", "tracking.enable_plots=false",
        "checkpoint.interval_steps=2",
    ]
    env = launch_env(demo_atlas)
    run([*cmd, "train.max_steps=4"], env, cwd=tmp_path)
    assert (run_dir / "mlflow_pending.jsonl").exists()
    server.start()
    server.wait_ready()
    run([*cmd, "train.max_steps=8"], env, cwd=tmp_path)
    client, only = _only_run(server.uri, "launcher-offline")
    steps = [m.step for m in client.get_metric_history(only.info.run_id, "train/loss")]
    assert sorted(steps) == list(range(1, 9))
    assert only.info.status == "FINISHED" and not (run_dir / "mlflow_pending.jsonl").exists()
