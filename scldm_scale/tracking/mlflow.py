"""`MLflowLogger`: one MLflow run per job, written by rank 0, robust to an unreachable or restarting server.

The only module that imports mlflow for writing. Every call becomes a record (with an id and the run key) in
an ordered queue that is flushed at once when the server answers. When it does not, records stay queued (with
their original timestamps), one warning is logged, training goes on, the next attempt waits
`tracking.retry_interval_seconds`, and the queue is kept on disk in `<run_dir>/mlflow_pending.jsonl` from the
first failure on (`tracking/spill.py`), so a hard kill loses nothing but the record in flight. The next job
continuing the run replays the file first; it shrinks only as records reach the server.

A record that may have reached the server already (in flight at a failure, or read back from the file) is
checked against the run before it is sent again (`RunContents`, `tracking/spill.py`), so a retry never
stores a metric twice.

The run is identified by a run key chosen by the client (tag `scldm.run_key`): a job that starts while the
server is down creates its run (with that tag) once the server answers, and a resumed job that knows only the
key finds the run by its tag instead of forking a new one. `run_id` is None until the run is known.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
import uuid
from pathlib import Path
from typing import Any

from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from scldm_scale.config.tracking import TrackingConfig
from scldm_scale.tracking.base import RUN_KEY_TAG, DatasetInfo
from scldm_scale.tracking.runs import STAGE_TAG, default_run_name
from scldm_scale.tracking.spill import PENDING_FILE, RunContents, SpillJournal

logger = logging.getLogger(__name__)

__all__ = ["PENDING_FILE", "MLflowLogger", "run_tags"]

_MAX_PARAMS_PER_BATCH = 100
_MAX_METRICS_PER_BATCH = 1000
_MAX_PARAM_CHARS = 6000
_RUN_KEY = re.compile(r"[A-Za-z0-9_.-]{1,64}")


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


def _first_line(exc: Exception) -> str:
    return str(exc).splitlines()[0][:200] if str(exc) else ""


class MLflowLogger:
    """Rank 0's logger: params, metrics, tags, artifacts and the dataset input of one MLflow run.

    Args:
        cfg: the `tracking` config section.
        run_id: continue this run (a resumed job); None = the run of `run_key`, created if none has the key.
        run_key: the client-side identity of the run (tag `scldm.run_key`); None = the key of the records left
            in `spill_dir` by an earlier job, else a new random key.
        spill_dir: the run_dir; unsent records are kept there and replayed by the next job continuing the run.
        tags: tags set when the run is opened.

    Raises:
        ValueError: a run key with characters other than letters, digits, `_`, `.`, `-` (or over 64 of them).
    """

    def __init__(
        self,
        cfg: TrackingConfig,
        *,
        run_id: str | None = None,
        run_key: str | None = None,
        spill_dir: str | None = None,
        tags: dict[str, str] | None = None,
    ) -> None:
        if run_key is not None and not _RUN_KEY.fullmatch(run_key):
            raise ValueError(f"MLflow run key must be 1-64 of [A-Za-z0-9_.-], got {run_key!r}")
        _configure_http(cfg)
        self.cfg = cfg
        self.run_id = run_id
        self._resumed = run_id is not None
        self._client: Any = None  # created at the first flush: a SQLite store may fail to open
        self._spill_dir = spill_dir
        self._journal = SpillJournal(Path(spill_dir) / PENDING_FILE if spill_dir else None)
        self.run_key = run_key or self._journal.pending_run_key() or uuid.uuid4().hex
        self._pending: list[dict[str, Any]] = self._journal.load(self.run_key)
        self._unsure = {rec["id"] for rec in self._pending}  # may be in the store already: check first
        self._contents: RunContents | None = None
        self.skipped_duplicates = 0
        """Metric values and artifacts not re-sent because the run already held them (after failures)."""
        self._open_tags = {k: str(v) for k, v in (tags or {}).items()}
        self._retry_at = 0.0
        self._online = True
        self._journal_ok = True
        self._monitor = None
        self._opened = False
        self._flush(force=True)
        if not self._opened and self._open_tags:
            # Kept with the records: the job that creates the run later may not know this job's tags.
            self._submit({"op": "tags", "tags": self._open_tags})

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
        """Flush (one last try), end the run with `status` (FINISHED, FAILED, KILLED), keep what is unsent."""
        if self._monitor is not None:
            self._monitor.finish()
            self._monitor = None
        self._submit({"op": "end", "status": status}, force=True)
        if not self._pending:
            return
        if self._journal.path is None:
            logger.warning(
                "MLflow unreachable at close: %d record(s) dropped (no run_dir)", len(self._pending)
            )
        else:
            logger.warning(
                "MLflow unreachable at close: %d record(s) kept in %s; the next job continuing this run "
                "sends them",
                len(self._pending),
                self._journal.path,
            )

    # ---- mechanics
    def _submit(self, record: dict[str, Any], force: bool = False) -> None:
        self._pending.append({"id": uuid.uuid4().hex, "run_key": self.run_key, **record})
        self._flush(force=force)

    def _flush(self, force: bool = False) -> None:
        """Send queued records in order; stop at the first failure, keep the rest (on disk too)."""
        if not force and time.monotonic() < self._retry_at:
            self._sync_journal(0)
            return
        sent, current = 0, None
        try:
            if self._client is None:
                self._client = MlflowClient(tracking_uri=self.cfg.uri)
            if not self._opened:
                self._open_run()
            while self._pending:
                current = self._pending[0]
                self._send(current)
                self._unsure.discard(self._pending.pop(0)["id"])
                sent, current = sent + 1, None
        except Exception as exc:  # noqa: BLE001 - any server/network error must not stop training
            if current is not None:
                self._unsure.add(current["id"])  # the server may have stored (part of) it
            self._retry_at = time.monotonic() + self.cfg.retry_interval_seconds
            if self._online:
                logger.warning(
                    "MLflow at %s is unreachable (%s: %s); training goes on, records are kept in %s until it "
                    "answers (retried every %g s)",
                    self.cfg.uri,
                    type(exc).__name__,
                    _first_line(exc),
                    self._journal.path or "memory",
                    self.cfg.retry_interval_seconds,
                )
            self._online = False
        else:
            if not self._online:
                logger.warning("MLflow at %s is reachable again; queued records sent", self.cfg.uri)
            self._online = True
            if self._contents is not None and self.skipped_duplicates:
                logger.info(
                    "%d value(s) already in MLflow run %s not sent again",
                    self.skipped_duplicates,
                    self.run_id,
                )
            self._contents = None
        self._sync_journal(sent)

    def _sync_journal(self, sent: int) -> None:
        """Mirror the queue on disk; a failing disk is reported once and never stops training."""
        try:
            self._journal.sent(sent)
            self._journal.sync(self._pending)
        except OSError as exc:
            if self._journal_ok:
                logger.warning(
                    "cannot write %s (%s); unsent MLflow records kept in memory", self._journal.path, exc
                )
            self._journal_ok = False

    def _open_run(self) -> None:
        """Find the run (by id, else by run key) or create it; set the opening tags; start system metrics."""
        if self.run_id is None:
            exp_id = self._experiment_id()
            self.run_id = self._find_run(exp_id)
            if self.run_id is None:
                tags = {**self._open_tags, RUN_KEY_TAG: self.run_key}
                run = self._client.create_run(exp_id, tags=tags, run_name=self._new_run_name())
                self.run_id = run.info.run_id
                logger.info("MLflow run %s (run key %s) at %s", self.run_id, self.run_key, self.cfg.uri)
            else:
                self._resumed = True
        if self._resumed:
            tags = dict(self._open_tags)
            if RUN_KEY_TAG not in self._client.get_run(self.run_id).data.tags:
                tags[RUN_KEY_TAG] = self.run_key
            self._client.update_run(self.run_id, status="RUNNING")
            self._client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in tags.items()])
            logger.info("MLflow run %s continued at %s", self.run_id, self.cfg.uri)
        self._opened = True
        if self.cfg.enable_system_metrics:
            self._start_system_metrics()

    def _experiment_id(self) -> str:
        """The experiment's id; created when missing (a create that timed out but happened is found again)."""
        name = self.cfg.experiment_name
        exp = self._client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        try:
            return self._client.create_experiment(name, _artifact_location(self.cfg))
        except Exception:
            exp = self._client.get_experiment_by_name(name)
            if exp is None:
                raise
            return exp.experiment_id

    def _find_run(self, exp_id: str) -> str | None:
        """The id of the experiment's (oldest) run tagged with this run key; None when there is none."""
        runs = self._client.search_runs(
            [exp_id],
            filter_string=f"tags.`{RUN_KEY_TAG}` = '{self.run_key}'",
            max_results=10,
            order_by=["attributes.start_time ASC"],
        )
        if len(runs) > 1:
            logger.warning("%d MLflow runs have run key %s; continuing the oldest", len(runs), self.run_key)
        return runs[0].info.run_id if runs else None

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

    def _run_contents(self) -> RunContents:
        if self._contents is None:
            self._contents = RunContents(self._client, self.run_id)
        return self._contents

    def _send(self, rec: dict[str, Any]) -> None:
        """Send one record; one that may be in the store already is checked against the run first."""
        op, client, run_id = rec["op"], self._client, self.run_id
        check = rec["id"] in self._unsure
        if op == "metrics":
            points = [(k, v, rec["time_ms"], rec["step"]) for k, v in rec["metrics"].items()]
            if check:
                missing = self._run_contents().missing_metrics(points)
                self.skipped_duplicates += len(points) - len(missing)
                points = missing
            for i in range(0, len(points), _MAX_METRICS_PER_BATCH):
                chunk = points[i : i + _MAX_METRICS_PER_BATCH]
                client.log_batch(run_id, metrics=[Metric(*p) for p in chunk])
                if self._contents is not None:
                    self._contents.stored_metrics(chunk)
        elif op == "params":
            self._send_params(rec["params"], check)
        elif op == "tags":
            client.log_batch(run_id, tags=[RunTag(k, v) for k, v in rec["tags"].items()])
        elif op == "artifact":
            if not Path(rec["path"]).exists():
                logger.warning("artifact %s no longer exists; not logged", rec["path"])
            elif check and self._run_contents().has_artifact(rec["path"], rec["artifact_path"]):
                self.skipped_duplicates += 1
            else:
                client.log_artifact(run_id, rec["path"], rec["artifact_path"])
        elif op == "dataset":
            client.log_inputs(run_id, datasets=[_dataset_input(rec["info"], rec["context"])])
        elif op == "end":
            client.set_terminated(run_id, status=rec["status"])
        else:
            raise AssertionError(f"unknown tracking record {op!r}")

    def _send_params(self, params: dict[str, str], check: bool) -> None:
        """Log params; a continued run (or a re-sent record) keeps each key's first value (a change warns)."""
        if self._resumed or check:
            existing = self._run_contents().params()
            changed = sorted(k for k, v in params.items() if k in existing and existing[k] != v)
            if changed:
                logger.warning(
                    "resumed run: params changed since first logged, first values kept: %s", changed
                )
            params = {k: v for k, v in params.items() if k not in existing}
        items = [Param(k, v) for k, v in params.items()]
        for i in range(0, len(items), _MAX_PARAMS_PER_BATCH):
            self._client.log_batch(self.run_id, params=items[i : i + _MAX_PARAMS_PER_BATCH])


def _dataset_input(info: dict[str, Any], context: str) -> DatasetInput:
    """The MLflow dataset input of a `DatasetInfo` dict (MLflow deduplicates it by name and digest)."""
    profile = {k: info[k] for k in ("num_cells", "num_genes", "value_filter")}
    dataset = Dataset(
        name=info["name"],
        digest=info["digest"][:36],
        source_type="soma",
        source=json.dumps({"uri": info["uri"], "value_filter": info["value_filter"]}),
        profile=json.dumps(profile),
    )
    return DatasetInput(dataset, tags=[InputTag("mlflow.data.context", context)])


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
