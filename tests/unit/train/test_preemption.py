"""Stop signals: names are checked, a real signal sets the flag once, a second one is left to the default."""

from __future__ import annotations

import os
import signal

import pytest

from scldm_scale.train.preemption import StopSignals, parse_signals


def test_signal_names_are_parsed_and_bad_ones_named():
    assert parse_signals(["SIGTERM", "usr1"]) == [signal.SIGTERM, signal.SIGUSR1]
    with pytest.raises(ValueError, match="'SIGKILL' is not a signal that can be handled"):
        parse_signals(["SIGKILL"])
    with pytest.raises(ValueError, match="'SIGNOPE'"):
        parse_signals(["SIGNOPE"])


def test_a_real_signal_sets_the_flag_and_restore_puts_the_old_handler_back():
    before = signal.getsignal(signal.SIGUSR1)
    stops = StopSignals([signal.SIGUSR1]).install()
    try:
        assert not stops.requested
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stops.received == signal.SIGUSR1
        assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL  # a second one would end the process
    finally:
        stops.restore()
    assert signal.getsignal(signal.SIGUSR1) == before
