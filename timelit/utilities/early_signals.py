"""The requeue signal of a `timelit fit` that is still starting up, kept for the Preemption callback.

Slurm's `--signal=USR1@N` warning (or a `scancel --signal=USR1`) can reach a job whose `timelit fit` is still
importing torch and Lightning, parsing its config or building its model: seconds to minutes before the Preemption
callback installs its handlers at `setup`. SIGUSR1's default action ends the process, so the job would end without
the requeue the signal asked for. `timelit.commands.cli.main` therefore records SIGUSR1 and SIGUSR2 from its first line
(`hold`), and Preemption adopts the one it is configured for (`take`): the run stops and requeues at its first
training batch, as for a signal that arrives during the zero-shot evaluation before the stream.

SIGTERM is not held: before `setup` there is nothing to save, so ending at once is what `scancel` means. A held
signal that no Preemption adopts is given back (`release`) and, if it arrived, delivered again to its previous
handler, so without the callback a run behaves as it always did. Standard library only: this module is imported
before anything heavy.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any

REQUEUE_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)

_held: dict[int, Any] = {}  # signal number -> the handler it had before `hold`
_arrived: set[int] = set()


def _record(signum: int, _frame: FrameType | None) -> None:
    _arrived.add(signum)


def hold() -> None:
    """Record the requeue signals from now on, where nothing else handles them yet (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        return
    for signum in REQUEUE_SIGNALS:
        if signum not in _held and signal.getsignal(signum) is signal.SIG_DFL:
            _held[signum] = signal.signal(signum, _record)


def held() -> set[int]:
    """The signals being recorded now."""
    return set(_held)


def take(signum: int) -> bool:
    """Hand `signum` over to a caller about to install its own handler: its previous handler is back in place and
    the return value says whether it arrived while held. Every other held signal is released."""
    arrived = signum in _arrived
    _arrived.discard(signum)
    if signum in _held:
        signal.signal(signum, _held.pop(signum))
    release()
    return arrived


def release(deliver: bool = True) -> None:
    """Give every held signal back to its previous handler and, with `deliver`, deliver again those that arrived
    while held (for SIGUSR1/SIGUSR2 with no handler of their own: the end of the process, as without `hold`)."""
    for signum, previous in list(_held.items()):
        signal.signal(signum, previous)
        del _held[signum]
        if signum in _arrived:
            _arrived.discard(signum)
            if deliver:
                signal.raise_signal(signum)
