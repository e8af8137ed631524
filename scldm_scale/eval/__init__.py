"""Evaluation: generation through prior + decoder, and distribution metrics (W2, MMD^2 RBF, Frechet)."""

from scldm_scale.eval.generation import LibrarySizeStats, generate, sample_latents, sampling_model
from scldm_scale.eval.metrics import (
    distribution_metrics,
    frechet_distance,
    highly_variable_genes,
    log1p_normalize,
    mmd2_rbf,
    per_condition_metrics,
    preprocess,
    wasserstein2,
)

__all__ = [
    "LibrarySizeStats",
    "distribution_metrics",
    "frechet_distance",
    "generate",
    "highly_variable_genes",
    "log1p_normalize",
    "mmd2_rbf",
    "per_condition_metrics",
    "preprocess",
    "sample_latents",
    "sampling_model",
    "wasserstein2",
]
