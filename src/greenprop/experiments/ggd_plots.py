"""Figures of ``greenprop ggd-check``: per-tensor update histograms with the fitted GGD density."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from greenprop.gradsamp import ggd

if TYPE_CHECKING:
    from greenprop.experiments.ggd_check import GGDCheckResult

__all__ = ["MAX_PANELS", "plot_epoch"]

#: A figure shows at most this many tensors (the largest, in model order).
MAX_PANELS = 24


def plot_epoch(result: GGDCheckResult, epoch: int, path: str | Path, *, log_y: bool = False) -> None:
    """A grid of the epoch's per-tensor update histograms with the fitted GGD density."""
    import matplotlib

    from greenprop.train.checkpoint import save_figure

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result.rows if r.epoch == epoch]
    shown = rows
    if len(rows) > MAX_PANELS:
        largest = sorted(range(len(rows)), key=lambda i: -rows[i].n)[:MAX_PANELS]
        shown = [rows[i] for i in sorted(largest)]
    ncols = min(4, max(1, len(shown)))
    nrows = max(1, math.ceil(len(shown) / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.2 * nrows), squeeze=False)
    for ax in axes.flat[len(shown) :]:
        ax.axis("off")
    for ax, row in zip(axes.flat, shown, strict=False):
        hist = result.histograms[(epoch, row.layer)]
        color = "tab:green" if row.passed else "tab:red"
        ax.stairs(hist.density, hist.edges, fill=True, alpha=0.45, color="tab:blue", label="update")
        if row.scale > 0:
            x = np.linspace(hist.edges[0], hist.edges[-1], 400)
            params = ggd.GGDParams(row.loc, row.scale, row.beta)
            ax.plot(x, ggd.pdf(x, params), color=color, lw=1.5, label="GGD fit")
        if log_y:
            ax.set_yscale("log")
        ax.set_title(
            f"{row.layer} {tuple(row.shape)}\nβ={row.beta:.2f} σ={row.scale:.2g} μ={row.loc:.2g} "
            f"KS p={row.p:.2g}",
            fontsize=8,
            color=color,
        )
        ax.tick_params(labelsize=7)
        ax.xaxis.get_offset_text().set_fontsize(7)
        if hist.outside > 0:
            ax.text(
                0.98,
                0.95,
                f"{100 * hist.outside:.1f}% outside",
                transform=ax.transAxes,
                ha="right",
                va="top",
                fontsize=6,
            )
    passed, total = sum(r.passed for r in rows), len(rows)
    note = f"; showing the {len(shown)} largest of {total} tensors" if len(shown) < total else ""
    replaced = {r.replaced_by for r in rows if r.replaced_by}
    note += f"; epoch replaced by {', '.join(sorted(replaced))}" if replaced else ""
    fig.suptitle(
        f"epoch {epoch}: update θ(k)−θ(k−1) with fitted GGD ({result.fit_method}); "
        f"KS at α={result.alpha:g}: {passed}/{total} pass (green){note}",
        fontsize=10,
    )
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)
