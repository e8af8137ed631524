"""Tracking without a server: the logger roles, the config checks, and MLflow on a SQLite file.

Cheapest first: config only, null / stdout loggers, then MLflow (SQLite store, one unreachable server).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from scldm_scale.config import TrackingConfig
from scldm_scale.tracking import (
    DatasetInfo,
    FanoutLogger,
    NullLogger,
    StdoutLogger,
    build_logger,
    format_metrics,
)
from tests.distributed._helpers import free_port


class _Records(logging.Handler):
    """Collects records of one logger even when the package logger does not propagate."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def mlflow_records():
    handler = _Records()
    log = logging.getLogger("scldm_scale.tracking.mlflow")
    log.addHandler(handler)
    old = log.level
    log.setLevel(logging.INFO)
    yield handler.messages
    log.removeHandler(handler)
    log.setLevel(old)


def test_config_rejects_folder_store_naming_the_key():
    with pytest.raises(ValueError, match="tracking.uri"):
        TrackingConfig(uri="./mlruns")
    with pytest.raises(ValueError, match="tracking.log_interval_steps"):
        TrackingConfig(log_interval_steps=0)
    with pytest.raises(ValueError, match="tracking.request_timeout_seconds"):
        TrackingConfig(request_timeout_seconds=0)
    TrackingConfig(uri="./anything", backend="none")  # the URI is unused without MLflow


def test_build_logger_picks_the_backend_and_keeps_the_run_id():
    lg = build_logger(TrackingConfig(backend="stdout"), run_id="abc", run_key="k")
    assert isinstance(lg, StdoutLogger) and (lg.run_id, lg.run_key) == ("abc", "k")
    off = build_logger(TrackingConfig(backend="none", enable_stdout=False), run_id="abc", run_key="k")
    assert type(off) is NullLogger and (off.run_id, off.run_key) == ("abc", "k")


def test_format_metrics_is_one_sorted_line():
    assert format_metrics({"train/loss": 1.23456, "lr": 1e-3}, 7) == "step 7 | lr 0.001 | train/loss 1.235"


def _dataset() -> DatasetInfo:
    return DatasetInfo(
        name="demo",
        uri="/x/demo",
        value_filter="split == 'train'",
        num_cells=123,
        digest="d" * 40,
        num_genes=50,
    )


def test_mlflow_run_roundtrip_and_resume(tmp_path, mlflow_records, new_store):
    from mlflow.tracking import MlflowClient

    from scldm_scale.tracking.mlflow import MLflowLogger

    cfg = TrackingConfig(uri=new_store(tmp_path / "m.db"), enable_system_metrics=False)
    (tmp_path / "config.yaml").write_text("a: 1\n")
    lg = build_logger(cfg, spill_dir=str(tmp_path), tags={"stage": "1"})
    assert isinstance(lg, FanoutLogger)
    lg.log_params({"train.max_steps": 5, "data.atlas_uri": "demo"})
    lg.log_metrics({"train/loss": 2.0}, step=1)
    lg.log_metrics({"train/loss": 1.0}, step=2)
    lg.log_dataset(_dataset())
    lg.log_artifact(str(tmp_path / "config.yaml"))
    lg.close()
    run_id = lg.run_id
    client = MlflowClient(cfg.uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.max_steps"] == "5" and run.data.tags["stage"] == "1"
    assert [m.value for m in client.get_metric_history(run_id, "train/loss")] == [2.0, 1.0]
    (ds,) = run.inputs.dataset_inputs
    assert json.loads(ds.dataset.profile)["num_cells"] == 123 and ds.dataset.source_type == "soma"
    assert [a.path for a in client.list_artifacts(run_id)] == ["config.yaml"]
    assert (
        Path(client.get_experiment(run.info.experiment_id).artifact_location.removeprefix("file://")).parent
        == tmp_path
    )

    resumed = MLflowLogger(cfg, run_id=run_id)
    resumed.log_params({"train.max_steps": 9, "new.key": 1})
    resumed.log_metrics({"train/loss": 0.5}, step=3)
    resumed.close()
    run = client.get_run(run_id)
    assert run.data.params["train.max_steps"] == "5" and run.data.params["new.key"] == "1"
    assert len(client.get_metric_history(run_id, "train/loss")) == 3
    assert any("params changed" in m and "train.max_steps" in m for m in mlflow_records)
    assert len(client.search_runs([run.info.experiment_id])) == 1


def test_unreachable_server_keeps_records_and_next_job_sends_them(tmp_path, mlflow_records, new_store):
    from mlflow.tracking import MlflowClient

    from scldm_scale.tracking.mlflow import PENDING_FILE, MLflowLogger

    down = TrackingConfig(
        uri=f"http://127.0.0.1:{free_port()}",
        request_timeout_seconds=1,
        request_max_retries=0,
        enable_system_metrics=False,
    )
    lg = MLflowLogger(down, spill_dir=str(tmp_path))
    lg.log_params({"a": 1})
    for step in range(3):
        lg.log_metrics({"train/loss": float(step)}, step=step)
    lg.close()
    assert lg.run_id is None
    assert sum("unreachable" in m for m in mlflow_records) == 2  # once when it failed, once at close
    assert len((tmp_path / PENDING_FILE).read_text().splitlines()) == 5  # params, 3 metrics, end

    up = TrackingConfig(uri=new_store(tmp_path / "m.db"), enable_system_metrics=False)
    lg = MLflowLogger(up, spill_dir=str(tmp_path))
    lg.close()
    assert not (tmp_path / PENDING_FILE).exists()
    client = MlflowClient(up.uri)
    assert [m.step for m in client.get_metric_history(lg.run_id, "train/loss")] == [0, 1, 2]
    assert client.get_run(lg.run_id).data.params == {"a": "1"}
