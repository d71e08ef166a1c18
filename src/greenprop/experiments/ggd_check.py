"""``greenprop ggd-check``: train a run and test the GGD hypothesis on chosen epochs' updates.

:func:`ggd_check` trains with the reference :class:`~greenprop.train.trainer.Trainer`; an
extra controller snapshots the chosen tensors before each checked epoch and, after it, hands
each update ``theta(k) - theta(k-1)`` to :func:`greenprop.gradsamp.check.check_update`
(GGD fit, KS test, histogram). The check composes with any ``config.method`` (the default,
``baseline``, checks plain training). Epochs are counted from 1 here, as the trainer prints
them, with ``theta(0)`` the initial weights. Memory: one copy of the checked tensors, only
during a checked epoch. Writes a CSV, a JSON, a Markdown report and per-epoch histograms.
"""

from __future__ import annotations

import csv
import fnmatch
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from greenprop.controller import Controller
from greenprop.data import DatasetPair
from greenprop.errors import GreenpropError
from greenprop.experiments.ggd_plots import plot_epoch
from greenprop.gradsamp import ggd
from greenprop.gradsamp.check import (
    BINS,
    DEFAULT_ALPHA,
    KS_SAMPLES,
    FitMethod,
    GGDCheckRow,
    UpdateHistogram,
    check_update,
    format_rows,
)
from greenprop.seeding import ggd_check_seed
from greenprop.train.checkpoint import ensure_writable_dir, write_json
from greenprop.train.config import TrainConfig
from greenprop.train.trainer import Trainer

__all__ = [
    "GGDCheckResult",
    "default_check_epochs",
    "ggd_check",
    "summary_lines",
    "write_outputs",
]

RUN_SUBDIR = "run"
FILES = ("ggd_check.csv", "ggd_check.json", "ggd_check.md")


@dataclass
class GGDCheckResult:
    """What :func:`ggd_check` found; ``paths`` lists the files it wrote."""

    rows: list[GGDCheckRow]
    epochs: list[int]
    alpha: float
    fit_method: str
    config: TrainConfig
    run_dir: Path
    metrics: dict[str, Any]
    skipped: dict[str, int] = field(default_factory=dict)
    histograms: dict[tuple[int, str], UpdateHistogram] = field(default_factory=dict)
    updates: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)
    paths: dict[str, Path] = field(default_factory=dict)

    @property
    def passed(self) -> int:
        return sum(r.passed for r in self.rows)

    @property
    def share_passed(self) -> float:
        """Fraction of checked (epoch, tensor) pairs where the GGD is not rejected."""
        return self.passed / len(self.rows) if self.rows else float("nan")

    def by_epoch(self) -> dict[int, tuple[int, int]]:
        """epoch -> (tensors passing, tensors checked)."""
        return {
            e: (sum(r.passed for r in self.rows if r.epoch == e), sum(r.epoch == e for r in self.rows))
            for e in self.epochs
        }

    def summary(self) -> dict[str, Any]:
        return {
            "checked": len(self.rows),
            "passed": self.passed,
            "share_passed": self.share_passed if self.rows else None,
            "by_epoch": {str(e): {"passed": p, "checked": n} for e, (p, n) in self.by_epoch().items()},
            "final_acc1": self.metrics.get("summary", {}).get("acc1"),
        }


def default_check_epochs(run_epochs: int) -> list[int]:
    """First, middle and last epoch (1-based), without repeats."""
    return sorted({1, (run_epochs + 1) // 2, run_epochs})


def _check_args(
    config: TrainConfig,
    epochs_to_check: Sequence[int] | None,
    alpha: float,
    fit_method: str,
    max_layers: int | None,
    bins: int,
) -> list[int]:
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not 0.0 < alpha < 1.0:
        raise GreenpropError(f"alpha must be a number in (0, 1), got {alpha!r}")
    if fit_method not in ("moments", "mle"):
        raise GreenpropError(f"fit method must be 'moments' or 'mle', got {fit_method!r}")
    if max_layers is not None and (
        isinstance(max_layers, bool) or not isinstance(max_layers, int) or max_layers < 1
    ):
        raise GreenpropError(f"max_layers must be a positive integer, got {max_layers!r}")
    if isinstance(bins, bool) or not isinstance(bins, int) or bins < 2:
        raise GreenpropError(f"bins must be an integer >= 2, got {bins!r}")
    if epochs_to_check is None:
        return default_check_epochs(config.epochs)
    epochs = list(epochs_to_check)
    if not epochs:
        raise GreenpropError("no epochs to check")
    for k in epochs:
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= config.epochs:
            raise GreenpropError(
                f"check epoch {k!r} is outside the run: epochs are counted 1..{config.epochs}"
            )
    return sorted(set(epochs))


def _select(
    model: nn.Module, layers: Sequence[str] | None, max_layers: int | None
) -> tuple[list[tuple[str, nn.Parameter]], dict[str, int]]:
    """Trainable tensors chosen by name or glob; those too small to fit are set aside."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if layers:
        names = [n for n, _ in params]
        for pattern in layers:
            if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
                shown = ", ".join(names[:20]) + (", ..." if len(names) > 20 else "")
                raise GreenpropError(f"layer pattern {pattern!r} matches no trainable parameter: {shown}")
        params = [(n, p) for n, p in params if any(fnmatch.fnmatchcase(n, pat) for pat in layers)]
    skipped = {n: p.numel() for n, p in params if p.numel() < ggd.MIN_FIT_SIZE}
    kept = [(n, p) for n, p in params if n not in skipped]
    if max_layers is not None:
        kept = kept[:max_layers]
    if not kept:
        raise GreenpropError(
            f"no parameter tensor with at least {ggd.MIN_FIT_SIZE} elements to check "
            f"(too small: {', '.join(skipped) or 'none'})"
        )
    return kept, skipped


class _UpdateRecorder(Controller):
    """Snapshots the chosen tensors before each checked epoch, analyses the update after it."""

    name = "ggd_check"

    def __init__(
        self,
        epochs: list[int],
        *,
        alpha: float,
        fit_method: FitMethod,
        bins: int,
        seed: int,
        keep_updates: bool,
        progress: bool,
    ) -> None:
        self.epochs = set(epochs)  # 1-based
        self.alpha, self.fit_method, self.bins, self.seed = alpha, fit_method, bins, seed
        self.keep_updates, self.progress = keep_updates, progress
        self.params: list[tuple[str, nn.Parameter]] = []
        self.rows: list[GGDCheckRow] = []
        self.histograms: dict[tuple[int, str], UpdateHistogram] = {}
        self.updates: dict[tuple[int, str], torch.Tensor] = {}
        self._snapshot: list[torch.Tensor] | None = None

    def on_epoch_start(self, epoch: int) -> None:
        if epoch + 1 in self.epochs:
            with torch.no_grad():
                self._snapshot = [p.detach().clone() for _, p in self.params]

    def on_epoch_end(self, epoch: int, record: dict[str, Any]) -> dict[str, Any] | None:
        if self._snapshot is None:
            return None
        k = epoch + 1
        passed = 0
        with torch.no_grad():
            for i, ((name, p), snap) in enumerate(zip(self.params, self._snapshot, strict=True)):
                delta = snap.neg_().add_(p.detach())  # theta(k) - theta(k-1), in place
                row, hist = check_update(
                    name,
                    delta,
                    k,
                    alpha=self.alpha,
                    fit_method=self.fit_method,
                    bins=self.bins,
                    seed=ggd_check_seed(self.seed, k, i),
                    replaced_by=record.get("replaced_by"),
                )
                self.rows.append(row)
                self.histograms[(k, name)] = hist
                if self.keep_updates:
                    self.updates[(k, name)] = delta.detach().cpu().clone()
                passed += row.passed
        self._snapshot = None
        if self.progress:
            print(
                f"ggd-check epoch {k}: GGD not rejected for {passed}/{len(self.params)} tensors "
                f"(KS, alpha={self.alpha:g})",
                flush=True,
            )
        return {"checked": len(self.params), "passed": passed, "alpha": self.alpha}


def ggd_check(
    config: TrainConfig,
    out_dir: str | Path,
    *,
    epochs_to_check: list[int] | None = None,
    layers: list[str] | None = None,
    max_layers: int | None = None,
    alpha: float = DEFAULT_ALPHA,
    fit_method: FitMethod = "moments",
    progress: bool = True,
    log_y: bool = False,
    bins: int = BINS,
    overwrite: bool = False,
    keep_updates: bool = False,
    data: DatasetPair | None = None,
    controllers: list[Controller] | None = None,
    command: str | None = None,
) -> GGDCheckResult:
    """Train ``config`` and test the GGD hypothesis on chosen epochs' parameter updates.

    Args:
        config: the run (any model, dataset and method; the check rides along).
        out_dir: gets ``ggd_check.csv``, ``ggd_check.json``, ``ggd_check.md``,
            ``ggd_hist_epoch<k>.png`` per checked epoch, and the trainer's run in ``run/``.
        epochs_to_check: 1-based epochs; default first, middle and last.
        layers: parameter names or glob patterns (``"features.*"``); default all trainable.
            Tensors with fewer than ``ggd.MIN_FIT_SIZE`` (8) elements are skipped and listed.
        max_layers: check at most this many tensors (in model order).
        alpha: KS significance level (the paper's 0.05); a tensor passes when ``p >= alpha``.
        fit_method: ``"moments"`` (fast torch estimator, default) or ``"mle"`` (SciPy, the
            paper's, on at most 200k elements).
        progress: print a line per checked epoch; False also silences the trainer.
        log_y: log-scale density axes in the figures (shows the tails).
        bins: histogram bins (60).
        overwrite: replace results already in ``out_dir``.
        keep_updates: also return every checked update (CPU copies) in ``result.updates``.
        data: preloaded datasets; controllers: extra controllers run after the check.
        command: the command line, written into the Markdown report.

    Raises:
        GreenpropError: a check epoch outside ``1..config.epochs``, a ``layers`` pattern that
            matches nothing, bad ``alpha``/``max_layers``/``fit_method``, or results already
            in ``out_dir`` without ``overwrite``.
    """
    epochs = _check_args(config, epochs_to_check, alpha, fit_method, max_layers, bins)
    out = Path(out_dir)
    if (out / FILES[1]).exists() and not overwrite:
        raise GreenpropError(f"{out} already holds a GGD check; pass --overwrite to replace it")
    ensure_writable_dir(out)
    config = config.replace(progress=config.progress and progress)
    recorder = _UpdateRecorder(
        epochs,
        alpha=float(alpha),
        fit_method=fit_method,
        bins=bins,
        seed=config.seed,
        keep_updates=keep_updates,
        progress=progress,
    )
    run_dir = out / RUN_SUBDIR
    trainer = Trainer(
        config, run_dir, overwrite=overwrite, controllers=[recorder, *(controllers or [])], data=data
    )
    recorder.params, skipped = _select(trainer.model, layers, max_layers)
    metrics = trainer.fit()
    result = GGDCheckResult(
        rows=recorder.rows,
        epochs=epochs,
        alpha=float(alpha),
        fit_method=fit_method,
        config=config,
        run_dir=run_dir,
        metrics=metrics,
        skipped=skipped,
        histograms=recorder.histograms,
        updates=recorder.updates,
    )
    result.paths = write_outputs(result, out, log_y=log_y, command=command)
    return result


# ---------------------------------------------------------------------- outputs
_CSV_FIELDS = tuple(f.name for f in fields(GGDCheckRow))


def write_outputs(
    result: GGDCheckResult, out_dir: str | Path, *, log_y: bool = False, command: str | None = None
) -> dict[str, Path]:
    """Write the CSV, JSON, Markdown report and one histogram figure per checked epoch."""
    out = Path(out_dir)
    paths = {"csv": out / FILES[0], "json": out / FILES[1], "markdown": out / FILES[2]}
    with paths["csv"].open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=_CSV_FIELDS)
        writer.writeheader()
        for row in result.rows:
            writer.writerow({**row.to_dict(), "shape": "x".join(map(str, row.shape))})
    for k in result.epochs:
        paths[f"hist_epoch{k}"] = out / f"ggd_hist_epoch{k}.png"
        plot_epoch(result, k, paths[f"hist_epoch{k}"], log_y=log_y)
    write_json(
        {
            "format": 1,
            "alpha": result.alpha,
            "fit_method": result.fit_method,
            "epochs": result.epochs,
            "summary": result.summary(),
            "skipped": result.skipped,
            "config": result.config.to_dict(),
            "run_dir": str(result.run_dir),
            "rows": [_json_safe(r.to_dict()) for r in result.rows],
            "histograms": [
                {"epoch": k, "layer": name, **asdict(h)} for (k, name), h in result.histograms.items()
            ],
        },
        paths["json"],
    )
    paths["markdown"].write_text(_markdown(result, paths, command))
    return paths


def _json_safe(row: dict[str, Any]) -> dict[str, Any]:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}


def summary_lines(result: GGDCheckResult) -> list[str]:
    """Per-epoch pass counts and the overall share, for terminals and reports."""
    lines = [
        f"epoch {k}: GGD not rejected for {p}/{n} tensors"
        + (f", median beta {np.median([r.beta for r in result.rows if r.epoch == k]):.2f}" if n else "")
        for k, (p, n) in result.by_epoch().items()
    ]
    share = result.share_passed
    lines.append(
        f"overall: {result.passed}/{len(result.rows)} (epoch, tensor) pairs pass the KS test at "
        f"alpha={result.alpha:g} ({100 * share:.1f}%)"
    )
    if result.skipped:
        lines.append(
            "skipped (fewer than 8 elements): " + ", ".join(f"{n} ({c})" for n, c in result.skipped.items())
        )
    return lines


def _markdown(result: GGDCheckResult, paths: dict[str, Path], command: str | None) -> str:
    cfg = result.config
    lines = ["# GGD hypothesis check (GradSamp, Figures 2-3)", ""]
    if command:
        lines += ["Reproduce with:", "", "```", command, "```", ""]
    lines += [
        f"Model `{cfg.model}` on `{cfg.dataset}` (train subset {cfg.subset or 'all'}, test subset "
        f"{cfg.test_subset or 'all'}), method `{cfg.method}`, {cfg.epochs} epochs, batch "
        f"{cfg.batch_size}, {cfg.optimizer} lr {cfg.lr} ({cfg.lr_schedule}), seed {cfg.seed}; "
        f"final test acc@1 {result.summary()['final_acc1']:.2f}%. Trainer run: `{result.run_dir}`.",
        "",
        f"For each checked epoch k, each parameter tensor's update theta(k) - theta(k-1) is fitted "
        f"with a GGD ({result.fit_method}) and tested with Kolmogorov-Smirnov at alpha = "
        f"{result.alpha:g} (pass: p >= alpha) on at most {KS_SAMPLES:,} of its elements.",
        "",
        *(f"- {line}" for line in summary_lines(result)),
        "",
        format_rows(result.rows, markdown=True),
        "",
        *_footnotes(result.rows),
        "Caveats: the GGD is fitted to the same elements it is tested on, which makes the KS "
        "p-value optimistic; and with tens of thousands of elements KS rejects even small "
        "deviations, so read D (the largest CDF gap) as the size of the misfit.",
        "",
        *(f"![epoch {k}]({paths[f'hist_epoch{k}'].name})" for k in result.epochs),
        "",
        "<details><summary>Full configuration</summary>",
        "",
        "| option | value |",
        "|---|---|",
        *(f"| {k} | `{v}` |" for k, v in cfg.to_dict().items()),
        "",
        "</details>",
        "",
    ]
    return "\n".join(lines)


def _footnotes(rows: Sequence[GGDCheckRow]) -> list[str]:
    notes = []
    if any(r.note for r in rows):
        notes.append("`*`: see the `note` column of the CSV (a degenerate fit or an MLE warning).")
    if any(r.replaced_by for r in rows):
        notes.append("`[name]`: that controller replaced the epoch (e.g. a GradSamp-sampled update).")
    return [*notes, ""] if notes else []
