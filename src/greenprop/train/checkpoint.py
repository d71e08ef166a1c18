"""Atomic writes, so an interrupted run never leaves a half-written checkpoint or log."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from greenprop.errors import GreenpropError


def _atomic_write(path: Path, write: Any) -> None:
    """Write to a temp file in the same directory, fsync, then rename over ``path``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """Save ``state`` with torch.save, atomically."""
    _atomic_write(Path(path), lambda handle: torch.save(state, handle))


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint; a missing or corrupt file is one clear GreenpropError."""
    path = Path(path)
    if not path.is_file():
        raise GreenpropError(f"no checkpoint to resume from at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # torch raises many types for a damaged file
        raise GreenpropError(
            f"checkpoint {path} is corrupt or unreadable ({type(err).__name__}: {err})"
        ) from err
    if not isinstance(state, dict) or "model" not in state or "epoch" not in state:
        raise GreenpropError(f"checkpoint {path} is not a greenprop checkpoint (missing model/epoch)")
    return state


def write_json(data: Any, path: str | Path) -> None:
    """Write JSON atomically (readable while a run is still going)."""
    text = json.dumps(data, indent=2, allow_nan=False) + "\n"
    _atomic_write(Path(path), lambda handle: handle.write(text.encode()))


def ensure_writable_dir(path: str | Path) -> Path:
    """Create ``path`` if needed and prove we can write there, before any work is done."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as err:
        raise GreenpropError(f"output directory {path} is not writable ({err.strerror or err})") from err
    return path
