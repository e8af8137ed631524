"""The durability of MLflow records: `SpillJournal` (the unsent records on disk) and `RunContents` (checks
against the run before a record is sent again).

No mlflow import here (the client is passed in). The journal is `<run_dir>/mlflow_pending.jsonl`, one JSON
record a line, and it always holds the logger's queue: records are appended (and fsynced) as soon as a flush
fails and while the server stays unreachable, the file is rewritten atomically (temp file + rename) once part
of the queue got through, and removed once all of it did. A hard kill therefore loses at most the one record
in flight, and a record is only ever deleted from disk after the server stored it.

Every record carries the run key of its MLflow run. Records of another run (a new job in a run_dir whose
previous job left records behind) are never sent to the wrong run: they are parked in
`mlflow_pending.<run_key>.jsonl`, where a job continuing that run (same run key) picks them up.

A record is checked against the run only when it may have reached the server already: it was in flight when
a call failed (a timeout after the server stored part of a batch), or it comes from the journal (a killed job
may have sent it without shrinking the file). What counts as "already there":
- a metric: the same (key, step, timestamp) in the run's history of that key (histories are fetched once per
  key and kept while records are being checked);
- a param: the same key (MLflow refuses a second value; the first one is kept);
- an artifact: a file at the same artifact path with the same size.
Tags, the dataset input (MLflow deduplicates it by name and digest) and the final status are idempotent.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from pathlib import Path
from typing import Any

from scldm_scale.utils.fsync import fsync_path

logger = logging.getLogger(__name__)

PENDING_FILE = "mlflow_pending.jsonl"
"""Records that have not reached the server, one JSON object a line, under the run_dir."""
MetricPoint = tuple[str, float, int, int]
"""(key, value, timestamp in ms, step): one metric value as a record holds it."""


def read_records(path: Path) -> list[dict[str, Any]]:
    """Records of one journal file; a line torn by a kill mid-write is skipped, with a warning."""
    if not path.exists():
        return []
    records = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            logger.warning("%s:%d: unreadable MLflow record skipped (torn write)", path, n)
            continue
        if isinstance(rec, dict) and "op" in rec:
            records.append(rec)
    return records


def _write_lines(path: Path, records: list[dict[str, Any]], mode: str) -> None:
    with path.open(mode) as fh:
        fh.write("".join(json.dumps(rec) + "\n" for rec in records))
        fh.flush()
        os.fsync(fh.fileno())


class SpillJournal:
    """Keeps `path` equal to the logger's queue of unsent records (a no-op when `path` is None).

    Args:
        path: the journal file (`<run_dir>/mlflow_pending.jsonl`); None = no run_dir, nothing is kept.
    """

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._in_file = 0  # leading queue records that are in the file
        self._stale = False  # the file still holds records that have since reached the server
        self._exists = path is not None and path.exists()

    def parked_path(self, run_key: str) -> Path:
        """Where records of run `run_key` wait for a job that continues that run."""
        assert self.path is not None
        return self.path.with_name(f"{self.path.stem}.{run_key}{self.path.suffix}")

    def pending_run_key(self) -> str | None:
        """The run key of the records the file holds (the last keyed one); None when it holds none."""
        if self.path is None:
            return None
        keys = [r["run_key"] for r in read_records(self.path) if r.get("run_key")]
        return keys[-1] if keys else None

    def load(self, run_key: str) -> list[dict[str, Any]]:
        """Records of run `run_key` left by earlier jobs, oldest first (they become the queue's head).

        Reads the journal and `run_key`'s parked file; records of other runs are moved to their parked files,
        records without a run key (older journals) count as this run's, duplicates (same id) are dropped, and
        so are earlier jobs' `end` records (they would close the run this job continues).
        """
        if self.path is None:
            return []
        parked = self.parked_path(run_key)
        own: list[dict[str, Any]] = []
        foreign: dict[str, list[dict[str, Any]]] = {}
        seen: set[str] = set()
        for rec in read_records(parked) + read_records(self.path):
            if rec.get("id") is not None:
                if rec["id"] in seen:
                    continue
                seen.add(rec["id"])
            rec.setdefault("id", uuid.uuid4().hex)  # records of older journals have none
            key = rec.get("run_key")
            if key and key != run_key:
                foreign.setdefault(key, []).append(rec)
            elif rec["op"] != "end":
                own.append(rec)
        for key, records in foreign.items():
            _write_lines(self.parked_path(key), records, "a")
            logger.warning(
                "%d MLflow record(s) of another run (run key %s) moved to %s; a job resuming that run "
                "sends them",
                len(records),
                key,
                self.parked_path(key),
            )
        self._in_file, self._stale = 0, self._exists or parked.exists()
        self.sync(own)  # the journal now holds exactly this run's records
        if parked.exists():
            parked.unlink()
        if own:
            logger.info("replaying %d MLflow record(s) kept by a previous job", len(own))
        return own

    def sent(self, n: int) -> None:
        """`n` records left the head of the queue (the server stored them)."""
        if self._in_file > 0:
            self._stale = True
        self._in_file = max(0, self._in_file - n)

    def sync(self, queue: list[dict[str, Any]]) -> None:
        """Make the file hold `queue`: remove it when empty, append what is new, or rewrite it when stale."""
        if self.path is None or (not queue and not self._exists):
            return
        if not queue:
            self.path.unlink(missing_ok=True)
            fsync_path(self.path.parent)
            self._exists, self._in_file, self._stale = False, 0, False
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self._stale or not self._exists:
            tmp = self.path.with_name(self.path.name + ".tmp")
            _write_lines(tmp, queue, "w")
            os.replace(tmp, self.path)
            fsync_path(self.path.parent)
        elif self._in_file < len(queue):
            _write_lines(self.path, queue[self._in_file :], "a")
        self._exists, self._in_file, self._stale = True, len(queue), False


class RunContents:
    """Lazily fetched contents of one run: metric (step, timestamp) pairs per key, params, artifacts.

    Args:
        client: an `MlflowClient` of the run's tracking server.
        run_id: the run.
    """

    def __init__(self, client: Any, run_id: str) -> None:
        self._client = client
        self._run_id = run_id
        self._points: dict[str, set[tuple[int, int]]] = {}

    def _history(self, key: str) -> set[tuple[int, int]]:
        if key not in self._points:
            history = self._client.get_metric_history(self._run_id, key)
            self._points[key] = {(int(m.step), int(m.timestamp)) for m in history}
        return self._points[key]

    def missing_metrics(self, points: list[MetricPoint]) -> list[MetricPoint]:
        """The points the run does not hold yet (compared by key, step and timestamp)."""
        return [p for p in points if (p[3], p[2]) not in self._history(p[0])]

    def stored_metrics(self, points: list[MetricPoint]) -> None:
        """Note points just stored, for keys whose history was fetched (the cache stays exact)."""
        for key, _value, timestamp, step in points:
            if key in self._points:
                self._points[key].add((step, timestamp))

    def params(self) -> dict[str, str]:
        """The run's params now."""
        return dict(self._client.get_run(self._run_id).data.params)

    def has_artifact(self, local_path: str, artifact_path: str | None) -> bool:
        """True when the run holds a file named like `local_path` under `artifact_path`, of the same size."""
        name = Path(local_path).name
        target = f"{artifact_path.strip('/')}/{name}" if artifact_path else name
        size = Path(local_path).stat().st_size
        for info in self._client.list_artifacts(self._run_id, artifact_path):
            if info.path == target and not info.is_dir and info.file_size == size:
                return True
        return False
