"""The Trainer in one process on a plain-torch engine (no DeepSpeed, no process group): skipped steps,
gradient accumulation, the checkpoint interval (with a resume), hooks, and how padded cells are counted."""

from __future__ import annotations

import pytest
import torch

from scldm_scale.checkpoint import list_checkpoints
from scldm_scale.config.checkpoint import CheckpointConfig
from scldm_scale.config.train import TrainConfig
from scldm_scale.distributed import TrainEngine
from scldm_scale.train.loop import Trainer
from tests.distributed._toy import ListLogger, ToyLoader, build_toy_model, toy_step
from tests.unit.train._plain_engine import ListLoader, PlainEngine


def _trainer(tmp_path, *, step_fn=toy_step, loader=None, ckpt=None, micro=8, **train_kw) -> Trainer:
    cfg_train = TrainConfig(**{"max_steps": 4, "enable_progress_bar": False, "run_dir": str(tmp_path), **train_kw})
    engine = PlainEngine(build_toy_model(seed=0), grad_accum_steps=cfg_train.grad_accum_steps)
    return Trainer(
        engine=engine,
        step_fn=step_fn,
        loader=loader if loader is not None else ToyLoader(micro),
        logger=ListLogger(),
        cfg_train=cfg_train,
        cfg_ckpt=ckpt or CheckpointConfig(interval_steps=100, resume="never"),
        manifest={},
        log_interval_steps=2,
    )


class NaNAtCalls:
    """`toy_step` whose loss is NaN on the given (1-based) calls."""

    def __init__(self, bad_calls: set[int]) -> None:
        self.bad_calls, self.calls = bad_calls, 0

    def __call__(self, model, batch):
        self.calls += 1
        out = toy_step(model, batch)
        if self.calls in self.bad_calls:
            out.loss = out.loss * float("nan")
        return out


def test_plain_engine_implements_the_protocol():
    assert isinstance(PlainEngine(build_toy_model()), TrainEngine)


def test_run_dir_defaults_to_the_train_config(tmp_path):
    trainer = _trainer(tmp_path / "from_cfg")
    assert trainer.run_dir == tmp_path / "from_cfg"


def test_nonfinite_step_is_skipped_counted_and_max_skipped_steps_raises(tmp_path):
    trainer = _trainer(tmp_path, step_fn=NaNAtCalls({2, 4}), max_steps=5, nonfinite="skip", max_skipped_steps=1)
    weights: list[dict[str, torch.Tensor]] = []
    trainer.hooks.append(lambda t: weights.append(t.engine.full_state_dict()))
    result = trainer.train(until_step=3)
    assert result.skipped_steps == trainer.skipped_steps == 1
    assert torch.isnan(torch.tensor(result.losses[1])) and all(map(torch.isfinite, torch.tensor(result.losses[::2])))
    assert trainer.engine.calls["skip_step"] == 1 and trainer.engine.calls["step"] == 2
    for name, before in weights[0].items():  # step 2 was skipped: weights as after step 1
        torch.testing.assert_close(weights[1][name], before, rtol=0, atol=0)
    assert any(not torch.equal(weights[2][n], weights[1][n]) for n in weights[1])  # step 3 applied
    with pytest.raises(FloatingPointError, match="2 steps skipped > train.max_skipped_steps=1"):
        trainer.train(until_step=5)  # second NaN at step 4


def test_nonfinite_stop_policy_raises_at_once(tmp_path):
    trainer = _trainer(tmp_path, step_fn=NaNAtCalls({1}), nonfinite="stop")
    with pytest.raises(FloatingPointError, match="non-finite loss or gradient norm at step 1"):
        trainer.train()
    assert trainer.engine.calls["step"] == trainer.engine.calls["skip_step"] == 0


def test_grad_accumulation_consumes_two_micro_batches_per_step_and_steps_once(tmp_path):
    loader = ToyLoader(4)
    accum = _trainer(tmp_path / "accum", loader=loader, max_steps=3, grad_accum_steps=2)
    result = accum.train()
    calls = accum.engine.calls
    assert loader.cells == 3 * 2 * 4 and result.cells_seen == 24
    assert calls["backward"] == 6 and calls["step"] == 3 and calls["clip_grad_norm"] == 3
    assert calls["no_sync"] == 3 and calls["backward_in_no_sync"] == 3  # every first micro-batch, never the last
    assert len(result.losses) == 3
    # Same cells in one micro-batch of 8: the same update (the engine divides by grad_accum_steps).
    single = _trainer(tmp_path / "single", loader=ToyLoader(8), max_steps=3)
    single_result = single.train()
    for name, value in single.engine.full_state_dict().items():
        torch.testing.assert_close(accum.engine.full_state_dict()[name], value, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.tensor(result.losses), torch.tensor(single_result.losses), rtol=1e-5, atol=1e-6)


def test_checkpoints_at_the_interval_and_the_end_across_a_resume(tmp_path):
    ckpt = CheckpointConfig(interval_steps=2, keep_latest_k=10, resume="auto")
    first = _trainer(tmp_path, ckpt=ckpt, max_steps=5)
    first.train(until_step=3)  # saves at 2; step 3 is neither an interval step nor the last
    assert [step for step, _ in list_checkpoints(tmp_path)] == [2]
    second = _trainer(tmp_path, ckpt=ckpt, max_steps=5)
    result = second.train()
    assert result.start_step == 2 and result.final_step == 5
    assert [step for step, _ in list_checkpoints(tmp_path)] == [2, 4, 5]
    assert result.last_checkpoint is not None and result.last_checkpoint.name == list_checkpoints(tmp_path)[-1][1].name


def test_padded_cells_are_passed_to_step_fn_and_counted_in_cells_seen(tmp_path):
    """The batch contract: `is_padding` rows reach `step_fn` (its loss averages over all rows) and count as
    cells seen; nothing in the loop drops them."""
    gen = torch.Generator().manual_seed(0)
    batches = [
        {"x": torch.randn(6, 7, generator=gen), "y": torch.randn(6, generator=gen), "is_padding": pad}
        for pad in (torch.zeros(6, dtype=torch.bool), torch.tensor([False] * 4 + [True] * 2))
    ]
    seen: list[int] = []

    def step_fn(model, batch):
        seen.append(int(batch["x"].shape[0]))
        return toy_step(model, batch)

    result = _trainer(tmp_path, step_fn=step_fn, loader=ListLoader(batches), max_steps=2).train()
    assert seen == [6, 6] and result.cells_seen == 12
