"""One run per output folder: an advisory ``fcntl`` lock on ``OUT/.greenprop.lock``.

The kernel drops the lock when its process dies, so a lock left by a killed run is
recovered by the next start; the file only says who held it last.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import socket
from pathlib import Path
from typing import IO

from greenprop.errors import GreenpropError

LOCK_NAME = ".greenprop.lock"


class OutputLock:
    """Hold ``folder``'s lock until :meth:`release` (or the process ends)."""

    def __init__(self, folder: str | Path) -> None:
        self.path = Path(folder) / LOCK_NAME
        self._handle: IO[str] | None = None

    @property
    def held(self) -> bool:
        return self._handle is not None

    def acquire(self) -> OutputLock:
        if self._handle is not None:
            return self
        handle = open(self.path, "a+")  # noqa: SIM115 - held open while the lock is held
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = _describe(handle.read())
            handle.close()
            raise GreenpropError(
                f"{self.path.parent} is in use by another greenprop run ({holder}); "
                "wait for it to finish or use another --out"
            ) from None
        handle.seek(0)
        handle.truncate()
        started = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
        handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": started}))
        handle.flush()
        self._handle = handle
        return self

    def release(self) -> None:
        if self._handle is not None:
            fcntl.flock(self._handle.fileno(), fcntl.LOCK_UN)
            self._handle.close()
            self._handle = None


def _describe(text: str) -> str:
    try:
        info = json.loads(text)
        return f"pid {info['pid']} on {info['host']}, started {info['started']}"
    except (ValueError, KeyError, TypeError):
        return "holder unknown"
