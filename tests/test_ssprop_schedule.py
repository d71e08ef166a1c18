"""Keep-ratio schedules: shapes, stepping, warmup, interleave, validation."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from greenprop.errors import GreenpropError
from greenprop.ssprop.schedule import SCHEDULE_KINDS, KeepSchedule, keep_shape


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("constant", [0.8, 0.8, 0.8, 0.8, 0.8]),
        ("linear", [0.8, 0.65, 0.5, 0.35, 0.2]),
        ("cosine", [0.8, 0.2 + 0.6 * (1 + math.cos(math.pi / 4)) / 2, 0.5, None, 0.2]),
        ("bar", [0.8, 0.8, 0.2, 0.2, 0.2]),
    ],
)
def test_per_epoch_shapes(kind, expected):
    sched = KeepSchedule(kind, keep=0.8, min_keep=0.2, epochs=5)
    got = [sched.keep_at(e) for e in range(5)]
    for g, e in zip(got, expected, strict=True):
        if e is not None:
            assert g == pytest.approx(e)
    assert got == [sched.keep_at(e, step=7) for e in range(5)]  # per epoch: step ignored


def test_bar_splits_even_runs_in_half():
    sched = KeepSchedule("bar", keep=0.6, min_keep=0.2, epochs=10)
    assert [sched.keep_at(e) for e in range(10)] == [0.6] * 5 + [0.2] * 5


def test_warmup_and_interleave():
    sched = KeepSchedule("constant", keep=0.2, warmup=2, interleave=True, epochs=8)
    assert [sched.keep_at(e) for e in range(8)] == [1.0, 1.0, 1.0, 0.2, 1.0, 0.2, 1.0, 0.2]
    # The paper's headline: keep 0.2 in interleaved sparse epochs saves 40%.
    headline = KeepSchedule("constant", keep=0.2, interleave=True, epochs=10, steps_per_epoch=3)
    assert headline.mean_keep() == pytest.approx(0.6)


def test_linear_progress_starts_after_warmup():
    sched = KeepSchedule("linear", keep=0.9, min_keep=0.3, warmup=1, epochs=4)
    assert [sched.keep_at(e) for e in range(4)] == pytest.approx([1.0, 0.9, 0.6, 0.3])


def test_per_iteration_with_period_repeats():
    sched = KeepSchedule("linear", keep=0.8, min_keep=0.2, period=4, steps_per_epoch=3)
    assert sched.per_step
    flat = [sched.keep_at(e, s) for e in range(3) for s in range(3)]
    assert flat == pytest.approx([0.8, 0.6, 0.4, 0.2, 0.8, 0.6, 0.4, 0.2, 0.8])
    bar = KeepSchedule("bar", keep=0.8, min_keep=0.2, period=4, steps_per_epoch=4)
    assert [bar.keep_at(0, s) for s in range(4)] == [0.8, 0.8, 0.2, 0.2]


def test_per_step_without_period_spans_the_run():
    sched = KeepSchedule("linear", keep=1.0, min_keep=0.5, per_step=True, epochs=2, steps_per_epoch=3)
    flat = [sched.keep_at(e, s) for e in range(2) for s in range(3)]
    assert flat == pytest.approx([1.0, 0.9, 0.8, 0.7, 0.6, 0.5])
    assert sched.mean_keep() == pytest.approx(0.75)


def test_period_one_and_single_epoch_stay_at_keep():
    assert KeepSchedule("linear", keep=0.7, min_keep=0.1, period=1, steps_per_epoch=5).keep_at(3, 2) == 0.7
    assert KeepSchedule("linear", keep=0.7, min_keep=0.1, epochs=1).keep_at(0) == 0.7


def test_missing_length_is_reported():
    sched = KeepSchedule("linear", keep=0.7, min_keep=0.1)
    with pytest.raises(GreenpropError, match="epochs"):
        sched.keep_at(1)
    assert sched.with_length(3, 2).keep_at(2) == pytest.approx(0.1)
    assert KeepSchedule("constant", keep=0.7).keep_at(100, 5) == 0.7  # needs no length


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"keep": 0.0}, "keep"),
        ({"keep": -0.5}, "keep"),
        ({"keep": 1.01}, "keep"),
        ({"kind": "exponential"}, "schedule"),
        ({"kind": "linear", "min_keep": 0.1, "period": -2}, "period"),
        ({"kind": "linear", "min_keep": 0.1, "period": 0}, "period"),
        ({"kind": "linear", "min_keep": 0.1, "period": 2.5}, "period"),
        ({"kind": "linear"}, "min_keep"),
        ({"min_keep": 0.0}, "min_keep"),
        ({"min_keep": 0.9}, "min_keep"),
        ({"warmup": -1}, "warmup"),
        ({"epochs": 0}, "epochs"),
        ({"steps_per_epoch": -1}, "steps_per_epoch"),
        ({"interleave": 1}, "interleave"),
    ],
)
def test_bad_options_raise_value_error_naming_them(kwargs, name):
    args = {"keep": 0.5, **kwargs}
    with pytest.raises(ValueError, match=name):
        KeepSchedule(**args)


def test_keep_shape_rejects_unknown_kind():
    with pytest.raises(ValueError, match="schedule"):
        keep_shape("step", 0.5, 0.8, 0.2)


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from(SCHEDULE_KINDS),
    st.floats(0.05, 1.0),
    st.floats(0.0, 1.0),
    st.integers(1, 12),
    st.integers(1, 7),
    st.one_of(st.none(), st.integers(1, 9)),
    st.integers(0, 3),
    st.booleans(),
    st.integers(0, 15),
    st.integers(0, 6),
)
def test_keep_is_always_in_range_and_pure(
    kind, keep, frac, epochs, spe, period, warmup, interleave, epoch, step
):
    min_keep = max(0.01, keep * frac)
    sched = KeepSchedule(
        kind,
        keep=keep,
        min_keep=min_keep,
        epochs=epochs,
        steps_per_epoch=spe,
        period=period,
        warmup=warmup,
        interleave=interleave,
    )
    value = sched.keep_at(epoch, min(step, spe - 1))
    assert value == sched.keep_at(epoch, min(step, spe - 1))  # pure
    assert value == 1.0 or min_keep - 1e-12 <= value <= keep + 1e-12
    if epoch < warmup or (interleave and epoch % 2 == 0):
        assert value == 1.0
    assert 0.0 < sched.mean_keep() <= 1.0
