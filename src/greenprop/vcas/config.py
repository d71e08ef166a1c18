"""VCASConfig: every VCAS setting in one frozen, validated dataclass."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from greenprop.errors import GreenpropError

__all__ = ["VCASConfig"]


@dataclass(frozen=True)
class VCASConfig:
    """Settings of VCAS (variance-controlled adaptive sampling), validated on construction.

    ``VCASConfig()`` holds the paper's defaults (Wang, Chen & Zhu, 2024, arXiv:2402.17227,
    and its public reference code). Training starts exact (``initial_keep = 1``, weight
    ratios 1) and the controller lowers the ratios while the extra variance stays small.

    Args:
        tau_act: tolerated ratio of activation-sampling variance to SGD variance; above
            it the global keep ``s`` rises by ``s_step``, otherwise it falls. In (0, inf).
            Default 0.025 (paper).
        tau_w: the same threshold for each Linear's weight-gradient (token) sampling.
            In (0, inf). Default 0.025 (paper).
        update_every: ``F``, steps between variance estimations / ratio updates; an
            integer >= 1. Default 100 (paper).
        mc_repeats: ``M``, Monte-Carlo repeats per estimation (exact backward on M
            batches for the SGD variance, M sampled backwards for the sampler variance);
            an integer >= 2 (a variance needs two draws). Default 2 (paper).
        s_step: how much ``s`` moves per update, in (0, 1). Default 0.01 (paper).
        weight_ratio_multiplier: each weight ratio ``nu_l`` is multiplied by this when
            its variance is below ``tau_w`` and divided by it otherwise; in (0, 1).
            Default 0.95 (paper).
        ema_decay: smoothing of the per-block activation ratios,
            ``ratio <- decay * ratio + (1 - decay) * new``; in [0, 1) (0 = no smoothing).
            Default 0.6 (paper).
        variance_sample_fraction: fraction of each weight's entries on which the
            variances are measured (to keep the estimation cheap); in (0, 1].
            Default 0.01, i.e. 1% (paper).
        initial_keep: starting value of ``s``, the fraction of gradient-norm mass the
            kept samples must reach; in (0, 1]. Default 1.0 (paper: start exact).
        initial_weight_ratio: starting token keep ratio ``nu_l`` of every Linear; in
            [min_ratio, 1]. Default 1.0 (paper: start exact).
        min_ratio: floor for every activation and weight keep ratio, so a layer never
            samples (almost) nothing; in (0, 1]. Default 0.05 (our choice; the paper
            has no explicit floor).
        seed: seeds the samplers' generators, for reproducible runs. Default 0 (ours).
        check_rows: debug mode: every sampled layer verifies that the gradient rows it
            skips are exactly zero, and raises naming the layer if not (a model that
            breaks the samplers' assumptions, e.g. an auxiliary loss on a block's
            internals or a sequence-first block). Costs a scan of each gradient. Default
            False (ours).
    """

    tau_act: float = 0.025
    tau_w: float = 0.025
    update_every: int = 100
    mc_repeats: int = 2
    s_step: float = 0.01
    weight_ratio_multiplier: float = 0.95
    ema_decay: float = 0.6
    variance_sample_fraction: float = 0.01
    initial_keep: float = 1.0
    initial_weight_ratio: float = 1.0
    min_ratio: float = 0.05
    seed: int = 0
    check_rows: bool = False

    def __post_init__(self) -> None:
        for name in _FLOAT_FIELDS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
                raise GreenpropError(f"{name} must be a number, got {value!r}")
            object.__setattr__(self, name, float(value))
        if not isinstance(self.check_rows, bool):
            raise GreenpropError(f"check_rows must be true or false, got {self.check_rows!r}")
        for name in _INT_FIELDS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise GreenpropError(f"{name} must be an integer, got {value!r}")

        def check(name: str, ok: bool, rule: str) -> None:
            if not ok:
                raise GreenpropError(f"{name} must be {rule}, got {getattr(self, name)!r}")

        check("tau_act", 0.0 < self.tau_act < math.inf, "> 0 and finite")
        check("tau_w", 0.0 < self.tau_w < math.inf, "> 0 and finite")
        check("update_every", self.update_every >= 1, ">= 1")
        check("mc_repeats", self.mc_repeats >= 2, ">= 2")
        check("s_step", 0.0 < self.s_step < 1.0, "in (0, 1)")
        check("weight_ratio_multiplier", 0.0 < self.weight_ratio_multiplier < 1.0, "in (0, 1)")
        check("ema_decay", 0.0 <= self.ema_decay < 1.0, "in [0, 1)")
        check("variance_sample_fraction", 0.0 < self.variance_sample_fraction <= 1.0, "in (0, 1]")
        check("initial_keep", 0.0 < self.initial_keep <= 1.0, "in (0, 1]")
        check("min_ratio", 0.0 < self.min_ratio <= 1.0, "in (0, 1]")
        check(
            "initial_weight_ratio",
            self.min_ratio <= self.initial_weight_ratio <= 1.0,
            f"in [min_ratio={self.min_ratio}, 1]",
        )

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> VCASConfig:
        """Build from a dict (YAML/JSON values or the CLI's strings such as ``"0.05"``).

        An unknown key or an unparsable string raises :class:`GreenpropError` naming
        the option.
        """
        names = [f.name for f in dataclasses.fields(cls)]
        kwargs: dict[str, Any] = {}
        for key, value in values.items():
            if key not in names:
                raise GreenpropError(f"unknown vcas option {key!r}; known: {', '.join(sorted(names))}")
            if isinstance(value, str) and key in _BOOL_FIELDS:
                words = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
                if value.strip().lower() not in words:
                    raise GreenpropError(f"{key} must be true or false, got {value!r}")
                value = words[value.strip().lower()]
            elif isinstance(value, str):
                parse: Callable[[str], Any] = int if key in _INT_FIELDS else float
                try:
                    value = parse(value.strip())
                except ValueError:
                    kind = "an integer" if key in _INT_FIELDS else "a number"
                    raise GreenpropError(f"{key} must be {kind}, got {value!r}") from None
            kwargs[key] = value
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python dict of the settings, for logs, YAML and ``from_dict``."""
        return dataclasses.asdict(self)


_INT_FIELDS: tuple[str, ...] = ("update_every", "mc_repeats", "seed")
_BOOL_FIELDS: tuple[str, ...] = ("check_rows",)
_FLOAT_FIELDS: tuple[str, ...] = tuple(
    f.name for f in dataclasses.fields(VCASConfig) if f.name not in _INT_FIELDS + _BOOL_FIELDS
)
