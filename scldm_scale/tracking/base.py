"""The `MetricLogger` protocol and the loggers that need no tracking server.

Only rank 0 ever holds a real logger; every other rank holds a `NullLogger` that still knows the run id.
No mlflow import here, and no import of `tracking/mlflow.py` (which imports this module): `build_logger`
and `get_run_tags` live in `tracking/factory.py`. An import-linter contract checks it.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any, Protocol, runtime_checkable

logger = logging.getLogger(__name__)

RUN_DIR_TAG = "scldm.run_dir"
"""Run tag: the absolute run_dir (stage 2 finds stage-1 checkpoints through it)."""
CHECKPOINT_TAG = "scldm.checkpoint"
"""Run tag: the absolute path of the run's latest checkpoint."""
CHECKPOINT_DIGEST_TAG = "scldm.checkpoint_digest"
"""Run tag: sha256 of that checkpoint's meta.json (which lists every file's checksum); loads by run id check it."""
RUN_KEY_TAG = "scldm.run_key"
"""Run tag: the client-chosen run key (a resumed job finds its run by it when the run id was never known)."""


@dataclass(frozen=True)
class DatasetInfo:
    """What identifies the training data of a run (logged as an MLflow dataset input)."""

    name: str
    """Short dataset name, e.g. the atlas folder name."""
    uri: str
    """SOMA experiment URI."""
    value_filter: str | None
    """obs query selecting the training cells."""
    num_cells: int
    """Cells matched by the filter."""
    digest: str
    """Stable content digest (e.g. of the cell ids and gene vocabulary)."""
    num_genes: int | None = None
    """Gene vocabulary size."""

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form (JSON-serializable)."""
        return asdict(self)


@runtime_checkable
class MetricLogger(Protocol):
    """Role of anything that records a run: params once, metrics per step, files, one close."""

    run_id: str | None
    run_key: str | None

    def log_params(self, params: dict[str, Any]) -> None:
        """Record the (flattened) configuration and run-time values."""

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Record scalar metrics at an optimizer step."""

    def set_tags(self, tags: dict[str, str]) -> None:
        """Attach string tags (lineage, run_dir, checkpoints)."""

    def log_artifact(self, path: str, artifact_path: str | None = None) -> None:
        """Upload a local file."""

    def log_dataset(self, info: DatasetInfo, context: str = "train") -> None:
        """Record the training data as a run input."""

    def close(self, status: str = "FINISHED") -> None:
        """Flush and end the run (status FINISHED, FAILED or KILLED)."""


class NullLogger:
    """Logs nothing; the logger of non-zero ranks (it still carries the job's run id and run key)."""

    def __init__(self, run_id: str | None = None, run_key: str | None = None) -> None:
        self.run_id = run_id
        self.run_key = run_key

    def log_params(self, params: dict[str, Any]) -> None:
        """No-op."""

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """No-op."""

    def set_tags(self, tags: dict[str, str]) -> None:
        """No-op."""

    def log_artifact(self, path: str, artifact_path: str | None = None) -> None:
        """No-op."""

    def log_dataset(self, info: DatasetInfo, context: str = "train") -> None:
        """No-op."""

    def close(self, status: str = "FINISHED") -> None:
        """No-op."""


def format_metrics(metrics: dict[str, float], step: int) -> str:
    """One compact progress line: `step 10 | train/loss 1.234 | lr 1e-03`."""
    parts = [f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in sorted(metrics.items())]
    return " | ".join([f"step {step}", *parts])


class StdoutLogger(NullLogger):
    """Writes each metrics record as one INFO log line (progress on rank 0)."""

    def log_params(self, params: dict[str, Any]) -> None:
        """Log the number of params (the config itself goes to run_dir/config.yaml)."""
        logger.info("run params: %d keys", len(params))

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Log one progress line."""
        logger.info(format_metrics(metrics, step))


class MemoryLogger(NullLogger):
    """Keeps every metric as `history[name] = [(step, value), ...]` (loss-curve plots, tests)."""

    def __init__(self, run_id: str | None = None, run_key: str | None = None) -> None:
        super().__init__(run_id, run_key)
        self.history: dict[str, list[tuple[int, float]]] = {}

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Append each value."""
        for name, value in metrics.items():
            self.history.setdefault(name, []).append((int(step), float(value)))


class FanoutLogger:
    """Sends every call to several loggers (e.g. progress lines plus MLflow)."""

    def __init__(self, loggers: list[MetricLogger]) -> None:
        self.loggers = loggers

    @property
    def run_id(self) -> str | None:
        """The first run id any child knows."""
        return next((lg.run_id for lg in self.loggers if lg.run_id), None)

    @property
    def run_key(self) -> str | None:
        """The first run key any child knows."""
        return next((lg.run_key for lg in self.loggers if getattr(lg, "run_key", None)), None)

    def log_params(self, params: dict[str, Any]) -> None:
        """Forward."""
        for lg in self.loggers:
            lg.log_params(params)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Forward."""
        for lg in self.loggers:
            lg.log_metrics(metrics, step)

    def set_tags(self, tags: dict[str, str]) -> None:
        """Forward."""
        for lg in self.loggers:
            lg.set_tags(tags)

    def log_artifact(self, path: str, artifact_path: str | None = None) -> None:
        """Forward."""
        for lg in self.loggers:
            lg.log_artifact(path, artifact_path)

    def log_dataset(self, info: DatasetInfo, context: str = "train") -> None:
        """Forward."""
        for lg in self.loggers:
            lg.log_dataset(info, context)

    def close(self, status: str = "FINISHED") -> None:
        """Close every child, even if one fails."""
        for lg in self.loggers:
            try:
                lg.close(status)
            except Exception:  # noqa: BLE001 - teardown must reach every logger
                logger.exception("closing %s failed", type(lg).__name__)
