"""Atomic writes and trusted loading, so an interrupted run never leaves a half-written
file and a checkpoint from elsewhere can never run code."""

from __future__ import annotations

import io
import json
import os
import pickle
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch

from greenprop.errors import GreenpropError

#: Keys every greenprop checkpoint holds.
CHECKPOINT_KEYS = ("format", "epoch", "config", "model", "optimizer", "scheduler", "controllers", "history")
_TMP_SUFFIX = ".tmp"


def _open_temp(path: Path) -> tuple[str, IO[bytes]]:
    """A new temp file next to ``path`` (the one place files are opened for writing)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=_TMP_SUFFIX)
    return tmp, os.fdopen(fd, "wb")


def _atomic_write(path: Path, write: Callable[[IO[bytes]], Any]) -> None:
    """Write to a temp file in the same directory, fsync, then rename over ``path``.

    A failed write (a full disk, say) leaves the previous ``path`` as it was, removes the
    temp file and is one GreenpropError naming the file and the cause.
    """
    path = Path(path)
    tmp = None
    try:
        tmp, handle = _open_temp(path)
        with handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        cause = _os_error(err)
        if cause is not None:
            raise GreenpropError(
                f"could not write {path} ({cause.strerror or cause}); the previous file is kept"
            ) from err
        raise


def _os_error(err: BaseException) -> OSError | None:
    """The OSError behind ``err`` (torch.save wraps a failed write in a RuntimeError)."""
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, OSError):
            return seen
        seen = seen.__cause__ or seen.__context__
    if isinstance(err, RuntimeError) and "unexpected pos" in str(err):
        return OSError(f"write failed: {err}")
    return None


def write_bytes(data: bytes, path: str | Path) -> None:
    """Write ``data`` atomically."""
    _atomic_write(Path(path), lambda handle: handle.write(data))


def write_text(text: str, path: str | Path) -> None:
    """Write ``text`` (UTF-8) atomically."""
    write_bytes(text.encode(), path)


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """Save ``state`` with torch.save, atomically."""

    def write(handle: IO[bytes]) -> None:
        buffer = io.BytesIO()  # a full disk then fails in our write, not deep inside torch
        torch.save(state, buffer)
        handle.write(buffer.getbuffer())

    _atomic_write(Path(path), write)


def load_checkpoint(path: str | Path, required: tuple[str, ...] = ("model", "epoch")) -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``: tensors and plain containers only.

    A pickled callable (or any other object) is refused before it can run; a missing,
    corrupt or foreign file (one lacking a ``required`` key) is one clear GreenpropError.
    """
    path = Path(path)
    if not path.is_file():
        raise GreenpropError(f"no checkpoint to resume from at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        unsafe = [line.strip() for line in str(err).splitlines() if "unsupported global" in line.lower()]
        if not unsafe:
            raise GreenpropError(f"checkpoint {path} is corrupt or unreadable (UnpicklingError)") from err
        raise GreenpropError(
            f"checkpoint {path} holds objects other than tensors and plain containers, refused "
            f"without running them ({unsafe[0][:200]})"
        ) from err
    except Exception as err:  # torch raises many types for a damaged file
        raise GreenpropError(
            f"checkpoint {path} is corrupt or unreadable ({type(err).__name__}: {str(err)[:200]})"
        ) from err
    missing = [key for key in required if not isinstance(state, dict) or key not in state]
    if missing:
        raise GreenpropError(
            f"checkpoint {path} is not a greenprop checkpoint of this run (missing {', '.join(missing)})"
        )
    if "config" in required and not isinstance(state["config"], dict):
        raise GreenpropError(
            f"checkpoint {path} is not a greenprop checkpoint of this run (config is not a dict)"
        )
    return state


def write_json(data: Any, path: str | Path) -> None:
    """Write JSON atomically (readable while a run is still going)."""
    write_text(json.dumps(data, indent=2, allow_nan=False) + "\n", path)


def remove_stale_temp_files(folder: str | Path) -> list[Path]:
    """Delete temp files an earlier, killed write left in ``folder`` (hold its lock first)."""
    removed = []
    for leftover in Path(folder).glob(f".*{_TMP_SUFFIX}"):
        if leftover.is_file():
            leftover.unlink(missing_ok=True)
            removed.append(leftover)
    return removed


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


def describe_model_mismatch(model: torch.nn.Module, saved: Any) -> str | None:
    """Why ``saved`` cannot be the model's state dict (one line), or None if it fits."""
    if not isinstance(saved, dict):
        return f"model state is a {type(saved).__name__}, not a dict"
    mine = model.state_dict()
    missing = [k for k in mine if k not in saved]
    extra = [k for k in saved if k not in mine]
    shapes = [
        f"{k} {tuple(saved[k].shape)} vs {tuple(v.shape)}"
        for k, v in mine.items()
        if isinstance(saved.get(k), torch.Tensor) and saved[k].shape != v.shape
    ]
    not_tensors = [k for k in mine if k in saved and not isinstance(saved[k], torch.Tensor)]
    parts = []
    for what, names in (
        ("missing", missing),
        ("unexpected", extra),
        ("shapes differ (saved vs this model)", shapes),
        ("not tensors", not_tensors),
    ):
        if names:
            more = f" and {len(names) - 3} more" if len(names) > 3 else ""
            parts.append(f"model tensors {what}: {', '.join(names[:3])}{more}")
    return "; ".join(parts) or None


def save_figure(fig: Any, path: str | Path, **kwargs: Any) -> None:
    """``fig.savefig`` atomically (a full disk keeps the previous plot)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format=Path(path).suffix.lstrip(".") or "png", **kwargs)
    write_bytes(buffer.getvalue(), path)
