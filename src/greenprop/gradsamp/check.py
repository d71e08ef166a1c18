"""The GGD hypothesis test of the GradSamp paper (its Figures 2-3) on one parameter update.

GradSamp is only as good as its hypothesis: the elements of one epoch's update of a
parameter tensor, ``theta(k) - theta(k-1)``, look like draws from a Generalized Gaussian.
:func:`check_update` fits a GGD to one update, runs the paper's Kolmogorov-Smirnov test
(reject at p < alpha = 0.05) and bins the update for a histogram; :func:`format_rows` turns
the results into a table. Training a run and collecting its updates is the job of the
``greenprop ggd-check`` experiment.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
import torch

from greenprop.gradsamp import ggd

__all__ = [
    "DEFAULT_ALPHA",
    "GGDCheckRow",
    "UpdateHistogram",
    "check_update",
    "format_rows",
]

#: The paper's significance level for the KS test.
DEFAULT_ALPHA = 0.05
#: At most this many elements of a tensor place the histogram window and feed the KS test
#: (which tests at most ``KS_SAMPLES`` of them); the fit and the histogram use every element.
SUBSAMPLE = 200_000
#: Elements per KS test: with millions the test rejects any model for tiny deviations.
KS_SAMPLES = 100_000
#: Histogram bins, and the central share of the update the histogram window covers.
BINS = 60
WINDOW = (0.005, 0.995)
#: Tensors up to this size are binned over their full range.
FULL_RANGE_MAX = 2_000

FitMethod = Literal["moments", "mle"]


@dataclass(frozen=True)
class GGDCheckRow:
    """One (epoch, tensor): the fitted GGD of its update and the KS test against it.

    ``epoch`` counts from 1 (the update ``theta(epoch) - theta(epoch-1)``); ``note`` holds the
    fit's fallback reason or an MLE warning; ``replaced_by`` names the controller that replaced
    the epoch (e.g. a GradSamp-sampled epoch), None for a trained one.
    """

    epoch: int
    layer: str
    shape: tuple[int, ...]
    n: int
    loc: float
    scale: float
    beta: float
    std: float
    ks_d: float
    p: float
    ks_n: int
    passed: bool
    note: str | None = None
    replaced_by: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["shape"] = list(self.shape)
        return out


@dataclass(frozen=True)
class UpdateHistogram:
    """A density-normalised histogram of one update over its central window.

    ``density`` integrates to ``1 - outside`` over ``edges``: counts are divided by *all*
    elements, so the fitted pdf overlays it on the same scale.
    """

    edges: list[float]
    density: list[float]
    outside: float


def check_update(
    name: str,
    delta: torch.Tensor,
    epoch: int,
    *,
    alpha: float = DEFAULT_ALPHA,
    fit_method: FitMethod = "moments",
    bins: int = BINS,
    seed: int = 0,
    replaced_by: str | None = None,
) -> tuple[GGDCheckRow, UpdateHistogram]:
    """Fit, KS-test and bin one update (any shape, on any device).

    ``seed`` draws the subsample that places the histogram window and feeds the KS test,
    and an MLE fit's subsample. Fit warnings are caught and kept in the row's ``note``.
    """
    flat = delta.reshape(-1).float()
    n = flat.numel()
    gen = torch.Generator().manual_seed(seed)
    sub = flat if n <= SUBSAMPLE else flat[torch.randperm(n, generator=gen)[:SUBSAMPLE].to(flat.device)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ggd.GGDFitWarning)
        params = ggd.fit(flat, method=fit_method, name=name, generator=gen)
    notes = [str(w.message) for w in caught if issubclass(w.category, ggd.GGDFitWarning)]
    ks = ggd.ks_test(sub, params, max_samples=KS_SAMPLES, seed=seed)
    row = GGDCheckRow(
        epoch=epoch,
        layer=name,
        shape=tuple(delta.shape),
        n=n,
        loc=params.loc,
        scale=params.scale,
        beta=params.beta,
        std=params.std,
        ks_d=ks.statistic,
        p=ks.pvalue,
        ks_n=ks.n,
        passed=ks.passed(alpha),
        note=params.fallback or ("; ".join(notes) if notes else None),
        replaced_by=replaced_by,
    )
    return row, _histogram(flat, sub, bins)


def _histogram(flat: torch.Tensor, sub: torch.Tensor, bins: int) -> UpdateHistogram:
    """Bin the update: small tensors over their full range, large ones over the central window
    (heavy tails would squash a full-range plot), with fewer bins for few elements."""
    n = flat.numel()
    lo, hi = float(flat.min()), float(flat.max())
    if n > FULL_RANGE_MAX:
        q_lo, q_hi = (float(v) for v in np.quantile(sub.detach().cpu().double().numpy(), WINDOW))
        if q_hi > q_lo:
            lo, hi = q_lo, q_hi
    if not hi > lo:
        pad = max(abs(lo) * 1e-3, 1e-12)
        lo, hi = lo - pad, hi + pad
    bins = min(bins, max(8, int(2 * math.sqrt(n))))
    counts = torch.histc(flat, bins=bins, min=lo, max=hi).double().cpu()
    width = (hi - lo) / bins
    return UpdateHistogram(
        edges=[float(e) for e in np.linspace(lo, hi, bins + 1)],
        density=[float(c) for c in counts / (n * width)],
        outside=max(0.0, 1.0 - float(counts.sum()) / n),
    )


def format_rows(rows: Sequence[GGDCheckRow], markdown: bool = False) -> str:
    """The rows as an aligned text table or a Markdown table."""
    head = ("epoch", "layer", "shape", "n", "loc", "scale", "beta", "KS D", "p", "pass")
    body = [
        [
            str(r.epoch),
            r.layer + (f" [{r.replaced_by}]" if r.replaced_by else ""),
            "x".join(map(str, r.shape)),
            str(r.n),
            f"{r.loc:.3g}",
            f"{r.scale:.3g}",
            f"{r.beta:.3f}",
            f"{r.ks_d:.4f}",
            f"{r.p:.3g}",
            ("yes" if r.passed else "no") + (" *" if r.note else ""),
        ]
        for r in rows
    ]
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        return "\n".join(lines + ["| " + " | ".join(cells) + " |" for cells in body])
    widths = [max(len(h), *(len(c[i]) for c in body)) if body else len(h) for i, h in enumerate(head)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join(
        [fmt.format(*head), fmt.format(*("-" * w for w in widths))] + [fmt.format(*cells) for cells in body]
    )
