"""Helpers for launcher tests: the environment, subprocess runs with a timeout, a real `mlflow server`."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from tests.distributed._helpers import free_port

REPO = Path(__file__).resolve().parents[2]
VAE = str(REPO / "launchers" / "train_vae.py")
LDM = str(REPO / "launchers" / "train_ldm.py")
GENERATE = str(REPO / "launchers" / "generate.py")
EVALUATE = str(REPO / "launchers" / "evaluate.py")
COMPARE = str(REPO / "launchers" / "compare.py")
VAE_DEBUG = str(REPO / "configs" / "vae" / "debug.yaml")
LDM_DEBUG = str(REPO / "configs" / "ldm" / "debug.yaml")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]

# The two small datasets of the demo atlas and a short vocabulary: launcher runs of a few seconds each.
SMALL_DATA = [
    "data.value_filter=split == 'train' and dataset_id != 'brain10k'",
    "data.val_value_filter=split == 'val' and dataset_id != 'brain10k'",
    "data.min_gene_cells=300",
    "data.seed=0",
    "train.enable_progress_bar=false",
]


def launch_env(demo_atlas: str) -> dict[str, str]:
    """Child environment: CPU DeepSpeed, one thread per rank, the session's demo atlas."""
    env = dict(os.environ)
    env.update(
        DS_ACCELERATOR="cpu",
        OMP_NUM_THREADS="1",
        SCLDM_SCALE_DEMO_ATLAS=demo_atlas,
        PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]),
    )
    return env


def run(
    cmd: list[str],
    env: dict[str, str],
    cwd: Path | str | None = None,
    timeout: float = 240,
    check: bool = True,
) -> subprocess.CompletedProcess:
    """Run a launcher command; on failure (when `check`) raise with the tail of its output."""
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
        )
    return proc


class MlflowServer:
    """`mlflow server` on 127.0.0.1 with a SQLite store under `root`; started in the background."""

    def __init__(self, root: Path) -> None:
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.log = open(root / "mlflow_server.log", "w")  # noqa: SIM115 - closed in stop()
        cmd = [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{root}/server.db",
            "--artifacts-destination",
            str(root / "server_artifacts"),
        ]
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, timeout: float = 120) -> None:
        """Block until /health answers."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {self.proc.returncode}")
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        raise TimeoutError(f"mlflow server at {self.uri} not ready after {timeout} s")

    def stop(self) -> None:
        """Terminate the server and its workers (its own process group)."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, 15)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
        self.log.close()
