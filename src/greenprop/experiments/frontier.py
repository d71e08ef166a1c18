"""The dense frontier: what dense training buys at a method's cost.

A user's real alternative to a cheaper method is dense training for less ("Budgeted
Training", Li, Yumer and Ramanan, ICLR 2020). So ``compare`` also trains the baseline at
shorter budgets, each with its own full learning-rate schedule over its shorter length
(cosine anneals to zero at the budget's end; a step schedule's step size shrinks in
proportion), same seeds. With the full baseline these runs give Acc@1 as a function of
counted training FLOPs and of measured train time, and every method is compared with
dense training at its own cost.

Interpolation: piecewise linear in the cost (FLOPs or seconds) between the frontier's
points of the same seed (numpy.interp). A method cheaper than the smallest budget has no
dense value (nothing was measured there). A method dearer than the full baseline is
compared with the full baseline, which cost less: a dense run with more epochs might do
better, so that difference is flagged (``beyond``) as favouring the method.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from greenprop.errors import GreenpropError
from greenprop.train.config import TrainConfig

if TYPE_CHECKING:  # compare imports this module for its list of runs
    from greenprop.experiments.compare import RunResult

__all__ = [
    "DEFAULT_FRACTIONS",
    "budget_epochs",
    "compare_with_frontier",
    "cost_points",
    "format_frontier_table",
    "frontier_runs",
    "interpolate",
    "verdict_lines",
]

#: Budgets as fractions of the baseline's epochs; the full budget is the baseline itself.
DEFAULT_FRACTIONS: tuple[float, ...] = (0.25, 0.5, 0.75)
#: The two costs a method is matched on: (key, words).
COSTS: tuple[tuple[str, str], ...] = (("flops", "FLOPs"), ("time", "time"))


def budget_epochs(epochs: int, fractions: Sequence[float]) -> list[int]:
    """The shorter budgets in epochs (rounded half up, at least 1, the full one left out)."""
    for fraction in fractions:
        if not (isinstance(fraction, int | float) and 0 < fraction < 1):
            raise GreenpropError(f"frontier budget {fraction!r} must be a fraction of the epochs in (0, 1)")
    return sorted({max(1, math.floor(f * epochs + 0.5)) for f in fractions} - {epochs})


def label(epochs: int) -> str:
    """The row and folder name of the dense run at ``epochs`` epochs."""
    return f"dense@{epochs}ep"


def frontier_runs(base: TrainConfig, fractions: Sequence[float]) -> list[tuple[str, TrainConfig]]:
    """``(label, config)`` of each shorter dense run: the baseline's config at fewer epochs."""
    runs = []
    for epochs in budget_epochs(base.epochs, fractions):
        step_size = max(1, math.floor(base.step_size * epochs / base.epochs + 0.5))
        runs.append((label(epochs), base.replace(method="baseline", epochs=epochs, step_size=step_size)))
    return runs


def is_dense(result: RunResult) -> bool:
    """A run of the baseline (full budget or frontier), by its recorded config."""
    return result.metrics["config"]["method"] == "baseline"


@dataclass(frozen=True)
class Point:
    """One finished run's cost and accuracy."""

    flops: float  # counted training FLOPs, forward + backward
    time: float  # measured train time, seconds
    acc1: float


def _point(result: RunResult) -> Point | None:
    if result.metrics.get("diverged") or not result.metrics.get("complete", True):
        return None
    s = result.metrics["summary"]
    if "acc1" not in s:  # a task without accuracy (diffusion): no frontier point
        return None
    flops = s["flops"]["forward"]["value"] + s["flops"]["backward"]["value"]
    return Point(flops, s["time"]["train"]["value"], s["acc1"])


def interpolate(costs: Sequence[float], accs: Sequence[float], cost: float) -> tuple[float | None, str]:
    """Dense Acc@1 at ``cost`` on one seed's frontier, and where ``cost`` lies.

    Returns ``(acc, "inside")`` piecewise linearly between the points, ``(acc of the
    dearest point, "beyond")`` above them, ``(None, "below")`` under the cheapest.
    """
    if not costs:
        return None, "below"
    order = np.argsort(costs)
    xs, ys = np.asarray(costs, dtype=float)[order], np.asarray(accs, dtype=float)[order]
    if cost < xs[0]:
        return None, "below"
    if cost > xs[-1]:
        return float(ys[-1]), "beyond"
    return float(np.interp(cost, xs, ys)), "inside"


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def _verdict(mean: float | None, std: float | None, position: str) -> str:
    if position == "diverged":
        return "no finished run (every seed diverged)"
    if mean is None:
        return "cheaper than the smallest budget (no dense run to compare)"
    if std is not None and abs(mean) <= std:
        words = "on the frontier (within the seed spread)"
    elif mean > 0:
        words = "above the frontier"
    elif mean < 0:
        words = "below the frontier"
    else:
        words = "on the frontier"
    if position == "beyond":
        words += " (costs more than full dense; compared with full dense)"
    return words


def compare_with_frontier(results: list[RunResult]) -> list[dict[str, Any]]:
    """For every method: dense Acc@1 at its FLOPs and at its time, and its difference.

    Each seed of a method is matched with the frontier of the same seed; the
    difference's mean and sample std are over those seeds. Empty when the comparison
    has fewer than two dense budgets.
    """
    frontier: dict[int, list[Point]] = defaultdict(list)
    methods: dict[str, list[tuple[int, Point]]] = defaultdict(list)
    budgets = set()
    for r in results:
        point = _point(r)
        if is_dense(r):
            budgets.add(r.metrics["config"]["epochs"])
            if point is not None:
                frontier[r.seed].append(point)
        elif point is not None:
            methods[r.method].append((r.seed, point))
        else:
            methods.setdefault(r.method, [])
    if len(budgets) < 2 or not any("acc1" in r.metrics["summary"] for r in results):
        return []  # no two budgets, or a task without Acc@1 (perplexity): its dense runs are table rows
    rows = []
    for method, runs in methods.items():
        row: dict[str, Any] = {"method": method, "seeds": [seed for seed, _ in runs]}
        for key, _ in COSTS:
            dense, deltas, positions = [], [], []
            for seed, point in runs:
                line = frontier.get(seed, [])
                acc, position = interpolate(
                    [getattr(p, key) for p in line], [p.acc1 for p in line], getattr(point, key)
                )
                positions.append(position)
                if acc is not None:
                    dense.append(acc)
                    deltas.append(point.acc1 - acc)
            position = max(positions, key=["inside", "beyond", "below"].index, default="diverged")
            reached = position in ("inside", "beyond")
            delta, delta_std = _mean_std(deltas) if reached else (None, None)
            row |= {
                f"dense_acc1_at_{key}": _mean_std(dense)[0] if reached else None,
                f"delta_acc1_{key}": delta,
                f"delta_acc1_{key}_std": delta_std,
                f"position_{key}": position,
                f"verdict_{key}": _verdict(delta, delta_std, position),
            }
        rows.append(row)
    return rows


def cost_points(results: list[RunResult]) -> dict[str, dict[str, Any]]:
    """Per row (method or dense budget): mean and std over seeds of FLOPs, time and Acc@1.

    What the frontier plots draw; ``dense`` marks the frontier's rows, ``epochs`` their budget.
    """
    grouped: dict[str, list[Point]] = defaultdict(list)
    dense: dict[str, int] = {}
    for r in results:
        point = _point(r)
        if point is not None:
            grouped[r.method].append(point)
        if is_dense(r):
            dense[r.method] = r.metrics["config"]["epochs"]
    out = {}
    for method, points in grouped.items():
        stats: dict[str, Any] = {"dense": method in dense, "epochs": dense.get(method)}
        for key in ("flops", "time", "acc1"):
            stats[key], stats[f"{key}_std"] = _mean_std([getattr(p, key) for p in points])
        out[method] = stats
    return out


def _signed(mean: float | None, std: float | None) -> str:
    if mean is None:
        return "n/a"
    return f"{mean:+.2f}" + ("" if std is None else f" ± {std:.2f}")


FRONTIER_COLUMNS = (
    "Method",
    "Dense @ same FLOPs",
    "Δ Acc@1 (FLOPs)",
    "Dense @ same time",
    "Δ Acc@1 (time)",
)


def frontier_cells(rows: list[dict[str, Any]]) -> list[list[str]]:
    """The frontier table's cells; ``*`` marks a method dearer than full dense."""
    body = []
    for row in rows:
        cells = [row["method"]]
        for key, _ in COSTS:
            dense = row[f"dense_acc1_at_{key}"]
            mark = "*" if row[f"position_{key}"] == "beyond" else ""
            cells.append("n/a" if dense is None else f"{dense:.2f}{mark}")
            cells.append(_signed(row[f"delta_acc1_{key}"], row[f"delta_acc1_{key}_std"]))
        body.append(cells)
    return body


def format_frontier_table(rows: list[dict[str, Any]], markdown: bool = False) -> str:
    from greenprop.experiments.report import render_table

    return render_table(FRONTIER_COLUMNS, frontier_cells(rows), markdown=markdown)


def verdict_lines(rows: list[dict[str, Any]]) -> list[str]:
    """In words: which methods sit above the frontier, at the same FLOPs and the same time."""
    lines = []
    for key, words in COSTS:
        groups: dict[str, list[str]] = defaultdict(list)
        for row in rows:
            groups[row[f"verdict_{key}"]].append(f"`{row['method']}`")
        parts = [f"{verdict}: {', '.join(names)}" for verdict, names in groups.items()]
        lines.append(f"At the same {words}: " + ("; ".join(parts) if parts else "no method") + ".")
    return lines


EXPLANATION = (
    "Dense frontier: the baseline retrained at shorter budgets, each with its own full "
    "learning-rate schedule, same seeds. \"Dense @ same FLOPs/time\" is the frontier's Acc@1 "
    "at the method's counted training FLOPs / measured train time, linear between the two "
    "nearest budgets of the same seed; Δ is the method's Acc@1 minus it, mean ± sample std "
    "over seeds (no ± with one seed). n/a: the method is cheaper than the smallest budget. "
    "*: the method costs more than full dense and is compared with full dense, which more "
    "epochs might beat. A difference within the seed spread counts as on the frontier. "
    "Train times carry the load of whatever else ran on the machine: compare them only "
    "from a quiet machine or runs taken side by side."
)


def frontier_report(
    results: list[RunResult], out_dir: Path
) -> tuple[list[dict[str, Any]], list[str], dict[str, Path]]:
    """The frontier's rows, its Markdown section and its plots (written to ``out_dir``).

    Nothing (``[], [], {}``) when the comparison has no frontier or no method.
    """
    from greenprop.experiments.plots import plot_frontier

    rows = compare_with_frontier(results)
    if not rows:
        return [], [], {}
    points = cost_points(results)
    paths = {f"frontier_{key}_plot": Path(out_dir) / f"frontier_{key}.png" for key, _ in COSTS}
    for key, _ in COSTS:
        plot_frontier(points, key, paths[f"frontier_{key}_plot"])
    lines = [
        "## Against the dense frontier",
        "",
        format_frontier_table(rows, markdown=True),
        "",
        *(f"- {line}" for line in verdict_lines(rows)),
        "",
        EXPLANATION,
        "",
        *(f"![Acc@1 vs {words}]({paths[f'frontier_{key}_plot'].name})\n" for key, words in COSTS),
    ]
    return rows, lines, paths
