"""What a run's metrics.json says beyond the epoch records: the environment and the totals."""

from __future__ import annotations

import os
import platform
from typing import Any

import torch

from greenprop.metering import Quantity
from greenprop.metering.load import summarize_load
from greenprop.train.tasks import ClassificationTask, Task
from greenprop.train.tuning import REEXEC_MARKER

__all__ = ["environment", "summarize"]


def environment(device: torch.device, *, channels_last: bool = False, tuned: bool = False) -> dict[str, Any]:
    """What the timings depend on, recorded next to them (``tuned``: ``--tuned`` was on)."""
    info: dict[str, Any] = {
        "tuned": tuned,
        "channels_last": channels_last,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "device": str(device),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "GLIBC_TUNABLES": os.environ.get("GLIBC_TUNABLES"),
        "reexecuted_for_tunables": bool(os.environ.get(REEXEC_MARKER)),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _sum_quantities(items: list[dict[str, Any]], unit: str) -> dict[str, Any]:
    total = None
    for item in items:
        q = Quantity.from_dict(item)
        total = q if total is None else total + q
    return (total or Quantity(0.0, unit, "counted", "no epochs")).to_dict()


def _peak_memory(history: list[dict[str, Any]]) -> dict[str, Any]:
    """The highest epoch peak: memory is not additive, the run needs its worst epoch's."""
    peaks = [Quantity.from_dict(r["memory"]["peak"]) for r in history if "memory" in r]
    known = [q for q in peaks if q.value is not None]
    if not known:
        source = peaks[0].source if peaks else "not recorded (epochs run by an older greenprop)"
        return Quantity.unavailable("B", source).to_dict()
    return max(known, key=lambda q: q.value or 0.0).to_dict()


def summarize(history: list[dict[str, Any]], task: Task | None = None) -> dict[str, Any]:
    """Totals over the epochs run so far: the task's metrics at the end (accuracy for
    classification, the default), FLOPs, time, energy, peak memory."""
    if not history:
        return {}
    phases = sorted({name for r in history for name in r["time"]})
    time_by_phase = {
        p: _sum_quantities([r["time"][p] for r in history if p in r["time"]], "s") for p in phases
    }
    train_phases = [time_by_phase[p] for p in phases if p != "eval"]
    return {
        "epochs_run": len(history),
        "epochs_replaced": sum(1 for r in history if r["replaced_by"]),
        "steps": sum(r["steps"] for r in history),
        **(task or ClassificationTask()).summary(history),
        "flops": {
            k: _sum_quantities([r["flops"][k] for r in history], "FLOP") for k in ("forward", "backward")
        },
        "time": {
            "phases": time_by_phase,
            "train": _sum_quantities(train_phases, "s") if train_phases else None,
        },
        "energy": _sum_quantities([r["energy"] for r in history], "J"),
        "peak_memory": _peak_memory(history),
        "load": summarize_load(history),
    }
