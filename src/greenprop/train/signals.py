"""Ctrl-C and SIGTERM stop a run cleanly: one line saying where, the last epoch's checkpoint kept."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType


class RunInterrupted(KeyboardInterrupt):
    """A run stopped by SIGINT/SIGTERM; ``str()`` says where and what was kept."""

    def __init__(self, message: str, signum: int = signal.SIGINT) -> None:
        super().__init__(message)
        self.signum = signum


class _Terminated(KeyboardInterrupt):
    signum = signal.SIGTERM


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Inside the block SIGTERM raises KeyboardInterrupt, like Ctrl-C (main thread only)."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise _Terminated()

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def signal_number(err: KeyboardInterrupt) -> int:
    """Which signal stopped the run (SIGINT unless SIGTERM did)."""
    return int(getattr(err, "signum", signal.SIGINT))
