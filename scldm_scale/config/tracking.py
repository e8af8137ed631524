"""Schema of experiment tracking (MLflow). Torch-free."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(kw_only=True)
class TrackingConfig:
    uri: str = "sqlite:///mlruns.db"
    """MLflow tracking URI: a local SQLite file by default, or an http(s):// server."""
    experiment_name: str = "scldm_scale"
    """MLflow experiment."""
    log_interval_steps: int = 10
    """Log metrics every N optimizer steps."""

    def __post_init__(self) -> None:
        if self.log_interval_steps < 1:
            raise ValueError(f"tracking.log_interval_steps must be >= 1, got {self.log_interval_steps}")
