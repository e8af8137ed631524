"""Stop requests from the scheduler: SIGTERM / SIGUSR1 become "checkpoint at the next step, then exit".

`StopSignals` installs handlers that only set a flag; the `Trainer` folds the flag into the all-reduce it
already does every step, so one signalled rank is enough: every rank stops after the same step, saves
one checkpoint together, and the job exits with `EXIT_PREEMPTED`. A second signal of the same kind is
left to its default action (the process ends at once), so an impatient operator is never ignored.
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType

from scldm_scale.config.train import parse_signals

__all__ = ["EXIT_PREEMPTED", "StopSignals", "parse_signals"]

logger = logging.getLogger(__name__)

EXIT_PREEMPTED = 75
"""Exit code of a job that stopped on a signal after saving its checkpoint (EX_TEMPFAIL: run it again)."""


class StopSignals:
    """Handlers for `signals` that record the first one received; `restore()` puts the old handlers back.

    Only the main thread may install handlers; elsewhere (a notebook worker thread) this does nothing and
    says so.
    """

    def __init__(self, signals: list[signal.Signals]) -> None:
        self.signals = signals
        self.received: signal.Signals | None = None
        self._previous: dict[signal.Signals, object] = {}

    def install(self) -> StopSignals:
        if threading.current_thread() is not threading.main_thread():
            logger.warning("not the main thread: %s will not stop training cleanly", [s.name for s in self.signals])
            return self
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    @property
    def requested(self) -> bool:
        return self.received is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        sig = signal.Signals(signum)
        if self.received is None:
            self.received = sig
            # Async-signal context: no logging locks here beyond a best-effort message.
            logger.warning("%s received: stopping after the current step with a checkpoint", sig.name)
        signal.signal(sig, signal.SIG_DFL)  # a second one ends the process
