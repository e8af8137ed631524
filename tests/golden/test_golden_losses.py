"""Golden losses: configs/vae/debug.yaml and configs/ldm/debug.yaml trained for a few steps must reproduce the
losses and gradient norms checked in next to this file (rtol 1e-5), so a change of numerics shows as a diff.

Path: the preset's model (`build_vae` / `build_dit`), the real step function (`vae_step` / `ldm_step`, stage 2
encoding token batches with a frozen, seeded debug autoencoder), the preset's AdamW and LR schedule
(`build_optimizer` / `build_lr_scheduler`) and the `Trainer` loop, on fixed synthetic token batches, one process,
CPU, one thread, fixed seeds. The engine is the plain-torch one of the unit tests (DeepSpeed / FSDP are
covered by tests/distributed), so this pins model + step + optimizer + loop numerics, not an engine's.

After a deliberate numerics change, regenerate and commit the files (review the diff):

    SCLDM_UPDATE_GOLDEN=1 python -m pytest tests/golden
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from pathlib import Path

import pytest
import torch

from scldm_scale.config import LDMExperimentConfig, VAEExperimentConfig, load_config
from scldm_scale.config.checkpoint import CheckpointConfig
from scldm_scale.models import build_dit, build_vae
from scldm_scale.train.ldm_step import ldm_step
from scldm_scale.train.loop import Trainer
from scldm_scale.train.optim import build_lr_scheduler, build_optimizer
from scldm_scale.train.vae_step import vae_step
from scldm_scale.utils import seed_everything
from tests.unit.train._plain_engine import ListLoader, PlainEngine

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = Path(__file__).resolve().parent
UPDATE_ENV = "SCLDM_UPDATE_GOLDEN"
STEPS = 10
NUM_GENES = 48
TOKENS = 16
LABEL_CARDINALITIES = (3, 4)
RTOL, ATOL = 1e-5, 1e-7


class _NoLogger:
    def log_metrics(self, metrics: dict, step: int) -> None:
        pass


@pytest.fixture(autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # reduction order (and speed on a shared machine)
    yield
    torch.set_num_threads(previous)


def token_batches(n: int, batch_size: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """`n` batches of the DEVELOPERS.md contract: B cells of up to TOKENS distinct genes (some padded)."""
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n):
        gene_ids = torch.stack([torch.randperm(NUM_GENES, generator=gen)[:TOKENS] + 1 for _ in range(batch_size)])
        counts = torch.randint(1, 30, (batch_size, TOKENS), generator=gen).float()
        lengths = torch.randint(TOKENS // 2, TOKENS + 1, (batch_size,), generator=gen)
        mask = torch.arange(TOKENS) < lengths[:, None]
        gene_ids, counts = gene_ids * mask, counts * mask
        labels = torch.stack([torch.randint(0, k + 1, (batch_size,), generator=gen) for k in LABEL_CARDINALITIES], 1)
        batches.append(
            {
                "gene_ids": gene_ids,
                "counts": counts,
                "mask": mask,
                "library_size": counts.sum(1) + torch.randint(0, 20, (batch_size,), generator=gen).float(),
                "labels": labels,
                "is_padding": torch.zeros(batch_size, dtype=torch.bool),
            }
        )
    return batches


def _train(cfg, model: torch.nn.Module, step_fn, run_dir: Path) -> dict[str, list[float]]:
    train_cfg = dataclasses.replace(cfg.train, run_dir=str(run_dir), enable_progress_bar=False)
    engine = PlainEngine(
        model,
        optimizer_factory=lambda ps: build_optimizer(ps, cfg.optim),
        scheduler_factory=lambda opt: build_lr_scheduler(opt, cfg.optim, train_cfg.max_steps),
        grad_clip_norm=cfg.optim.grad_clip_norm,
        grad_accum_steps=train_cfg.grad_accum_steps,
    )
    loader = ListLoader(token_batches(STEPS * train_cfg.grad_accum_steps, cfg.data.micro_batch_size))
    trainer = Trainer(
        engine=engine,
        step_fn=step_fn,
        loader=loader,
        logger=_NoLogger(),
        cfg_train=train_cfg,
        cfg_ckpt=CheckpointConfig(interval_steps=10**6, resume="never"),
        manifest={},
        log_interval_steps=10**6,
    )
    assert STEPS < train_cfg.max_steps  # until_step < max_steps: no final checkpoint, the schedule as configured
    result = trainer.train(until_step=STEPS)
    assert result.skipped_steps == 0
    return {"losses": result.losses, "grad_norms": result.grad_norms}


def run_vae_debug(run_dir: Path) -> dict[str, list[float]]:
    cfg = load_config(VAEExperimentConfig, [ROOT / "configs" / "vae" / "debug.yaml"])
    seed_everything(cfg.train.seed)
    return _train(cfg, build_vae(cfg.model, NUM_GENES), vae_step, run_dir)


def run_ldm_debug(run_dir: Path) -> dict[str, list[float]]:
    vae_cfg = load_config(VAEExperimentConfig, [ROOT / "configs" / "vae" / "debug.yaml"])
    cfg = load_config(LDMExperimentConfig, [ROOT / "configs" / "ldm" / "debug.yaml"])
    seed_everything(vae_cfg.train.seed)
    vae = build_vae(vae_cfg.model, NUM_GENES).requires_grad_(False).eval()  # frozen, as stage 2 loads it
    seed_everything(cfg.train.seed)
    dit = build_dit(cfg.model, vae.latent_shape, LABEL_CARDINALITIES)
    return _train(cfg, dit, functools.partial(ldm_step, vae=vae), run_dir)


def _check(name: str, preset: str, got: dict[str, list[float]]) -> None:
    path = GOLDEN / f"{name}_losses.json"
    if os.environ.get(UPDATE_ENV) == "1":
        record = {"preset": preset, "steps": STEPS, "num_genes": NUM_GENES, "torch": torch.__version__, **got}
        path.write_text(json.dumps(record, indent=2) + "\n")
        return
    if not path.exists():
        pytest.fail(f"{path} is missing: generate it with {UPDATE_ENV}=1 python -m pytest {Path(__file__).name}")
    want = json.loads(path.read_text())
    hint = f"{name}: numerics changed; if deliberate, rerun with {UPDATE_ENV}=1 and commit {path.name}"
    for key in ("losses", "grad_norms"):
        assert len(got[key]) == len(want[key]), hint
        torch.testing.assert_close(
            torch.tensor(got[key], dtype=torch.float64),
            torch.tensor(want[key], dtype=torch.float64),
            rtol=RTOL,
            atol=ATOL,
            msg=lambda m, key=key: f"{hint}\n{key}: {m}",
        )


def test_vae_debug_losses(tmp_path):
    _check("vae_debug", "configs/vae/debug.yaml", run_vae_debug(tmp_path))


def test_ldm_debug_losses(tmp_path):
    _check("ldm_debug", "configs/ldm/debug.yaml", run_ldm_debug(tmp_path))
