"""The one way to build a config: schema defaults <- YAML files <- key=value overrides.

Torch-free. Code outside `config/` receives dataclasses, never DictConfig.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

T = TypeVar("T")


def _clean_message(exc: OmegaConfBaseException) -> str:
    """OmegaConf messages end with a multi-line 'full_key: ...' trailer; keep the key and first line."""
    first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    key = getattr(exc, "full_key", None)
    return f"{key}: {first}" if key else first


def load_config(root: type[T], paths: list[str | Path] | tuple = (), overrides: list[str] | tuple = ()) -> T:
    """Merge `root` defaults with YAML files (in order) and `key=value` overrides.

    Args:
        root: a `@dataclass` root schema such as `VAEExperimentConfig`.
        paths: YAML files, each a partial override of the schema.
        overrides: dotlist tokens, e.g. `["train.max_steps=10"]`.

    Returns:
        An instance of `root`; every `__post_init__` check has run.

    Raises:
        ValueError: naming the file or dotted key for unknown keys, wrong types, bad choices
            or missing values.
    """
    cfg = OmegaConf.structured(root)
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"config file {path} does not exist")
        try:
            cfg = OmegaConf.merge(cfg, OmegaConf.load(path))
        except OmegaConfBaseException as exc:
            raise ValueError(f"config file {path}: {_clean_message(exc)}") from None
    bad = [tok for tok in overrides if "=" not in tok]
    if bad:
        raise ValueError(f"overrides must be key=value, got {bad}")
    try:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
        return OmegaConf.to_object(cfg)
    except OmegaConfBaseException as exc:
        raise ValueError(f"config override: {_clean_message(exc)}") from None


def to_flat_dict(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """Flatten a dataclass config to dotted keys (for MLflow params)."""
    out: dict[str, Any] = {}
    for field in dataclasses.fields(cfg):
        value = getattr(cfg, field.name)
        key = f"{prefix}{field.name}"
        if dataclasses.is_dataclass(value):
            out.update(to_flat_dict(value, key + "."))
        else:
            out[key] = value
    return out


def to_yaml(cfg: Any) -> str:
    """Serialize a resolved dataclass config to YAML."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
