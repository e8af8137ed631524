"""Root schemas: one per training stage. Cross-field checks live here."""

from __future__ import annotations

from dataclasses import dataclass, field

from scldm_scale.config.checkpoint import CheckpointConfig
from scldm_scale.config.data import SomaDataConfig
from scldm_scale.config.engine import EngineConfig
from scldm_scale.config.flow import FlowConfig
from scldm_scale.config.model import DiTConfig, VAEConfig
from scldm_scale.config.optim import OptimConfig
from scldm_scale.config.tracking import TrackingConfig
from scldm_scale.config.train import TrainConfig


@dataclass(kw_only=True)
class Stage1Config:
    checkpoint: str | None = None
    """Stage-1 run_dir (latest checkpoint used) or one checkpoint directory."""
    mlflow_run_id: str | None = None
    """Alternative to `checkpoint`: the stage-1 MLflow run; its checkpoint path is looked up."""


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
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=5e-4, betas=[0.9, 0.999], schedule="cosine"))
    """Optimizer and schedule (reference: AdamW 5e-4, cosine)."""
    train: TrainConfig = field(default_factory=lambda: TrainConfig(run_dir="runs/ldm-demo"))
    """Loop."""
    engine: EngineConfig = field(default_factory=EngineConfig)
    """Parallel engine."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpointing."""
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    """MLflow."""
