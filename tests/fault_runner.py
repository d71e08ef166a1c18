"""Run ``greenprop`` in a real subprocess with one injected fault (for test_reliability.py).

    python tests/fault_runner.py FAULT -- greenprop arguments...

FAULT is ``none``; ``signal:NAME:N`` (the process sends itself signal NAME, e.g. KILL,
INT, TERM, when the N-th training batch (1-based, counted over the whole run) is drawn);
or ``enospc:FILE:K`` (the K-th atomic write of a file named FILE fails with "No space
left on device" after half its bytes were written, as a full disk does).
One intra-op thread, so the result is bit-comparable with an in-process run.
"""

from __future__ import annotations

import errno
import os
import signal
import sys
from pathlib import Path

import torch

import greenprop.train.checkpoint as checkpoint
import greenprop.train.distributed as trainer  # the training batches come from here
from greenprop.cli import main


def _signal_at_batch(name: str, n: int) -> None:
    # A shell's background job starts with SIGINT ignored, and Python then installs no
    # KeyboardInterrupt handler: give Ctrl-C its usual meaning, as in a terminal.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    real = trainer.iterate_batches
    count = 0

    def iterate_batches(*args, **kwargs):
        nonlocal count
        for batch in real(*args, **kwargs):
            count += 1
            if count == n:
                os.kill(os.getpid(), getattr(signal, f"SIG{name}"))
            yield batch

    trainer.iterate_batches = iterate_batches


class _FullDisk:
    """A file whose writes stop with ENOSPC after ``room`` bytes."""

    def __init__(self, handle, room: int) -> None:
        self._handle, self._room = handle, room

    def write(self, data) -> int:
        data = bytes(data)
        if len(data) > self._room:
            self._handle.write(data[: self._room])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._room -= len(data)
        return self._handle.write(data)

    def __getattr__(self, name):
        return getattr(self._handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self._handle.close()


def _enospc_on(file_name: str, k: int) -> None:
    real = checkpoint._open_temp
    count = 0

    def open_temp(path: Path):
        nonlocal count
        tmp, handle = real(path)
        if Path(path).name == file_name:
            count += 1
            if count == k:
                return tmp, _FullDisk(handle, room=64)
        return tmp, handle

    checkpoint._open_temp = open_temp


if __name__ == "__main__":
    torch.set_num_threads(1)
    fault, sep, *argv = sys.argv[1:]
    kind, *params = fault.split(":")
    if kind == "signal":
        _signal_at_batch(params[0], int(params[1]))
    elif kind == "enospc":
        _enospc_on(params[0], int(params[1]))
    sys.exit(main(argv))
