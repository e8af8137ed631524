"""MLflow durability without a server: the spill journal, idempotent replay, run keys (SQLite stores).

A store that is "down" is a SQLite URI whose parent folder is a regular file (MLflow cannot open it);
replacing that file by the store's folder is the recovery. A dead HTTP port stands for a server that never
answers.
Stores are copies of one migrated template (`new_store`, conftest.py). No part is mocked.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from scldm_scale.config import TrackingConfig
from scldm_scale.tracking import RUN_KEY_TAG, build_logger
from tests.distributed._helpers import free_port

pytest.importorskip("mlflow")

from mlflow.tracking import MlflowClient  # noqa: E402

from scldm_scale.tracking.mlflow import PENDING_FILE, MLflowLogger  # noqa: E402


def _cfg(uri: str) -> TrackingConfig:
    return TrackingConfig(
        uri=uri,
        request_timeout_seconds=1,
        request_max_retries=0,
        retry_interval_seconds=0,
        enable_system_metrics=False,
    )


def _dead() -> TrackingConfig:
    return _cfg(f"http://127.0.0.1:{free_port()}")


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _steps(client: MlflowClient, run_id: str, key: str = "loss") -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def _runs(client: MlflowClient, experiment: str = "scldm_scale") -> list:
    return client.search_runs([client.get_experiment_by_name(experiment).experiment_id])


def test_records_reach_the_spill_file_at_the_first_failed_flush(tmp_path, new_store):
    lg = MLflowLogger(_dead(), run_key="job1", spill_dir=str(tmp_path))
    lg.log_params({"a": 1})
    for step in (1, 2, 3):
        lg.log_metrics({"loss": float(step)}, step=step)
    # No close(): a hard kill here must not lose the queue.
    records = _lines(tmp_path / PENDING_FILE)
    assert [r["op"] for r in records] == ["params", "metrics", "metrics", "metrics"]
    assert {r["run_key"] for r in records} == {"job1"} and len({r["id"] for r in records}) == 4
    assert lg.run_id is None and lg.run_key == "job1"
    with (tmp_path / PENDING_FILE).open("a") as fh:
        fh.write('{"op": "metr')  # the writer was killed mid-line

    store = _cfg(new_store(tmp_path / "m.db"))
    resumed = MLflowLogger(store, run_key="job1", spill_dir=str(tmp_path))
    assert not (tmp_path / PENDING_FILE).exists()  # shrunk only once the server stored everything
    client = MlflowClient(store.uri)
    assert _steps(client, resumed.run_id) == [1, 2, 3]
    assert client.get_run(resumed.run_id).data.tags[RUN_KEY_TAG] == "job1"


def test_replaying_the_same_spill_twice_stores_every_metric_once(tmp_path, new_store):
    (tmp_path / "config.yaml").write_text("a: 1\n")
    offline = MLflowLogger(_dead(), run_key="job2", spill_dir=str(tmp_path))
    offline.log_params({"a": 1, "b": "x"})
    offline.set_tags({"t": "1"})
    offline.log_artifact(str(tmp_path / "config.yaml"))
    for step in range(1, 6):
        offline.log_metrics({"loss": float(step), "lr": 0.1}, step=step)
    offline.close()
    kept = tmp_path / "kept.jsonl"
    shutil.copy(tmp_path / PENDING_FILE, kept)

    store = _cfg(new_store(tmp_path / "m.db"))
    first = MLflowLogger(store, run_key="job2", spill_dir=str(tmp_path))
    first.close()
    # A job killed after sending but before shrinking the file: the same records are replayed again.
    shutil.copy(kept, tmp_path / PENDING_FILE)
    second = MLflowLogger(store, run_key="job2", spill_dir=str(tmp_path))
    second.close("KILLED")
    assert second.run_id == first.run_id and not (tmp_path / PENDING_FILE).exists()
    assert first.skipped_duplicates == 0 and second.skipped_duplicates == 5 * 2 + 1  # metrics, artifact
    client = MlflowClient(store.uri)
    (run,) = _runs(client)
    assert _steps(client, run.info.run_id) == [1, 2, 3, 4, 5]
    assert _steps(client, run.info.run_id, "lr") == [1, 2, 3, 4, 5]
    assert run.data.params == {"a": "1", "b": "x"} and run.data.tags["t"] == "1"
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["config.yaml"]
    assert run.info.status == "KILLED"


def test_the_run_is_created_with_its_key_when_the_store_comes_back(tmp_path, new_store):
    blocker = tmp_path / "store"
    blocker.write_text("not a folder")  # sqlite:///.../store/m.db cannot be opened while this file exists
    cfg = _cfg(f"sqlite:///{blocker}/m.db")
    lg = build_logger(cfg, run_key="job3", spill_dir=str(tmp_path / "run"), tags={"scldm.stage": "vae"})
    lg.log_metrics({"loss": 1.0}, step=1)
    assert lg.run_id is None and lg.run_key == "job3"
    assert (tmp_path / "run" / PENDING_FILE).exists()
    blocker.unlink()  # the store is back
    new_store(blocker / "m.db")
    lg.log_metrics({"loss": 2.0}, step=2)
    assert lg.run_id is not None  # known now, not at start
    assert not (tmp_path / "run" / PENDING_FILE).exists()
    lg.close()
    client = MlflowClient(cfg.uri)
    run = client.get_run(lg.run_id)
    assert run.data.tags[RUN_KEY_TAG] == "job3" and run.data.tags["scldm.stage"] == "vae"
    assert _steps(client, lg.run_id) == [1, 2] and run.info.status == "FINISHED"


def test_a_resume_with_only_the_run_key_continues_the_same_run(tmp_path, new_store):
    store = _cfg(new_store(tmp_path / "m.db"))
    first = MLflowLogger(store, run_key="job4", spill_dir=str(tmp_path / "run"))
    first.log_params({"a": 1})
    first.log_metrics({"loss": 1.0}, step=1)
    first.close("KILLED")
    client = MlflowClient(store.uri)
    assert client.get_run(first.run_id).info.status == "KILLED"
    name = client.get_run(first.run_id).info.run_name

    resumed = MLflowLogger(store, run_id=None, run_key="job4", spill_dir=str(tmp_path / "run"))
    assert resumed.run_id == first.run_id
    resumed.log_params({"a": 2})  # first value kept, as for any resumed run
    resumed.log_metrics({"loss": 2.0}, step=2)
    resumed.close()
    (run,) = _runs(client)
    assert run.info.run_name == name and run.info.status == "FINISHED" and run.data.params == {"a": "1"}
    assert _steps(client, run.info.run_id) == [1, 2]

    other = MLflowLogger(store, run_key="job5")  # another key: a run of its own
    other.close()
    assert other.run_id != first.run_id and len(_runs(client)) == 2


def test_records_of_another_run_are_parked_not_sent_to_the_new_run(tmp_path, new_store):
    run_dir = tmp_path / "run"
    offline = MLflowLogger(_dead(), run_key="old", spill_dir=str(run_dir))
    offline.log_metrics({"loss": 1.0}, step=1)
    offline.close()

    store = _cfg(new_store(tmp_path / "m.db"))
    fresh = MLflowLogger(store, run_key="new", spill_dir=str(run_dir))
    fresh.close()
    client = MlflowClient(store.uri)
    assert _steps(client, fresh.run_id) == []
    parked = run_dir / f"mlflow_pending.old{Path(PENDING_FILE).suffix}"
    assert parked.exists() and not (run_dir / PENDING_FILE).exists()

    continued = MLflowLogger(store, run_key="old", spill_dir=str(run_dir))
    continued.close()
    assert _steps(client, continued.run_id) == [1] and continued.run_id != fresh.run_id
    assert not parked.exists()


def test_a_bad_run_key_is_refused():
    with pytest.raises(ValueError, match="run key"):
        MLflowLogger(_dead(), run_key="a'b")
