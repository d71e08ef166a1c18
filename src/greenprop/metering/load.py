"""Background load: how many CPU cores other work took while a run trained.

Wall-time ratios between runs are fair only when the runs saw the same machine. A
:class:`LoadMeter` reads the machine's busy CPU time and this process's own CPU time
(psutil, from ``/proc/stat`` and ``/proc/self/stat`` on Linux) around a span. The
machine's busy time minus the run's own time, divided by the wall time, is the number
of cores other processes kept busy: 0 on a quiet machine, 1.0 when one other core-bound
job ran the whole time. The 1-minute load average is kept next to it for context (it
counts the run's own threads too).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import psutil

__all__ = ["CpuSpan", "LoadMeter", "summarize_load"]

#: Fields of ``psutil.cpu_times()`` that are busy time; guest time is already in user/nice.
_BUSY_FIELDS = ("user", "nice", "system", "irq", "softirq", "steal")
SOURCE = "psutil: machine busy CPU time minus this run's own CPU time, per second of wall time"


def machine_busy_seconds() -> float:
    """CPU seconds all cores spent busy since boot (every process, ours included)."""
    times = psutil.cpu_times()
    return sum(getattr(times, name, 0.0) for name in _BUSY_FIELDS)


def own_cpu_seconds() -> float:
    """CPU seconds this process (all its threads) has used."""
    times = psutil.Process().cpu_times()
    return times.user + times.system


@dataclass(frozen=True)
class CpuSpan:
    """CPU time seen over one span of wall time."""

    wall_s: float
    machine_busy_s: float
    own_s: float
    loadavg_1m: float

    def record(self, own_s: float | None = None) -> dict[str, Any]:
        """The span as an epoch record's ``load`` field.

        ``own_s`` replaces this process's CPU time when the run has more processes on
        the machine (the ranks of a DDP run), so they do not count as background.
        """
        own = self.own_s if own_s is None else own_s
        wall = max(self.wall_s, 1e-9)
        return {
            "background_cores": max(0.0, (self.machine_busy_s - own) / wall),  # tick rounding
            "own_cores": own / wall,
            "loadavg_1m": self.loadavg_1m,
            "cpus": psutil.cpu_count(),
            "wall_s": self.wall_s,
            "source": SOURCE,
        }


class LoadMeter:
    """Start before a span, stop after it: :meth:`stop` returns the :class:`CpuSpan`."""

    def __init__(self) -> None:
        self._start: tuple[float, float, float] | None = None

    def start(self) -> None:
        self._start = (time.perf_counter(), machine_busy_seconds(), own_cpu_seconds())

    def stop(self) -> CpuSpan:
        if self._start is None:
            raise RuntimeError("LoadMeter.stop() without start()")
        wall0, busy0, own0 = self._start
        self._start = None
        return CpuSpan(
            wall_s=time.perf_counter() - wall0,
            machine_busy_s=machine_busy_seconds() - busy0,
            own_s=own_cpu_seconds() - own0,
            loadavg_1m=psutil.getloadavg()[0],
        )


def summarize_load(history: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean background load over the epochs that measured it, weighted by their wall time.

    ``background_cores`` is None when no epoch measured it (runs from before the meter).
    """
    spans = [r["load"] for r in history if isinstance(r.get("load"), dict)]
    wall = sum(s["wall_s"] for s in spans)
    if not spans or wall <= 0:
        return {"background_cores": None, "max_background_cores": None, "epochs_measured": 0}
    return {
        "background_cores": sum(s["background_cores"] * s["wall_s"] for s in spans) / wall,
        "max_background_cores": max(s["background_cores"] for s in spans),
        "own_cores": sum(s["own_cores"] * s["wall_s"] for s in spans) / wall,
        "epochs_measured": len(spans),
        "source": spans[0]["source"],
    }
