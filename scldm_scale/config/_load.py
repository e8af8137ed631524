"""The one way to build a config: schema defaults <- YAML files <- key=value overrides.

Torch-free. Code outside `config/` receives dataclasses, never DictConfig. Every problem is a `ConfigError`
with a one-line message naming the dotted key.
"""

from __future__ import annotations

import dataclasses
import difflib
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

T = TypeVar("T")


class ConfigError(ValueError):
    """A bad configuration: the message is one line naming the dotted key and what to do.

    Raised by `load_config` and, at start-up, by code that checks the config against the world (the atlas's
    obs columns, the stage-1 checkpoint). Launchers print it as `error: <message>` and exit with 2.
    """

    def __init__(self, message: str) -> None:
        super().__init__(one_line(message))


def one_line(message: str) -> str:
    """Join a multi-line message ("problems:\\n  a\\n  b") into one line ("problems: a; b")."""
    lines = [line.strip() for line in str(message).splitlines() if line.strip()]
    if len(lines) < 2:
        return lines[0] if lines else ""
    head, rest = lines[0], lines[1:]
    return f"{head} {'; '.join(rest)}" if head.endswith(":") else "; ".join(lines)


def _clean_message(exc: OmegaConfBaseException) -> str:
    """OmegaConf messages end with a multi-line 'full_key: ...' trailer; keep the key and first line.

    An unknown key also gets the valid keys of its section (and the closest one).
    """
    first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    key = getattr(exc, "full_key", None)
    message = f"{key}: {first}" if key else first
    section = getattr(exc, "object_type", None)
    if isinstance(exc, ConfigKeyError) and dataclasses.is_dataclass(section):
        valid = [f.name for f in dataclasses.fields(section)]
        close = difflib.get_close_matches(str(getattr(exc, "key", "")), valid, n=1)
        hint = f"did you mean {close[0]!r}? " if close and "did you mean" not in first.lower() else ""
        message += f" ({hint}valid keys here: {', '.join(valid)})"
    return message


def load_config(root: type[T], paths: list[str | Path] | tuple = (), overrides: list[str] | tuple = ()) -> T:
    """Merge `root` defaults with YAML files (in order) and `key=value` overrides.

    Args:
        root: a `@dataclass` root schema such as `VAEExperimentConfig`.
        paths: YAML files, each a partial override of the schema.
        overrides: dotlist tokens, e.g. `["train.max_steps=10"]`.

    Returns:
        An instance of `root`; every `__post_init__` check has run.

    Raises:
        ConfigError: (a ValueError) one line naming the file or dotted key, for unknown keys, wrong types,
            bad choices, bad values (every `__post_init__` check) or missing values.
    """
    cfg = OmegaConf.structured(root)
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            cfg = OmegaConf.merge(cfg, OmegaConf.load(path))
        except OmegaConfBaseException as exc:
            raise ConfigError(f"config file {path}: {_clean_message(exc)}") from None
    return _with_overrides(cfg, overrides)


def load_config_text(root: type[T], text: str, *, source: str = "config text") -> T:
    """`load_config` from YAML text instead of files, e.g. the resolved config a checkpoint manifest carries.

    Raises:
        ConfigError: as `load_config`, naming `source` where a file would be named.
    """
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(root), OmegaConf.create(text))
    except OmegaConfBaseException as exc:
        raise ConfigError(f"{source}: {_clean_message(exc)}") from None
    return _with_overrides(cfg, ())


def _with_overrides(cfg: Any, overrides: list[str] | tuple) -> Any:
    """Merge `key=value` overrides into a structured config and build its dataclass (running the checks)."""
    bad = [tok for tok in overrides if "=" not in tok]
    if bad:
        raise ConfigError(f"overrides must be key=value, got {bad}")
    try:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
        return OmegaConf.to_object(cfg)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"config override: {_clean_message(exc)}") from None
    except ConfigError:
        raise
    except ValueError as exc:  # a __post_init__ check (already names the dotted key)
        raise ConfigError(str(exc)) from None


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
