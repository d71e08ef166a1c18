"""The headline results page's tables (docs/results.md), made from a compare's ``results.json``.

One row per method with what the page's target asks about: Acc@1/Acc@5 (mean ± std over
seeds), counted FLOPs and measured wall time saved against full dense, energy, peak
memory, the difference to the dense frontier at the same FLOPs and at the same time, and
whether the target is met. The target (issue 12): at least 50% less training FLOPs and
wall time than full dense, at most 0.5 points lower Acc@1 (mean over seeds), and above
the dense frontier at the same FLOPs and at the same time.
"""

from __future__ import annotations

from typing import Any

from greenprop.experiments.load_check import time_ratio_cell
from greenprop.experiments.report import render_table

__all__ = ["TARGET_MAX_DROP", "TARGET_SAVED_PCT", "headline_table", "target_misses"]

TARGET_SAVED_PCT = 50.0
TARGET_MAX_DROP = 0.5

COLUMNS = (
    "Method",
    "Acc@1 (%)",
    "Acc@5 (%)",
    "FLOPs saved",
    "Time saved",
    "Energy",
    "Peak mem (MiB)",
    "Δ Acc@1 vs dense @ same FLOPs",
    "Δ Acc@1 vs dense @ same time",
    "Target",
)


def _pm(mean: float | None, std: float | None, sign: str = "") -> str:
    if mean is None:
        return "n/a"
    return f"{mean:{sign}.2f}" + ("" if std is None else f" ± {std:.2f}")


def _time_saved(row: dict[str, Any]) -> str:
    if row["time_ratio"] is None:
        return "n/a"
    cell = time_ratio_cell(row)  # the ratio, with compare's "(load differs)" mark
    return f"{100 * (1 - row['time_ratio']):.1f}%" + cell[len(f"{row['time_ratio']:.3f}") :]


def _energy(row: dict[str, Any]) -> str:
    """Never 0 for an unmeasured energy: "unavailable" (the provenance goes under the table)."""
    return "unavailable" if row["energy_j"] is None else f"{row['energy_j']:.4g} J ({row['energy_kind']})"


def _delta(frontier: dict[str, Any] | None, key: str) -> str:
    if frontier is None:
        return "-"
    cell = _pm(frontier[f"delta_acc1_{key}"], frontier[f"delta_acc1_{key}_std"], "+")
    return cell + ("*" if frontier[f"position_{key}"] == "beyond" else "")


def target_misses(row: dict[str, Any], base: dict[str, Any], frontier: dict[str, Any] | None) -> list[str]:
    """The parts of the target ``row`` misses, in words; empty when it meets all of them."""
    misses = []
    if row["flops_saved_pct"] is None or row["flops_saved_pct"] < TARGET_SAVED_PCT:
        misses.append(f"FLOPs saved {_opt_pct(row['flops_saved_pct'])}")
    time_saved = None if row["time_ratio"] is None else 100 * (1 - row["time_ratio"])
    if time_saved is None or time_saved < TARGET_SAVED_PCT:
        misses.append(f"time saved {_opt_pct(time_saved)}")
    if row["acc1_mean"] is None:
        misses.append("every seed diverged")
    elif base["acc1_mean"] - row["acc1_mean"] > TARGET_MAX_DROP:
        misses.append(f"Acc@1 {row['acc1_mean'] - base['acc1_mean']:+.2f}")
    for key, words in (("flops", "FLOPs"), ("time", "time")):
        verdict = "not compared" if frontier is None else frontier[f"verdict_{key}"]
        if not verdict.startswith("above"):
            misses.append(f"{verdict.split(' (')[0]} at the same {words}")
    return misses


def _opt_pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}%"


def headline_table(results: dict[str, Any], baseline: str = "baseline") -> str:
    """The page's Markdown table for one compare (``results.json`` as loaded)."""
    rows = results["rows"]
    base = next(row for row in rows if row["method"] == baseline)
    frontier = {row["method"]: row for row in results.get("frontier", [])}
    dense = {row["method"] for row in rows if row["method"] == baseline or row["method"].startswith("dense@")}
    body = []
    for row in rows:
        method_frontier = frontier.get(row["method"])
        if row["method"] in dense:
            target = "-"
        else:
            misses = target_misses(row, base, method_frontier)
            target = "met" if not misses else "no: " + ", ".join(misses)
        body.append(
            [
                row["method"],
                _pm(row["acc1_mean"], row["acc1_std"]),
                _pm(row["acc5_mean"], row["acc5_std"]),
                "n/a" if row["flops_saved_pct"] is None else f"{row['flops_saved_pct']:.1f}%",
                _time_saved(row),
                _energy(row),
                "n/a" if row.get("peak_memory_mib") is None else f"{row['peak_memory_mib']:.0f}",
                _delta(method_frontier, "flops"),
                _delta(method_frontier, "time"),
                target,
            ]
        )
    return render_table(COLUMNS, body, markdown=True)
