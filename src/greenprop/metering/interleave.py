"""Side-by-side timing: several variants called in turn, round after round.

Shared by ``greenprop advise`` and the benchmark scripts (``benchmarks/_common.py``
re-exports it). Interleaving exposes every variant to the same drift (thermal, other
processes on a shared machine); the order rotates every round so none gets a
first-in-round advantage.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

try:
    import resource
except ImportError:  # not on Windows
    resource = None  # type: ignore[assignment]

__all__ = ["Timings", "interleaved_times", "minor_page_faults", "rotated", "synchronizer"]


def rotated(items: Sequence[str], shift: int) -> list[str]:
    """``items`` rotated left by ``shift``: round r starts with item ``r mod len``."""
    shift %= len(items)
    return [*items[shift:], *items[:shift]]


def minor_page_faults() -> int:
    """Minor page faults of this process so far (0 where ``resource`` is unavailable).

    Counted around every timed call: a large count per step means the allocator hands
    fresh (mmap'ed) pages to each step, i.e. GLIBC_TUNABLES did not take effect.
    """
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt if resource is not None else 0


@dataclass
class Timings:
    """Per-variant measurements of :func:`interleaved_times`, one entry per round."""

    seconds: dict[str, list[float]]
    minor_faults: dict[str, list[int]]


def synchronizer(device: torch.device | str | None) -> Callable[[], None]:
    """What waits for ``device``'s queued kernels (CUDA runs asynchronously); a no-op on CPU."""
    device = torch.device(device or "cpu")
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def interleaved_times(
    fns: Mapping[str, Callable[[], object]],
    rounds: int,
    warmup: int,
    device: torch.device | str | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> Timings:
    """Seconds (and page faults) per call of each function, one call each per round.

    Python's GC is off while timing so a collection does not land in one variant's
    measurement. On CUDA the device is synchronized before and after every call, so a
    call is charged its kernels' time, not their launches'. ``clock`` measures: wall time
    by default, or e.g. ``time.process_time`` (CPU time) on a machine shared with other jobs.
    """
    sync = synchronizer(device)
    names = list(fns)
    for i in range(warmup):
        for name in rotated(names, i):
            fns[name]()
    timings = Timings({name: [] for name in names}, {name: [] for name in names})
    gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for r in range(rounds):
            for name in rotated(names, r):
                faults = minor_page_faults()
                sync()
                start = clock()
                fns[name]()
                sync()
                timings.seconds[name].append(clock() - start)
                timings.minor_faults[name].append(minor_page_faults() - faults)
    finally:
        if gc_was_enabled:
            gc.enable()
    return timings
