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


def plot_accuracy_vs_saving(rows: list[dict[str, Any]], path: Path, metric: dict[str, Any] = _ACC1) -> None:
    """The task's first metric (top-1 accuracy; FD for diffusion), mean ± std over seeds,
    against the FLOPs saved."""
    key = metric["key"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for row in rows:
        if row[f"{key}_mean"] is None or row["flops_saved_pct"] is None:
            continue  # diverged everywhere, unscored, or no baseline to measure a saving against
        saving = row["flops_saved_pct"]
        ax.errorbar(
            saving, row[f"{key}_mean"], yerr=row[f"{key}_std"] or 0.0, fmt="o", capsize=4, label=row["method"]
        )
    ax.set_xlabel("training FLOPs saved vs baseline (%)")
    ax.set_ylabel(metric["label"] + ("" if metric["higher_is_better"] else " (lower is better)"))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
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
    key = metric["key"]
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
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel(metric["label"])
    ax_acc.set_title(f"{metric['label']} (x: epoch without backprop)")
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
