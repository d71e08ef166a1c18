"""``--method gradsamp:...``: build a :class:`GradSamp` controller from CLI string options."""

from __future__ import annotations

import math

from torch import nn

from greenprop.controller import Controller
from greenprop.errors import GreenpropError
from greenprop.gradsamp.controller import GradSamp
from greenprop.gradsamp.sampling import DEFAULT_BETA_BOUNDS, TOLERANCE_MODES, UPDATE_VARIANTS
from greenprop.gradsamp.schedule import parse_strategy

__all__ = ["DEFAULT_STRATEGY", "OPTIONS", "build"]

#: The paper's most used setting: 5 real epochs, then one sampled (saves 1/6).
DEFAULT_STRATEGY = "pe:5"

#: Option name -> help, for ``greenprop train --help`` and ``greenprop methods``.
OPTIONS: dict[str, str] = {
    "strategy": f"which epochs are sampled: pe:P, pr:rho, dp:P, dr:rho (default {DEFAULT_STRATEGY})",
    "tolerance": "the paper's eps (default 1e-3), applied as tolerance_mode says",
    "tolerance_mode": "relative (default): draw std = real std*(1+tol); absolute: std+tol; "
    "paper: GGD scale+tol, the literal rule (explodes at small beta; no clamp/bounds)",
    "update": "ggd (default, the paper), ggd-signed (GGD magnitudes, signs of the last real "
    "update), extrapolate (repeat the last real update)",
    "scale": "multiplies every sampled update (default 1.0)",
    "clamp": "true/false: clamp draws to the real update's largest step (default true; false in paper mode)",
    "beta_min": f"lower bound on the fitted GGD shape (default {DEFAULT_BETA_BOUNDS[0]}; 0 in paper mode)",
    "beta_max": f"upper bound on the fitted GGD shape (default {DEFAULT_BETA_BOUNDS[1]}; inf in paper mode)",
    "fit": "moments (default, fast torch fit) or mle (SciPy maximum likelihood, subsampled)",
    "allow_consecutive": "true/false: allow two sampled epochs in a row (default false)",
    "guard": "off (default) or a fraction: roll a sampled epoch back if validation loss rose by more than it",
    "record_fits": "true/false: write every tensor's fitted GGD to the epoch record (default false)",
}

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _bool(name: str, value: str) -> bool:
    low = value.strip().lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise GreenpropError(f"gradsamp option {name}={value!r}: expected true or false")


def _float(name: str, value: str, *, minimum: float = 0.0, allow_inf: bool = False) -> float:
    try:
        number = float(value)
    except ValueError:
        raise GreenpropError(f"gradsamp option {name}={value!r}: expected a number") from None
    if math.isnan(number) or (math.isinf(number) and not allow_inf) or number < minimum:
        raise GreenpropError(f"gradsamp option {name}={value!r}: expected a number >= {minimum:g}")
    return number


def _choice(name: str, value: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise GreenpropError(f"gradsamp option {name}={value!r}: choose from {', '.join(choices)}")
    return value


def build(
    model: nn.Module,
    options: dict[str, str],
    *,
    epochs: int,
    steps_per_epoch: int,
    seed: int,
) -> list[Controller]:
    """Parse ``options`` (all strings) and return ``[GradSamp(model, ...)]``.

    Unknown or malformed options raise :class:`~greenprop.errors.GreenpropError` (a
    ValueError) naming the option.
    """
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise GreenpropError(f"unknown gradsamp option(s) {', '.join(unknown)}; known: {', '.join(OPTIONS)}")
    opts = {k: v.strip() for k, v in options.items()}
    mode = _choice("tolerance_mode", opts.get("tolerance_mode", "relative"), TOLERANCE_MODES)
    allow_consecutive = _bool("allow_consecutive", opts.get("allow_consecutive", "false"))
    try:
        strategy = parse_strategy(
            opts.get("strategy", DEFAULT_STRATEGY),
            total_epochs=epochs,
            seed=seed,
            allow_consecutive=allow_consecutive,
        )
    except GreenpropError as err:
        raise GreenpropError(f"gradsamp option strategy: {err}") from None
    beta_bounds = None
    if "beta_min" in opts or "beta_max" in opts:
        paper = mode == "paper"
        lo = (
            _float("beta_min", opts["beta_min"])
            if "beta_min" in opts
            else (0.0 if paper else DEFAULT_BETA_BOUNDS[0])
        )
        hi = (
            _float("beta_max", opts["beta_max"], allow_inf=True)
            if "beta_max" in opts
            else (math.inf if paper else DEFAULT_BETA_BOUNDS[1])
        )
        if not lo < hi:
            raise GreenpropError(f"gradsamp options beta_min={lo:g} and beta_max={hi:g}: need min < max")
        beta_bounds = (lo, hi)
    guard_text = opts.get("guard", "off").lower()
    guard = None if guard_text in {"off", "none", "false", "no"} else _float("guard", guard_text)
    controller = GradSamp(
        model,
        strategy,
        total_epochs=epochs,
        tolerance=_float("tolerance", opts.get("tolerance", "1e-3")),
        tolerance_mode=mode,  # type: ignore[arg-type]
        update=_choice("update", opts.get("update", "ggd"), UPDATE_VARIANTS),  # type: ignore[arg-type]
        update_scale=_float("scale", opts.get("scale", "1.0")),
        clamp=_bool("clamp", opts["clamp"]) if "clamp" in opts else None,
        beta_bounds=beta_bounds,
        fit_method=_choice("fit", opts.get("fit", "moments"), ("moments", "mle")),  # type: ignore[arg-type]
        guard_threshold=guard,
        seed=seed,
        record_fits=_bool("record_fits", opts.get("record_fits", "false")),
    )
    return [controller]
