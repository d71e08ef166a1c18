"""GradSamp epoch-sampling strategies: exact skip sets, rates, reproducibility, errors."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from greenprop.errors import GreenpropError
from greenprop.gradsamp.schedule import (
    DelayedPeriodic,
    DelayedRandom,
    Periodic,
    Probabilistic,
    Strategy,
    parse_strategy,
)


def _no_two_in_a_row(skipped: list[int]) -> bool:
    return all(b - a > 1 for a, b in itertools.pairwise(skipped))


def test_periodic_matches_the_paper_count():
    # Appendix D of the paper: Pe=5 over 200 epochs is 167 real + 33 sampled.
    s = Periodic(5, epochs=200)
    assert s.skipped_epochs() == list(range(5, 200, 6))
    assert len(s.skipped_epochs()) == 33
    assert s.expected_saving() == pytest.approx(33 / 200)
    assert s.realised_saving() == pytest.approx(33 / 200)
    assert Periodic(5).expected_saving() == pytest.approx(1 / 6)  # long-run, no length


@pytest.mark.parametrize(
    ("P", "total", "expected"),
    [
        (5, 12, [5]),  # epoch 11 would be sampled but is the last: real
        (5, 13, [5, 11]),
        (1, 6, [1, 3]),  # 5 is the last epoch
        (2, 9, [2, 5]),  # 8 is the last epoch
        (10, 5, []),
        (1, 1, []),
    ],
)
def test_periodic_exact_skip_sets(P, total, expected):
    assert Periodic(P).skipped_epochs(total) == expected


@pytest.mark.parametrize(
    ("P", "total", "expected"),
    [
        (5, 20, [15]),  # half = 10, then 5 real, 1 sampled
        (5, 40, [25, 31, 37]),
        (2, 11, [7]),  # half = 5: 5, 6 real, 7 sampled, 8, 9 real, 10 is the last
        (5, 200, list(range(105, 199, 6))),
    ],
)
def test_delayed_periodic_exact_skip_sets(P, total, expected):
    s = DelayedPeriodic(P, epochs=total)
    assert s.skipped_epochs() == expected
    assert all(s.should_skip(e) == (e in expected) for e in range(total))


@pytest.mark.parametrize("rho", [0.2, 0.5, 0.7])
def test_probabilistic_rate_is_rho_over_one_plus_rho(rho):
    total = 3000
    s = Probabilistic(rho, seed=1, epochs=total)
    skipped = s.skipped_epochs()
    assert _no_two_in_a_row(skipped)
    assert s.realised_saving() == pytest.approx(rho / (1 + rho), abs=0.03)
    assert s.expected_saving() == pytest.approx(rho / (1 + rho), abs=0.002)
    assert Probabilistic(rho).expected_saving() == pytest.approx(rho / (1 + rho))


def test_allow_consecutive_saves_rho():
    s = Probabilistic(0.5, seed=4, epochs=3000, allow_consecutive=True)
    assert s.realised_saving() == pytest.approx(0.5, abs=0.03)
    assert not _no_two_in_a_row(s.skipped_epochs())
    assert s.expected_saving() == pytest.approx(0.5, abs=0.001)


@pytest.mark.parametrize("rho", [0.2, 0.7])
def test_delayed_random_samples_only_in_the_second_half(rho):
    total = 2000
    s = DelayedRandom(rho, seed=2, epochs=total)
    skipped = s.skipped_epochs()
    assert skipped and min(skipped) >= total // 2
    assert _no_two_in_a_row(skipped)
    assert len(skipped) / (total / 2) == pytest.approx(rho / (1 + rho), abs=0.04)
    assert s.expected_saving() == pytest.approx(rho / (2 * (1 + rho)), abs=0.002)


def test_expected_saving_is_exact_for_short_runs():
    # Averaging the realised saving over many seeds converges to expected_saving(E).
    total, rho = 10, 0.5
    realised = [Probabilistic(rho, seed=s).realised_saving(total) for s in range(3000)]
    mean = sum(realised) / len(realised)
    assert mean == pytest.approx(Probabilistic(rho).expected_saving(total), abs=0.005)


@pytest.mark.parametrize("spec", ["pr:0.5", "dr:0.5"])
def test_random_strategies_are_reproducible_and_order_free(spec):
    a = parse_strategy(spec, epochs=100, seed=7)
    b = parse_strategy(spec, epochs=100, seed=7)
    c = parse_strategy(spec, epochs=100, seed=8)
    assert a.skipped_epochs() == b.skipped_epochs()
    assert a.skipped_epochs() != c.skipped_epochs()
    # A resumed run asks from the middle first: the decisions are the same.
    fresh = parse_strategy(spec, epochs=100, seed=7)
    later = [e for e in range(99, 49, -1) if fresh.should_skip(e)]
    assert sorted(later) == [e for e in a.skipped_epochs() if e >= 50]


@settings(max_examples=60, deadline=None)
@given(
    kind=st.sampled_from(["pe", "pr", "dp", "dr"]),
    value=st.integers(1, 12),
    total=st.integers(1, 80),
    seed=st.integers(0, 2**40),
)
def test_first_and_last_epoch_are_never_skipped(kind, value, total, seed):
    spec = f"{kind}:{value if kind in ('pe', 'dp') else value / 13}"
    s = parse_strategy(spec, epochs=total, seed=seed)
    skipped = s.skipped_epochs()
    assert 0 not in skipped and total - 1 not in skipped
    assert _no_two_in_a_row(skipped)
    assert skipped == [e for e in range(total) if s.should_skip(e)]
    if kind in ("dp", "dr"):
        assert all(e >= total // 2 for e in skipped)
    assert 0.0 <= s.expected_saving() < 0.5


def test_labels_nominal_and_spec_round_trip():
    cases = {
        "pe:5": ("Pe=5", 1 / 5, Periodic),
        "pr:0.2": ("Pr=0.2", 0.2, Probabilistic),
        "dp:10": ("DP=10", 1 / 20, DelayedPeriodic),
        "dr:0.7": ("DR=0.7", 0.35, DelayedRandom),
    }
    for spec, (label, nominal, cls) in cases.items():
        s = parse_strategy(spec, epochs=200, seed=3)
        assert isinstance(s, cls)
        assert s.label == label and s.spec == spec
        assert s.nominal_saving == pytest.approx(nominal)
        assert parse_strategy(s.spec, epochs=200, seed=3) == s
        info = s.describe()
        assert info["strategy"] == label and info["realised_saving"] == s.realised_saving()
    assert parse_strategy("Pe=5") == Periodic(5)
    assert parse_strategy("periodic:3", seed=1) == Periodic(3, seed=1)


def test_parse_passes_strategies_through_and_fills_the_length():
    s = parse_strategy(DelayedPeriodic(5), epochs=40)
    assert s.epochs == 40 and s.skipped_epochs() == [25, 31, 37]


@pytest.mark.parametrize(
    ("make", "name"),
    [
        (lambda: Periodic(0), "P"),
        (lambda: Periodic(-3), "P"),
        (lambda: Periodic(2.5), "P"),  # type: ignore[arg-type]
        (lambda: DelayedPeriodic(0), "P"),
        (lambda: Probabilistic(1.0), "rho"),
        (lambda: Probabilistic(-0.1), "rho"),
        (lambda: DelayedRandom(1.5), "rho"),
        (lambda: Probabilistic(0.2, epochs=0), "epochs"),
        (lambda: Periodic(5, seed=1.5), "seed"),  # type: ignore[arg-type]
        (lambda: parse_strategy("pe:0"), "P"),
        (lambda: parse_strategy("pe:abc"), "P"),
        (lambda: parse_strategy("pr:1"), "rho"),
        (lambda: parse_strategy("pr:nan"), "rho"),
        (lambda: parse_strategy("dr:x"), "rho"),
        (lambda: parse_strategy("xx:5"), "unknown kind 'xx'"),
        (lambda: parse_strategy("pe"), "pe:5"),
        (lambda: parse_strategy(""), "pe:5"),
        (lambda: DelayedPeriodic(5).skipped_epochs(), "epochs"),
        (lambda: DelayedRandom(0.2).should_skip(3), "epochs"),
        (lambda: Periodic(5).skipped_epochs(), "epochs"),
        (lambda: Periodic(5, epochs=10).should_skip(10), "outside"),
        (lambda: Periodic(5).should_skip(-1), "epoch"),
    ],
)
def test_bad_options_raise_value_error_naming_the_option(make, name):
    with pytest.raises(ValueError, match=name) as info:
        make()
    assert isinstance(info.value, GreenpropError)


def test_rho_zero_never_samples():
    assert Probabilistic(0.0, epochs=50).skipped_epochs() == []
    assert isinstance(Probabilistic(0.0), Strategy)
