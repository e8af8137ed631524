"""Schema of checkpointing. Torch-free."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(kw_only=True)
class CheckpointConfig:
    interval_steps: int = 100
    """Save every N optimizer steps (and at the end)."""
    keep_latest_k: int = 2
    """Retention: how many published checkpoints to keep (older ones are deleted after a save)."""
    resume: str = "auto"
    """auto (latest in run_dir if any), never, or a path (a run_dir or one checkpoint directory)."""
    enable_export_at_end: bool = False
    """After the final save, also write `model.safetensors` + `manifest.json` into the last checkpoint."""

    def __post_init__(self) -> None:
        if self.interval_steps < 1:
            raise ValueError(f"checkpoint.interval_steps must be >= 1, got {self.interval_steps}")
        if self.keep_latest_k < 1:
            raise ValueError(f"checkpoint.keep_latest_k must be >= 1, got {self.keep_latest_k}")
        if not self.resume.strip():
            raise ValueError("checkpoint.resume must be auto, never or a path, got an empty string")
