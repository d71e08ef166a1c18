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


def plot_accuracy_vs_saving(rows: list[dict[str, Any]], path: Path) -> None:
    """Final top-1 accuracy (mean ± std over seeds) against the FLOPs saved."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for row in rows:
        if row["acc1_mean"] is None or row["flops_saved_pct"] is None:
            continue  # diverged everywhere, or no baseline to measure a saving against
        saving = row["flops_saved_pct"]
        ax.errorbar(
            saving, row["acc1_mean"], yerr=row["acc1_std"] or 0.0, fmt="o", capsize=4, label=row["method"]
        )
    ax.set_xlabel("training FLOPs saved vs baseline (%)")
    ax.set_ylabel("test accuracy @1 (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)


def _mean_or_nan(values: list[float | None]) -> float:
    """Mean of the known values; NaN (a gap in the line) for an epoch without training."""
    known = [v for v in values if v is not None]
    return float(np.mean(known)) if known else float("nan")


def plot_curves(results: list[RunResult], path: Path) -> None:
    """Per-epoch test accuracy and losses, averaged over seeds, one line per method."""
    by_method: dict[str, list[RunResult]] = defaultdict(list)
    for r in results:
        by_method[r.method].append(r)
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(11, 4))
    for method, runs in by_method.items():
        epochs = [r.metrics["epochs"] for r in runs if not r.metrics.get("diverged")]
        if not epochs:
            continue
        n = min(len(e) for e in epochs)
        x = np.arange(1, n + 1)
        acc = np.mean([[rec["acc1"] for rec in e[:n]] for e in epochs], axis=0)
        test_loss = np.mean([[rec["loss"] for rec in e[:n]] for e in epochs], axis=0)
        (line,) = ax_acc.plot(x, acc, marker="o", label=method)
        ax_loss.plot(x, test_loss, marker="o", color=line.get_color(), label=f"{method} (test)")
        train = [_mean_or_nan([e[i]["train_loss"] for e in epochs]) for i in range(n)]
        ax_loss.plot(x, train, linestyle="--", color=line.get_color(), label=f"{method} (train)")
        replaced = [i + 1 for i, rec in enumerate(epochs[0][:n]) if rec["replaced_by"]]
        if replaced:
            ax_acc.scatter(replaced, acc[np.array(replaced) - 1], marker="x", s=60, color=line.get_color())
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("test accuracy @1 (%)")
    ax_acc.set_title("accuracy (x: epoch without backprop)")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("loss")
    ax_loss.set_title("loss")
    for ax in (ax_acc, ax_loss):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)


def _step_losses(metrics: dict[str, Any]) -> list[float]:
    return [loss for rec in metrics["epochs"] for loss in rec.get("step_losses") or []]


def plot_step_losses(results: list[RunResult], path: Path) -> bool:
    """Training loss per step (moving average), mean over seeds with min-max band, per method.

    The view that shows whether a method follows the dense loss trajectory step by
    step. Returns False (no file written) when the runs recorded no per-step losses.
    """
    by_method: dict[str, list[list[float]]] = defaultdict(list)
    for r in results:
        losses = _step_losses(r.metrics)
        if losses and not r.metrics.get("diverged"):
            by_method[r.method].append(losses)
    if not by_method:
        return False
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
    steps_per_epoch = len(results[0].metrics["epochs"][0].get("step_losses") or [])
    if steps_per_epoch:
        for boundary in range(steps_per_epoch, n, steps_per_epoch):
            ax.axvline(boundary, color="grey", alpha=0.3, linewidth=0.8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)
    return True


_FRONTIER_AXES = {
    "flops": ("counted training FLOPs (TFLOP)", 1e-12, "training FLOPs"),
    "time": ("measured train time (s)", 1.0, "wall time"),
}


def plot_frontier(points: dict[str, dict[str, Any]], cost: str, path: Path) -> None:
    """Acc@1 against a cost: the dense frontier as a line, each method as a point.

    ``points`` is :func:`greenprop.experiments.frontier.cost_points`; error bars are
    the sample std over seeds (accuracy, and the cost where it varies).
    """
    xlabel, scale, title = _FRONTIER_AXES[cost]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    dense = sorted((p for p in points.values() if p["dense"]), key=lambda p: p[cost])
    ax.errorbar(
        [p[cost] * scale for p in dense],
        [p["acc1"] for p in dense],
        yerr=[p["acc1_std"] or 0.0 for p in dense],
        fmt="-s",
        color="black",
        capsize=3,
        label="dense frontier (epochs: " + ", ".join(str(p["epochs"]) for p in dense) + ")",
    )
    for method, p in points.items():
        if p["dense"]:
            continue
        ax.errorbar(
            p[cost] * scale,
            p["acc1"],
            xerr=(p[f"{cost}_std"] or 0.0) * scale,
            yerr=p["acc1_std"] or 0.0,
            fmt="o",
            capsize=4,
            label=method,
        )
    ax.set_xlabel(xlabel)
    ax.set_ylabel("test accuracy @1 (%)")
    ax.set_title(f"Acc@1 vs {title}: methods against dense at shorter budgets", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)
