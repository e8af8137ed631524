"""Typed configuration: dataclass schemas, YAML files in configs/, key=value overrides. Torch-free."""

from scldm_scale.config._load import ConfigError, load_config, load_config_text, to_flat_dict, to_yaml
from scldm_scale.config.checkpoint import CheckpointConfig
from scldm_scale.config.data import DEFAULT_LABEL_COLUMNS, DEMO_ATLAS, SomaDataConfig
from scldm_scale.config.engine import EngineConfig
from scldm_scale.config.experiment import LDMExperimentConfig, Stage1Config, VAEExperimentConfig
from scldm_scale.config.flow import FlowConfig
from scldm_scale.config.model import DiTConfig, VAEConfig
from scldm_scale.config.optim import OptimConfig
from scldm_scale.config.tracking import TrackingConfig
from scldm_scale.config.train import TrainConfig

__all__ = [
    "DEFAULT_LABEL_COLUMNS",
    "DEMO_ATLAS",
    "CheckpointConfig",
    "ConfigError",
    "DiTConfig",
    "EngineConfig",
    "FlowConfig",
    "LDMExperimentConfig",
    "OptimConfig",
    "SomaDataConfig",
    "Stage1Config",
    "TrackingConfig",
    "TrainConfig",
    "VAEConfig",
    "VAEExperimentConfig",
    "load_config",
    "load_config_text",
    "to_flat_dict",
    "to_yaml",
]
