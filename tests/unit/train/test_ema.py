"""The EMA (the only one: engine-local shards): warm-up copies, decay ramp, updates every k steps with the same
horizon, exact updates, and the state checkpoints keep."""

from __future__ import annotations

import pytest
import torch

from scldm_scale.train.ema import EMA


class _Params:
    """The one thing the EMA reads from an engine: its local trainable tensors."""

    def __init__(self) -> None:
        self.p = {"w": torch.zeros(3)}

    def local_params(self) -> dict[str, torch.Tensor]:
        return self.p


def _run(steps: int, **kw) -> EMA:
    engine = _Params()
    ema = EMA(engine, **kw)
    engine.p["w"].fill_(1.0)  # trained weights: 1; initial weights: 0
    for _ in range(steps):
        ema.update()
    return ema


def test_without_the_ramp_the_initial_weights_linger_with_it_they_fade():
    plain = _run(500, decay=0.995)
    assert plain.shadow["w"][0].item() == pytest.approx(1 - 0.995**500, rel=1e-4)  # 8% still the init
    ramped = _run(500, decay=0.995, ramp=True)
    assert ramped.shadow["w"][0].item() > 0.999
    assert ramped.current_decay() == pytest.approx(501 / 510) and _run(10**5, decay=0.995, ramp=True).current_decay() == 0.995


def test_update_every_keeps_the_horizon_and_warmup_copies():
    every = _run(100, decay=0.99, update_every=10)
    each = _run(100, decay=0.99)
    torch.testing.assert_close(every.shadow["w"], each.shadow["w"])
    assert _run(9, decay=0.99, update_every=10).shadow["w"].abs().max() == 0  # no update before step 10
    warm = _run(3, decay=0.99, warmup_steps=3)
    assert torch.equal(warm.shadow["w"], torch.ones(3))
    with pytest.raises(ValueError, match="update_every"):
        EMA(_Params(), update_every=0)


def test_update_is_exact_and_the_checkpointed_state_restores_the_step():
    engine = _Params()
    ema = EMA(engine, decay=0.5, warmup_steps=1)
    engine.p["w"].fill_(1.0)
    ema.update()  # step 1 <= warmup_steps: plain copy
    assert torch.equal(ema.shadow["w"], torch.ones(3))
    engine.p["w"].fill_(3.0)
    ema.update()
    assert torch.equal(ema.tensors()["w"], torch.full((3,), 2.0)) and ema.tensors() is ema.shadow
    assert ema.state_dict() == {"num_updates": 2, "decay": 0.5}  # state.json keys of existing checkpoints
    restored = EMA(_Params(), decay=0.5)
    restored.load_state_dict(ema.state_dict())
    assert restored.num_updates == 2
