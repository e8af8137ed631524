"""`build_logger`, the one place that picks a logger, and `get_run_tags`.

These are the package's doors to `tracking/mlflow.py`: mlflow is slow to import, so that module is imported
only inside them, when MLflow is configured or asked. `tracking/base.py` (the roles and the server-free loggers) never imports it.
"""

from __future__ import annotations

from scldm_scale.config.tracking import TrackingConfig
from scldm_scale.tracking.base import FanoutLogger, MetricLogger, NullLogger, StdoutLogger


def build_logger(
    cfg: TrackingConfig,
    *,
    run_id: str | None = None,
    run_key: str | None = None,
    spill_dir: str | None = None,
    tags: dict[str, str] | None = None,
) -> MetricLogger:
    """The logger of the process that records the run (rank 0): the configured backend(s).

    Other ranks do not call this: they hold `NullLogger(run_id, run_key)` with rank 0's values (broadcast
    them, as `scldm_scale.train.run.open_tracker` does).

    Args:
        cfg: the `tracking` config section.
        run_id: an existing MLflow run to continue (resume); None = the run tagged with `run_key`, created
            (with that tag) when none is, possibly later, once the server answers.
        run_key: the client-side identity of the run (tag `scldm.run_key`), e.g. `uuid4().hex` drawn by a
            new job and kept in its checkpoints; None = the key of the records left in `spill_dir`, else a
            new one.
        spill_dir: folder (the run_dir) where records that could not reach the server are kept
            and picked up again by the next job continuing the run.
        tags: tags set when the run is opened.

    Returns:
        A `MetricLogger` whose `run_id` may stay None until the server answers and whose `run_key` is the one
        in use (`NullLogger` when no backend is configured).
    """
    loggers: list[MetricLogger] = [StdoutLogger(run_id, run_key)] if cfg.enable_stdout else []
    if cfg.backend == "mlflow":
        from scldm_scale.tracking.mlflow import MLflowLogger  # mlflow is slow to import; rank 0 only

        loggers.append(MLflowLogger(cfg, run_id=run_id, run_key=run_key, spill_dir=spill_dir, tags=tags))
    elif cfg.backend == "stdout" and not cfg.enable_stdout:
        loggers.append(StdoutLogger(run_id, run_key))
    if not loggers:
        return NullLogger(run_id, run_key)
    return loggers[0] if len(loggers) == 1 else FanoutLogger(loggers)


def get_run_tags(cfg: TrackingConfig, run_id: str) -> dict[str, str]:
    """Tags of an existing MLflow run at `cfg.uri` (e.g. a stage-1 run's `RUN_DIR_TAG`, `CHECKPOINT_TAG`).

    Raises:
        ValueError: naming `stage1.mlflow_run_id` when the run cannot be found.
    """
    from scldm_scale.tracking.mlflow import run_tags  # mlflow is slow to import; only when asked

    return run_tags(cfg, run_id)
