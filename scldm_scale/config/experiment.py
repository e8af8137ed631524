"""Root schemas: one per training stage. Cross-field checks live here, collected and raised once."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal

from scldm_scale.config._load import ConfigError
from scldm_scale.config.checkpoint import CheckpointConfig
from scldm_scale.config.data import SomaDataConfig
from scldm_scale.config.engine import EngineConfig
from scldm_scale.config.flow import FlowConfig
from scldm_scale.config.model import DiTConfig, VAEConfig
from scldm_scale.config.optim import OptimConfig
from scldm_scale.config.tracking import TrackingConfig
from scldm_scale.config.train import TrainConfig

DEFAULT_STAGE1_RUN_DIR = "runs/vae-demo"
"""Stage-1 run_dir used by stage 2 when neither `stage1.checkpoint` nor `stage1.mlflow_run_id` is set."""
DEFAULT_STAGE2_RUN_DIR = "runs/ldm-demo"
"""Stage-2 run_dir: the default `train.run_dir` of stage 2, and the model generate / evaluate read by default."""


@dataclass(kw_only=True)
class Stage1Config:
    checkpoint: str | None = None
    """Stage-1 run_dir (latest checkpoint used) or one checkpoint directory; None (and no run id) = runs/vae-demo."""
    mlflow_run_id: str | None = None
    """Alternative to `checkpoint`: the stage-1 MLflow run (at `tracking.uri`); its checkpoint is looked up."""


@dataclass(kw_only=True)
class LatentCacheConfig:
    mode: Literal["auto", "always", "never"] = "auto"
    """auto = cache when the training latents fit `max_bytes`; always; never (encode every batch on the fly)."""
    max_bytes: int = 2 * 2**30
    """Budget: the cached latents of the whole training set must fit this on disk (ranks memory-map them and
    hold ~30 bytes per cell in memory)."""
    dir: str | None = None
    """Cache folder (sharded safetensors + index.json); None = `<train.run_dir>/latent_cache`."""

    def __post_init__(self) -> None:
        if self.max_bytes < 0:
            raise ValueError(f"latent_cache.max_bytes must be >= 0, got {self.max_bytes}")


@dataclass(kw_only=True)
class GenerationEvalConfig:
    enable_at_end: bool = True
    """After training, generate cells, score them against real cells (W2, MMD^2, FD) and plot both (rank 0)."""
    num_cells: int = 256
    """Real cells (and as many generated, with their labels and library sizes) scored at the end."""
    use_val_split: bool = True
    """Take the real cells from `data.val_value_filter` (else from the training filter)."""

    def __post_init__(self) -> None:
        if self.num_cells < 2:
            raise ValueError(f"eval.num_cells must be >= 2, got {self.num_cells}")


def _raise(problems: list[str]) -> None:
    if problems:
        raise ValueError("invalid config:\n  " + "\n  ".join(problems) if len(problems) > 1 else problems[0])


@dataclass(kw_only=True)
class VAEExperimentConfig:
    data: SomaDataConfig = field(default_factory=SomaDataConfig)
    """Data section."""
    model: VAEConfig = field(default_factory=VAEConfig)
    """Stage-1 autoencoder."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and schedule."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Loop."""
    engine: EngineConfig = field(default_factory=EngineConfig)
    """Parallel engine."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpointing."""
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    """MLflow."""


@dataclass(kw_only=True)
class LDMExperimentConfig:
    data: SomaDataConfig = field(default_factory=SomaDataConfig)
    """Data section."""
    stage1: Stage1Config = field(default_factory=Stage1Config)
    """Where the frozen autoencoder comes from."""
    model: DiTConfig = field(default_factory=DiTConfig)
    """Stage-2 DiT."""
    flow: FlowConfig = field(default_factory=FlowConfig)
    """Flow matching and sampling."""
    latent_cache: LatentCacheConfig = field(default_factory=LatentCacheConfig)
    """Encode the training set once with the frozen VAE, or on the fly."""
    eval: GenerationEvalConfig = field(default_factory=GenerationEvalConfig)
    """End-of-run generation scores and plot."""
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(lr=5e-4, betas=[0.9, 0.999], schedule="cosine")
    )
    """Optimizer and schedule (reference: AdamW 5e-4, cosine)."""
    train: TrainConfig = field(default_factory=lambda: TrainConfig(run_dir=DEFAULT_STAGE2_RUN_DIR))
    """Loop."""
    engine: EngineConfig = field(default_factory=EngineConfig)
    """Parallel engine."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpointing."""
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    """MLflow."""

    def __post_init__(self) -> None:
        problems = []
        if self.stage1.checkpoint is not None and self.stage1.mlflow_run_id is not None:
            problems.append("stage1.checkpoint and stage1.mlflow_run_id are exclusive: set only one")
        # With auto label columns (data.label_columns: null) their number is known only once the atlas is
        # open: the run checks it then (`check_guidance_weights`).
        if self.data.label_columns is not None:
            problem = _guidance_problem(self.flow.guidance_weights, self.data.label_columns)
            if problem:
                problems.append(problem)
        stage1_dir = self.stage1.checkpoint or (None if self.stage1.mlflow_run_id else DEFAULT_STAGE1_RUN_DIR)
        if stage1_dir is not None and _same_path(stage1_dir, self.train.run_dir):
            problems.append(
                f"train.run_dir={self.train.run_dir!r} is the stage-1 run_dir: stage 2 would resume the autoencoder's "
                "checkpoints; give stage 2 its own train.run_dir"
            )
        _raise(problems)


def _guidance_problem(weights: list[float], label_columns: list[str]) -> str | None:
    if len(weights) in (0, len(label_columns)):
        return None
    return (
        f"flow.guidance_weights needs one weight per data.label_columns entry ({len(label_columns)}: "
        f"{', '.join(label_columns)}), got {len(weights)}"
    )


def check_guidance_weights(cfg: LDMExperimentConfig, label_columns: list[str]) -> None:
    """`flow.guidance_weights` against the run's resolved label columns (once the atlas is open).

    Raises:
        ConfigError: when there are weights, but not one per label column.
    """
    problem = _guidance_problem(cfg.flow.guidance_weights, label_columns)
    if problem:
        raise ConfigError(problem)


def _same_path(a: str, b: str) -> bool:
    """Same folder, however spelled (`runs/x`, `./runs/x/`)."""
    return os.path.normpath(os.path.abspath(a)) == os.path.normpath(os.path.abspath(b))
