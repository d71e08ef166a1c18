"""Whether a comparison's time ratios stand: the background load each method trained under.

Each epoch record carries the cores other processes kept busy while it trained
(:mod:`greenprop.metering.load`). A method whose mean background load differs from the
baseline's by more than :data:`LOAD_LIMIT_CORES` was not timed on the same machine as
the baseline, so its time ratio is marked instead of being shown as if measured alike.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from typing import Any

from greenprop.experiments.compare import RunResult

__all__ = ["LOAD_LIMIT_CORES", "annotate_load", "load_notes", "time_ratio_cell"]

#: Largest difference in mean background load (cores) under which time ratios stand.
LOAD_LIMIT_CORES = 0.5
MARK = "load differs"


def run_background_cores(metrics: dict[str, Any]) -> float | None:
    """A run's mean background load (cores), None when it was not measured."""
    load = (metrics.get("summary") or {}).get("load") or {}
    return load.get("background_cores")


def annotate_load(rows: list[dict[str, Any]], results: list[RunResult], baseline: str = "baseline") -> None:
    """Add ``background_cores`` and ``time_ratio_reliable`` (None: unknown) to each row."""
    loads: dict[str, list[float | None]] = defaultdict(list)
    for r in results:
        if not r.metrics.get("diverged"):
            loads[r.method].append(run_background_cores(r.metrics))
    for row in rows:
        known = loads.get(row["method"], [])
        measured = bool(known) and None not in known
        row["background_cores"] = statistics.fmean(known) if measured else None
    base = next((row["background_cores"] for row in rows if row["method"] == baseline), None)
    for row in rows:
        if row["time_ratio"] is None or base is None or row["background_cores"] is None:
            row["time_ratio_reliable"] = None
        else:
            row["time_ratio_reliable"] = abs(row["background_cores"] - base) <= LOAD_LIMIT_CORES


def time_ratio_cell(row: dict[str, Any]) -> str:
    """The "Time vs base" cell: the ratio, marked when the loads differed."""
    if row["time_ratio"] is None:
        return "n/a"
    text = f"{row['time_ratio']:.3f}"
    return f"{text} ({MARK})" if row.get("time_ratio_reliable") is False else text


def load_notes(rows: list[dict[str, Any]]) -> list[str]:
    """Sentences for under the table: each method's background load, and a warning if needed."""
    known = [row for row in rows if row.get("background_cores") is not None]
    if not known:
        return ["Background load: not measured (the runs predate its recording); time ratios unchecked."]
    loads = ", ".join(f"{row['method']} {row['background_cores']:.2f}" for row in known)
    notes = [
        "Background load while training (cores other processes kept busy, mean over seeds; "
        f"runs trained round-robin by epoch): {loads}."
    ]
    finished = [row for row in rows if row["epochs"] is not None]  # not diverged in every seed
    unknown = [row["method"] for row in finished if row.get("background_cores") is None]
    if unknown:
        notes.append(f"Background load not measured for {', '.join(unknown)}.")
    differs = [row["method"] for row in rows if row.get("time_ratio_reliable") is False]
    if differs:
        notes.append(
            f"WARNING: time ratios unreliable: the background load of {', '.join(differs)} differed from "
            f"the baseline's by more than {LOAD_LIMIT_CORES} cores, so their times were not measured "
            f"alike (marked '{MARK}'); rerun them on a quieter machine."
        )
    return notes
