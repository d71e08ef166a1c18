"""Pure functions of VCAS's control law (the paper's variance control), no state.

Every ``F`` steps VCAS measures how much variance its samplers add on top of the SGD
noise that training already tolerates, and adapts its ratios:

* :func:`variance_ratio` turns repeated sampled-gradient estimates into
  ``extra variance / SGD variance``;
* :func:`update_s` moves the norm mass ``s`` one step up
  (too noisy) or down (room to save more) against ``tau_act``;
* :func:`block_ratio` converts ``s`` into a block's sample ratio from its
  per-sample gradient norms, smoothed over updates by :func:`ema`;
* :func:`update_weight_ratio` scales each Linear's token ratio ``nu_l`` by the
  multiplier (0.95) against ``tau_w``.

Keeping these pure (numbers and tensors in, numbers out) lets the stateful controller
stay thin and lets every rule be tested on hand-computed cases.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

from greenprop.errors import GreenpropError

__all__ = [
    "block_ratio",
    "ema",
    "update_s",
    "update_weight_ratio",
    "variance_ratio",
]


def _number(name: str, value: object, lo: float, hi: float, *, lo_open: bool, hi_open: bool) -> float:
    """``value`` as a float, or a GreenpropError naming it if not a real number in the interval."""
    ok = not isinstance(value, bool) and isinstance(value, numbers.Real) and not math.isnan(value)
    if ok:
        v = float(value)  # type: ignore[arg-type]
        ok = (lo < v if lo_open else lo <= v) and (v < hi if hi_open else v <= hi)
    if not ok:
        interval = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
        raise GreenpropError(f"{name} must be a number in {interval}, got {value!r}")
    return float(value)  # type: ignore[arg-type]


def _real_tensor(name: str, value: object, dim: int) -> Tensor:
    """Check a non-empty, finite, real tensor of ``dim`` dimensions; return it as float64."""
    if not isinstance(value, Tensor) or value.dim() != dim:
        shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
        raise GreenpropError(f"{name} must be a {dim}-D tensor, got {shape}")
    if value.numel() == 0:
        raise GreenpropError(f"{name} must not be empty, got shape {tuple(value.shape)}")
    if value.dtype.is_complex or value.dtype == torch.bool:
        raise GreenpropError(f"{name} must be real numbers, got dtype {value.dtype}")
    v = value.to(torch.float64)
    finite = torch.isfinite(v)
    if not bool(finite.all()):
        raise GreenpropError(f"{name} must be finite, got {value[~finite][0].item()!r}")
    return v


def block_ratio(norms: Tensor, s: float) -> float:
    """Smallest fraction of samples whose largest gradient norms reach ``s`` of the total norm.

    VCAS keeps whole samples in a block's backward; the samples with the largest
    gradient norms carry most of the gradient, so keeping just enough of them to cover
    a fraction ``s`` of the norm mass sets how many rows the soft top-k keeps.

    With norms sorted descending and ``k`` the smallest count whose partial sum is
    ``>= s * total`` (compared in float64), the result is ``k / N``.

    ``s = 1`` returns the fraction of samples with non-zero norm (our choice): zero-norm
    samples add nothing, and counting them exactly avoids float rounding of the partial
    sums swallowing tiny but non-zero norms. All-zero norms return 1.0: there is nothing
    to rank, so nothing is sampled away.

    Args:
        norms: 1-D, non-empty, finite, non-negative per-sample gradient norms.
        s: fraction of the total norm the kept samples must reach, in (0, 1].

    Returns:
        A fraction in ``(0, 1]``.
    """
    v = _real_tensor("norms", norms, 1)
    if bool((v < 0).any()):
        raise GreenpropError(f"norms must be >= 0, got {norms[v < 0][0].item()!r}")
    s = _number("s", s, 0.0, 1.0, lo_open=True, hi_open=False)
    n = v.numel()
    n_nonzero = int((v > 0).sum())
    if n_nonzero == 0:
        return 1.0
    if s == 1.0:
        return n_nonzero / n
    partial = torch.sort(v, descending=True).values.cumsum(0)
    target = s * float(partial[-1])
    k = int(torch.searchsorted(partial, torch.tensor([target], dtype=torch.float64))) + 1
    # searchsorted (left) gives the first index with partial >= target; partial[-1] >= target.
    return min(k, n) / n


def ema(previous: float | None, value: float, decay: float) -> float:
    """Exponential moving average ``decay * previous + (1 - decay) * value``.

    Smooths the per-block ratios so one noisy estimate does not swing them; the
    paper's 0.6 (``VCASConfig.ema_decay``) is this ``decay``, the weight of the *old*
    value. ``previous = None`` (first update) returns ``value``; ``decay = 0`` is no
    smoothing.
    """
    decay = _number("decay", decay, 0.0, 1.0, lo_open=False, hi_open=True)
    value = _number("value", value, -math.inf, math.inf, lo_open=True, hi_open=True)
    if previous is None:
        return value
    previous = _number("previous", previous, -math.inf, math.inf, lo_open=True, hi_open=True)
    return decay * previous + (1.0 - decay) * value


def update_s(s: float, variance_ratio: float, tau: float, step: float) -> float:
    """Next norm mass ``s``: ``s + step`` if ``variance_ratio > tau`` else ``s - step``.

    Too much extra variance means keep more norm mass; otherwise save more. The result
    is clamped to ``[step, 1]`` (our choice: ``s`` never reaches 0, which would keep
    no samples at all).

    Args:
        s: current norm mass, in [0, 1].
        variance_ratio: activation-sampling variance / SGD variance, >= 0 (inf allowed).
        tau: threshold (``VCASConfig.tau_act``), > 0 and finite.
        step: ``VCASConfig.s_step``, in (0, 1).
    """
    s = _number("s", s, 0.0, 1.0, lo_open=False, hi_open=False)
    variance_ratio = _number("variance_ratio", variance_ratio, 0.0, math.inf, lo_open=False, hi_open=False)
    tau = _number("tau", tau, 0.0, math.inf, lo_open=True, hi_open=True)
    step = _number("step", step, 0.0, 1.0, lo_open=True, hi_open=True)
    new = s + step if variance_ratio > tau else s - step
    return min(1.0, max(step, new))


def update_weight_ratio(
    ratio: float, variance_ratio: float, tau: float, multiplier: float, min_ratio: float
) -> float:
    """Next token ratio ``nu_l``: divided by ``multiplier`` if ``variance_ratio > tau``, else multiplied.

    Multiplicative steps adapt at the same relative speed whatever the ratio's scale.
    The result is clamped to ``[min_ratio, 1]`` so a Linear never samples (almost) nothing.

    Args:
        ratio: current ratio, in (0, 1].
        variance_ratio: weight-sampling variance / SGD variance, >= 0 (inf allowed).
        tau: threshold (``VCASConfig.tau_w``), > 0 and finite.
        multiplier: ``VCASConfig.weight_ratio_multiplier``, in (0, 1).
        min_ratio: ``VCASConfig.min_ratio``, in (0, 1].
    """
    ratio = _number("ratio", ratio, 0.0, 1.0, lo_open=True, hi_open=False)
    variance_ratio = _number("variance_ratio", variance_ratio, 0.0, math.inf, lo_open=False, hi_open=False)
    tau = _number("tau", tau, 0.0, math.inf, lo_open=True, hi_open=True)
    multiplier = _number("multiplier", multiplier, 0.0, 1.0, lo_open=True, hi_open=True)
    min_ratio = _number("min_ratio", min_ratio, 0.0, 1.0, lo_open=True, hi_open=False)
    new = ratio / multiplier if variance_ratio > tau else ratio * multiplier
    return min(1.0, max(min_ratio, new))


def variance_ratio(sampled: Tensor, exact: Tensor, sgd_variance: float) -> float:
    """Extra variance of a sampler relative to the SGD variance.

    ``sampled`` holds ``R`` independent sampled-gradient estimates (``R x D``, on a
    random subset of ``D`` gradient entries) of the same batch whose exact gradient is
    ``exact`` (``D``). Because the samplers are unbiased and the mean ``exact`` is
    known, ``mean_r (sampled[r, j] - exact[j])^2`` is an unbiased estimate of entry
    ``j``'s sampling variance for any ``R >= 1`` (no Bessel correction: the mean is not
    estimated). The extra variance is the mean of that over the ``D`` entries, and the
    result is ``extra / sgd_variance``; ``sgd_variance`` must be measured on the same
    entries with the same per-entry averaging.

    ``sgd_variance = 0`` gives ``inf`` if the extra variance is positive, else ``0.0``.

    Args:
        sampled: ``R x D`` finite real tensor, ``R >= 1``.
        exact: ``D`` finite real tensor.
        sgd_variance: per-entry-averaged SGD variance, finite and >= 0.
    """
    samp = _real_tensor("sampled", sampled, 2)
    ex = _real_tensor("exact", exact, 1)
    if samp.shape[1] != ex.shape[0]:
        raise GreenpropError(
            f"sampled must have exact's {ex.shape[0]} entries per row, got shape {tuple(sampled.shape)}"
        )
    sgd_variance = _number("sgd_variance", sgd_variance, 0.0, math.inf, lo_open=False, hi_open=True)
    extra = float((samp - ex).square().mean())
    if sgd_variance == 0.0:
        return math.inf if extra > 0.0 else 0.0
    return extra / sgd_variance
