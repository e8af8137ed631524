"""`MLflowLogger`: one MLflow run per job, written by rank 0, robust to an unreachable server.

The only module that imports mlflow. Every call becomes a record in an ordered queue that is flushed at
once when the server answers; when it does not, records stay queued (with their original timestamps),
one warning is logged, training goes on, and the next attempt waits `tracking.retry_interval_seconds`.
Whatever is still queued at `close()` is spilled to `<run_dir>/mlflow_pending.jsonl`, and the next job
with the same run_dir replays it first, so nothing logged is lost.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from scldm_scale.config.tracking import TrackingConfig
from scldm_scale.tracking.base import DatasetInfo
from scldm_scale.tracking.runs import STAGE_TAG, default_run_name

logger = logging.getLogger(__name__)

PENDING_FILE = "mlflow_pending.jsonl"
"""Records that never reached the server, one JSON object a line, under the run_dir."""
_MAX_PARAMS_PER_BATCH = 100
_MAX_PARAM_CHARS = 6000


def _configure_http(cfg: TrackingConfig) -> None:
    """Bound how long one MLflow HTTP call can block (process-wide; rank 0 only ever calls this)."""
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(int(max(1, cfg.request_timeout_seconds)))
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = str(cfg.request_max_retries)
    os.environ["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"] = "1"


def _artifact_location(cfg: TrackingConfig) -> str | None:
    """Artifacts of a SQLite store go beside the database file, not into the working directory."""
    if cfg.artifact_location is not None:
        return cfg.artifact_location
    if cfg.uri.startswith("sqlite:///"):
        db_path = Path(cfg.uri.removeprefix("sqlite:///")).resolve()
        return (db_path.parent / "mlartifacts").as_uri()
    return None


class MLflowLogger:
    """Rank 0's logger: params, metrics, tags, artifacts and the dataset input of one MLflow run.

    Args:
        cfg: the `tracking` config section.
        run_id: continue this run (a resumed job); None opens a new one.
        spill_dir: the run_dir; queued records are spilled there at close and replayed by the next job.
        tags: tags set when the run is opened.
    """

    def __init__(
        self,
        cfg: TrackingConfig,
        *,
        run_id: str | None = None,
        spill_dir: str | None = None,
        tags: dict[str, str] | None = None,
    ) -> None:
        _configure_http(cfg)
        self.cfg = cfg
        self.run_id = run_id
        self._resumed = run_id is not None
        self._client = MlflowClient(tracking_uri=cfg.uri)
        self._spill_dir = spill_dir
        self._spill = Path(spill_dir) / PENDING_FILE if spill_dir else None
        self._pending: list[dict[str, Any]] = self._load_spilled()
        self._open_tags = {k: str(v) for k, v in (tags or {}).items()}
        self._retry_at = 0.0
        self._online = True
        self._monitor = None
        self._opened = False
        self._flush(force=True)

    # ---- public API: every call is queued, then flushed when the server answers
    def log_params(self, params: dict[str, Any]) -> None:
        """Queue params (values stringified, cut to MLflow's 6000-char limit)."""
        clean = {k: str(v)[:_MAX_PARAM_CHARS] for k, v in params.items()}
        self._submit({"op": "params", "params": clean})

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Queue metrics, stamped now."""
        values = {k: float(v) for k, v in metrics.items()}
        self._submit(
            {"op": "metrics", "metrics": values, "step": int(step), "time_ms": int(time.time() * 1000)}
        )

    def set_tags(self, tags: dict[str, str]) -> None:
        """Queue tags."""
        self._submit({"op": "tags", "tags": {k: str(v) for k, v in tags.items()}})

    def log_artifact(self, path: str, artifact_path: str | None = None) -> None:
        """Queue the upload of a local file (read when flushed)."""
        self._submit({"op": "artifact", "path": str(Path(path).resolve()), "artifact_path": artifact_path})

    def log_dataset(self, info: DatasetInfo, context: str = "train") -> None:
        """Queue the dataset input (source = the atlas URI; profile = filter, cell and gene counts)."""
        self._submit({"op": "dataset", "info": info.to_dict(), "context": context})

    def close(self, status: str = "FINISHED") -> None:
        """Flush (one last try), end the run, spill what could not be sent."""
        if self._monitor is not None:
            self._monitor.finish()
            self._monitor = None
        self._submit({"op": "end", "status": status}, force=True)
        if self._pending:
            self._spill_pending()

    # ---- mechanics
    def _submit(self, record: dict[str, Any], force: bool = False) -> None:
        self._pending.append(record)
        self._flush(force=force)

    def _flush(self, force: bool = False) -> None:
        """Send queued records in order; stop at the first failure and keep the rest."""
        if not force and time.monotonic() < self._retry_at:
            return
        try:
            if not self._opened:
                self._open_run()
            while self._pending:
                self._send(self._pending[0])
                self._pending.pop(0)
        except Exception as exc:  # noqa: BLE001 - any server/network error must not stop training
            self._retry_at = time.monotonic() + self.cfg.retry_interval_seconds
            if self._online:
                logger.warning(
                    "MLflow at %s is unreachable (%s: %s); training goes on, %d record(s) kept for later",
                    self.cfg.uri,
                    type(exc).__name__,
                    str(exc).splitlines()[0][:200] if str(exc) else "",
                    len(self._pending),
                )
            self._online = False
            return
        if not self._online:
            logger.warning("MLflow at %s is reachable again; queued records sent", self.cfg.uri)
        self._online = True

    def _open_run(self) -> None:
        """Create (or reopen) the run, set its opening tags and start system metrics."""
        if self.run_id is None:
            exp = self._client.get_experiment_by_name(self.cfg.experiment_name)
            exp_id = (
                exp.experiment_id
                if exp is not None
                else self._client.create_experiment(self.cfg.experiment_name, _artifact_location(self.cfg))
            )
            run = self._client.create_run(exp_id, tags=self._open_tags, run_name=self._new_run_name())
            self.run_id = run.info.run_id
            logger.info("MLflow run %s at %s", self.run_id, self.cfg.uri)
        else:
            self._client.update_run(self.run_id, status="RUNNING")
            if self._open_tags:
                self._client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in self._open_tags.items()])
            logger.info("MLflow run %s continued at %s", self.run_id, self.cfg.uri)
        self._opened = True
        if self.cfg.enable_system_metrics:
            self._start_system_metrics()

    def _new_run_name(self) -> str:
        """`tracking.run_name`, else `<stage>-<preset>-<time>` from the stage tag and the run_dir.

        Never None: MLflow would draw a random name from Python's `random`, which `seed_everything`
        has seeded, so every run of a seed would get the same name.
        """
        if self.cfg.run_name:
            return self.cfg.run_name
        return default_run_name(self._open_tags.get(STAGE_TAG, "run"), self._spill_dir or "")

    def _start_system_metrics(self) -> None:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        self._monitor = SystemMetricsMonitor(
            self.run_id,
            sampling_interval=self.cfg.system_metrics_interval_seconds,
            resume_logging=self._resumed,
            tracking_uri=self.cfg.uri,
        )
        self._monitor.start()

    def _send(self, rec: dict[str, Any]) -> None:
        op, client, run_id = rec["op"], self._client, self.run_id
        if op == "metrics":
            metrics = [Metric(k, v, rec["time_ms"], rec["step"]) for k, v in rec["metrics"].items()]
            for i in range(0, len(metrics), 1000):
                client.log_batch(run_id, metrics=metrics[i : i + 1000])
        elif op == "params":
            self._send_params(rec["params"])
        elif op == "tags":
            client.log_batch(run_id, tags=[RunTag(k, v) for k, v in rec["tags"].items()])
        elif op == "artifact":
            if Path(rec["path"]).exists():
                client.log_artifact(run_id, rec["path"], rec["artifact_path"])
            else:
                logger.warning("artifact %s no longer exists; not logged", rec["path"])
        elif op == "dataset":
            info = rec["info"]
            profile = {k: info[k] for k in ("num_cells", "num_genes", "value_filter")}
            dataset = Dataset(
                name=info["name"],
                digest=info["digest"][:36],
                source_type="soma",
                source=json.dumps({"uri": info["uri"], "value_filter": info["value_filter"]}),
                profile=json.dumps(profile),
            )
            tag = InputTag("mlflow.data.context", rec["context"])
            client.log_inputs(run_id, datasets=[DatasetInput(dataset, tags=[tag])])
        elif op == "end":
            client.set_terminated(run_id, status=rec["status"])
        else:
            raise AssertionError(f"unknown tracking record {op!r}")

    def _send_params(self, params: dict[str, str]) -> None:
        """Log params; on a resumed run keep the first value of a key and warn when it changed."""
        if self._resumed:
            existing = self._client.get_run(self.run_id).data.params
            changed = sorted(k for k, v in params.items() if k in existing and existing[k] != v)
            if changed:
                logger.warning(
                    "resumed run: params changed since the first job, first values kept: %s", changed
                )
            params = {k: v for k, v in params.items() if k not in existing}
        items = [Param(k, v) for k, v in params.items()]
        for i in range(0, len(items), _MAX_PARAMS_PER_BATCH):
            self._client.log_batch(self.run_id, params=items[i : i + _MAX_PARAMS_PER_BATCH])

    def _load_spilled(self) -> list[dict[str, Any]]:
        """Records a previous job could not send (replayed before anything new)."""
        if self._spill is None or not self._spill.exists():
            return []
        records = [json.loads(line) for line in self._spill.read_text().splitlines() if line.strip()]
        # The previous job's "end" record would close the run we are about to continue.
        records = [r for r in records if r["op"] != "end"]
        self._spill.unlink()
        logger.info("replaying %d MLflow record(s) spilled by a previous job", len(records))
        return records

    def _spill_pending(self) -> None:
        if self._spill is None:
            logger.warning(
                "MLflow unreachable at close: %d record(s) dropped (no run_dir)", len(self._pending)
            )
            return
        self._spill.parent.mkdir(parents=True, exist_ok=True)
        with self._spill.open("a") as fh:
            for rec in self._pending:
                fh.write(json.dumps(rec) + "\n")
        logger.warning(
            "MLflow unreachable at close: %d record(s) kept in %s; the next job on this run_dir sends them",
            len(self._pending),
            self._spill,
        )
        self._pending.clear()


def run_tags(cfg: TrackingConfig, run_id: str) -> dict[str, str]:
    """Tags of an existing run (e.g. a stage-1 run's `scldm.run_dir`, `scldm.checkpoint`).

    Raises:
        ValueError: when the run cannot be found at `cfg.uri`.
    """
    _configure_http(cfg)
    try:
        return dict(MlflowClient(tracking_uri=cfg.uri).get_run(run_id).data.tags)
    except Exception as exc:  # noqa: BLE001 - turned into a config error naming the key
        raise ValueError(
            f"stage1.mlflow_run_id={run_id!r}: no such run at tracking.uri={cfg.uri!r} ({exc})"
        ) from exc
