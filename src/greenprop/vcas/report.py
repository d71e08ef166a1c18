"""VCAS's part of a comparison report: a plot of its controller over training.

The compare report asks each method in the comparison for its extras
(``REPORT_EXTRAS`` of the method's CLI module), so shared code knows no method.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["report_extras"]


def report_extras(results: Sequence[Any], out_dir: Path) -> list[tuple[str, Path]]:
    """Draw ``vcas_ratios.png`` if any run recorded VCAS updates; ``(caption, path)`` pairs."""
    path = Path(out_dir) / "vcas_ratios.png"
    return [("VCAS ratios", path)] if plot_ratios(results, path) else []


def plot_ratios(results: Sequence[Any], path: Path) -> bool:
    """VCAS's controller over training: its ratios and the variance ratios they answer to.

    Left: the norm mass ``s``, the mean block (sample) keep ratio and the
    mean token ratio of the Linear layers. Right: the measured activation- and
    weight-sampling variance relative to the SGD variance, against ``tau``. One line per
    seed. Returns False (no file) when no run recorded VCAS updates.
    """
    runs = [
        (r, [h for rec in r.metrics["epochs"] for h in (rec.get("vcas") or {}).get("history", [])])
        for r in results
    ]
    runs = [(r, history) for r, history in runs if history]
    if not runs:
        return False
    import matplotlib

    from greenprop.train.checkpoint import save_figure

    matplotlib.use("Agg")  # headless machines; must precede pyplot
    import matplotlib.pyplot as plt

    fig, (ax_ratio, ax_var) = plt.subplots(1, 2, figsize=(11, 4))
    # Colour = quantity, line style = seed, so the three quantities stay readable across seeds.
    series = (
        ("s", "s (norm mass kept)", "tab:blue"),
        ("activation_ratio_mean", "mean block keep", "tab:orange"),
        ("weight_ratio_mean", "mean token ratio", "tab:green"),
    )
    variances = (
        ("activation_variance_ratio", "activation", "tab:orange"),
        ("weight_variance_ratio_mean", "weight (mean over layers)", "tab:green"),
    )
    styles = ("-", "--", ":", "-.")
    for i, (r, history) in enumerate(runs):
        steps = [h["step"] for h in history]
        style = styles[i % len(styles)]
        for ax, lines in ((ax_ratio, series), (ax_var, variances)):
            for key, label, color in lines:
                values = [h[key] for h in history]
                if any(v is None for v in values):  # e.g. no token ratios in a CNN
                    continue
                ax.plot(steps, values, style, color=color, label=f"{label}, seed {r.seed}")
    options = (runs[0][0].metrics.get("method") or {}).get("options", {})
    tau_act, tau_w = options.get("tau_act", "0.025"), options.get("tau_w", "0.025")
    ax_var.axhline(float(tau_act), color="tab:orange", linewidth=0.8, label=f"tau_act = {tau_act}")
    if tau_w != tau_act:
        ax_var.axhline(float(tau_w), color="tab:green", linewidth=0.8, label=f"tau_w = {tau_w}")
    ax_ratio.set_title("VCAS ratios at each update")
    ax_ratio.set_ylabel("ratio")
    ax_var.set_title("sampling variance / SGD variance")
    ax_var.set_yscale("symlog", linthresh=1e-3)
    ax_var.set_ylim(bottom=0)
    for ax in (ax_ratio, ax_var):
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)
    return True
