"""Evaluation and generation: per-cell-seeded generation through the prior and the decoder, the evaluation
protocol (docs/evaluation.md) with its metrics and plots, the end-of-run report, and `run_generate` /
`run_evaluate` behind `launchers/generate.py` and `launchers/evaluate.py` (in `eval/run.py`)."""

from scldm_scale.eval.generation import generate, generate_cells, sample_latents
from scldm_scale.eval.loading import Stage2Model, load_stage2
from scldm_scale.eval.metrics import (
    distribution_metrics,
    distribution_scores,
    energy_distance,
    frechet_distance,
    highly_variable_genes,
    log1p_normalize,
    mmd2_rbf,
    mmd2_unbiased,
    per_condition_metrics,
    preprocess,
    wasserstein2,
)

__all__ = [
    "Stage2Model",
    "distribution_metrics",
    "distribution_scores",
    "energy_distance",
    "frechet_distance",
    "generate",
    "generate_cells",
    "highly_variable_genes",
    "load_stage2",
    "log1p_normalize",
    "mmd2_rbf",
    "mmd2_unbiased",
    "per_condition_metrics",
    "preprocess",
    "sample_latents",
    "wasserstein2",
]
