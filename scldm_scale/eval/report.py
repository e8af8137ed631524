"""End-of-run results people look at: loss curves, and for stage 2 the evaluation protocol on a small scale.

Rank 0 writes PNGs under `<run_dir>/plots/` and logs them (and the scores) to the tracker. The only
collective here is the consolidation of the DiT weights, which every rank joins. The full evaluation
(3 seeds, up to 5,000 cells, UMAP) is `launchers/evaluate.py`; this runs the same protocol on
`eval.num_cells` cells with one seed.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from scldm_scale.config import LDMExperimentConfig
from scldm_scale.config.eval import DEFAULT_MIN_CELLS_PER_CONDITION, ProtocolConfig, SamplingConfig
from scldm_scale.data.training_data import TrainingData
from scldm_scale.distributed import DistInfo, TrainEngine
from scldm_scale.eval.evaluate import evaluate
from scldm_scale.eval.loading import Stage1, stage2_from_memory
from scldm_scale.eval.plots import plot_condition_bars, plot_generated_vs_real, plot_loss_curves
from scldm_scale.models import build_dit
from scldm_scale.tracking import MetricLogger

logger = logging.getLogger(__name__)

LOSS_CURVE_METRICS = ("train/loss", "train/grad_norm", "train/lr", "sys/cells_per_second")
"""Panels of the loss-curve plot (those the run logged), loss terms `train/<term>` added."""
HEADLINE = ("w2", "mmd2_unbiased", "fd", "energy", "knn_condition_acc")
"""Per-condition metrics logged as `eval/<source>/<metric>`."""


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


def flat_metrics(result: dict[str, Any]) -> dict[str, float]:
    """MLflow metrics of an evaluation: eval/<source>/<metric> (mean, `_std` beside), the kNN accuracy on
    real cells, reconstruction and classification scores."""
    out: dict[str, float] = {}
    for source, scores in result["generation"].items():
        for metric, value in scores.items():
            if isinstance(value, dict) and "mean" in value:
                out[f"eval/{source}/{metric}"] = value["mean"]
                out[f"eval/{source}/{metric}_std"] = value["std"]
    out["eval/knn_condition_acc_real"] = result["knn_condition_acc_real"]
    for k, v in result["reconstruction"].items():
        if isinstance(v, float):
            out[f"eval/reconstruction/{k}"] = v
    for label, scores in result["classification"].items():
        for k, v in scores.items():
            if isinstance(v, float):
                out[f"eval/classification/{label}/{k}"] = v
    return {k: float(v) for k, v in out.items() if v is not None and np.isfinite(v)}


def end_of_run_protocol(cfg: LDMExperimentConfig) -> ProtocolConfig:
    """The protocol at the end of training: `eval.num_cells` held-out cells, one seed, no UMAP."""
    use_val = cfg.eval.use_val_split and cfg.data.val_value_filter is not None
    return ProtocolConfig(
        value_filter=cfg.data.val_value_filter if use_val else cfg.data.value_filter,
        max_cells=max(cfg.eval.num_cells, 4),
        seeds=[cfg.train.seed],
        min_cells_per_condition=int(max(2, min(DEFAULT_MIN_CELLS_PER_CONDITION, cfg.eval.num_cells // 10))),
    )


def evaluate_generation(
    tracker: MetricLogger,
    cfg: LDMExperimentConfig,
    dist: DistInfo,
    *,
    engine: TrainEngine,
    ema: Any,
    stage1: Stage1,
    data: TrainingData,
    manifest: dict[str, Any],
) -> dict[str, float]:
    """Score the trained prior with the evaluation protocol (rank 0) and log `eval/*` and two plots.

    Returns:
        The logged metrics on rank 0 ({} elsewhere or when `eval.enable_at_end` is off).
    """
    if not cfg.eval.enable_at_end:
        return {}
    use_ema = ema is not None and cfg.flow.use_ema_for_sampling
    weights = ema.full_state_dict() if use_ema else engine.full_state_dict()  # collective: every rank joins
    if dist.rank != 0:
        return {}
    dit = build_dit(cfg.model, stage1.vae.latent_shape, data.label_cardinalities)
    dit.load_state_dict(weights, strict=False)  # EMA holds trainable parameters only; buffers are rebuilt
    model = stage2_from_memory(dit.to(dist.device), stage1.vae, cfg, manifest, "ema" if use_ema else "raw")
    model.latent_stats = stage1.latent_stats
    protocol = end_of_run_protocol(cfg)
    try:
        result, plot_data = evaluate(model, protocol, SamplingConfig(), atlas_uri=data.atlas_uri,
                                     device=dist.device, progress=False)
    except ValueError as exc:  # e.g. no condition with enough held-out cells: the trained model still counts
        logger.warning("end-of-run generation scores skipped: %s", exc)
        return {}
    scores = flat_metrics(result)
    tracker.log_metrics(scores, step=cfg.train.max_steps)
    gen, floor = result["generation"]["scldm"], result["generation"].get("real_floor")
    logger.info(
        "generation vs %d held-out cells (per condition; real floor in brackets): %s",
        result["protocol"]["eval_cells"],
        ", ".join(f"{m}={gen[m]['mean']:.4g}" + (f" [{floor[m]['mean']:.4g}]" if floor else "") for m in HEADLINE),
    )
    if cfg.tracking.enable_plots:
        plots = Path(cfg.train.run_dir) / "plots"
        real_pc, _ = plot_data["real"]
        gen_pc, _ = plot_data["scldm"]
        title = {m: gen[m]["mean"] for m in ("w2", "fd", "energy")}
        if floor:
            title.update({f"floor_{m}": floor[m]["mean"] for m in ("w2", "fd", "energy")})
        paths = [plot_generated_vs_real(np.asarray(real_pc), np.asarray(gen_pc), plots / "generated_vs_real_pca.png",
                                        title)]
        per_condition = {s: {c: v for c, v in r["per_condition"].items() if "w2" in v}
                         for s, r in result["generation"].items() if "per_condition" in r and s != "scldm_shuffled_labels"}
        paths.append(plot_condition_bars(per_condition, plots / "per_condition_metrics.png",
                                         title="end-of-run protocol, one seed"))
        for path in paths:
            tracker.log_artifact(str(path), "plots")
    return scores
