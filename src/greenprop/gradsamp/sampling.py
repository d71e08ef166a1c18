"""GradSamp's draw rule: one tensor's sampled update from its last real update, as a pure function.

:func:`sample_update` fits a GGD to a real epoch's update ``delta`` and returns a draw of the
same shape; :class:`DrawStats` summarises a sampled epoch's draws for the epoch record. The
controller only loops over tensors and owns the generators, so the rule can be tested and
reused on its own. The default keeps each draw's standard deviation at the real update's,
because the paper's literal rule (``GGD(mu, sigma + eps, beta)``) explodes at small ``beta``
(see the GradSamp card, "Tolerance modes").
"""

from __future__ import annotations

import math
import statistics
import warnings
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import torch

from greenprop.gradsamp import ggd

__all__ = [
    "DEFAULT_BETA_BOUNDS",
    "TOLERANCE_MODES",
    "UPDATE_VARIANTS",
    "DrawStats",
    "FitMethod",
    "ToleranceMode",
    "UpdateVariant",
    "sample_update",
]

#: Update variants: the paper's i.i.d. draw, and two ablations of ours.
UpdateVariant = Literal["ggd", "ggd-signed", "extrapolate"]
#: How ``tolerance`` enters the draw (see :func:`sample_update`).
ToleranceMode = Literal["relative", "absolute", "paper"]
#: GGD estimators: torch moments (fast) or SciPy maximum likelihood (the paper's).
FitMethod = Literal["moments", "mle"]

UPDATE_VARIANTS: tuple[str, ...] = get_args(UpdateVariant)
TOLERANCE_MODES: tuple[str, ...] = get_args(ToleranceMode)
#: Shape bounds used by the safe modes: below 0.2 a draw is a few huge values among zeros.
DEFAULT_BETA_BOUNDS: tuple[float, float] = (0.2, 8.0)


def sample_update(
    delta: torch.Tensor,
    *,
    update: UpdateVariant,
    tolerance: float,
    tolerance_mode: ToleranceMode,
    update_scale: float,
    clamp: bool,
    beta_bounds: tuple[float, float],
    fit_method: FitMethod,
    generator: torch.Generator,
    fit_generator: torch.Generator | None = None,
    name: str | None = None,
) -> tuple[torch.Tensor, ggd.GGDParams | None]:
    """A sampled update shaped like ``delta`` (one real epoch's update of one tensor).

    Args:
        delta: the real update; not modified.
        update: ``"ggd"`` (the paper: an i.i.d. draw from the fitted GGD), ``"ggd-signed"``
            (GGD magnitudes, signs of ``delta``), ``"extrapolate"`` (``delta`` again, no fit).
        tolerance: the paper's ``eps``, applied as ``tolerance_mode`` says.
        tolerance_mode: ``"relative"``: draw std = real std * (1 + tolerance);
            ``"absolute"``: real std + tolerance; ``"paper"``: GGD scale + tolerance.
        update_scale: multiplies the result.
        clamp: clamp the draw to ``[-m, m]``, ``m`` = the largest ``|delta|``.
        beta_bounds: bounds for the fitted shape before drawing.
        fit_method: ``"moments"`` or ``"mle"`` (see :func:`greenprop.gradsamp.ggd.fit`).
        generator: draws the sample; it lives on ``delta``'s device.
        fit_generator: subsamples an MLE fit (CPU).
        name: names the tensor in warnings.

    Returns:
        ``(draw, fitted)``: the draw in float32 (float64 for float64 ``delta``) and the GGD
        fitted to ``delta`` (None for ``"extrapolate"``). A degenerate fit gives a constant
        draw at its ``loc``; a non-finite ``delta`` under ``"extrapolate"`` a zero draw, with
        a :class:`~greenprop.gradsamp.ggd.GGDFitWarning`.
    """
    work = torch.float64 if delta.dtype == torch.float64 else torch.float32
    if update == "extrapolate":
        if not bool(torch.isfinite(delta).all()):
            warnings.warn(
                f"GradSamp: the last real update of {name!r} has NaN/Inf; using a zero update",
                ggd.GGDFitWarning,
                stacklevel=3,
            )
            return torch.zeros_like(delta, dtype=work), None
        return delta.to(work) * update_scale, None

    fitted = ggd.fit(delta, method=fit_method, name=name, generator=fit_generator)
    if fitted.fallback is not None:
        return torch.full_like(delta, fitted.loc, dtype=work) * update_scale, fitted
    lo, hi = beta_bounds
    beta = min(max(fitted.beta, lo), hi)
    if tolerance_mode == "paper":
        scale = fitted.scale + tolerance
    else:  # target the real update's own spread (an MLE fit's std can overflow)
        real_std = float(delta.float().std())
        target = real_std + tolerance if tolerance_mode == "absolute" else real_std * (1.0 + tolerance)
        scale = ggd.scale_for_std(target, beta)
    if update == "ggd":
        draw = ggd.sample(ggd.GGDParams(fitted.loc, scale, beta), delta.shape, generator, dtype=work)
    else:  # ggd-signed: magnitudes from the GGD, signs of the last real update
        draw = ggd.sample(ggd.GGDParams(0.0, scale, beta), delta.shape, generator, dtype=work)
        draw.abs_().mul_(torch.sign(delta.to(work) - fitted.loc)).add_(fitted.loc)
    if clamp:
        largest = float(delta.abs().max())
        draw.clamp_(-largest, largest)
    if update_scale != 1.0:
        draw.mul_(update_scale)
    return draw, fitted


@dataclass
class DrawStats:
    """What a sampled epoch's draws looked like: fits, fallbacks, shapes and spreads."""

    fits: dict[str, ggd.GGDParams] = field(default_factory=dict)
    fallbacks: list[str] = field(default_factory=list)
    betas: list[float] = field(default_factory=list)
    std_ratios: list[float] = field(default_factory=list)

    def add(self, name: str, delta: torch.Tensor, draw: torch.Tensor, fitted: ggd.GGDParams | None) -> None:
        """Record one tensor's draw (from :func:`sample_update`) against its real update."""
        if fitted is not None:
            self.fits[name] = fitted
            if fitted.fallback is not None:
                self.fallbacks.append(name)
            else:
                self.betas.append(fitted.beta)
        real_std = float(delta.float().std()) if delta.numel() > 1 else 0.0
        if real_std > 0 and math.isfinite(real_std):
            ratio = float(draw.float().std()) / real_std
            if math.isfinite(ratio):
                self.std_ratios.append(ratio)

    def summary(self, *, record_fits: bool = False) -> dict[str, Any]:
        """Record fields: fallback count and names, median fitted beta, largest draw/real std."""
        out: dict[str, Any] = {
            "fallbacks": len(self.fallbacks),
            "fallback_tensors": list(self.fallbacks),
            "beta_median": statistics.median(self.betas) if self.betas else None,
            "draw_std_ratio_max": max(self.std_ratios) if self.std_ratios else None,
        }
        if record_fits:
            out["fits"] = {
                n: {"loc": f.loc, "scale": f.scale, "beta": f.beta, "fallback": f.fallback}
                for n, f in self.fits.items()
            }
        return out
