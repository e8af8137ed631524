"""Engines on a real 2-rank gloo group: every engine trains, matches a 1-process 2B reference, exports.

Cheapest first: a single-process pure-torch reference (no group) is computed in the parent; each engine
then runs in one 2-rank spawn that covers fp32 parity (plain, and with gradient accumulation plus
activation checkpointing), grad-norm
parity, EMA, bf16 training, the consolidated state dict and its export through the checkpoint.
"""

from __future__ import annotations

import math

import pytest
import torch

from scldm_scale.checkpoint import EMA as EMA_KEY
from scldm_scale.checkpoint import export_safetensors, latest_checkpoint, load_model_weights
from scldm_scale.config import CheckpointConfig, EngineConfig, OptimConfig, TrainConfig
from scldm_scale.train import EMA, Trainer, build_engine, build_lr_scheduler, build_optimizer
from tests.distributed._helpers import run_on_ranks
from tests.distributed._toy import ListLogger, ToyLoader, build_toy_model, toy_step

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(900)]  # spawns share 2 busy cores

ENGINES = ["zero0", "zero1", "zero2", "zero3", "fsdp2"]
STEPS = 8
MICRO = 4  # per-rank batch; the reference uses 2 * MICRO
OPTIM = OptimConfig(lr=2e-2, schedule="wsd", warmup_fraction=0.25, decay_fraction=0.25, grad_clip_norm=1.0)
EMA_DECAY = 0.5
TOL = dict(rtol=1e-4, atol=1e-5)  # fp32; reduction order differs between 2x B and 1x 2B


def _train(engine_name, run_dir, *, rank, world, precision="fp32", accum=1, ema=False, steps=STEPS, ac=False):
    model = build_toy_model(seed=0)
    cfg_train = TrainConfig(max_steps=steps, grad_accum_steps=accum, precision=precision, enable_progress_bar=False)
    engine = build_engine(
        EngineConfig(name=engine_name, enable_activation_checkpointing=ac), model, optim_cfg=OPTIM, max_steps=steps, precision=precision,
        device="cpu", grad_accum_steps=accum,
    )
    ema_weights = EMA(engine, decay=EMA_DECAY) if ema else None
    logger = ListLogger()
    trainer = Trainer(
        engine=engine, step_fn=toy_step, loader=ToyLoader(MICRO // accum, rank, world), logger=logger,
        cfg_train=cfg_train, cfg_ckpt=CheckpointConfig(interval_steps=100, resume="never"), run_dir=run_dir,
        manifest={"note": "toy"}, ema=ema_weights, log_interval_steps=4,
    )
    result = trainer.train()
    out = {
        "losses": result.losses,
        "grad_norms": result.grad_norms,
        "full": engine.full_state_dict(),
        "lr": engine.lr,
        "records": [step for step, _ in logger.records],
        "metric_keys": sorted(logger.records[-1][1]) if logger.records else [],
        "cells_seen": result.cells_seen,
    }
    if ema_weights is not None:
        out["ema"] = ema_weights.full_state_dict()
    return out


class NaNOnRank1AtCall:
    """step_fn that returns a NaN loss on rank 1 at one call (so only one rank sees it)."""

    def __init__(self, rank, bad_call):
        self.rank, self.bad_call, self.calls = rank, bad_call, 0

    def __call__(self, model, batch):
        self.calls += 1
        out = toy_step(model, batch)
        if self.rank == 1 and self.calls == self.bad_call:
            out.loss = out.loss * float("nan")
        return out


def _nonfinite(engine_name, run_dir, *, rank, world, policy):
    engine = build_engine(EngineConfig(name=engine_name), build_toy_model(seed=0), optim_cfg=OPTIM, max_steps=4,
                          device="cpu")
    trainer = Trainer(
        engine=engine, step_fn=NaNOnRank1AtCall(rank, bad_call=3), loader=ToyLoader(MICRO, rank, world),
        logger=ListLogger(), cfg_train=TrainConfig(max_steps=4, nonfinite=policy, enable_progress_bar=False),
        cfg_ckpt=CheckpointConfig(interval_steps=100, resume="never"), run_dir=run_dir, manifest={},
    )
    if policy == "stop":
        try:
            trainer.train()
        except FloatingPointError as exc:
            return str(exc)
        return "no error"
    trainer.train(until_step=2)
    before = engine.full_state_dict()
    skipped = trainer.train(until_step=3)
    after_skip = engine.full_state_dict()
    result = trainer.train()
    unchanged = all(torch.equal(before[k], after_skip[k]) for k in before)
    return {"losses": skipped.losses + result.losses, "skipped": result.skipped_steps, "unchanged": unchanged,
            "final_step": result.final_step}


def _engines_worker(rank, world, tmp_path):
    # All engines in one spawn: process start-up (torch + deepspeed imports) dominates on 2 shared cores.
    out = {}
    for name in ENGINES:
        root = tmp_path / name
        out[name] = {
            "fp32": _train(name, root / "fp32", rank=rank, world=world, ema=True),
            "accum": _train(name, root / "accum", rank=rank, world=world, accum=2, ac=True),
            "bf16": _train(name, root / "bf16", rank=rank, world=world, precision="bf16", steps=12),
            "skip": _nonfinite(name, root / "skip", rank=rank, world=world, policy="skip"),
            "stop": _nonfinite(name, root / "stop", rank=rank, world=world, policy="stop"),
        }
    return out


def _reference():
    """One process, batch 2 * MICRO, plain torch AdamW + the same schedule and clipping."""
    model = build_toy_model(seed=0)
    opt = build_optimizer(model.parameters(), OPTIM)
    sched = build_lr_scheduler(opt, OPTIM, STEPS)
    loader = ToyLoader(2 * MICRO)
    ema = {n: p.detach().clone() for n, p in model.named_parameters()}
    losses, norms = [], []
    batches = iter(loader)
    for _ in range(STEPS):
        out = toy_step(model, next(batches))
        out.loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), OPTIM.grad_clip_norm)))
        opt.step()
        sched.step()
        opt.zero_grad()
        losses.append(float(out.loss.detach()))
        for n, p in model.named_parameters():
            ema[n].lerp_(p.detach(), 1 - EMA_DECAY)
    return losses, norms, model.state_dict(), ema


@pytest.fixture(scope="module")
def reference():
    return _reference()


@pytest.fixture(scope="module")
def engine_runs(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("engines")
    return tmp_path, run_on_ranks(_engines_worker, world_size=2, tmp_path=tmp_path, timeout=240)


@pytest.mark.parametrize("engine_name", ENGINES)
def test_engine_trains_matches_reference_and_exports(engine_name, engine_runs, reference):
    ref_losses, ref_norms, ref_state, ref_ema = reference
    tmp_path, results = engine_runs
    tmp_path = tmp_path / engine_name
    r0, r1 = (r[engine_name] for r in results)
    # Data-parallel equivalence: 2 ranks x B == 1 rank x 2B, loss, grad norm and final weights;
    # "accum" splits each rank's B into 2 micro-batches and recomputes activations (no_sync + AC).
    for key in ("fp32", "accum"):
        torch.testing.assert_close(torch.tensor(r0[key]["losses"]), torch.tensor(ref_losses), **TOL)
        torch.testing.assert_close(torch.tensor(r0[key]["grad_norms"]), torch.tensor(ref_norms), **TOL)
        for name, value in ref_state.items():
            torch.testing.assert_close(r0[key]["full"][name], value, **TOL)
    assert r0["fp32"]["losses"] == r1["fp32"]["losses"], "ranks must agree on the reduced loss"
    for name, value in ref_ema.items():
        torch.testing.assert_close(r0["fp32"]["ema"][name], value, **TOL)
    assert r0["fp32"]["cells_seen"] == STEPS * 2 * MICRO
    assert r0["fp32"]["records"] == [4, 8] and r1["fp32"]["records"] == []
    assert {"train/loss", "train/grad_norm", "train/lr", "train/mse", "sys/cells_per_second"} <= set(
        r0["fp32"]["metric_keys"]
    )
    # bf16 mixed precision trains: finite and decreasing.
    bf16 = r0["bf16"]["losses"]
    assert all(math.isfinite(v) for v in bf16)
    assert sum(bf16[-3:]) / 3 < 0.8 * sum(bf16[:3]) / 3, bf16
    # The final checkpoint consolidates on one process (no group) to the engine's full state dict.
    ckpt = latest_checkpoint(tmp_path / "fp32")
    state, meta = load_model_weights(ckpt)
    assert meta["engine"] == engine_name and meta["world_size"] == 2 and meta["step"] == STEPS
    assert meta["manifest"] == {"note": "toy"}
    assert set(state) == set(r0["fp32"]["full"])
    for name, value in r0["fp32"]["full"].items():
        torch.testing.assert_close(state[name], value, rtol=0, atol=0)
    ema_state, _ = load_model_weights(ckpt, which=EMA_KEY)
    for name, value in r0["fp32"]["ema"].items():
        torch.testing.assert_close(ema_state[name], value, rtol=0, atol=0)
    exported = export_safetensors(ckpt, tmp_path / "export" / "model.safetensors")
    state2, meta2 = load_model_weights(exported)
    assert meta2 == meta and (tmp_path / "export" / "model.manifest.json").is_file()
    for name, value in state.items():
        assert torch.equal(state2[name], value)


@pytest.mark.parametrize("engine_name", ENGINES)
def test_nonfinite_step_is_skipped_or_stops_on_every_rank(engine_name, engine_runs):
    _, results = engine_runs
    for rank_result in results:  # rank 0 never saw the NaN itself: the decision is collective
        skip = rank_result[engine_name]["skip"]
        assert skip["skipped"] == 1 and skip["final_step"] == 4 and skip["unchanged"]
        assert not math.isfinite(skip["losses"][0]) and all(math.isfinite(v) for v in skip["losses"][1:])
        stop = rank_result[engine_name]["stop"]
        assert "non-finite loss or gradient norm at step 3" in stop and "train.nonfinite=skip" in stop
