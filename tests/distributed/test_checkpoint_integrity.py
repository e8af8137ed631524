"""Verified checkpoints on a real 2-rank gloo group with real engines (ZeRO-3 and FSDP2).

One spawn runs, per engine: a save whose rank-1 shard write hits ENOSPC (every rank raises the same error
naming rank 1, the .tmp is gone, the previous checkpoint stays the latest and verifies, the group still
works); a save whose published checkpoint is corrupted before it re-verifies (retention keeps the older
ones); a truncated shard and a flipped byte in the newest checkpoints (load_latest warns and loads the
newest good one; load_checkpoint names the bad file; all bad -> a clear error); the free-space pre-check;
and, where this process may mount a size-limited tmpfs, a real full disk during a save.
The parent then runs `python -m scldm_scale.checkpoint verify` on the same checkpoints.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from scldm_scale.checkpoint import (
    checkpoint_name,
    checkpoints_root,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    load_latest,
    save_checkpoint,
    verify_collective,
)
from scldm_scale.checkpoint.manifest import checkpoint_size
from scldm_scale.config import EngineConfig, OptimConfig
from scldm_scale.distributed import barrier
from scldm_scale.distributed.faults import PeerFailure
from scldm_scale.train import build_engine
from tests.distributed._helpers import run_on_ranks
from tests.distributed._toy import build_toy_model, toy_data, toy_step

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(600)]

ENGINES = ["zero3", "fsdp2"]
OPTIM = OptimConfig(lr=1e-2, schedule="constant", grad_clip_norm=1.0)
TMPFS_SIZE = 16 << 20


def _engine(name):
    return build_engine(EngineConfig(name=name), build_toy_model(seed=0), optim_cfg=OPTIM, max_steps=10, device="cpu")


def _step(engine, rank):
    x, y = toy_data()
    out = toy_step(engine.model, {"x": x[rank * 6 : rank * 6 + 6], "y": y[rank * 6 : rank * 6 + 6]})
    engine.backward(out.loss)
    engine.clip_grad_norm(engine.grad_clip_norm)
    engine.step()


def _save(engine, run, step, keep=None, **extra):
    state = {"train_state": {"cells_seen": step * 12}, **extra}
    return save_checkpoint(engine, run, step, extra_state=state, manifest={"run": "t"}, keep_latest_k=keep)


def _failure(fn):
    """The message of the PeerFailure (or CheckpointError) `fn` raises, or None."""
    try:
        fn()
    except PeerFailure as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


@contextlib.contextmanager
def _full_disk_on_rank1(name, rank):
    """Rank 1's engine shard write raises ENOSPC (DeepSpeed: torch.save; DCP: its file streams)."""
    from torch.distributed.checkpoint.filesystem import FileSystem

    def enospc(path):
        return OSError(errno.ENOSPC, "No space left on device", str(path))

    patch = pytest.MonkeyPatch()
    if rank == 1 and name.startswith("zero"):
        real = torch.save

        def save(obj, f, *args, **kwargs):
            if "optim_states" in str(f):
                raise enospc(f)
            return real(obj, f, *args, **kwargs)

        patch.setattr(torch, "save", save)
    elif rank == 1:
        def create_stream(self, path, mode):
            raise enospc(path)

        patch.setattr(FileSystem, "create_stream", create_stream)
    try:
        yield
    finally:
        patch.undo()


def _biggest(ckpt):
    """Relative name of the checkpoint's biggest engine shard (.distcp / .pt)."""
    files = [p for p in ckpt.rglob("*") if p.suffix in (".distcp", ".pt") and p.parent.name != "rng"]
    return max(files, key=lambda p: (p.stat().st_size, p.name)).relative_to(ckpt).as_posix()


def _corrupt(ckpt, kind):
    """Truncate the biggest shard to half, or flip one of its bytes (one process); returns its name."""
    name = _biggest(ckpt)
    data = bytearray((ckpt / name).read_bytes())
    if kind == "truncate":
        data = data[: len(data) // 2]
    else:
        data[len(data) // 3] ^= 0xFF
    (ckpt / name).write_bytes(bytes(data))
    return name


def _corrupting_publish(rank):
    """Rank 0 publishes, then a byte of the published checkpoint flips (storage corruption) before it re-verifies."""
    import scldm_scale.checkpoint.io as ckpt_io

    real, patch = ckpt_io.publish, pytest.MonkeyPatch()

    def publish(tmp_dir, final_dir):
        real(tmp_dir, final_dir)
        _corrupt(final_dir, "flip")

    if rank == 0:
        patch.setattr(ckpt_io, "publish", publish)
    return patch


def _verdict(path):
    result = verify_collective(path)
    return {"ok": result.ok, "problems": result.problems, "verified": result.verified}


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _enospc_on_rank1(name, engine, run, rank):
    """Save 3 fails on rank 1's shard write: same error everywhere, .tmp gone, step 2 still latest and valid."""
    with _full_disk_on_rank1(name, rank):
        message = _failure(lambda: _save(engine, run, 3))
    tmp = checkpoints_root(run) / (checkpoint_name(3) + ".tmp")
    return {"message": message, "tmp_left": tmp.exists(), "latest": latest_checkpoint(run).name,
            "previous": _verdict(checkpoints_root(run) / checkpoint_name(2))}


def _retention_after_bad_publish(engine, run, rank):
    """Save 4 (keep 1) is corrupted once published: CheckpointError everywhere, steps 1-3 kept."""
    patch = _corrupting_publish(rank)
    try:
        message = _failure(lambda: _save(engine, run, 4, keep=1))
    finally:
        patch.undo()
    return {"message": message, "kept": [step for step, _ in list_checkpoints(run)]}


def _resume_skips_bad(engine, run, rank, logs):
    """Step 4 has a flipped byte (above), step 3 a truncated shard: load_latest warns twice, loads step 2."""
    truncated = _corrupt(checkpoints_root(run) / checkpoint_name(3), "truncate") if rank == 0 else None
    barrier()
    logs.messages.clear()
    state = load_latest(engine, run)
    explicit = _failure(lambda: load_checkpoint(engine, checkpoints_root(run) / checkpoint_name(3)))
    return {"truncated": truncated, "loaded_step": state["meta"]["step"], "weights": engine.full_state_dict(),
            "verification": state["verification"], "warnings": list(logs.messages), "explicit": explicit}


def _all_bad(engine, run, tmp_path, name, rank):
    """A copy of the run where every checkpoint is bad: load_latest raises instead of starting over."""
    copy = tmp_path / f"{name}-allbad"
    if rank == 0:
        shutil.copytree(run, copy)
        for _, ckpt in list_checkpoints(copy):
            _corrupt(ckpt, "truncate")
    barrier()
    return _failure(lambda: load_latest(engine, copy))


def _engine_worker(name, rank, tmp_path, logs):
    run = tmp_path / name
    engine = _engine(name)
    weights = {}
    for step in (1, 2):
        _step(engine, rank)
        _save(engine, run, step)
        weights[step] = engine.full_state_dict()
    out = {"enospc": _enospc_on_rank1(name, engine, run, rank)}
    _step(engine, rank)
    _save(engine, run, 3)  # the group survived the failed save
    _step(engine, rank)
    out["retention"] = _retention_after_bad_publish(engine, run, rank)
    out["resume"] = _resume_skips_bad(engine, run, rank, logs)
    out["step2_weights"] = weights[2]
    out["all_bad"] = _all_bad(engine, run, tmp_path, name, rank)
    return out


def _integrity_worker(rank, world, tmp_path, small_fs):
    small_fs = None if small_fs is None else Path(small_fs)
    logs = _Records()
    logging.getLogger("scldm_scale.checkpoint").addHandler(logs)
    out = {name: _engine_worker(name, rank, tmp_path, logs) for name in ENGINES}
    out["small_fs"] = _small_fs_worker(rank, tmp_path, small_fs)
    return out


def _fill(path, leave_free):
    """Rank 0: write a file of zeros so that `leave_free` bytes stay free on path's filesystem."""
    size = shutil.disk_usage(path.parent).free - leave_free
    with open(path, "wb") as fh:
        for _ in range(size // (1 << 20)):
            fh.write(bytes(1 << 20))
        fh.write(bytes(size % (1 << 20)))


def _inflate_claim(run):
    """Fallback without tmpfs: the latest checkpoint's table claims more bytes than the disk has free."""
    ckpt = latest_checkpoint(run)
    meta = json.loads((ckpt / "meta.json").read_text())
    first = sorted(meta["files"])[0]
    meta["files"][first]["size"] = shutil.disk_usage(run).free * 2
    (ckpt / "meta.json").write_text(json.dumps(meta))


def _precheck(engine, run, rank, real):
    """Less free space than the last checkpoint's size: the save fails on every rank before writing."""
    base = run.parent
    if rank == 0:
        _fill(base / "filler", checkpoint_size(latest_checkpoint(run)) // 2) if real else _inflate_claim(run)
    barrier()
    message = _failure(lambda: _save(engine, run, 2))
    left = sorted(p.name for p in checkpoints_root(run).iterdir())
    if rank == 0:
        (base / "filler").unlink(missing_ok=True)
    barrier()
    return {"message": message, "left": left}


def _real_full_disk(engine, run, rank, ckpt_bytes):
    """The pre-check passes, but the new checkpoint is bigger (a 2 MiB state) and the disk fills up."""
    if rank == 0:
        _fill(run.parent / "filler", ckpt_bytes + (256 << 10))
    barrier()
    message = _failure(lambda: _save(engine, run, 2, blob="x" * (2 << 20)))
    out = {"message": message, "left": sorted(p.name for p in checkpoints_root(run).iterdir()),
           "previous": _verdict(latest_checkpoint(run))}
    if rank == 0:
        (run.parent / "filler").unlink()
    barrier()
    out["after_freeing"] = _verdict(_save(engine, run, 2))
    return out


def _small_fs_worker(rank, tmp_path, small_fs):
    real = small_fs is not None
    base = small_fs if real else tmp_path / "no-tmpfs"
    engine = _engine("fsdp2")
    _step(engine, rank)
    used = shutil.disk_usage(tmp_path).used if not real else shutil.disk_usage(base).used
    _save(engine, base / "run", 1)
    ckpt_bytes = shutil.disk_usage(base).used - used
    out = {"real": real, "precheck": _precheck(engine, base / "run", rank, real)}
    if real:
        out["full"] = _real_full_disk(engine, base / "run", rank, ckpt_bytes)
    return out


@pytest.fixture(scope="module")
def small_fs(tmp_path_factory):
    """A 16 MiB tmpfs when this process may mount one (root), else None."""
    path = tmp_path_factory.mktemp("tmpfs")
    try:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE}", "tmpfs", str(path)],
                                 capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        mounted = False
    yield path if mounted else None
    if mounted:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=30)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, small_fs):
    tmp_path = tmp_path_factory.mktemp("integrity")
    results = run_on_ranks(_integrity_worker, world_size=2, tmp_path=tmp_path, timeout=300,
                           small_fs=str(small_fs) if small_fs else None)
    return tmp_path, results


@pytest.mark.parametrize("name", ENGINES)
def test_enospc_on_one_rank_fails_the_save_everywhere(name, runs):
    _, results = runs
    r0, r1 = (r[name]["enospc"] for r in results)
    assert r0["message"] == r1["message"]  # the same error on every rank
    assert r0["message"].startswith("PeerFailure: writing checkpoint step-00000003 failed on 1 of 2 ranks: rank 1: ")
    assert "No space left on device" in r0["message"]
    assert not r0["tmp_left"] and not r1["tmp_left"]
    assert r0["latest"] == r1["latest"] == checkpoint_name(2)
    assert r0["previous"] == {"ok": True, "problems": [], "verified": True}


@pytest.mark.parametrize("name", ENGINES)
def test_retention_keeps_older_checkpoints_when_the_new_one_fails_verification(name, runs):
    _, results = runs
    r0, r1 = (r[name]["retention"] for r in results)
    assert r0 == r1
    assert r0["message"].startswith("CheckpointError: checkpoint ") and "failed verification right after" in r0["message"]
    assert "checksum mismatch" in r0["message"] and "retention skipped" in r0["message"]
    assert r0["kept"] == [1, 2, 3, 4]  # keep_latest_k=1 would have left only step 4


@pytest.mark.parametrize("name", ENGINES)
def test_resume_skips_corrupt_newest_checkpoints(name, runs):
    _, results = runs
    r0, r1 = (r[name]["resume"] for r in results)
    assert r0["loaded_step"] == r1["loaded_step"] == 2  # every rank loaded the same, newest good one
    for key, value in results[0][name]["step2_weights"].items():
        assert torch.equal(r0["weights"][key], value), key
    skipped = r0["verification"]["skipped"]
    assert [s["checkpoint"].rsplit("/", 1)[1] for s in skipped] == [checkpoint_name(4), checkpoint_name(3)]
    assert "checksum mismatch" in skipped[0]["problems"][0]
    assert skipped[1]["problems"][0].startswith(f"{r0['truncated']}: size ")
    assert r0["verification"]["verified"] and len(r0["verification"]["digest"]) == 64
    warnings = [m for m in r0["warnings"] if m.startswith("resume: skipping")]
    assert len(warnings) == 2 and r0["truncated"] in warnings[1]
    assert r0["explicit"] == r1["explicit"] and r0["explicit"].startswith("CheckpointError: checkpoint ")
    assert f"{r0['truncated']}: size " in r0["explicit"]
    all_bad = results[0][name]["all_bad"]
    assert all_bad == results[1][name]["all_bad"] and "no checkpoint in" in all_bad and "verifies" in all_bad


def test_verify_cli_names_bad_files_and_exits_nonzero(runs):
    tmp_path, results = runs
    for name in ENGINES:
        proc = subprocess.run([sys.executable, "-m", "scldm_scale.checkpoint", "verify", str(tmp_path / name)],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 1, proc.stdout + proc.stderr
        lines = [line for line in proc.stdout.splitlines() if not line.startswith("  warning")]
        assert [line.split()[0] for line in lines] == ["OK", "OK", "BAD", "BAD"], lines
        assert f"{results[0][name]['resume']['truncated']}: size " in lines[2]
        assert "checksum mismatch" in lines[3]
        ok = subprocess.run([sys.executable, "-m", "scldm_scale.checkpoint", "verify",
                             str(tmp_path / name / "checkpoints" / checkpoint_name(2))], capture_output=True, timeout=120)
        assert ok.returncode == 0


def test_free_space_precheck_fails_before_writing(runs):
    _, results = runs
    r0, r1 = (r["small_fs"]["precheck"] for r in results)
    assert r0["message"] == r1["message"]
    message = r0["message"]
    assert message.startswith("PeerFailure: preparing checkpoint step-00000002 failed on 1 of 2 ranks: rank 0: ")
    assert "not enough free space" in message and "bytes free" in message and "bytes needed" in message
    assert "/run/checkpoints" in message
    assert r0["left"] == [checkpoint_name(1)]  # nothing written, no .tmp


def test_real_full_disk_during_save(runs):
    _, results = runs
    if not results[0]["small_fs"]["real"]:
        pytest.skip("cannot mount a size-limited tmpfs here (not root); ENOSPC injection covers the save path")
    r0, r1 = (r["small_fs"]["full"] for r in results)
    assert r0["message"] == r1["message"]
    assert r0["message"].startswith("PeerFailure: writing checkpoint step-00000002 failed on 1 of 2 ranks: rank 0: ")
    assert f"[Errno {errno.ENOSPC}]" in r0["message"] and "step-00000002.tmp/state.json" in r0["message"]
    assert r0["left"] == [checkpoint_name(1)]
    assert r0["previous"]["ok"] and r0["previous"]["verified"]
    assert r0["after_freeing"]["ok"] and r0["after_freeing"]["verified"]
