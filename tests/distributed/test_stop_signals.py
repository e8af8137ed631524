"""A stop signal on one rank stops every rank after the same step, with one checkpoint (real signals, 2 gloo ranks).

Only rank 1 sends itself SIGUSR1 (from a hook after step 2); the flag rides on the per-step all-reduce, so
both ranks stop after step 3 at the latest, save together, and report the signal. The checkpoint's loader
state accounts for every cell of the epoch (consumed + remaining), and resuming from it gives the losses of
an uninterrupted run.
"""

from __future__ import annotations

import os
import signal

import pytest
import torch

from tests.distributed._helpers import run_on_ranks

pytestmark = pytest.mark.distributed

MAX_STEPS = 6


def _trainer(rank, world, run_dir, stops=None, resume="auto"):
    from scldm_scale.config import EngineConfig, OptimConfig
    from scldm_scale.config.checkpoint import CheckpointConfig
    from scldm_scale.config.train import TrainConfig
    from scldm_scale.train.loop import Trainer
    from scldm_scale.train.optim import build_engine
    from tests.distributed._toy import ListLogger, ToyLoader, build_toy_model, toy_step

    engine = build_engine(
        EngineConfig(name="zero2"), build_toy_model(), optim_cfg=OptimConfig(lr=1e-2), max_steps=MAX_STEPS, device="cpu"
    )
    return Trainer(
        engine=engine,
        step_fn=toy_step,
        loader=ToyLoader(8, rank=rank, world_size=world),
        logger=ListLogger(),
        cfg_train=TrainConfig(max_steps=MAX_STEPS, enable_progress_bar=False),
        cfg_ckpt=CheckpointConfig(interval_steps=100, resume=resume),
        run_dir=run_dir,
        manifest={},
        stop_signals=stops,
    )


def _signal_rank1_then_resume(rank, world, tmp_path):
    from scldm_scale.checkpoint import list_checkpoints
    from scldm_scale.train.preemption import StopSignals, parse_signals

    stops = StopSignals(parse_signals(["SIGTERM", "USR1"])).install()
    trainer = _trainer(rank, world, tmp_path / "run", stops)

    def kick(t):
        if rank == 1 and t.step == 2:
            os.kill(os.getpid(), signal.SIGUSR1)

    trainer.hooks.append(kick)
    first = trainer.train()
    stops.restore()
    saved = [step for step, _ in list_checkpoints(tmp_path / "run")]
    resumed = _trainer(rank, world, tmp_path / "run").train()
    return {
        "stopped_by": first.stopped_by,
        "final": first.final_step,
        "saved": saved,
        "loader": trainer.loader.state_dict(),
        "resumed_start": resumed.start_step,
        "resumed_losses": resumed.losses,
    }


def _uninterrupted(rank, world, tmp_path):
    return _trainer(rank, world, tmp_path / "ref", resume="never").train().losses


def test_one_signalled_rank_stops_both_after_the_same_step_and_resume_is_exact(tmp_path):
    results = run_on_ranks(_signal_rank1_then_resume, world_size=2, tmp_path=tmp_path)
    reference = run_on_ranks(_uninterrupted, world_size=2, tmp_path=tmp_path)[0]
    r0, r1 = results
    assert r1["stopped_by"] == "SIGUSR1" and r0["stopped_by"] == "a peer's stop request"
    assert r0["final"] == r1["final"] == 3  # the signal arrived during step 3's hook window: stop after step 3
    assert r0["saved"] == [3]
    # No cell lost or repeated: 3 steps x 2 ranks x 8 cells consumed, the loader resumes right after them.
    assert r0["loader"] == {"epoch": 0, "cells": 48}
    assert r0["resumed_start"] == 3
    torch.testing.assert_close(torch.tensor(r0["resumed_losses"]), torch.tensor(reference[3:]), rtol=1e-6, atol=1e-7)
