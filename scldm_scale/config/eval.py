"""Schemas of the two model products: `launchers/generate.py` and `launchers/evaluate.py`. Torch-free.

Both read a trained scLDM from a stage-2 run_dir, checkpoint directory or MLflow run id; sampler settings left
at None take the values the model was trained with (its `flow` section).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from scldm_scale.config.tracking import TrackingConfig

DEFAULT_NUM_HVG = 2000
"""Highly variable genes the evaluation protocol scores in (CFGen's and the scLDM paper's choice)."""
DEFAULT_NUM_PCS = 30
"""Principal components of the protocol's distances, kNN classifier and UMAP (CFGen's choice)."""
DEFAULT_MIN_CELLS_PER_CONDITION = 30
"""Conditions with fewer real or generated cells are skipped: FD and energy distance on 30 PCs from fewer
cells are dominated by the error of the estimated covariance / pairwise terms, not by the model."""


@dataclass(kw_only=True)
class ModelSourceConfig:
    checkpoint: str | None = None
    """Stage-2 run_dir (its latest checkpoint) or one checkpoint directory; None = runs/ldm-demo."""
    mlflow_run_id: str | None = None
    """Alternative to `checkpoint`: a stage-2 MLflow run at `tracking.uri`; its checkpoint is looked up."""
    weights: Literal["ema", "raw"] = "ema"
    """Sample with the DiT's EMA weights (default) or its raw weights."""
    device: str = "auto"
    """auto (cuda:<local rank> when available, else cpu), cpu or cuda."""
    batch_size: int = 256
    """Cells per generation / encoding batch."""


@dataclass(kw_only=True)
class SamplingConfig:
    sampler: Literal["euler", "heun", "dopri5"] | None = None
    """ODE sampler; None = the model's `flow.sampler`."""
    num_steps: int | None = None
    """Steps for euler / heun; None = the model's `flow.num_steps`."""
    guidance: Literal["joint", "additive"] | None = None
    """Classifier-free guidance over the label columns; None = the model's training strategy."""
    guidance_weights: list[float] = field(default_factory=list)
    """One weight per label column of the model (0 = ignore it, 1 = plain conditional); empty = the model's
    `flow.guidance_weights` (empty there = 1 for every column)."""

    def __post_init__(self) -> None:
        if self.num_steps is not None and self.num_steps < 1:
            raise ValueError(f"sampling.num_steps must be >= 1, got {self.num_steps}")
        if any(w < 0 for w in self.guidance_weights):
            raise ValueError(f"sampling.guidance_weights must be >= 0, got {self.guidance_weights}")


@dataclass(kw_only=True)
class GenerateConfig:
    model: ModelSourceConfig = field(default_factory=ModelSourceConfig)
    """Which trained model."""
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    """ODE and guidance."""
    num_cells: int = 1000
    """Cells to generate unconditionally, or in the label mix of `like_split`."""
    conditions: list[str] = field(default_factory=list)
    """Label combinations and counts, `"col=value,col=value:count"` (free columns left out)."""
    conditions_csv: str | None = None
    """CSV of label columns plus a count column `n`, one condition per row."""
    like_split: str | None = None
    """Generate `num_cells` cells in the label mix of the atlas cells of this split (e.g. test)."""
    seed: int = 0
    """Cell i's draws come from (seed, i): the same cells whatever the world size."""
    out: str = "generated.h5ad"
    """The .h5ad written (raw integer counts in X, labels in obs, latents in obsm['X_latent'])."""
    soma_uri: str | None = None
    """Also append the cells to this SOMA atlas through the ingestion path."""
    dataset_id: str | None = None
    """dataset_id of the appended cells; None = `generated-<model run name or checkpoint>`."""
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    """Only to look up `model.mlflow_run_id`."""

    def __post_init__(self) -> None:
        sources = [bool(self.conditions), self.conditions_csv is not None, self.like_split is not None]
        if sum(sources) > 1:
            raise ValueError("conditions, conditions_csv and like_split are exclusive: set one (or none)")
        if self.num_cells < 1:
            raise ValueError(f"num_cells must be >= 1, got {self.num_cells}")
        if not self.out.endswith(".h5ad"):
            raise ValueError(f"out must be a .h5ad path, got {self.out!r}")
        if self.model.checkpoint is not None and self.model.mlflow_run_id is not None:
            raise ValueError("model.checkpoint and model.mlflow_run_id are exclusive: set only one")


@dataclass(kw_only=True)
class ProtocolConfig:
    split: str = "test"
    """Atlas split scored against (obs `split`); `value_filter` overrides it."""
    value_filter: str | None = None
    """obs filter of the evaluation cells; None = `split == '<split>'`."""
    train_value_filter: str | None = None
    """obs filter of the training cells (HVGs, kNN classifier, floor, baseline); None = the model's."""
    max_cells: int = 5000
    """Cap on evaluation cells (a seeded sample beyond it) and on the training cells sampled."""
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    """Each seed redraws the generated cells, the baseline, the ceiling's counts and the floor's cells."""
    num_hvg: int = DEFAULT_NUM_HVG
    """Highly variable genes (seurat_v3 on raw counts of the training cells)."""
    num_pcs: int = DEFAULT_NUM_PCS
    """Principal components fitted on the evaluation cells (log1p of counts per 10k of each cell's total)."""
    min_cells_per_condition: int = DEFAULT_MIN_CELLS_PER_CONDITION
    """Conditions with fewer evaluation cells are reported with their n but not scored (FD and energy in 30
    PCs are dominated by covariance noise below this); the floor skips exactly the same conditions."""
    condition_columns: list[str] | None = None
    """Label columns whose combination defines a condition for scoring; None = all the model's columns."""
    knn_k: int = 15
    """Neighbours of the kNN condition classifier (trained on training cells in the same PCs)."""
    classification_folds: int = 5
    """Cross-validation folds of the embedding classifiers."""
    embedding: Literal["flattened", "mean_pooled"] = "flattened"
    """Cell embedding: the encoder's latent tokens flattened (M * L) or averaged over tokens (L)."""
    baselines: bool = True
    """Score gaussian_baseline, stage1_ceiling and real_floor beside scLDM."""

    def __post_init__(self) -> None:
        if self.max_cells < 2 * max(1, self.min_cells_per_condition):
            raise ValueError(f"protocol.max_cells={self.max_cells} is too small for min_cells_per_condition")
        if not self.seeds:
            raise ValueError("protocol.seeds needs at least one seed")
        if self.num_pcs < 2 or self.num_hvg < self.num_pcs:
            raise ValueError(f"protocol needs 2 <= num_pcs <= num_hvg, got {self.num_pcs} / {self.num_hvg}")
        if self.min_cells_per_condition < 2:
            raise ValueError(f"protocol.min_cells_per_condition must be >= 2, got {self.min_cells_per_condition}")

    @property
    def eval_filter(self) -> str:
        return self.value_filter or f"split == '{self.split}'"


@dataclass(kw_only=True)
class EvaluateConfig:
    model: ModelSourceConfig = field(default_factory=ModelSourceConfig)
    """Which trained model."""
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    """ODE and guidance of the generated cells."""
    protocol: ProtocolConfig = field(default_factory=ProtocolConfig)
    """What is scored, and how."""
    atlas_uri: str | None = None
    """Atlas of the real cells; None = the model's training atlas."""
    compare_weights: bool = False
    """Also score the other DiT weights (raw when `model.weights=ema`), reported under generation.scldm_<w>."""
    umap: bool = True
    """Draw the UMAP of real against generated cells (umap-learn; ~20 s of compilation on first use)."""
    out_dir: str | None = None
    """Report folder (JSON, PNGs); None = `<stage-2 run_dir>/eval-<split>`."""
    json: str | None = None
    """Also write the result JSON here (`--json OUT`)."""
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    """The evaluation is an MLflow run of its own, tagged with the evaluated stage-2 run."""
