"""Plots people would rather look at than read: accuracy vs saving, training curves."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib

from greenprop.train.checkpoint import save_figure

matplotlib.use("Agg")  # headless machines; must precede pyplot
import matplotlib.pyplot as plt
import numpy as np

from greenprop.experiments.compare import RunResult

_ACC1 = {"key": "acc1", "label": "test accuracy @1 (%)", "higher_is_better": True}

def _legend(ax: Any, fontsize: float) -> None:
    """A legend when something is labelled (matplotlib warns on an empty one)."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=fontsize)


def _say_absent(ax: Any, absent: list[str]) -> None:
    """Name what the plot leaves out, inside the axes, so nobody reads its absence as a result."""
    if absent:
        text = "not shown: " + "; ".join(absent)
        ax.text(0.01, 0.01, text, transform=ax.transAxes, fontsize=7, va="bottom", wrap=True)


def _diverged_label(run: RunResult) -> str:
    epoch = run.metrics["diverged"]["epoch"] + 1
    return f"{run.method} seed {run.seed} (diverged in epoch {epoch})"


def plot_accuracy_vs_saving(rows: list[dict[str, Any]], path: Path, metric: dict[str, Any] = _ACC1) -> None:
    """The task's first metric (top-1 accuracy; FD for diffusion), mean ± std over seeds,
    against the FLOPs saved."""
    key = metric["key"]
    fig, ax = plt.subplots(figsize=(6, 4))
    absent = []
    for row in rows:
        if row[f"{key}_mean"] is None:
            why = "diverged in every seed" if key == "acc1" else "diverged or unscored in every seed"
            absent.append(f"{row['method']} ({why})")
            continue
        if row["flops_saved_pct"] is None:
            absent.append(f"{row['method']} (no finished baseline to measure a saving against)")
            continue
        saving = row["flops_saved_pct"]
        ax.errorbar(
            saving, row[f"{key}_mean"], yerr=row[f"{key}_std"] or 0.0, fmt="o", capsize=4, label=row["method"]
        )
    ax.set_xlabel("training FLOPs saved vs baseline (%)")
    ax.set_ylabel(metric["label"] + ("" if metric["higher_is_better"] else " (lower is better)"))
    ax.grid(alpha=0.3)
    _legend(ax, 8)
    _say_absent(ax, absent)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)


def _mean_or_nan(values: list[float | None]) -> float:
    """Mean of the known values; NaN (a gap in the line) for an epoch without training."""
    known = [v for v in values if v is not None]
    return float(np.mean(known)) if known else float("nan")


def plot_curves(results: list[RunResult], path: Path, metric: dict[str, Any] = _ACC1) -> None:
    """Per-epoch test metric (accuracy; FD at scored epochs) and losses, mean over seeds,
    one line per method."""
    by_method: dict[str, list[RunResult]] = defaultdict(list)
    for r in results:
        by_method[r.method].append(r)
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(11, 4))
    absent: list[str] = []
    for method, runs in by_method.items():
        color = None
        epochs = [r.metrics["epochs"] for r in runs if not r.metrics.get("diverged")]
        if epochs:
            color = _plot_method_curves(ax_acc, ax_loss, method, epochs, metric["key"])
        for run in (r for r in runs if r.metrics.get("diverged")):
            drawn = _plot_diverged(ax_acc, ax_loss, run, color, metric["key"])
            if drawn is None:
                absent.append(_diverged_label(run) + ", no epoch finished")
            color = color or drawn
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel(metric["label"])
    ax_acc.set_title(f"{metric['label']} (x: epoch without backprop; X, dotted: diverged)")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("loss")
    ax_loss.set_title("loss")
    for ax in (ax_acc, ax_loss):
        ax.grid(alpha=0.3)
        _legend(ax, 7)
    _say_absent(ax_acc, absent)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)


def _plot_diverged(ax_acc: Any, ax_loss: Any, run: RunResult, color: Any, key: str = "acc1") -> Any:
    """A diverged run's epochs before it diverged, dotted, ending in a big X.

    Returns the colour used (None when no epoch finished, so nothing was drawn).
    """
    records = run.metrics["epochs"]
    if not records:
        return None
    x = np.arange(1, len(records) + 1)
    for ax, field in ((ax_acc, key), (ax_loss, "loss")):
        values = np.array([_mean_or_nan([rec.get(field)]) for rec in records])
        (line,) = ax.plot(x, values, linestyle=":", color=color, label=_diverged_label(run))
        color = line.get_color()
        ax.scatter(x[-1:], values[-1:], marker="X", s=90, color=color, zorder=3)
    return color


def _plot_method_curves(
    ax_acc: Any, ax_loss: Any, method: str, epochs: list[list[dict[str, Any]]], key: str = "acc1"
) -> Any:
    """One method's finished runs, averaged over seeds; returns the line colour."""
    n = min(len(e) for e in epochs)
    x = np.arange(1, n + 1)
    acc = np.array([_mean_or_nan([e[i].get(key) for e in epochs]) for i in range(n)])
    test_loss = np.mean([[rec["loss"] for rec in e[:n]] for e in epochs], axis=0)
    known = ~np.isnan(acc)  # FD exists only at scored epochs
    (line,) = ax_acc.plot(x[known], acc[known], marker="o", label=method)
    ax_loss.plot(x, test_loss, marker="o", color=line.get_color(), label=f"{method} (test)")
    train = [_mean_or_nan([e[i]["train_loss"] for e in epochs]) for i in range(n)]
    ax_loss.plot(x, train, linestyle="--", color=line.get_color(), label=f"{method} (train)")
    replaced = [i + 1 for i, rec in enumerate(epochs[0][:n]) if rec["replaced_by"]]
    if replaced:
        ax_acc.scatter(replaced, acc[np.array(replaced) - 1], marker="x", s=60, color=line.get_color())
    return line.get_color()


def _step_losses(metrics: dict[str, Any]) -> list[float]:
    return [loss for rec in metrics["epochs"] for loss in rec.get("step_losses") or []]


def plot_step_losses(results: list[RunResult], path: Path) -> bool:
    """Training loss per step (moving average), mean over seeds with min-max band, per method.

    The view that shows whether a method follows the dense loss trajectory step by
    step. Returns False (no file written) when the runs recorded no per-step losses.
    """
    by_method: dict[str, list[list[float]]] = defaultdict(list)
    steps_per_epoch = 0
    for r in results:
        losses = _step_losses(r.metrics)
        if losses and not r.metrics.get("diverged"):
            by_method[r.method].append(losses)
            steps_per_epoch = steps_per_epoch or len(r.metrics["epochs"][0].get("step_losses") or [])
    if not by_method:
        return False
    absent = [_diverged_label(r) for r in results if r.metrics.get("diverged")]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for method, runs in by_method.items():
        n = min(len(run) for run in runs)
        window = max(1, n // 25)
        kernel = np.ones(window) / window
        smooth = np.array([np.convolve(run[:n], kernel, mode="valid") for run in runs])
        x = np.arange(window, n + 1)
        (line,) = ax.plot(x, smooth.mean(axis=0), label=f"{method} ({len(runs)} seeds)")
        if len(runs) > 1:
            ax.fill_between(x, smooth.min(axis=0), smooth.max(axis=0), color=line.get_color(), alpha=0.2)
    ax.set_xlabel("training step")
    ax.set_ylabel(f"train loss (moving average over {window} steps)")
    ax.set_title("training loss per step: mean over seeds, band = min..max")
    if steps_per_epoch:
        for boundary in range(steps_per_epoch, n, steps_per_epoch):
            ax.axvline(boundary, color="grey", alpha=0.3, linewidth=0.8)
    ax.grid(alpha=0.3)
    _legend(ax, 8)
    _say_absent(ax, absent)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)
    return True


#: Axis labels of the metrics whose table label is shorter than a plot needs.
_FRONTIER_LABELS = {"acc1": "test accuracy @1 (%)"}

_FRONTIER_AXES = {
    "flops": ("counted training FLOPs (TFLOP)", 1e-12, "training FLOPs"),
    "time": ("measured train time (s)", 1.0, "wall time"),
}


def plot_frontier(points: dict[str, dict[str, Any]], cost: str, path: Path, metric: Any = None) -> None:
    """A task metric (Acc@1 by default) against a cost: the dense frontier as a line, each
    method as a point.

    ``points`` is :func:`greenprop.experiments.frontier.cost_points`; ``metric`` a
    :class:`~greenprop.experiments.frontier.FrontierMetric`. Error bars are the sample std
    over seeds (the metric, and the cost where it varies). A lower-is-better metric's axis
    is upside down, so a method above the frontier is better in every plot; perplexity's
    axis is logarithmic, so the straight segments are the interpolation the table reads.
    """
    from greenprop.experiments.frontier import ACC1

    metric = metric or ACC1
    key = metric.key
    xlabel, scale, title = _FRONTIER_AXES[cost]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    dense = sorted((p for p in points.values() if p["dense"] and p[key] is not None), key=lambda p: p[cost])
    ax.errorbar(
        [p[cost] * scale for p in dense],
        [p[key] for p in dense],
        yerr=[p[f"{key}_std"] or 0.0 for p in dense],
        fmt="-s",
        color="black",
        capsize=3,
        label="dense frontier (epochs: " + ", ".join(str(p["epochs"]) for p in dense) + ")",
    )
    absent = []
    for method, p in points.items():
        if p["dense"]:
            continue
        if p[key] is None:
            absent.append(f"{method} (not measured)")
            continue
        ax.errorbar(
            p[cost] * scale,
            p[key],
            xerr=(p[f"{cost}_std"] or 0.0) * scale,
            yerr=p[f"{key}_std"] or 0.0,
            fmt="o",
            capsize=4,
            label=method,
        )
    ylabel = _FRONTIER_LABELS.get(key, metric.label)
    if metric.log:
        ax.set_yscale("log")
    if not metric.higher_is_better:
        ax.invert_yaxis()
        ylabel += " (lower is better: axis upside down)"
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel, fontsize=9)
    ax.set_title(f"{metric.label} vs {title}: methods against dense at shorter budgets", fontsize=10)
    ax.grid(alpha=0.3)
    _say_absent(ax, absent)
    # Below the axes: long method specs inside them would hide the frontier's points.
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(0.0, -0.13), frameon=False)
    save_figure(fig, path, dpi=120, bbox_inches="tight")
    plt.close(fig)
