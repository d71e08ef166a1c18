"""GradSampConfig: every GradSamp setting in one frozen, validated dataclass."""

from __future__ import annotations

import math
from dataclasses import dataclass

from greenprop.errors import GreenpropError
from greenprop.gradsamp.sampling import (
    DEFAULT_BETA_BOUNDS,
    FitMethod,
    ToleranceMode,
    UpdateVariant,
)
from greenprop.gradsamp.schedule import parse_strategy
from greenprop.options import MethodConfig, check_interval, fail, option

__all__ = ["DEFAULT_STRATEGY", "GradSampConfig"]

#: The paper's most used setting: 5 real epochs, then one sampled (saves 1/6).
DEFAULT_STRATEGY = "pe:5"


@dataclass(frozen=True)
class GradSampConfig(MethodConfig):
    """Settings of GradSamp (epochs replaced by GGD-sampled updates), validated on construction.

    ``GradSampConfig(strategy="pe:5")`` is the paper's most used setting with greenprop's
    safe draw. ``tolerance_mode="paper"`` is the paper's literal rule, GGD scale +
    tolerance, which explodes at a small fitted shape; in that mode ``clamp`` and the
    beta bounds default to off (``clamp``, ``beta_min``, ``beta_max`` left at None mean
    "the mode's default", see :attr:`clamp_draws` and :attr:`beta_bounds`). The strategy's
    coins and the draws are seeded by ``seed``; each epoch's come from ``(seed, epoch)``,
    so a resumed run samples identically.
    """

    METHOD = "gradsamp"

    strategy: str = option(
        DEFAULT_STRATEGY, "which epochs are sampled: pe:P, pr:rho, dp:P, dr:rho (first and last real)"
    )
    tolerance: float = option(1e-3, "the paper's eps, >= 0, applied as tolerance_mode says")
    tolerance_mode: ToleranceMode = option(
        "relative",
        "relative: draw std = real std*(1+tol); absolute: std+tol; paper: GGD scale+tol, "
        "the literal rule (explodes at small beta; no clamp/bounds)",
    )
    update: UpdateVariant = option(
        "ggd",
        "ggd (the paper: i.i.d. draw), ggd-signed (GGD magnitudes, signs of the last real "
        "update), extrapolate (repeat the last real update)",
    )
    update_scale: float = option(1.0, "multiplies every sampled update, >= 0")
    clamp: bool | None = option(
        None,
        "clamp draws to the real update's largest step",
        default_text="true; false in paper mode",
    )
    beta_min: float | None = option(
        None,
        "lower bound on the fitted GGD shape, >= 0",
        default_text=f"{DEFAULT_BETA_BOUNDS[0]:g}; 0 in paper mode",
    )
    beta_max: float | None = option(
        None,
        "upper bound on the fitted GGD shape, above beta_min",
        allow_inf=True,
        default_text=f"{DEFAULT_BETA_BOUNDS[1]:g}; inf in paper mode",
    )
    fit_method: FitMethod = option(
        "moments", "moments (fast torch fit) or mle (SciPy maximum likelihood, subsampled)"
    )
    guard_threshold: float | None = option(
        None,
        "a fraction >= 0: roll a sampled epoch back if the evaluation loss rose by more than it",
        default_text="off",
    )
    allow_consecutive: bool = option(False, "allow two sampled epochs in a row")
    seed: int = option(0, "seeds the strategy's coins and the draws", default_text="the run's seed")
    record_fits: bool = option(False, "write every tensor's fitted GGD to the epoch record")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_interval(self, "tolerance", "[0, inf)")
        check_interval(self, "update_scale", "[0, inf)")
        for name in ("beta_min", "beta_max", "guard_threshold"):
            if getattr(self, name) is not None:
                check_interval(self, name, "[0, inf]" if name == "beta_max" else "[0, inf)")
        low, high = self.beta_bounds
        if not low < high:
            name = "beta_min" if self.beta_min is not None else "beta_max"
            fail(self.METHOD, name, getattr(self, name), f"need beta_min < beta_max, got {low:g}, {high:g}")
        try:
            parse_strategy(self.strategy, seed=self.seed, allow_consecutive=self.allow_consecutive)
        except GreenpropError as err:
            fail(self.METHOD, "strategy", self.strategy, str(err))

    @property
    def clamp_draws(self) -> bool:
        """``clamp`` with its default filled in: on, except in paper mode."""
        return self.tolerance_mode != "paper" if self.clamp is None else self.clamp

    @property
    def beta_bounds(self) -> tuple[float, float]:
        """``(beta_min, beta_max)`` with the mode's defaults filled in."""
        paper = self.tolerance_mode == "paper"
        low = (0.0 if paper else DEFAULT_BETA_BOUNDS[0]) if self.beta_min is None else self.beta_min
        high = (math.inf if paper else DEFAULT_BETA_BOUNDS[1]) if self.beta_max is None else self.beta_max
        return low, high
