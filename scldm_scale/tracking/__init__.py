"""Experiment tracking: the `MetricLogger` role, a null and a stdout logger, MLflow (rank 0 only, durable
across server outages and job restarts: docs/tracking.md), run names, and read-only queries that compare
runs (`find_runs`, `comparison_table`, `write_table`).

Modules: `base` (the roles, the null / stdout / memory / fan-out loggers, run tags), `factory` (`build_logger`,
`get_run_tags`), `mlflow` (the MLflow logger), `spill` (its on-disk queue), `runs` (names, queries, tables).
mlflow is imported lazily: `tracking/mlflow.py` by `build_logger` and `get_run_tags`, and inside the query
functions of `tracking/runs.py`, so importing this package stays cheap.
"""

from scldm_scale.tracking.base import (
    CHECKPOINT_DIGEST_TAG,
    CHECKPOINT_TAG,
    RUN_DIR_TAG,
    RUN_KEY_TAG,
    DatasetInfo,
    FanoutLogger,
    MemoryLogger,
    MetricLogger,
    NullLogger,
    StdoutLogger,
    format_metrics,
)
from scldm_scale.tracking.factory import build_logger, get_run_tags
from scldm_scale.tracking.runs import (
    STAGE_TAG,
    RunSummary,
    comparison_table,
    default_run_name,
    find_runs,
    metric_history,
    write_table,
)

__all__ = [
    "CHECKPOINT_DIGEST_TAG",
    "CHECKPOINT_TAG",
    "RUN_DIR_TAG",
    "RUN_KEY_TAG",
    "STAGE_TAG",
    "DatasetInfo",
    "FanoutLogger",
    "MemoryLogger",
    "MetricLogger",
    "NullLogger",
    "RunSummary",
    "StdoutLogger",
    "build_logger",
    "comparison_table",
    "default_run_name",
    "find_runs",
    "format_metrics",
    "get_run_tags",
    "metric_history",
    "write_table",
]
