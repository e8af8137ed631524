"""Experiment tracking: the `MetricLogger` role, a null and a stdout logger, and MLflow (rank 0 only).

`tracking/mlflow.py` is the only module that imports mlflow; it is imported lazily by `build_logger`.
"""

from scldm_scale.tracking.base import (
    CHECKPOINT_TAG,
    RUN_DIR_TAG,
    DatasetInfo,
    FanoutLogger,
    MemoryLogger,
    MetricLogger,
    NullLogger,
    StdoutLogger,
    build_logger,
    format_metrics,
    get_run_tags,
)

__all__ = [
    "CHECKPOINT_TAG",
    "RUN_DIR_TAG",
    "DatasetInfo",
    "FanoutLogger",
    "MemoryLogger",
    "MetricLogger",
    "NullLogger",
    "StdoutLogger",
    "build_logger",
    "format_metrics",
    "get_run_tags",
]
