"""VCAS control law: norm-mass keep ratio, EMA, the two update rules, the variance ratio."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from greenprop.errors import GreenpropError
from greenprop.vcas import VCASConfig
from greenprop.vcas.control import (
    block_ratio,
    ema,
    update_s,
    update_weight_ratio,
    variance_ratio,
)
from greenprop.vcas.samplers import sample_mask, soft_topk_probabilities

SETTINGS = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _t(values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


# --- block_ratio ------------------------------------------------------------


@pytest.mark.parametrize(
    ("norms", "s", "expected"),
    [
        ([4.0, 3.0, 2.0, 1.0], 0.7, 0.5),  # 4 + 3 = 7 = 0.7 * 10 exactly reaches it
        ([4.0, 3.0, 2.0, 1.0], 0.71, 0.75),  # 7 < 7.1 <= 9
        ([4.0, 3.0, 2.0, 1.0], 0.4, 0.25),
        ([4.0, 3.0, 2.0, 1.0], 0.41, 0.5),
        ([4.0, 3.0, 2.0, 1.0], 0.95, 1.0),
        ([1.0, 2.0, 3.0, 4.0], 0.7, 0.5),  # order of input does not matter
        ([5.0, 0.0, 0.0, 0.0, 0.0], 0.5, 0.2),
        ([1.0, 1.0, 1.0, 1.0], 0.5, 0.5),
        ([1.0, 1.0, 1.0, 1.0], 0.51, 0.75),
        ([3.0], 0.2, 1.0),
    ],
)
def test_block_keep_ratio_hand_computed(norms: list[float], s: float, expected: float) -> None:
    assert block_ratio(_t(norms), s) == pytest.approx(expected)


def test_block_keep_ratio_s_one_counts_nonzero_and_all_zero_keeps_all() -> None:
    assert block_ratio(_t([4.0, 0.0, 2.0, 0.0]), 1.0) == 0.5
    assert block_ratio(_t([4.0, 3.0, 2.0, 1.0]), 1.0) == 1.0
    # A norm too small to change the float64 sum still counts at s = 1.
    assert block_ratio(_t([1.0, 1e-30, 0.0, 0.0]), 1.0) == 0.5
    assert block_ratio(torch.zeros(5), 1.0) == 1.0
    assert block_ratio(torch.zeros(5), 0.3) == 1.0


def test_block_keep_ratio_accepts_float32_and_ints() -> None:
    assert block_ratio(torch.tensor([4.0, 3.0, 2.0, 1.0]), 0.7) == 0.5
    assert block_ratio(torch.tensor([4, 3, 2, 1]), 0.7) == 0.5


def test_block_keep_ratio_monotone_in_s() -> None:
    norms = torch.rand(200, generator=torch.Generator().manual_seed(0)) ** 3
    ratios = [block_ratio(norms, s) for s in torch.linspace(0.01, 1.0, 100).tolist()]
    assert all(a <= b for a, b in itertools.pairwise(ratios))
    assert ratios[0] < 0.1 and ratios[-1] == 1.0


@SETTINGS
@given(
    ints=st.lists(st.integers(0, 1000), min_size=1, max_size=40),
    s=st.floats(0.001, 0.999),
)
def test_block_keep_ratio_is_smallest_fraction_reaching_s(ints: list[int], s: float) -> None:
    # Integer-valued norms make every partial sum exact, so the check is independent of rounding.
    norms = _t([float(i) for i in ints])
    ratio = block_ratio(norms, s)
    n = len(ints)
    k = round(ratio * n)
    assert ratio == k / n and 1 <= k <= n
    total = sum(ints)
    if total == 0:
        assert ratio == 1.0
        return
    top = sorted(ints, reverse=True)
    assert sum(top[:k]) >= s * total
    assert sum(top[: k - 1]) < s * total


@SETTINGS
@given(
    values=st.lists(st.floats(0.0, 1e6, allow_subnormal=False), min_size=1, max_size=40),
    s=st.floats(0.001, 1.0),
)
def test_block_keep_ratio_reaches_s_for_general_floats(values: list[float], s: float) -> None:
    norms = _t(values)
    ratio = block_ratio(norms, s)
    k = round(ratio * len(values))
    assert 0.0 < ratio <= 1.0
    total = math.fsum(values)
    top = sorted(values, reverse=True)
    if total > 0:
        assert math.fsum(top[:k]) >= s * total * (1 - 1e-12)
        assert math.fsum(top[: k - 1]) <= s * total * (1 + 1e-12)


@pytest.mark.parametrize(
    ("norms", "s", "match"),
    [
        (torch.tensor([1.0, -2.0]), 0.5, "-2.0"),
        (torch.tensor([1.0, float("nan")]), 0.5, "nan"),
        (torch.tensor([1.0, float("inf")]), 0.5, "inf"),
        (torch.ones(2, 2), 0.5, r"1-D tensor, got \(2, 2\)"),
        (torch.ones(0), 0.5, "empty"),
        ([1.0, 2.0], 0.5, "got list"),
        (torch.tensor([True, False]), 0.5, "dtype torch.bool"),
        (torch.ones(3), 0.0, "s must be a number in \\(0, 1\\], got 0.0"),
        (torch.ones(3), 1.5, "got 1.5"),
        (torch.ones(3), float("nan"), "got nan"),
        (torch.ones(3), True, "got True"),
    ],
)
def test_block_keep_ratio_rejects_bad_input(norms: object, s: object, match: str) -> None:
    with pytest.raises(GreenpropError, match=match):
        block_ratio(norms, s)  # type: ignore[arg-type]


# --- ema -------------------------------------------------------------------------


def test_ema_math() -> None:
    assert ema(None, 0.3, 0.6) == 0.3
    assert ema(1.0, 0.0, 0.6) == pytest.approx(0.6)  # decay weighs the old value
    assert ema(0.5, 1.0, 0.6) == pytest.approx(0.6 * 0.5 + 0.4 * 1.0)
    assert ema(0.5, 1.0, 0.0) == 1.0  # no smoothing
    # Repeated updates converge to a constant input geometrically.
    x: float | None = None
    for _ in range(60):
        x = ema(x if x is not None else 0.0, 1.0, 0.6)
    assert x == pytest.approx(1.0, abs=1e-12)
    assert ema(0.2, 0.8, VCASConfig().ema_decay) == pytest.approx(0.44)


@pytest.mark.parametrize(
    ("previous", "value", "decay", "match"),
    [
        (0.5, 0.5, 1.0, "decay .* got 1.0"),
        (0.5, 0.5, -0.1, "decay .* got -0.1"),
        (0.5, float("nan"), 0.6, "value .* got nan"),
        (float("inf"), 0.5, 0.6, "previous .* got inf"),
        (0.5, "0.3", 0.6, "value .* got '0.3'"),
    ],
)
def test_ema_rejects_bad_input(previous: object, value: object, decay: object, match: str) -> None:
    with pytest.raises(GreenpropError, match=match):
        ema(previous, value, decay)  # type: ignore[arg-type]


# --- update rules ----------------------------------------------------------------


def test_update_activation_keep_moves_and_clamps() -> None:
    assert update_s(0.5, 0.03, 0.025, 0.01) == pytest.approx(0.51)  # too noisy: keep more
    assert update_s(0.5, 0.02, 0.025, 0.01) == pytest.approx(0.49)  # quiet: save more
    assert update_s(0.5, 0.025, 0.025, 0.01) == pytest.approx(0.49)  # equal is not above
    assert update_s(0.5, math.inf, 0.025, 0.01) == pytest.approx(0.51)
    assert update_s(0.995, 1.0, 0.025, 0.01) == 1.0
    assert update_s(1.0, 1.0, 0.025, 0.01) == 1.0
    assert update_s(0.012, 0.0, 0.025, 0.01) == 0.01
    assert update_s(0.0, 0.0, 0.025, 0.01) == 0.01  # never 0


def test_update_activation_keep_long_quiet_run_floors_at_step() -> None:
    s = 1.0
    for _ in range(500):
        s = update_s(s, 0.0, 0.025, 0.01)
    assert s == 0.01


def test_update_weight_ratio_moves_and_clamps() -> None:
    assert update_weight_ratio(0.5, 0.03, 0.025, 0.95, 0.05) == pytest.approx(0.5 / 0.95)
    assert update_weight_ratio(0.5, 0.02, 0.025, 0.95, 0.05) == pytest.approx(0.5 * 0.95)
    assert update_weight_ratio(0.5, 0.025, 0.025, 0.95, 0.05) == pytest.approx(0.475)
    assert update_weight_ratio(0.97, 1.0, 0.025, 0.95, 0.05) == 1.0
    assert update_weight_ratio(0.051, 0.0, 0.025, 0.95, 0.05) == 0.05
    ratio = 1.0
    for _ in range(200):
        ratio = update_weight_ratio(ratio, 0.0, 0.025, 0.95, 0.05)
    assert ratio == 0.05


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((1.5, 0.0, 0.025, 0.01), "s .* got 1.5"),
        ((0.5, -1.0, 0.025, 0.01), "variance_ratio .* got -1.0"),
        ((0.5, float("nan"), 0.025, 0.01), "variance_ratio .* got nan"),
        ((0.5, 0.0, 0.0, 0.01), "tau .* got 0.0"),
        ((0.5, 0.0, 0.025, 0.0), "step .* got 0.0"),
        ((0.5, 0.0, 0.025, 1.0), "step .* got 1.0"),
    ],
)
def test_update_activation_keep_rejects_bad_input(args: tuple[object, ...], match: str) -> None:
    with pytest.raises(GreenpropError, match=match):
        update_s(*args)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((0.0, 0.0, 0.025, 0.95, 0.05), "ratio .* got 0.0"),
        ((0.5, float("nan"), 0.025, 0.95, 0.05), "variance_ratio .* got nan"),
        ((0.5, 0.0, math.inf, 0.95, 0.05), "tau .* got inf"),
        ((0.5, 0.0, 0.025, 1.0, 0.05), "multiplier .* got 1.0"),
        ((0.5, 0.0, 0.025, 0.95, 0.0), "min_ratio .* got 0.0"),
    ],
)
def test_update_weight_ratio_rejects_bad_input(args: tuple[object, ...], match: str) -> None:
    with pytest.raises(GreenpropError, match=match):
        update_weight_ratio(*args)  # type: ignore[arg-type]


# --- variance_ratio --------------------------------------------------------------


def test_variance_ratio_analytic() -> None:
    exact = _t([1.0, -2.0, 0.5])
    dev = _t([0.1, 0.2, 0.3])
    sampled = torch.stack([exact + dev, exact - dev])  # each entry deviates by +-dev_j
    extra = (0.01 + 0.04 + 0.09) / 3
    assert variance_ratio(sampled, exact, 0.5) == pytest.approx(extra / 0.5)
    # Known mean: a single repeat is already an estimate (no Bessel correction).
    assert variance_ratio(sampled[:1], exact, 2.0) == pytest.approx(extra / 2.0)
    # Deviations are measured from `exact`, not from the repeats' own mean.
    shifted = torch.stack([exact + 1.0, exact + 1.0])
    assert variance_ratio(shifted, exact, 1.0) == pytest.approx(1.0)


def test_variance_ratio_zero_sgd_variance() -> None:
    exact = _t([1.0, 2.0])
    assert variance_ratio(torch.stack([exact, exact]), exact, 0.0) == 0.0
    assert variance_ratio(torch.stack([exact, exact + 1e-3]), exact, 0.0) == math.inf


def test_variance_ratio_matches_horvitz_thompson_variance() -> None:
    """Repeats of a real sampler reproduce its analytic variance sum_i a_ij^2 (1/p_i - 1)."""
    gen = torch.Generator().manual_seed(0)
    rows = torch.randn(16, 5, generator=gen, dtype=torch.float64)  # per-sample gradients a_i
    probs = soft_topk_probabilities(rows.norm(dim=1), 6.0)
    exact = rows.sum(0)
    repeats = 4000
    masks = sample_mask(probs.expand(repeats, -1).contiguous(), generator=gen)
    sampled = (masks.to(torch.float64) / probs) @ rows  # R x D Horvitz-Thompson estimates
    analytic = float((rows.square() * (1 / probs - 1).unsqueeze(1)).sum(0).mean())
    assert variance_ratio(sampled, exact, 1.0) == pytest.approx(analytic, rel=0.1)
    assert variance_ratio(sampled, exact, 4.0) == pytest.approx(analytic / 4.0, rel=0.1)


@pytest.mark.parametrize(
    ("sampled", "exact", "sgd", "match"),
    [
        (torch.ones(3), torch.ones(3), 1.0, r"sampled must be a 2-D tensor, got \(3,\)"),
        (torch.ones(2, 3), torch.ones(2, 3), 1.0, r"exact must be a 1-D tensor, got \(2, 3\)"),
        (torch.ones(2, 3), torch.ones(4), 1.0, r"exact's 4 entries per row, got shape \(2, 3\)"),
        (torch.ones(0, 3), torch.ones(3), 1.0, "sampled must not be empty"),
        (torch.tensor([[1.0, float("nan")]]), torch.ones(2), 1.0, "sampled must be finite, got nan"),
        (torch.ones(1, 2), torch.tensor([1.0, float("inf")]), 1.0, "exact must be finite, got inf"),
        (torch.ones(1, 2), torch.ones(2), -1.0, "sgd_variance .* got -1.0"),
        (torch.ones(1, 2), torch.ones(2), math.inf, "sgd_variance .* got inf"),
    ],
)
def test_variance_ratio_rejects_bad_input(sampled: object, exact: object, sgd: object, match: str) -> None:
    with pytest.raises(GreenpropError, match=match):
        variance_ratio(sampled, exact, sgd)  # type: ignore[arg-type]
