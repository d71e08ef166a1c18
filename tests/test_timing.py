"""PhaseTimer with a fake clock, so every figure is exact."""

from __future__ import annotations

import pytest
import torch

from greenprop.metering import PhaseTimer, Quantity
from greenprop.metering import timing as timing_module


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def test_accumulates_per_phase() -> None:
    clock = FakeClock()
    timer = PhaseTimer(clock=clock)
    for _ in range(3):
        with timer.phase("forward"):
            clock.advance(1.0)
        with timer.phase("backward"):
            clock.advance(2.5)
        clock.advance(10.0)  # time outside any phase is not charged
    assert timer.totals() == {"forward": 3.0, "backward": 7.5}
    assert timer.counts() == {"forward": 3, "backward": 3}


def test_different_phases_nest() -> None:
    clock = FakeClock()
    timer = PhaseTimer(clock=clock)
    with timer.phase("step"):
        clock.advance(0.5)
        with timer.phase("forward"):
            clock.advance(1.0)
    assert timer.totals() == {"step": 1.5, "forward": 1.0}


def test_reentering_an_open_phase_raises() -> None:
    timer = PhaseTimer(clock=FakeClock())
    with (
        timer.phase("forward"),
        pytest.raises(RuntimeError, match="already being timed"),
        timer.phase("forward"),
    ):
        pass
    with timer.phase("forward"):  # usable again once closed
        pass
    assert timer.counts() == {"forward": 2}  # the refused entry is not counted


def test_time_is_charged_when_the_body_raises() -> None:
    clock = FakeClock()
    timer = PhaseTimer(clock=clock)
    with pytest.raises(KeyError), timer.phase("backward"):
        clock.advance(2.0)
        raise KeyError("x")
    assert timer.totals() == {"backward": 2.0}
    with timer.phase("backward"):  # the phase was closed despite the error
        clock.advance(1.0)
    assert timer.totals() == {"backward": 3.0}


def test_reset_and_quantities() -> None:
    clock = FakeClock()
    timer = PhaseTimer("cpu", clock=clock)
    with timer.phase("optimizer"):
        clock.advance(0.25)
    assert timer.to_quantities() == {
        "optimizer": Quantity(0.25, "s", "measured", "time.perf_counter")
    }
    with timer.phase("x"), pytest.raises(RuntimeError, match="open"):
        timer.reset()
    timer.reset()
    assert timer.totals() == {} and timer.to_quantities() == {}


def test_cpu_never_touches_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*args: object) -> None:
        raise AssertionError("CPU timing must not call torch.cuda")

    monkeypatch.setattr(torch.cuda, "synchronize", forbidden)
    timer = PhaseTimer(torch.device("cpu"))
    with timer.phase("forward"):
        pass
    assert timer.totals()["forward"] >= 0.0


def test_cuda_synchronizes_around_each_phase(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = FakeClock()
    events: list[str] = []
    monkeypatch.setattr(timing_module.torch.cuda, "synchronize", lambda d: events.append(str(d)))
    timer = PhaseTimer("cuda:0", clock=clock)
    with timer.phase("forward"):
        clock.advance(1.0)
    assert events == ["cuda:0", "cuda:0"]
    assert "synchronize" in timer.to_quantities()["forward"].source
