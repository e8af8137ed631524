"""Cluster faults against the real launchers: real processes, real signals, 2 CPU ranks, MLflow on SQLite.

- SIGTERM to a torchrun job mid-epoch: a checkpoint at the step it stopped, the MLflow run KILLED, and the
  relaunch continues the same run with every step logged once and the losses of an uninterrupted run.
- SIGKILL (or SIGSTOP: a hung node) of one rank of a two-"node" job: the survivor exits non-zero within
  `engine.collective_timeout_s` plus a margin; the relaunch resumes from the last checkpoint.
- An exception on one rank: every rank exits non-zero and the survivor's message names the rank and step.
- SIGKILL of the whole job during a save: the restart uses the previous checkpoint.
- A reused run_dir: refused with one error line; accepted with train.overwrite=true.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.integration._launch import SMALL_DATA, TORCHRUN, VAE, VAE_DEBUG, free_port, launch_env, run

pytestmark = [pytest.mark.integration, pytest.mark.slow]

STEP_LINE = re.compile(r"\bstep (\d+) \|")
MAX_STEPS = 40


def _args(run_dir: Path, db: Path, *extra: str) -> list[str]:
    return [
        VAE,
        "--config",
        VAE_DEBUG,
        *SMALL_DATA,
        "engine.name=zero2",
        f"train.max_steps={MAX_STEPS}",
        "checkpoint.interval_steps=1000",
        "tracking.log_interval_steps=1",
        f"train.run_dir={run_dir}",
        f"tracking.uri=sqlite:///{db}",
        *extra,
    ]


class Job:
    """A launcher command in its own session, its output collected by a thread."""

    def __init__(self, cmd: list[str], env: dict[str, str], cwd: Path) -> None:
        self.proc = subprocess.Popen(
            cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True)
        self._reader.start()

    @property
    def text(self) -> str:
        return "".join(list(self.lines))

    def wait_for(self, pattern: str, timeout: float = 180) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = re.search(pattern, self.text)
            if found:
                return found
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"{pattern!r} not seen (exit {self.proc.poll()}):\n{self.text[-4000:]}")

    def wait_step(self, step: int, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            steps = [int(m) for m in STEP_LINE.findall(self.text)]
            if steps and max(steps) >= step:
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.02)
        raise AssertionError(f"step {step} not reached (exit {self.proc.poll()}):\n{self.text[-4000:]}")

    def signal_all(self, sig: int) -> None:
        """`sig` to the launcher and every process under it (torchrun starts each worker in its own session)."""
        import psutil

        try:
            parent = psutil.Process(self.proc.pid)
            family = [parent, *parent.children(recursive=True)]
        except psutil.NoSuchProcess:
            return
        for p in family:
            try:
                p.send_signal(sig)
            except psutil.NoSuchProcess:
                pass

    def finish(self, timeout: float = 120) -> int:
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.signal_all(signal.SIGKILL)
            raise
        self._reader.join(timeout=10)
        return code


def _assert_epoch_accounted(ckpt: Path, step: int, log: str) -> None:
    """No cell lost or repeated: the checkpoint's loader state has consumed exactly `step` batches of 2 x 16 cells
    in the epoch, and consumed + remaining = the training cells."""
    num_cells = int(re.search(r"num_cells=(\d+)", log).group(1))
    state = json.loads((ckpt / "state.json").read_text())
    loader = state["dataloader"]
    remaining = sum(end - begin for *_, begin, end in loader["pieces"])
    assert loader["cells_consumed_in_epoch"] + remaining == num_cells
    per_epoch = -(-num_cells // 32)
    epoch, in_epoch = divmod(step, per_epoch)
    if in_epoch == 0 and step > 0:  # saved right after an epoch's last batch: that epoch, complete
        assert loader["epoch"] == epoch - 1 and loader["cells_consumed_in_epoch"] == num_cells
    else:
        assert loader["epoch"] == epoch and loader["cells_consumed_in_epoch"] == in_epoch * 32
    assert state["train_state"]["cells_seen"] == step * 32


def _runs(db: Path, run_dir: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    return client, [r for r in runs if r.data.tags.get("scldm.run_dir") == str(run_dir.resolve())]


def _losses(client, run) -> dict[int, list[float]]:
    out: dict[int, list[float]] = {}
    for m in client.get_metric_history(run.info.run_id, "train/loss"):
        out.setdefault(m.step, []).append(m.value)
    return out


def test_sigterm_to_torchrun_saves_marks_killed_and_the_relaunch_continues_exactly(demo_atlas, tmp_path):
    env, db = launch_env(demo_atlas), tmp_path / "mlruns.db"
    torchrun = [*TORCHRUN, "--standalone", "--nproc_per_node", "2"]
    run_dir = tmp_path / "preempted"
    job = Job([*torchrun, *_args(run_dir, db)], env, tmp_path)
    ref_db = tmp_path / "reference.db"  # its own store: two jobs writing one SQLite file would contend
    reference = Job([*torchrun, *_args(tmp_path / "reference", ref_db)], env, tmp_path)  # uninterrupted, alongside
    job.wait_step(4)
    os.kill(job.proc.pid, signal.SIGTERM)  # to torchrun's agent, which forwards it to both workers
    code = job.finish()
    stopped = int(job.wait_for(r"stopped at step (\d+) \(SIGTERM\)").group(1))
    assert code != 0 and 4 <= stopped < MAX_STEPS, job.text[-3000:]

    ckpts = sorted((run_dir / "checkpoints").glob("step-*"))
    assert [p.name for p in ckpts] == [f"step-{stopped:08d}"]
    _assert_epoch_accounted(ckpts[0], stopped, job.text)
    client, runs = _runs(db, run_dir)
    assert len(runs) == 1 and runs[0].info.status == "KILLED"

    rerun = run([*torchrun, *_args(run_dir, db)], env, cwd=tmp_path)
    assert f"step-{stopped:08d}" in rerun.stdout + rerun.stderr
    assert reference.finish() == 0, reference.text[-3000:]
    client, runs = _runs(db, run_dir)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"  # the same MLflow run, continued
    losses = _losses(client, runs[0])
    assert sorted(losses) == list(range(1, MAX_STEPS + 1)) and all(len(v) == 1 for v in losses.values())
    ref_client, ref_runs = _runs(ref_db, tmp_path / "reference")
    ref = _losses(ref_client, ref_runs[0])
    for step in range(stopped + 1, MAX_STEPS + 1):
        assert losses[step][0] == pytest.approx(ref[step][0], rel=1e-5), step


def _node_env(env: dict[str, str], rank: int, port: int) -> dict[str, str]:
    """Each rank as the only worker of its own "node" (no torchrun agent to take the other one down)."""
    return {
        **env,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "RANK": str(rank),
        "WORLD_SIZE": "2",
        "LOCAL_RANK": "0",
        "LOCAL_WORLD_SIZE": "1",
    }


@pytest.mark.parametrize("fault", ["SIGKILL", "SIGSTOP"])
def test_a_dead_or_hung_rank_on_another_node_ends_the_job_within_the_timeout(demo_atlas, tmp_path, fault):
    env, db, run_dir, port = launch_env(demo_atlas), tmp_path / "mlruns.db", tmp_path / "run", free_port()
    timeout_s = 20
    extra = ("train.max_steps=2000", "checkpoint.interval_steps=5", f"engine.collective_timeout_s={timeout_s}")
    cmd = [sys.executable, *_args(run_dir, db, *extra)]
    nodes = [Job(cmd, _node_env(env, rank, port), tmp_path) for rank in (0, 1)]
    nodes[0].wait_step(7)
    os.kill(nodes[1].proc.pid, getattr(signal, fault))
    t0 = time.monotonic()
    code = nodes[0].finish(timeout=timeout_s + 60)
    elapsed = time.monotonic() - t0
    nodes[1].signal_all(signal.SIGKILL)
    nodes[1].finish()
    assert code != 0, nodes[0].text[-3000:]
    assert elapsed < timeout_s + 25, f"rank 0 took {elapsed:.1f} s to exit"
    assert "rank 0 stopped at step" in nodes[0].text, nodes[0].text[-3000:]
    last = max(int(p.name.split("-")[1]) for p in (run_dir / "checkpoints").glob("step-*") if p.suffix != ".tmp")
    _assert_epoch_accounted(run_dir / "checkpoints" / f"step-{last:08d}", last, nodes[0].text)
    if fault == "SIGKILL":  # the relaunch (torchrun, one node) resumes from the last checkpoint
        relaunch = Job([*TORCHRUN, "--standalone", "--nproc_per_node", "2", *cmd[1:]], env, tmp_path)
        relaunch.wait_for(rf"resumed from \S*step-{last:08d}")
        relaunch.wait_step(last + 1)
        os.kill(relaunch.proc.pid, signal.SIGTERM)
        relaunch.finish()


def test_an_exception_on_one_rank_names_the_rank_and_step_on_every_rank(demo_atlas, tmp_path):
    """Rank 1 raises inside step 5 (patched in by a sitecustomize module, only in this child process)."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import os\n"
        "if os.environ.get('RANK') == '1':\n"
        "    import scldm_scale.train.loop as loop\n"
        "    original = loop.Trainer.train_step\n"
        "    def train_step(self, batches):\n"
        "        if self.step + 1 == 5:\n"
        "            raise ValueError('injected failure')\n"
        "        return original(self, batches)\n"
        "    loop.Trainer.train_step = train_step\n"
    )
    env, db, port = launch_env(demo_atlas), tmp_path / "mlruns.db", free_port()
    env["PYTHONPATH"] = os.pathsep.join([str(hook), env["PYTHONPATH"]])
    cmd = [sys.executable, *_args(tmp_path / "run", db, "engine.collective_timeout_s=30")]
    nodes = [Job(cmd, _node_env(env, rank, port), tmp_path) for rank in (0, 1)]
    t0 = time.monotonic()
    codes = [node.finish(timeout=90) for node in nodes]
    assert codes[0] != 0 and codes[1] != 0
    assert time.monotonic() - t0 < 90
    assert "ValueError: injected failure" in nodes[1].text
    assert re.search(r"rank 0 stopped at step 5 because a peer failed \(rank 1: rank 1 failed at step 5: ValueError", nodes[0].text), nodes[0].text[-3000:]
    _, runs = _runs(db, tmp_path / "run")
    assert [r.info.status for r in runs] == ["FAILED"]


def test_sigkill_during_a_save_restarts_from_the_previous_checkpoint(demo_atlas, tmp_path):
    env, db, run_dir = launch_env(demo_atlas), tmp_path / "mlruns.db", tmp_path / "run"
    cmd = [*TORCHRUN, "--standalone", "--nproc_per_node", "2", *_args(run_dir, db, "train.max_steps=2000", "checkpoint.interval_steps=5")]
    job = Job(cmd, env, tmp_path)
    root = run_dir / "checkpoints"
    caught = None
    deadline = time.monotonic() + 180
    while caught is None and time.monotonic() < deadline and job.proc.poll() is None:
        tmp = [p for p in root.glob("step-*.tmp")] if root.is_dir() else []
        if tmp and int(tmp[0].name[5:13]) >= 10:
            job.signal_all(signal.SIGSTOP)  # freeze every process of the job mid-save
            if tmp[0].exists() and not (root / tmp[0].name[:-4]).exists():
                caught = tmp[0]
            else:
                job.signal_all(signal.SIGCONT)  # the save finished meanwhile: catch the next one
        time.sleep(0.001)
    job.signal_all(signal.SIGKILL)  # the whole job dies at once, as on a node crash
    job.finish()
    assert caught is not None, job.text[-3000:]
    previous = int(caught.name[5:13]) - 5
    _assert_epoch_accounted(root / f"step-{previous:08d}", previous, job.text)
    assert sorted(p.name for p in root.glob("step-*") if p.suffix != ".tmp")[-1] == f"step-{previous:08d}"
    relaunch = Job(cmd, env, tmp_path)
    relaunch.wait_for(rf"resumed from \S*step-{previous:08d}")
    relaunch.wait_step(previous + 1)
    os.kill(relaunch.proc.pid, signal.SIGTERM)
    relaunch.finish()
    assert not caught.exists()  # the unfinished save was cleaned up by the next one


def test_a_reused_run_dir_is_refused_unless_overwrite(demo_atlas, tmp_path):
    env, db, run_dir = launch_env(demo_atlas), tmp_path / "mlruns.db", tmp_path / "run"
    first = [sys.executable, *_args(run_dir, db, "train.max_steps=1")]
    run(first, env, cwd=tmp_path)
    again = run([*first, "checkpoint.resume=never"], env, cwd=tmp_path, check=False)
    assert again.returncode == 2, again.stderr[-2000:]
    assert "already holds another run's checkpoints" in again.stderr and "train.overwrite=true" in again.stderr
    assert (run_dir / "checkpoints" / "step-00000001").is_dir()
    run([*first, "checkpoint.resume=never", "train.overwrite=true"], env, cwd=tmp_path)
    archived = list((run_dir / "archive").glob("*/checkpoints/step-00000001"))
    assert len(archived) == 1 and (run_dir / "checkpoints" / "step-00000001").is_dir()


def test_a_resumed_stage2_keeps_its_pinned_stage1_and_stops_if_it_changed(demo_atlas, tmp_path):
    from tests.integration._launch import LDM, LDM_DEBUG

    env, db = launch_env(demo_atlas), tmp_path / "mlruns.db"
    common = [*SMALL_DATA, f"tracking.uri=sqlite:///{db}", "tracking.enable_plots=false"]
    s1 = [sys.executable, VAE, "--config", VAE_DEBUG, *common, f"train.run_dir={tmp_path}/s1"]
    s2 = [sys.executable, LDM, "--config", LDM_DEBUG, *common, f"train.run_dir={tmp_path}/s2",
          f"stage1.checkpoint={tmp_path}/s1", "eval.enable_at_end=false", "flow.num_steps=2"]
    run([*s1, "train.max_steps=2"], env, cwd=tmp_path)
    run([*s2, "train.max_steps=2"], env, cwd=tmp_path)
    run([*s1, "train.max_steps=4"], env, cwd=tmp_path)  # stage 1 moves on: its newest checkpoint is now step 4
    pinned = tmp_path / "s1" / "checkpoints" / "step-00000002"
    meta = json.loads((tmp_path / "s2" / "checkpoints" / "step-00000002" / "meta.json").read_text())
    assert meta["manifest"]["stage1_checkpoint"] == str(pinned.resolve()) and len(meta["manifest"]["stage1_digest"]) == 64
    shard = max((p for p in pinned.rglob("*") if p.is_file() and p.name != "meta.json"), key=lambda p: p.stat().st_size)
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    changed = run([*s2, "train.max_steps=4"], env, cwd=tmp_path, check=False)
    assert changed.returncode == 2, changed.stderr[-3000:]
    # The resume checked the pinned step 2 (damaged), not stage 1's newest checkpoint (step 4, intact).
    assert "changed or is gone" in changed.stderr and shard.name in changed.stderr and str(pinned.resolve()) in changed.stderr

    # Trust: a checkpoint named by an MLflow tag loads only if it matches the digest the run recorded.
    _, (s1_run,) = _runs(db, tmp_path / "s1")
    newest = tmp_path / "s1" / "checkpoints" / "step-00000004"
    assert s1_run.data.tags["scldm.checkpoint"] == str(newest.resolve())
    meta = newest / "meta.json"
    meta.write_text(meta.read_text().replace('"step": 4', '"step": 4 '))  # same content, other bytes
    by_id = run([sys.executable, LDM, "--config", LDM_DEBUG, *common, f"train.run_dir={tmp_path}/s2b",
                 f"stage1.mlflow_run_id={s1_run.info.run_id}"], env, cwd=tmp_path, check=False)
    assert by_id.returncode == 2 and "does not match what the run recorded" in by_id.stderr, by_id.stderr[-3000:]
