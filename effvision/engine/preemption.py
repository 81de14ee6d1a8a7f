"""Stop cleanly when the machine is being taken away.

SLURM, Kubernetes and spot instances send SIGTERM some seconds before they kill; SLURM can
also send SIGUSR1 ahead of time (``--signal=USR1@120``). While ``stop_on_signals()`` is active
such a signal only raises a flag: training finishes its current step, every rank agrees on
that step, writes a checkpoint (atomically, so a second signal or a kill during the write
leaves the previous one intact) and raises ``Preempted``. The CLI exits with
``PREEMPTED_EXIT`` (75, EX_TEMPFAIL: try again), and the same command with ``--resume`` (or
a requeued job) continues from that step with nothing lost.
"""
from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType

__all__ = ["Preempted", "PREEMPTED_EXIT", "STOP_SIGNALS", "stop_on_signals", "stop_requested"]

PREEMPTED_EXIT = 75
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

_received: list[signal.Signals] = []  # the signals seen while the handlers are installed
_active = False


class Preempted(Exception):
    """Training stopped on a signal after writing a checkpoint; ``--resume`` continues it.

    Not an ``EffVisionError``: nothing is wrong with the input, and the exit code differs."""


def _note(signum: int, frame: FrameType | None) -> None:
    _received.append(signal.Signals(signum))


def stop_requested() -> str | None:
    """The name of the first stop signal received, or None."""
    return _received[0].name if _received else None


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """Turn SIGTERM/SIGUSR1 into a flag for the duration. Nestable (the outermost installs);
    only in the main thread, as Python allows (elsewhere the signals keep their handlers)."""
    global _active
    if _active or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _note) for s in STOP_SIGNALS}
    _active = True
    try:
        yield
    finally:
        _active = False
        _received.clear()
        for s, h in previous.items():
            signal.signal(s, h)
