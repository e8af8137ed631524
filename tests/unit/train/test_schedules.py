"""LR schedules (pure functions) and their LambdaLR wiring; the optimizer / schedule config checks."""

from __future__ import annotations

import math

import pytest
import torch

from scldm_scale.config import OptimConfig, TrainConfig, VAEExperimentConfig, load_config
from scldm_scale.train import build_lr_scheduler, build_optimizer, build_schedule, cosine, peak_lr, wsd


def test_wsd_matches_reference_shape():
    f = wsd(100, warmup_steps=10, decay_steps=10, warmup_start_ratio=0.01, min_lr_ratio=0.1, decay_type="sqrt")
    assert f(0) == pytest.approx(0.01)
    assert f(5) == pytest.approx(0.01 + 0.99 * 0.5)
    assert f(10) == 1.0 and f(50) == 1.0 and f(89) == 1.0
    assert f(90) == pytest.approx(1.0)  # decay starts at 1
    assert f(95) == pytest.approx(0.1 + 0.9 * (1 - math.sqrt(0.5)))
    assert f(100) == pytest.approx(0.1)
    values = [f(s) for s in range(90, 101)]
    assert all(a >= b for a, b in zip(values, values[1:]))


@pytest.mark.parametrize("decay_type", ["linear", "cosine"])
def test_wsd_other_decays_end_at_min(decay_type):
    f = wsd(20, warmup_steps=0, decay_steps=10, min_lr_ratio=0.2, decay_type=decay_type)
    assert f(0) == 1.0 and f(10) == pytest.approx(1.0) and f(20) == pytest.approx(0.2)


def test_cosine_warmup_then_half_then_min():
    f = cosine(110, warmup_steps=10, warmup_start_ratio=0.0, min_lr_ratio=0.1)
    assert f(0) == 0.0 and f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5)
    assert f(110) == pytest.approx(0.1)


def test_build_schedule_uses_fractions():
    cfg = OptimConfig(schedule="wsd", warmup_fraction=0.1, decay_fraction=0.1)
    f = build_schedule(cfg, 200)
    assert f(20) == 1.0 and f(179) == 1.0 and f(200) == pytest.approx(cfg.min_lr_ratio)
    assert build_schedule(OptimConfig(schedule="constant", warmup_fraction=0.0), 10)(7) == 1.0


def test_lambda_lr_drives_the_optimizer_and_state_is_json():
    import json

    model = torch.nn.Linear(2, 1)
    cfg = OptimConfig(lr=1.0, schedule="cosine", warmup_fraction=0.5, warmup_start_ratio=0.5, min_lr_ratio=0.0)
    opt = build_optimizer(model.parameters(), cfg)
    sched = build_lr_scheduler(opt, cfg, max_steps=4)
    lrs = []
    for _ in range(4):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.5, 0.75, 1.0, 0.5])
    json.dumps(sched.state_dict())  # checkpoints store it as JSON


def test_linear_lr_scaling():
    assert peak_lr(OptimConfig(lr=1e-3, lr_scaling="linear"), 8) == pytest.approx(8e-3)
    assert peak_lr(OptimConfig(lr=1e-3), 8) == pytest.approx(1e-3)


@pytest.mark.parametrize(
    "override, key",
    [
        ("optim.warmup_start_ratio=0", "optim.warmup_start_ratio"),
        ("optim.decay_fraction=1.5", "optim.decay_fraction"),
        ("optim.min_lr_ratio=2", "optim.min_lr_ratio"),
        ("optim.grad_clip_norm=-1", "optim.grad_clip_norm"),
        ("optim.eps=0", "optim.eps"),
        ("optim.weight_decay=-0.1", "optim.weight_decay"),
        ("train.max_skipped_steps=-1", "train.max_skipped_steps"),
        ("engine.zero_bucket_size=0", "engine.zero_bucket_size"),
        ("checkpoint.resume=' '", "checkpoint.resume"),
        ("checkpoint.keep_latest_k=0", "checkpoint.keep_latest_k"),
    ],
)
def test_config_checks_name_the_key(override, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        load_config(VAEExperimentConfig, overrides=[override])


def test_wsd_fractions_must_fit():
    with pytest.raises(ValueError, match=r"optim\.warmup_fraction \+ optim\.decay_fraction"):
        OptimConfig(schedule="wsd", warmup_fraction=0.6, decay_fraction=0.5)
    OptimConfig(schedule="cosine", warmup_fraction=0.6, decay_fraction=0.5)  # decay unused: fine


def test_train_nonfinite_choices():
    assert TrainConfig(nonfinite="skip").nonfinite == "skip"
    with pytest.raises(ValueError, match="train.nonfinite"):
        load_config(VAEExperimentConfig, overrides=["train.nonfinite=ignore"])
