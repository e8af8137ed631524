"""A tiny model, loss and deterministic in-memory loader for distributed tests (no SOMA, no models/).

Sizes are odd on purpose (7, 13) so ZeRO / FSDP shards need padding; two blocks in an nn.ModuleList,
named by `block_lists`, make FSDP2 shard per block as it does for the real models.
"""

from __future__ import annotations

import torch
from torch import nn

from scldm_scale.models.output import LossOutput

IN_DIM = 7
HIDDEN = 13
NUM_SAMPLES = 96


class ToyModel(nn.Module):
    """embed -> [Linear, Tanh, Dropout] x num_blocks -> head."""

    block_lists = ("blocks",)
    """Named like the real models' blocks (`scldm_scale.distributed.parallelize`)."""

    def __init__(self, num_blocks: int = 2, dropout: float = 0.0) -> None:
        super().__init__()
        self.embed = nn.Linear(IN_DIM, HIDDEN)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(HIDDEN, HIDDEN), nn.Tanh(), nn.Dropout(dropout)) for _ in range(num_blocks)
        )
        self.head = nn.Linear(HIDDEN, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for block in self.blocks:
            h = h + block(h)
        return self.head(h).squeeze(-1)


def build_toy_model(seed: int = 0, dropout: float = 0.0) -> ToyModel:
    """Same weights for the same seed, on every rank."""
    torch.manual_seed(seed)
    return ToyModel(dropout=dropout)


def toy_step(model: nn.Module, batch: dict[str, torch.Tensor]) -> LossOutput:
    """MSE regression; terms carry the loss and the mean prediction."""
    pred = model(batch["x"]).float()
    loss = torch.mean((pred - batch["y"]) ** 2)
    return LossOutput(loss=loss, terms={"mse": loss.detach(), "pred_mean": pred.detach().mean()})


def toy_data(seed: int = 123) -> tuple[torch.Tensor, torch.Tensor]:
    """NUM_SAMPLES x IN_DIM inputs and a smooth target."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(NUM_SAMPLES, IN_DIM, generator=gen)
    y = torch.sin(x[:, 0]) + 0.5 * x[:, 1] * x[:, 2]
    return x, y


class ToyLoader:
    """Deterministic sharded loader: each step takes the next `micro_batch_size * world_size` cells of the
    epoch's permutation and gives rank r its r-th slice. State (epoch, global cells consumed in the epoch)
    is world-size independent, as the SOMA loader promises.
    """

    def __init__(self, micro_batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 7) -> None:
        self.x, self.y = toy_data()
        self.micro_batch_size = micro_batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.epoch, self.cells = 0, 0

    def _perm(self) -> torch.Tensor:
        return torch.randperm(NUM_SAMPLES, generator=torch.Generator().manual_seed(self.seed + self.epoch))

    def __iter__(self):
        perm = self._perm()
        step = self.micro_batch_size * self.world_size
        while self.cells + step <= NUM_SAMPLES:
            start = self.cells + self.rank * self.micro_batch_size
            idx = perm[start : start + self.micro_batch_size]
            self.cells += step
            yield {"x": self.x[idx], "y": self.y[idx]}

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.cells = epoch, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cells": self.cells}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.cells = int(state["epoch"]), int(state["cells"])


class ListLogger:
    """Collects `log_metrics` calls (tests inspect them)."""

    def __init__(self) -> None:
        self.records: list[tuple[int, dict]] = []

    def log_metrics(self, metrics: dict, step: int) -> None:
        self.records.append((step, dict(metrics)))

    def log_params(self, params: dict) -> None:
        pass

    def close(self) -> None:
        pass
