"""Schema of experiment tracking (MLflow). Torch-free."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

_URI_SCHEMES = ("sqlite:///", "http://", "https://", "databricks", "postgresql", "mysql", "mssql")


@dataclass(kw_only=True)
class TrackingConfig:
    backend: Literal["mlflow", "stdout", "none"] = "mlflow"
    """Where rank 0 sends params and metrics: MLflow, text log lines only, or nowhere."""
    uri: str = "sqlite:///mlruns.db"
    """MLflow tracking URI: a local SQLite file by default, or an http(s):// server."""
    experiment_name: str = "scldm_scale"
    """MLflow experiment."""
    run_name: str | None = None
    """Name of a new MLflow run (a resumed run keeps its own); None = `<stage>-<preset>-<YYYYmmdd-HHMMSS>`.

    The preset is the basename of `train.run_dir` without a leading `<stage>-`: `runs/vae-demo` ->
    `vae-demo-20261203-071200`, `runs/my_vae` -> `vae-my_vae-20261203-071200` (local time at start)."""
    artifact_location: str | None = None
    """Artifact root for a new experiment; None = `mlartifacts/` beside a SQLite file, else the server's."""
    log_interval_steps: int = 10
    """Log metrics every N optimizer steps."""
    enable_system_metrics: bool = True
    """Log MLflow system metrics (CPU, memory, disk, network, GPU) from a background thread on rank 0."""
    system_metrics_interval_seconds: float = 10.0
    """Sampling interval of the system metrics."""
    enable_stdout: bool = True
    """Also write each metrics record as a log line on rank 0 (progress)."""
    enable_plots: bool = True
    """Write PNG plots (loss curves; stage 2: generated vs real cells) to run_dir and log them as artifacts."""
    request_timeout_seconds: float = 5.0
    """HTTP timeout per MLflow request, so an unreachable server stalls training briefly, not for minutes."""
    request_max_retries: int = 1
    """HTTP retries per MLflow request."""
    retry_interval_seconds: float = 30.0
    """After a failed MLflow call, queue records (also in run_dir/mlflow_pending.jsonl); retry after this."""

    def __post_init__(self) -> None:
        if self.log_interval_steps < 1:
            raise ValueError(f"tracking.log_interval_steps must be >= 1, got {self.log_interval_steps}")
        if self.backend == "mlflow" and not self.uri.startswith(_URI_SCHEMES):
            raise ValueError(
                f"tracking.uri must be sqlite:///<file> or an http(s):// MLflow server, got {self.uri!r} "
                "(MLflow 3 refuses plain-folder stores)"
            )
        for key in ("system_metrics_interval_seconds", "request_timeout_seconds"):
            if getattr(self, key) <= 0:
                raise ValueError(f"tracking.{key} must be > 0, got {getattr(self, key)}")
        if self.request_max_retries < 0:
            raise ValueError(f"tracking.request_max_retries must be >= 0, got {self.request_max_retries}")
        if self.retry_interval_seconds < 0:
            raise ValueError(
                f"tracking.retry_interval_seconds must be >= 0, got {self.retry_interval_seconds}"
            )
