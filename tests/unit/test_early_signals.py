"""timelit.utilities.early_signals: requeue signals held while `timelit fit` starts, then adopted or given back."""

from __future__ import annotations

import signal
import subprocess
import sys

from timelit.utilities import early_signals


def test_a_held_signal_is_recorded_and_taken_over_with_its_default_handler_back():
    early_signals.hold()
    try:
        assert early_signals.held() == {signal.SIGUSR1, signal.SIGUSR2}
        signal.raise_signal(signal.SIGUSR1)  # would end this process without the hold
        assert early_signals.take(signal.SIGUSR1) is True
        assert early_signals.held() == set()
        assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL
        assert signal.getsignal(signal.SIGUSR2) is signal.SIG_DFL
    finally:
        early_signals.release()


def test_nothing_arrived_means_nothing_to_act_on():
    early_signals.hold()
    assert early_signals.take(signal.SIGUSR1) is False
    assert early_signals.held() == set()


def test_a_handler_already_in_place_is_left_alone():
    def mine(signum, frame):
        pass

    previous = signal.signal(signal.SIGUSR2, mine)
    try:
        early_signals.hold()
        assert early_signals.held() == {signal.SIGUSR1}
        early_signals.release()
        assert signal.getsignal(signal.SIGUSR2) is mine
    finally:
        signal.signal(signal.SIGUSR2, previous)


def test_a_released_signal_that_arrived_is_delivered_again():
    code = (
        "import signal\n"
        "from timelit.utilities import early_signals\n"
        "early_signals.hold()\n"
        "signal.raise_signal(signal.SIGUSR2)\n"
        "print('still running', flush=True)\n"
        "early_signals.take(signal.SIGUSR1)  # SIGUSR2 is not taken: released, delivered, default action\n"
        "print('not reached')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == -signal.SIGUSR2
    assert result.stdout == "still running\n"


def test_a_fit_that_fails_while_starting_ends_with_its_error_not_with_the_held_signal(tmp_path):
    """SIGUSR1 during start-up, then a config error before any Preemption exists: the error's traceback and exit
    status 1, not a silent death by SIGUSR1."""
    code = (
        "import os, signal, sys\n"
        "import timelit.commands.cli as cli\n"
        "def failing(args):\n"
        "    os.kill(os.getpid(), signal.SIGUSR1)\n"
        "    raise ValueError('no such config key')\n"
        "cli.run_lightning = failing\n"
        "cli.main(['fit'])\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert result.returncode == 1
    assert "ValueError: no such config key" in result.stderr
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL  # this process was never touched
