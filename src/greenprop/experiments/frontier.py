"""The dense frontier: what dense training buys at a method's cost.

A user's real alternative to a cheaper method is dense training for less ("Budgeted
Training", Li, Yumer and Ramanan, ICLR 2020). So ``compare`` also trains the baseline at
shorter budgets, each with its own full learning-rate schedule over its shorter length
(cosine anneals to zero at the budget's end; a step schedule's step size shrinks in
proportion), same seeds. With the full baseline these runs give the task's metric (Acc@1,
perplexity, FD, ...) as a function of counted training FLOPs and of measured train time,
and every method is compared with dense training at its own cost.

Interpolation: piecewise linear in the cost (FLOPs or seconds) between the frontier's
points of the same seed (numpy.interp); perplexity is interpolated in its logarithm, i.e.
linearly in the test loss (nats per token) it is the exponential of, like every other
metric here (an accuracy, a loss or an FD is read linearly; interpolating perplexity
itself would bend the frontier upwards between budgets, towards the method's favour). A
method cheaper than the smallest budget has no dense value (nothing was measured there).
A method dearer than the full baseline is compared with the full baseline, which cost
less: a dense run with more epochs might do better, so that difference is flagged
(``beyond``) as favouring the method.

Direction: "above the frontier" always means better than dense at the same cost: a higher
value of a higher-is-better metric (Acc@1), a lower value of a lower-is-better one
(perplexity, FD, test loss; Δ < 0). The plots of a lower-is-better metric turn their value
axis upside down, so that better is up there too.
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
    "FrontierMetric",
    "budget_epochs",
    "compare_with_frontier",
    "cost_points",
    "format_frontier_table",
    "frontier_metrics",
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
class FrontierMetric:
    """A task metric the frontier compares, from ``metrics.json``'s task (see :class:`Task`)."""

    key: str
    label: str
    higher_is_better: bool
    log: bool = False  # interpolate its logarithm (perplexity: the exponential of the test loss)
    fmt: str = ".4g"  # how the tables write it: 4 significant digits (a noise MSE of 0.1615)

    @property
    def heading(self) -> str:
        """The label as the tables show it: a lower-is-better metric ends in "↓"."""
        return self.label + ("" if self.higher_is_better else " ↓")

    def to_dict(self) -> dict[str, Any]:
        """As ``results.json`` lists it (``scale``: how the frontier interpolates it)."""
        return {
            "key": self.key,
            "label": self.label,
            "higher_is_better": self.higher_is_better,
            "scale": "log" if self.log else "linear",
        }


#: Shorter labels for the frontier's columns (the main table's say the unit).
_SHORT = {"acc1": "Acc@1"}


def frontier_metrics(results: list[RunResult]) -> tuple[FrontierMetric, ...]:
    """The task's metrics the frontier compares on, the ranking one first.

    Left out as repeats: Acc@5 beside Acc@1, and a causal LM's test loss, which is the
    logarithm of its perplexity (the perplexity's frontier is read in that logarithm).
    """
    from greenprop.experiments.report import task_metrics

    metrics = task_metrics(results)
    keys = {m["key"] for m in metrics}
    return tuple(
        FrontierMetric(
            m["key"],
            _SHORT.get(m["key"], m["label"]),
            m["higher_is_better"],
            log=m["key"] == "ppl",
            fmt=".2f" if m["key"] == "acc1" else ".4g",  # percentage points, as always
        )
        for m in metrics
        if m["key"] != "acc5" and not (m["key"] == "test_loss" and "ppl" in keys)
    )


@dataclass(frozen=True)
class Point:
    """One finished run's cost and metric values (None: not measured, e.g. an unscored FD)."""

    flops: float  # counted training FLOPs, forward + backward
    time: float  # measured train time, seconds
    values: dict[str, float | None]


def _point(result: RunResult, metrics: Sequence[FrontierMetric]) -> Point | None:
    if result.metrics.get("diverged") or not result.metrics.get("complete", True):
        return None
    s = result.metrics["summary"]
    flops = s["flops"]["forward"]["value"] + s["flops"]["backward"]["value"]
    values = {m.key: _finite(s.get(m.key)) for m in metrics}
    return Point(flops, s["time"]["train"]["value"], values)


def _finite(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


def interpolate(
    costs: Sequence[float], values: Sequence[float], cost: float, *, log: bool = False
) -> tuple[float | None, str]:
    """Dense metric value at ``cost`` on one seed's frontier, and where ``cost`` lies.

    Returns ``(value, "inside")`` piecewise linearly between the points (linearly in
    ``log(value)`` when ``log``), ``(value of the dearest point, "beyond")`` above them,
    ``(None, "below")`` under the cheapest.
    """
    if not costs:
        return None, "below"
    order = np.argsort(costs)
    xs, ys = np.asarray(costs, dtype=float)[order], np.asarray(values, dtype=float)[order]
    if cost < xs[0]:
        return None, "below"
    if cost > xs[-1]:
        return float(ys[-1]), "beyond"
    if log:
        return float(np.exp(np.interp(cost, xs, np.log(ys)))), "inside"
    return float(np.interp(cost, xs, ys)), "inside"


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


#: What a one-seed verdict adds: its difference has no seed spread to be judged by.
ONE_SEED = " (one seed: no spread to judge by)"


def _verdict(
    mean: float | None, std: float | None, position: str, higher_is_better: bool = True, seeds: int = 2
) -> str:
    """The verdict in words; with one seed a difference has no spread to judge it by: it says so."""
    if position == "diverged":
        return "no finished run (every seed diverged)"
    if position == "unmeasured":
        return "not measured (the method or every dense budget lacks this metric)"
    if mean is None:
        return "cheaper than the smallest budget (no dense run to compare)"
    better = mean if higher_is_better else -mean
    if std is not None and abs(mean) <= std:
        words = "on the frontier (within the seed spread)"
    elif better > 0:
        words = "above the frontier"
    elif better < 0:
        words = "below the frontier"
    else:
        words = "on the frontier"
    if seeds == 1 and words != "on the frontier":
        words += ONE_SEED
    if position == "beyond":
        words += " (costs more than full dense; compared with full dense)"
    return words


#: Where a method's cost lies on its seeds' frontiers, the least favourable listed first.
_POSITIONS = ["inside", "beyond", "below"]


def _against(
    metric: FrontierMetric, key: str, runs: list[tuple[int, Point]], frontier: dict[int, list[Point]]
) -> dict[str, Any]:
    """One metric at one cost (``key``): the fields of a method's frontier row."""
    name = metric.key
    dense, deltas, positions = [], [], []
    for seed, point in runs:
        value = point.values[name]
        if value is None:
            continue
        line = [p for p in frontier.get(seed, []) if p.values[name] is not None]
        if not line:  # no dense budget of this seed has the metric (e.g. none scored)
            continue
        at, position = interpolate(
            [getattr(p, key) for p in line], [p.values[name] for p in line], getattr(point, key),
            log=metric.log,
        )
        positions.append(position)
        if at is not None:
            dense.append(at)
            deltas.append(value - at)
    default = "unmeasured" if runs else "diverged"
    position = max(positions, key=_POSITIONS.index, default=default)
    reached = position in ("inside", "beyond")
    delta, delta_std = _mean_std(deltas) if reached else (None, None)
    return {
        f"dense_{name}_at_{key}": _mean_std(dense)[0] if reached else None,
        f"delta_{name}_{key}": delta,
        f"delta_{name}_{key}_std": delta_std,
        f"position_{name}_{key}": position,
        f"verdict_{name}_{key}": _verdict(delta, delta_std, position, metric.higher_is_better, len(deltas)),
    }


def compare_with_frontier(results: list[RunResult]) -> list[dict[str, Any]]:
    """For every method and frontier metric: dense's value at its FLOPs and at its time, and
    the method's difference (method minus dense).

    Each seed of a method is matched with the frontier of the same seed; the
    difference's mean and sample std are over those seeds. A row's keys, per metric
    ``k`` (:func:`frontier_metrics`, listed in ``metrics``) and cost ``c`` (flops, time):
    ``dense_<k>_at_<c>``, ``delta_<k>_<c>``, ``delta_<k>_<c>_std``, ``position_<k>_<c>``,
    ``verdict_<k>_<c>``; ``position_<c>`` and ``verdict_<c>`` repeat the first metric's.
    Empty when the comparison has fewer than two dense budgets.
    """
    metrics = frontier_metrics(results)
    frontier: dict[int, list[Point]] = defaultdict(list)
    methods: dict[str, list[tuple[int, Point]]] = defaultdict(list)
    budgets = set()
    for r in results:
        point = _point(r, metrics)
        if is_dense(r):
            budgets.add(r.metrics["config"]["epochs"])
            if point is not None:
                frontier[r.seed].append(point)
        elif point is not None:
            methods[r.method].append((r.seed, point))
        else:
            methods.setdefault(r.method, [])
    if len(budgets) < 2 or not metrics:
        return []  # no two budgets (or a task without metrics): its dense runs are table rows
    rows = []
    for method, runs in methods.items():
        row: dict[str, Any] = {"method": method, "seeds": [seed for seed, _ in runs]}
        row["metrics"] = [m.key for m in metrics]
        for metric in metrics:
            for key, _ in COSTS:
                row |= _against(metric, key, runs, frontier)
        for key, _ in COSTS:  # the ranking metric's, under the names the results page reads
            row[f"position_{key}"] = row[f"position_{metrics[0].key}_{key}"]
            row[f"verdict_{key}"] = row[f"verdict_{metrics[0].key}_{key}"]
        rows.append(row)
    return rows


def cost_points(results: list[RunResult]) -> dict[str, dict[str, Any]]:
    """Per row (method or dense budget): mean and std over seeds of FLOPs, time and each
    frontier metric (None where no seed measured it).

    What the frontier plots draw; ``dense`` marks the frontier's rows, ``epochs`` their budget.
    """
    metrics = frontier_metrics(results)
    grouped: dict[str, list[Point]] = defaultdict(list)
    dense: dict[str, int] = {}
    for r in results:
        point = _point(r, metrics)
        if point is not None:
            grouped[r.method].append(point)
        if is_dense(r):
            dense[r.method] = r.metrics["config"]["epochs"]
    out = {}
    for method, points in grouped.items():
        stats: dict[str, Any] = {"dense": method in dense, "epochs": dense.get(method)}
        for key in ("flops", "time"):
            stats[key], stats[f"{key}_std"] = _mean_std([getattr(p, key) for p in points])
        for m in metrics:
            known = [p.values[m.key] for p in points if p.values[m.key] is not None]
            stats[m.key], stats[f"{m.key}_std"] = _mean_std(known)
        out[method] = stats
    return out


def _signed(mean: float | None, std: float | None, fmt: str = ".2f") -> str:
    if mean is None:
        return "n/a"
    return f"{mean:+{fmt}}" + ("" if std is None else f" ± {std:{fmt}}")


def frontier_columns(metric: FrontierMetric) -> tuple[str, ...]:
    """The frontier table's header for one metric ("↓": lower is better)."""
    return (
        "Method",
        "Dense @ same FLOPs",
        f"Δ {metric.heading} (FLOPs)",
        "Dense @ same time",
        f"Δ {metric.heading} (time)",
    )


ACC1 = FrontierMetric("acc1", "Acc@1", True, fmt=".2f")
FRONTIER_COLUMNS = frontier_columns(ACC1)


def frontier_cells(rows: list[dict[str, Any]], metric: FrontierMetric = ACC1) -> list[list[str]]:
    """The frontier table's cells for ``metric``; ``*`` marks a method dearer than full dense."""
    body = []
    for row in rows:
        cells = [row["method"]]
        for key, _ in COSTS:
            dense = row[f"dense_{metric.key}_at_{key}"]
            mark = "*" if row[f"position_{metric.key}_{key}"] == "beyond" else ""
            cells.append("n/a" if dense is None else f"{dense:{metric.fmt}}{mark}")
            delta = row[f"delta_{metric.key}_{key}"], row[f"delta_{metric.key}_{key}_std"]
            cells.append(_signed(*delta, metric.fmt))
        body.append(cells)
    return body


def format_frontier_table(
    rows: list[dict[str, Any]], markdown: bool = False, metric: FrontierMetric = ACC1
) -> str:
    from greenprop.experiments.report import render_table

    return render_table(frontier_columns(metric), frontier_cells(rows, metric), markdown=markdown)


def verdict_lines(
    rows: list[dict[str, Any]], metric: FrontierMetric = ACC1, named: bool = False
) -> list[str]:
    """In words: which methods sit above the frontier (better than dense), at the same FLOPs
    and the same time, by ``metric``; ``named`` starts each line with the metric."""
    lines = []
    for key, words in COSTS:
        groups: dict[str, list[str]] = defaultdict(list)
        for row in rows:
            groups[row[f"verdict_{metric.key}_{key}"]].append(f"`{row['method']}`")
        parts = [f"{verdict}: {', '.join(names)}" for verdict, names in groups.items()]
        start = f"{metric.heading}, at the same {words}: " if named else f"At the same {words}: "
        lines.append(start + ("; ".join(parts) if parts else "no method") + ".")
    return lines


def frontier_text(rows: list[dict[str, Any]], metrics: Sequence[FrontierMetric], markdown: bool) -> list[str]:
    """Each metric's frontier table and verdicts (a heading line per metric when several)."""
    lines: list[str] = []
    for metric in metrics:
        if len(metrics) > 1:
            direction = "higher is better" if metric.higher_is_better else "lower is better"
            lines += [f"{'### ' if markdown else ''}{metric.heading} ({direction})", ""]
        lines += [format_frontier_table(rows, markdown=markdown, metric=metric), ""]
        verdicts = verdict_lines(rows, metric, named=len(metrics) > 1)
        lines += [f"{'- ' if markdown else ''}{line}" for line in verdicts]
        lines.append("")
    return lines


EXPLANATION = (
    "Dense frontier: the baseline retrained at shorter budgets, each with its own full "
    "learning-rate schedule, same seeds. \"Dense @ same FLOPs/time\" is the frontier's value "
    "of the metric at the method's counted training FLOPs / measured train time, linear between "
    "the two nearest budgets of the same seed (perplexity: linear in its logarithm, the test "
    "loss); Δ is the method's value minus it, mean ± sample std over seeds (no ± with one seed). "
    "Above the frontier means better than dense at the same cost: Δ > 0 for a "
    "higher-is-better metric, Δ < 0 for a lower-is-better one (↓; its plots have the value axis "
    "upside down, so better is up). n/a: the method is cheaper than the smallest budget "
    "(or the metric was not measured). "
    "*: the method costs more than full dense and is compared with full dense, which more "
    "epochs might beat. A difference within the seed spread counts as on the frontier; with one "
    "seed there is no spread, and the verdict says so. "
    "Train times carry the load of whatever else ran on the machine: compare them only "
    "from a quiet machine or runs taken side by side."
)


def plot_name(metric: FrontierMetric, cost: str, first: bool) -> str:
    """The plot's file name: ``frontier_<cost>.png`` for the ranking metric (as before
    other tasks had a frontier), ``frontier_<metric>_<cost>.png`` for the others."""
    return f"frontier_{cost}.png" if first else f"frontier_{metric.key}_{cost}.png"


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
    metrics = frontier_metrics(results)
    points = cost_points(results)
    paths: dict[str, Path] = {}
    figures = []
    for i, metric in enumerate(metrics):
        if not any(p["dense"] and p[metric.key] is not None for p in points.values()):
            figures.append(f"No {metric.label} plot: no dense budget has it.\n")
            continue
        for key, words in COSTS:
            path = Path(out_dir) / plot_name(metric, key, i == 0)
            plot_frontier(points, key, path, metric)
            paths[path.stem + "_plot"] = path
            figures.append(f"![{metric.label} vs {words}]({path.name})\n")
    lines = [
        "## Against the dense frontier",
        "",
        *frontier_text(rows, metrics, markdown=True),
        EXPLANATION,
        "",
        *figures,
    ]
    return rows, lines, paths
