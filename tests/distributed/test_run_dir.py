"""Start-up checks of `train.run_dir` on 2 gloo ranks: one shared directory, owned by one run."""

from __future__ import annotations

import pytest

from tests.distributed._helpers import run_on_ranks

pytestmark = pytest.mark.distributed


def _probe(rank, world, tmp_path, shared):
    from scldm_scale.train.run_dir import RunDirError, check_shared

    run_dir = tmp_path / "run" if shared else tmp_path / f"node-{rank}" / "run"
    try:
        check_shared(run_dir, rank)
    except RunDirError as exc:
        return str(exc)
    return None


def test_a_run_dir_that_ranks_do_not_share_is_refused_on_every_rank(tmp_path):
    assert run_on_ranks(_probe, world_size=2, tmp_path=tmp_path, shared=True) == [None, None]
    assert not [p for p in (tmp_path / "run").iterdir()]  # the probe file is cleaned up
    errors = run_on_ranks(_probe, world_size=2, tmp_path=tmp_path, shared=False)
    assert errors[0] == errors[1] and "rank 1" in errors[1] and "not the directory rank 0 wrote to" in errors[1]
    assert str(tmp_path / "node-1" / "run") in errors[1]


def test_claim_refuses_another_runs_checkpoints_and_overwrite_archives_them(tmp_path):
    from scldm_scale.train.run_dir import RunDirError, claim

    run_dir = tmp_path / "run"
    assert claim(run_dir, "never", overwrite=False, rank=0) is None  # nothing there yet
    ckpt = run_dir / "checkpoints" / "step-00000010"
    ckpt.mkdir(parents=True)
    (ckpt / "meta.json").write_text("{}")
    assert claim(run_dir, "auto", overwrite=False, rank=0) is None  # auto continues it
    assert claim(run_dir, str(ckpt), overwrite=False, rank=0) is None  # a checkpoint of this run_dir too
    for resume in ("never", str(tmp_path / "elsewhere")):
        with pytest.raises(RunDirError, match="already holds another run's checkpoints .1, newest step-00000010."):
            claim(run_dir, resume, overwrite=False, rank=0)
    assert ckpt.is_dir()  # refusing touched nothing
    archived = claim(run_dir, "never", overwrite=True, rank=0)
    assert (archived / "checkpoints" / "step-00000010" / "meta.json").is_file() and not ckpt.exists()
