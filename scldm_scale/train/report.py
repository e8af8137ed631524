"""End-of-run results people look at: loss curves, and for stage 2 generated-vs-real scores and plot.

Rank 0 writes PNGs under `<run_dir>/plots/` and logs them (and the scores) to the tracker. The only
collective here is the consolidation of the DiT weights, which every rank joins.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from scldm_scale.config import LDMExperimentConfig
from scldm_scale.data.loader import build_loader
from scldm_scale.distributed import DistInfo, TrainEngine
from scldm_scale.eval import distribution_metrics, generate, preprocess
from scldm_scale.models import build_dit
from scldm_scale.tracking import MetricLogger
from scldm_scale.train.ema import EMA
from scldm_scale.train.plots import plot_generated_vs_real, plot_loss_curves

logger = logging.getLogger(__name__)

LOSS_CURVE_METRICS = ("train/loss", "train/grad_norm", "train/lr", "sys/cells_per_second")
"""Panels of the loss-curve plot (those the run logged), loss terms `train/<term>` added."""


def log_loss_curves(
    tracker: MetricLogger, history: dict[str, list[tuple[int, float]]], run_dir: Path
) -> Path:
    """Plot the logged loss (and its terms, grad norm, lr, throughput) against step; log the PNG."""
    terms = [
        n
        for n in history
        if n.startswith("train/")
        and n not in LOSS_CURVE_METRICS
        and n not in ("train/skipped_steps", "train/epoch", "train/cells_seen")
    ]
    panels = {
        n: history[n] for n in (*LOSS_CURVE_METRICS[:1], *terms, *LOSS_CURVE_METRICS[1:]) if n in history
    }
    path = plot_loss_curves(panels, run_dir / "plots" / "loss_curves.png", title=str(run_dir))
    tracker.log_artifact(str(path), "plots")
    return path


def _real_cells(
    cfg: LDMExperimentConfig, data: Any, stage1: Any, device: torch.device, value_filter: str | None
) -> dict[str, torch.Tensor]:
    """Up to `eval.num_cells` real cells of `value_filter`: one shuffled batch (seeded by `train.seed`), so
    the sample spans datasets instead of the first one stored."""
    loader = build_loader(
        cfg.data,
        rank=0,
        world_size=1,
        gene_vocab=stage1.gene_vocab,
        label_vocabs=data.loader.label_vocabs,
        value_filter=value_filter,
        atlas_uri=data.atlas_uri,
        seed=cfg.train.seed,
        shuffle=True,
        batch_size=cfg.eval.num_cells,
        num_workers=0,
    )
    batch = next(iter(loader))
    keep = (
        ~batch["is_padding"]
        if "is_padding" in batch
        else torch.ones(len(batch["soma_joinid"]), dtype=torch.bool)
    )
    return {k: v[keep].to(device) for k, v in batch.items()}


def evaluate_generation(
    tracker: MetricLogger,
    cfg: LDMExperimentConfig,
    dist: DistInfo,
    *,
    engine: TrainEngine,
    ema: EMA | None,
    stage1: Any,
    data: Any,
) -> dict[str, float]:
    """Generate as many cells as real ones (same labels and library sizes) and score them (rank 0).

    Scores follow REFERENCE.md section 8 (HVGs on real cells, log1p-CP10k, PCA fitted on real cells): W2,
    MMD^2 RBF and Frechet distance, logged as `eval/*` at the final step, beside a PCA scatter.

    Returns:
        The scores on rank 0 ({} elsewhere or when `eval.enable_at_end` is off).
    """
    if not cfg.eval.enable_at_end:
        return {}
    use_ema = ema is not None and cfg.flow.use_ema_for_sampling
    weights = ema.full_state_dict() if use_ema else engine.full_state_dict()  # collective: every rank joins
    if dist.rank != 0:
        return {}
    dit = build_dit(cfg.model, stage1.vae.latent_shape, data.label_cardinalities)
    dit.load_state_dict(weights, strict=False)  # EMA holds trainable parameters only; buffers are rebuilt
    dit.to(dist.device).eval()
    use_val = cfg.eval.use_val_split and cfg.data.val_value_filter is not None
    real = _real_cells(
        cfg, data, stage1, dist.device, cfg.data.val_value_filter if use_val else cfg.data.value_filter
    )
    generator = torch.Generator().manual_seed(cfg.train.seed)
    out = generate(
        dit,
        stage1.vae,
        real["labels"],
        library_size=real["library_size"],
        generator=generator,
        sampler=cfg.flow.sampler,
        num_steps=cfg.flow.num_steps,
        atol=cfg.flow.atol,
        rtol=cfg.flow.rtol,
        guidance_weights=cfg.flow.guidance_weights or None,
        latent_stats=stage1.latent_stats,
    )
    real_counts = stage1.vae.dense_targets(real["gene_ids"], real["counts"], real["mask"]).cpu().numpy()
    gen_counts = out["counts"].float().cpu().numpy()
    n_comp = int(min(30, len(real_counts) - 1, real_counts.shape[1]))
    real_pc, gen_pc = preprocess(
        real_counts, gen_counts, n_hvg=min(2000, real_counts.shape[1]), n_components=n_comp
    )
    scores = {k: float(v) for k, v in distribution_metrics(real_pc, gen_pc).items()}
    if use_val:
        # Real-versus-real floor (REFERENCE.md section 8): training cells against the same held-out cells,
        # projected on the same HVGs and PCs (both are fitted on the held-out cells only, so deterministic).
        train = _real_cells(cfg, data, stage1, dist.device, cfg.data.value_filter)
        train_counts = (
            stage1.vae.dense_targets(train["gene_ids"], train["counts"], train["mask"]).cpu().numpy()
        )
        _, train_pc = preprocess(
            real_counts, train_counts, n_hvg=min(2000, real_counts.shape[1]), n_components=n_comp
        )
        floor = distribution_metrics(real_pc, train_pc)
        scores.update({f"floor_{k}": float(v) for k, v in floor.items()})
    tracker.log_metrics({f"eval/{k}": v for k, v in scores.items()}, step=cfg.train.max_steps)
    logger.info(
        "generation vs %d real cells: %s",
        len(real_counts),
        ", ".join(f"{k}={v:.4g}" for k, v in scores.items()),
    )
    if cfg.tracking.enable_plots:
        path = plot_generated_vs_real(
            np.asarray(real_pc),
            np.asarray(gen_pc),
            Path(cfg.train.run_dir) / "plots" / "generated_vs_real_pca.png",
            scores,
        )
        tracker.log_artifact(str(path), "plots")
    return scores
