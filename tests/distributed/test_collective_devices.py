"""Every tensor our code hands to a collective lives on the engine's device (NCCL rejects CPU tensors).

CPU-only CI has one device, so a stray `torch.tensor(x)` (on CPU) next to `device=engine.device` tensors
looks fine here and fails at the first log step on a multi-GPU node. `HostTaint` makes the difference
visible on CPU: it plays a second device. Tensors that scldm_scale code creates without a `device=`
argument are "host" tensors, results of ops on host tensors stay host, and `.to(device)` moves them to
the "device". The collectives of torch.distributed are wrapped to fail on a host tensor. The Trainer then
runs real steps on 2 gloo ranks with a log every step, under the taint.
"""

from __future__ import annotations

import sys
import weakref
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode

from tests.distributed._helpers import run_on_ranks

pytestmark = pytest.mark.distributed

_FACTORIES = {torch.tensor, torch.zeros, torch.ones, torch.full, torch.empty, torch.arange, torch.as_tensor}
_COLLECTIVES = ("all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor", "reduce")
_PACKAGE = str(Path(__file__).resolve().parents[2] / "scldm_scale")


class HostTaint(TorchFunctionMode):
    """Track tensors that would be on the host (CPU) when the engine computes on an accelerator."""

    def __init__(self) -> None:
        super().__init__()
        self.host: weakref.WeakSet = weakref.WeakSet()
        self.violations: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in _FACTORIES and kwargs.get("device") is None and _called_from_package():
            self._mark(out)
        elif getattr(func, "__name__", "") in ("to", "cuda") and (len(args) > 1 or "device" in kwargs):
            pass  # moved to a device: a fresh, untainted tensor
        elif any(isinstance(a, torch.Tensor) and a in self.host for a in _flat(args, kwargs)):
            self._mark(out)
        return out

    def _mark(self, out) -> None:
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.host.add(t)

    def wrap_collectives(self) -> None:
        for name in _COLLECTIVES:
            original = getattr(dist, name)

            def checked(*args, _original=original, _name=name, **kwargs):
                for a in _flat(args, kwargs):
                    if isinstance(a, torch.Tensor) and a in self.host:
                        self.violations.append(f"dist.{_name} got a host tensor (created without device=)")
                return _original(*args, **kwargs)

            setattr(dist, name, checked)


def _flat(args, kwargs):
    for a in (*args, *kwargs.values()):
        if isinstance(a, (list, tuple)):
            yield from a
        else:
            yield a


def _called_from_package() -> bool:
    frame = sys._getframe(2)
    for _ in range(3):
        if frame is None:
            return False
        if frame.f_code.co_filename.startswith(_PACKAGE):
            return True
        frame = frame.f_back
    return False


def _loop_under_taint(rank, world_size, tmp_path, engine_name):
    from scldm_scale.config import EngineConfig, OptimConfig
    from scldm_scale.config.checkpoint import CheckpointConfig
    from scldm_scale.config.train import TrainConfig
    from scldm_scale.distributed import all_reduce_sum
    from scldm_scale.train.loop import Trainer
    from scldm_scale.train.optim import build_engine
    from tests.distributed._toy import ListLogger, ToyLoader, build_toy_model, toy_step

    engine = build_engine(EngineConfig(name=engine_name), build_toy_model(), optim_cfg=OptimConfig(lr=1e-2), max_steps=3, device="cpu")
    taint = HostTaint()
    taint.wrap_collectives()
    trainer = Trainer(
        engine=engine,
        step_fn=toy_step,
        loader=ToyLoader(8, rank=rank, world_size=world_size),
        logger=ListLogger(),
        cfg_train=TrainConfig(max_steps=3, run_dir=str(tmp_path / "run"), enable_progress_bar=False),
        cfg_ckpt=CheckpointConfig(interval_steps=100, resume="never"),
        run_dir=tmp_path / "run",
        manifest={},
        log_interval_steps=1,
    )
    with taint:
        trainer.train(until_step=3)
        clean = list(taint.violations)
        # The control: a host tensor created in package code (as the old `Trainer._log` did) is caught.
        control = eval(compile("torch.tensor(1.0)", f"{_PACKAGE}/control.py", "eval"), {"torch": torch})  # noqa: S307
        all_reduce_sum(control)
    return {"clean": clean, "control": taint.violations[len(clean):], "logged": len(trainer.metric_logger.records)}


@pytest.mark.parametrize("engine_name", ["fsdp2", "zero2"])
def test_the_loop_passes_only_device_tensors_to_collectives(tmp_path, engine_name):
    results = run_on_ranks(_loop_under_taint, world_size=2, tmp_path=tmp_path, engine_name=engine_name)
    for rank, result in enumerate(results):
        assert result["clean"] == [], f"rank {rank}: {result['clean']}"
        assert result["control"] == ["dist.all_reduce got a host tensor (created without device=)"]
    assert results[0]["logged"] == 3  # a log step every step: its reductions were checked
