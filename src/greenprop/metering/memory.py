"""Peak memory over a span of work (an epoch's training steps, one benchmark step).

What is measured depends on the device, and the source of every reading says which:

* CUDA: ``torch.cuda.max_memory_allocated``, reset at the span's start: the bytes of
  tensors PyTorch held on the device at the worst moment (not the caching allocator's
  reserve, nor the CUDA context).
* CPU on Linux: the process's peak resident set size, ``VmHWM`` of
  ``/proc/self/status``, which writing ``5`` to ``/proc/self/clear_refs`` resets to the
  current RSS at the span's start. It is the whole process (interpreter, libraries,
  loaded data), so :attr:`MemoryReading.at_start` is recorded too.
* CPU elsewhere: ``ru_maxrss`` is a lifetime high-water mark that cannot be reset, so it
  says something about the span only if it rose during it; otherwise the reading is
  ``unavailable`` rather than a figure from before the span.
* Other devices (MPS, ...): unavailable.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

from greenprop.metering.quantity import Quantity

try:
    import resource
except ImportError:  # not on Windows
    resource = None  # type: ignore[assignment]

__all__ = ["MemoryReading", "PeakMemory", "TensorBytes", "release_free_heap", "tensor_bytes"]

#: Linux files the CPU meter reads and writes (module constants so tests can point them away).
STATUS = Path("/proc/self/status")
CLEAR_REFS = Path("/proc/self/clear_refs")
UNIT = "B"


@dataclass(frozen=True)
class MemoryReading:
    """The peak over a span and the level it started from, both in bytes."""

    peak: Quantity
    at_start: Quantity

    def growth(self) -> Quantity:
        """How far the span rose above its start (what its own work needed at the worst moment)."""
        if self.peak.value is None or self.at_start.value is None:
            return Quantity.unavailable(UNIT, self.peak.source)
        return Quantity(self.peak.value - self.at_start.value, UNIT, self.peak.kind, self.peak.source)

    def to_dict(self) -> dict[str, dict]:
        return {"peak": self.peak.to_dict(), "at_start": self.at_start.to_dict()}


def _status_bytes(field: str) -> int | None:
    """A ``kB`` field of /proc/self/status (``VmRSS``, ``VmHWM``) in bytes; None if unreadable."""
    try:
        for line in STATUS.read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _reset_hwm() -> bool:
    """Reset VmHWM to the current RSS; False where the kernel or sandbox does not allow it."""
    try:
        CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return _status_bytes("VmHWM") is not None


def _max_rss() -> int | None:
    """The process's lifetime peak RSS in bytes (``ru_maxrss``: kB on Linux, bytes on macOS)."""
    if resource is None:
        return None
    value = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return value if sys.platform == "darwin" else value * 1024


def release_free_heap() -> bool:
    """Return freed heap pages to the OS (glibc ``malloc_trim(0)``); False where unsupported.

    The C allocator keeps freed memory resident (GLIBC_TUNABLES can make it keep
    everything), and a later span reuses it without its RSS rising. Benchmarks call this
    before each measured step so a step's RSS growth reflects what it allocates.
    """
    name = ctypes.util.find_library("c") if sys.platform.startswith("linux") else None
    if name is None:
        return False
    try:
        return bool(ctypes.CDLL(name).malloc_trim(0))
    except (OSError, AttributeError):
        return False


class PeakMemory:
    """Measures the peak memory of the work between :meth:`start` and :meth:`stop`.

    Args:
        device: where the measured work runs; decides what is measured (see the module).
    """

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self._mode: str | None = None
        self._at_start: int | None = None

    def start(self) -> None:
        """Reset the peak to the current level and remember that level."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._mode, self._at_start = "cuda", torch.cuda.memory_allocated(self.device)
        elif self.device.type != "cpu":
            self._mode, self._at_start = "none", None
        elif _reset_hwm():
            self._mode, self._at_start = "vmhwm", _status_bytes("VmRSS")
        else:
            self._mode, self._at_start = "maxrss", _max_rss()

    def stop(self) -> MemoryReading:
        """The peak since :meth:`start` and the level at the start, with their provenance."""
        if self._mode is None:
            raise RuntimeError("PeakMemory.stop() called before start()")
        mode, at_start, self._mode = self._mode, self._at_start, None
        source = self.describe(mode)
        peak: int | None = None
        if mode == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        elif mode == "vmhwm":
            peak = _status_bytes("VmHWM")
        elif mode == "maxrss":
            now = _max_rss()
            # The lifetime mark says nothing about this span unless the span raised it.
            peak = now if now is not None and at_start is not None and now > at_start else None
            at_start = None
        return MemoryReading(self._quantity(peak, source), self._quantity(at_start, source))

    @staticmethod
    def _quantity(value: int | None, source: str) -> Quantity:
        if value is None:
            return Quantity.unavailable(UNIT, source)
        return Quantity(float(value), UNIT, "measured", source)

    def describe(self, mode: str | None = None) -> str:
        """What the readings are (the source of every Quantity it returns)."""
        mode = mode or self._mode
        if mode == "cuda":
            return (
                f"torch.cuda.max_memory_allocated({self.device}), reset at the start: tensors PyTorch "
                "allocated, without the caching allocator's reserve and the CUDA context"
            )
        if mode == "vmhwm":
            return (
                "peak RSS of this process (VmHWM of /proc/self/status, reset via /proc/self/clear_refs "
                "at the start); the whole process: interpreter, libraries and loaded data included"
            )
        if mode == "maxrss":
            return (
                "the process's lifetime peak RSS (ru_maxrss), which cannot be reset here: reported only "
                "when it rose during the span"
            )
        return f"no peak memory counter for device {self.device.type!r}"


class TensorBytes(NamedTuple):
    """CPU tensor bytes of a span above those held at its start: the most at once, and at its end."""

    peak: int
    held: int


def tensor_bytes(fn: Callable[[], object]) -> TensorBytes | None:
    """The most CPU tensor bytes held at once during ``fn()``, and those still held after it,
    above what was held at its start.

    Read from PyTorch's CPU allocator (``torch.profiler`` with ``profile_memory``: every
    allocation and free in order), so unlike the RSS it does not depend on how the C
    allocator lays out and returns its heap: the same work gives the same numbers. It counts
    tensors (and kernels' workspaces) only, not the interpreter's or the allocator's own
    memory; frees of older tensors count against the span. None when the profiler reports
    no allocation at all.
    """
    from torch.profiler import ProfilerActivity, profile  # imported here: the profiler is heavy

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = prof.profiler.kineto_results.events() if prof.profiler is not None else []
    changes = sorted(
        ((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]" and e.device_type() == _CPU),
        key=lambda change: change[0],  # stable: events at the same instant keep their order
    )
    if not changes:
        return None
    held = peak = 0
    for _, nbytes in changes:
        held += nbytes
        peak = max(peak, held)
    return TensorBytes(peak, held)


_CPU = torch.autograd.DeviceType.CPU
