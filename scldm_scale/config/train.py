"""Schema of the training loop. Torch-free."""

from __future__ import annotations

import signal
from dataclasses import dataclass, field
from typing import Literal


def parse_signals(names: list[str]) -> list[signal.Signals]:
    """`["SIGTERM", "USR1"]` -> signal enums; a clear error for a name that is not a catchable signal."""
    found = []
    for name in names:
        key = name.upper() if name.upper().startswith("SIG") else f"SIG{name.upper()}"
        if key in ("SIGKILL", "SIGSTOP") or not isinstance(getattr(signal, key, None), signal.Signals):
            raise ValueError(f"train.stop_signals: {name!r} is not a signal that can be handled (e.g. SIGTERM, SIGUSR1)")
        found.append(signal.Signals[key])
    return found


@dataclass(kw_only=True)
class TrainConfig:
    max_steps: int = 200
    """Optimizer steps (not micro-batches)."""
    run_dir: str = "runs/vae-demo"
    """Where checkpoints and the resolved config go."""
    grad_accum_steps: int = 1
    """Micro-batches per optimizer step."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """bf16 = mixed precision (fp32 master weights)."""
    seed: int = 0
    """Model-init and dropout seed."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto = cuda when available."""
    nonfinite: Literal["skip", "stop"] = "stop"
    """A step whose loss or gradient norm is not finite on any rank: skip it (and count it) or stop the run."""
    max_skipped_steps: int = 100
    """With nonfinite=skip: stop anyway once this many steps have been skipped in total."""
    enable_progress_bar: bool = True
    """Show a progress bar on rank 0."""
    stop_signals: list[str] = field(default_factory=lambda: ["SIGTERM", "SIGUSR1"])
    """Signals that stop training cleanly: finish the step, checkpoint on every rank, mark the run KILLED, exit 75."""
    overwrite: bool = False
    """Start a new run (checkpoint.resume=never) in a run_dir holding another run's checkpoints: move them aside."""

    def __post_init__(self) -> None:
        if self.max_steps < 1:
            raise ValueError(f"train.max_steps must be >= 1, got {self.max_steps}")
        if self.grad_accum_steps < 1:
            raise ValueError(f"train.grad_accum_steps must be >= 1, got {self.grad_accum_steps}")
        parse_signals(self.stop_signals)
        if self.max_skipped_steps < 0:
            raise ValueError(f"train.max_skipped_steps must be >= 0, got {self.max_skipped_steps}")
