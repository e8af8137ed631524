"""A single-process `TrainEngine` in plain torch (no DeepSpeed, no process group), and a list loader.

For Trainer tests and the golden-loss tests: the engine implements the protocol of
`scldm_scale/distributed/engine.py` on one device and counts its calls, so a test can check what the loop
asked of it (backward per micro-batch, no_sync on all but the last, step / skip_step once per step).
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

ENGINE_FILE = "plain_engine.pt"


class PlainEngine:
    """`TrainEngine` over one un-wrapped module: optimizer and LR scheduler as the real engines build them."""

    name = "plain"

    def __init__(
        self,
        model: nn.Module,
        *,
        optimizer_factory: Callable[[list[nn.Parameter]], torch.optim.Optimizer] | None = None,
        scheduler_factory: Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler] | None = None,
        grad_clip_norm: float = 0.0,
        grad_accum_steps: int = 1,
        device: torch.device | str = "cpu",
    ) -> None:
        self.device = torch.device(device)
        self.model = model.to(self.device)
        self._params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        params = list(self._params.values())
        self.optimizer = optimizer_factory(params) if optimizer_factory else torch.optim.SGD(params, lr=1e-2)
        self.lr_scheduler = (
            scheduler_factory(self.optimizer)
            if scheduler_factory
            else torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda _: 1.0)
        )
        self.grad_clip_norm = grad_clip_norm
        self.grad_accum_steps = grad_accum_steps
        self.calls: Counter[str] = Counter()
        """backward / no_sync / clip_grad_norm / step / skip_step calls so far."""
        self.in_no_sync = False

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def backward(self, loss: torch.Tensor) -> None:
        self.calls["backward"] += 1
        self.calls["backward_in_no_sync"] += int(self.in_no_sync)
        (loss / self.grad_accum_steps).backward()

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        self.calls["no_sync"] += 1
        self.in_no_sync = True
        try:
            yield
        finally:
            self.in_no_sync = False

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        self.calls["clip_grad_norm"] += 1
        grads = [p.grad for p in self._params.values() if p.grad is not None]
        if not grads:
            return torch.zeros((), device=self.device)
        if max_norm > 0:
            return torch.nn.utils.clip_grad_norm_(list(self._params.values()), max_norm)
        return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))

    def step(self) -> None:
        self.calls["step"] += 1
        self.optimizer.step()
        self.lr_scheduler.step()
        self.zero_grad()

    def skip_step(self) -> None:
        self.calls["skip_step"] += 1
        self.zero_grad()
        self.lr_scheduler.step()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def local_params(self) -> dict[str, torch.Tensor]:
        return {n: p.detach() for n, p in self._params.items()}

    def gather_full(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {n: t.detach().float().cpu().clone() for n, t in tensors.items()}

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        return {n: t.detach().float().cpu().clone() for n, t in self.model.state_dict().items()}

    def save(self, path: Path, *, tensors: dict[str, dict[str, torch.Tensor]]) -> None:
        state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "tensors": tensors}
        torch.save(state, Path(path) / ENGINE_FILE)

    def load(self, path: Path, *, tensors: dict[str, dict[str, torch.Tensor]]) -> None:
        state = torch.load(Path(path) / ENGINE_FILE, weights_only=True)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        for group, named in tensors.items():
            for name, tensor in named.items():
                tensor.copy_(state["tensors"][group][name])


class ListLoader:
    """Stateful loader over a fixed list of batches (one epoch = the list); counts the batches handed out."""

    def __init__(self, batches: list[dict[str, torch.Tensor]]) -> None:
        self.batches = batches
        self.epoch, self.index, self.served = 0, 0, 0

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while self.index < len(self.batches):
            self.index += 1
            self.served += 1
            yield self.batches[self.index - 1]

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.index = epoch, 0

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
