"""Checkpoints on real gloo groups: exact resume, crash mid-save, and resharding 2 -> 1 and 2 -> 3 ranks.

One 2-rank spawn runs, per engine (ZeRO-2, ZeRO-3, FSDP2): N straight steps; k steps + resume + N-k steps;
a save that crashes after the shards are written; and a dropout-free continuation from step k that is the
reference for the 1- and 3-rank spawns resuming the same step-k checkpoint. The global batch is the
same at every world size (12 cells), so losses must match where only the reduction order differs.
"""

from __future__ import annotations

import shutil

import pytest
import torch

from scldm_scale.checkpoint import EMA as EMA_KEY
from scldm_scale.checkpoint import checkpoint_name, latest_checkpoint, list_checkpoints, load_model_weights
from scldm_scale.config import CheckpointConfig, EngineConfig, OptimConfig, TrainConfig
from scldm_scale.distributed.faults import PeerFailure
from scldm_scale.train import EMA, Trainer, build_engine
from tests.distributed._helpers import run_on_ranks
from tests.distributed._toy import ListLogger, ToyLoader, build_toy_model, toy_step

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(900)]  # spawns share 2 busy cores

ENGINES = ["zero2", "zero3", "fsdp2"]
N, K = 6, 3
GLOBAL_BATCH = 12
OPTIM = OptimConfig(lr=1e-2, schedule="cosine", warmup_fraction=0.2, grad_clip_norm=1.0)
TOL = dict(rtol=1e-5, atol=1e-6)


class InjectedCrash(RuntimeError):
    """Raised from inside a save, after the shards are written, before publication."""


def _trainer(engine_name, run_dir, *, rank, world, dropout, resume="auto"):
    model = build_toy_model(seed=0, dropout=dropout)
    torch.manual_seed(1000 + rank)  # dropout stream; a resume must restore it
    engine = build_engine(EngineConfig(name=engine_name), model, optim_cfg=OPTIM, max_steps=N, device="cpu")
    return Trainer(
        engine=engine,
        step_fn=toy_step,
        loader=ToyLoader(GLOBAL_BATCH // world, rank, world),
        logger=ListLogger(),
        cfg_train=TrainConfig(max_steps=N, enable_progress_bar=False),
        cfg_ckpt=CheckpointConfig(interval_steps=K, keep_latest_k=2, resume=resume),
        run_dir=run_dir,
        manifest={"gene_vocab": ["g1", "g2"], "mlflow_run_id": "abc"},
        ema=EMA(engine, decay=0.5),
        log_interval_steps=N,
    )


def _final(trainer):
    return {"full": trainer.engine.full_state_dict(), "ema": trainer.ema.full_state_dict()}


def _crashing_save(engine):
    real_save = engine.save

    def save(path, *, tensors):
        real_save(path, tensors=tensors)
        raise InjectedCrash(str(path))

    engine.save = save


def _resume_worker(rank, world, tmp_path):
    out = {}
    for name in ENGINES:
        root = tmp_path / name
        res = {}
        straight = _trainer(name, root / "straight", rank=rank, world=world, dropout=0.1)
        res["straight"] = straight.train().losses
        res["straight_final"] = _final(straight)

        first = _trainer(name, root / "resumed", rank=rank, world=world, dropout=0.1)
        res["first"] = first.train(until_step=K).losses
        # A crash inside the step-N save (after every rank wrote its shards) must leave step K as latest.
        crashing = _trainer(name, root / "resumed", rank=rank, world=world, dropout=0.1)
        _crashing_save(crashing.engine)
        try:
            crashing.train()
            res["crash_raised"] = False
        except PeerFailure as exc:  # every rank agrees on the failure, naming the ranks and the error
            res["crash_raised"] = "InjectedCrash" in str(exc) and not any(
                p.name.endswith(".tmp") for p in (root / "resumed" / "checkpoints").iterdir()
            )
        res["after_crash_latest"] = str(latest_checkpoint(root / "resumed"))
        resumed = _trainer(name, root / "resumed", rank=rank, world=world, dropout=0.1)
        result = resumed.train()
        res["second"], res["second_start"] = result.losses, result.start_step
        res["resumed_final"] = _final(resumed)

        # Dropout-free continuation from step K: the reference for other world sizes.
        cont = _trainer(name, root / "cont2", rank=rank, world=world, dropout=0.0,
                        resume=str(root / "resumed" / "checkpoints" / checkpoint_name(K)))
        res["cont"] = cont.train().losses
        out[name] = res
    return out


def _reshard_worker(rank, world, tmp_path, source):
    out = {}
    for name in ENGINES:
        ckpt = f"{source}/{name}/resumed/checkpoints/{checkpoint_name(K)}"
        trainer = _trainer(name, tmp_path / f"{name}-w{world}", rank=rank, world=world, dropout=0.0, resume=ckpt)
        trainer.resume()
        loaded = _final(trainer)
        trainer.cfg_ckpt.resume = "never"  # already loaded above
        result = trainer.train()
        out[name] = {"loaded": loaded, "losses": result.losses, "step": trainer.step, "cells": trainer.cells_seen,
                     "epoch": trainer.epoch}
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    src = tmp_path_factory.mktemp("ckpt2")
    two = run_on_ranks(_resume_worker, world_size=2, tmp_path=src, timeout=240)
    one = run_on_ranks(_reshard_worker, world_size=1, tmp_path=tmp_path_factory.mktemp("w1"), timeout=180,
                       source=str(src))
    three = run_on_ranks(_reshard_worker, world_size=3, tmp_path=tmp_path_factory.mktemp("w3"), timeout=180,
                         source=str(src))
    return src, two, one, three


@pytest.mark.parametrize("name", ENGINES)
def test_exact_resume_and_crash_mid_save(name, runs):
    src, two, _, _ = runs
    r0, r1 = (r[name] for r in two)
    # Dropout is active: equal losses need RNG, loader, optimizer, scheduler and EMA all restored.
    assert r0["straight"] == r0["first"] + r0["second"], (r0["straight"], r0["first"], r0["second"])
    assert r0["second_start"] == K and r1["second"] == r0["second"]
    for part in ("full", "ema"):
        for key, value in r0["straight_final"][part].items():
            assert torch.equal(r0["resumed_final"][part][key], value), (part, key)
    assert r0["crash_raised"] and r1["crash_raised"]
    assert r0["after_crash_latest"].endswith(checkpoint_name(K))
    steps = [step for step, _ in list_checkpoints(src / name / "resumed")]
    assert steps == [K, N]  # the resumed run published N; retention keeps 2
    # The step-K checkpoint written at world size 2 consolidates on one process.
    state, meta = load_model_weights(src / name / "resumed" / "checkpoints" / checkpoint_name(K))
    assert meta["world_size"] == 2 and meta["step"] == K and meta["cells_seen"] == K * GLOBAL_BATCH
    assert meta["manifest"]["mlflow_run_id"] == "abc" and meta["code_version"]
    assert set(state) == set(r0["straight_final"]["full"])
    ema, _ = load_model_weights(src / name / "resumed", which=EMA_KEY)
    for key, value in r0["resumed_final"]["ema"].items():
        assert torch.equal(ema[key], value)


@pytest.mark.parametrize("name", ENGINES)
@pytest.mark.parametrize("world", [1, 3])
def test_reshard_from_two_ranks(name, world, runs):
    src, two, one, three = runs
    results = {1: one, 3: three}[world]
    ckpt_state, _ = load_model_weights(src / name / "resumed" / "checkpoints" / checkpoint_name(K))
    reference = two[0][name]["cont"]
    for rank_result in results:
        r = rank_result[name]
        for key, value in ckpt_state.items():
            assert torch.equal(r["loaded"]["full"][key], value), key
        assert r["step"] == N and r["cells"] == N * GLOBAL_BATCH
        torch.testing.assert_close(torch.tensor(r["losses"]), torch.tensor(reference), **TOL)


def test_tmp_dirs_are_never_resolved(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints" / (checkpoint_name(5) + ".tmp")).mkdir(parents=True)
    assert latest_checkpoint(run) is None
    shutil.rmtree(run)
