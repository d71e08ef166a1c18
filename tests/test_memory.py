"""Peak memory: the meter resets per span, grows with what a span allocates, says what it measured."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fixtures import digits_run
from greenprop import Controller
from greenprop.experiments import report
from greenprop.experiments.compare import RunResult
from greenprop.metering import PeakMemory, memory
from greenprop.metering.memory import release_free_heap
from greenprop.train.trainer import METRICS, Trainer

MIB = 2**20
linux_rss = pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")


def _span_allocating(nbytes: int) -> memory.MemoryReading:
    """Peak memory of a span that writes ``nbytes`` of fresh tensor memory, then frees it."""
    release_free_heap()
    meter = PeakMemory("cpu")
    meter.start()
    held = torch.ones(nbytes // 4)  # ones, not empty: untouched pages are not resident
    del held
    return meter.stop()


@linux_rss
def test_cpu_peak_is_measured_reset_per_span_and_grows_with_the_allocation():
    big = _span_allocating(256 * MIB)
    small = _span_allocating(16 * MIB)  # after the big span: only a reset peak can read lower
    for reading in (big, small):
        assert reading.peak.kind == reading.at_start.kind == "measured"
        assert reading.peak.unit == "B" and "VmHWM" in reading.peak.source
        assert reading.peak.value >= reading.at_start.value > 0
    assert big.growth().value >= 250 * MIB
    assert small.growth().value < 100 * MIB
    assert big.peak.value - small.peak.value > 150 * MIB


def test_without_a_resettable_counter_a_lifetime_mark_is_not_passed_off(monkeypatch, tmp_path):
    # clear_refs not writable: the meter falls back to ru_maxrss, which a span that
    # allocates nothing does not raise, so it has no figure for that span.
    monkeypatch.setattr(memory, "CLEAR_REFS", tmp_path / "missing" / "clear_refs")
    meter = PeakMemory("cpu")
    meter.start()
    reading = meter.stop()
    assert reading.peak.kind == "unavailable" and reading.peak.value is None
    assert "ru_maxrss" in reading.peak.source
    assert reading.growth().value is None


def test_cuda_reads_the_allocator_peak_reset_at_the_start(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: calls.append("reset"))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 1000)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 5000)
    meter = PeakMemory("cuda:0")
    meter.start()
    assert calls == ["reset"]
    reading = meter.stop()
    assert (reading.at_start.value, reading.peak.value, reading.growth().value) == (1000, 5000, 4000)
    assert "max_memory_allocated(cuda:0)" in reading.peak.source


def test_other_devices_are_unavailable_and_stop_needs_start():
    meter = PeakMemory("meta")
    with pytest.raises(RuntimeError, match="before start"):
        meter.stop()
    meter.start()
    assert meter.stop().peak.value is None


class Ballast(Controller):
    """Holds ``nbytes`` of written memory from each step's start to its end: a step that needs more."""

    name = "ballast"

    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes
        self.held: torch.Tensor | None = None

    def on_step_start(self, epoch: int, step: int) -> None:
        self.held = torch.ones(self.nbytes // 4)

    def on_step_end(self, epoch: int, step: int, loss: float) -> None:
        self.held = None


@linux_rss
def test_metrics_record_peak_memory_per_epoch_and_a_step_that_allocates_more_reads_more(tmp_path, digits):
    growth = {}
    config = digits_run(model="mlp", width=32, epochs=2, batch_size=256, lr=0.01)
    for nbytes in (0, 128 * MIB):
        release_free_heap()
        metrics = Trainer(config, tmp_path / str(nbytes), controllers=[Ballast(nbytes)], data=digits).fit()
        records = json.loads((tmp_path / str(nbytes) / METRICS).read_text())["epochs"]
        for record in records:
            peak, at_start = record["memory"]["peak"], record["memory"]["at_start"]
            assert peak["kind"] == "measured" and peak["unit"] == "B" and "VmHWM" in peak["source"]
            assert peak["value"] >= at_start["value"] > 0
        peaks = [r["memory"]["peak"] for r in records]
        assert metrics["summary"]["peak_memory"] == max(peaks, key=lambda q: q["value"])
        growth[nbytes] = records[0]["memory"]["peak"]["value"] - records[0]["memory"]["at_start"]["value"]
    # The ballast is held above the step's own work (part of which it may reuse freed pages for).
    assert growth[128 * MIB] >= 0.95 * 128 * MIB and growth[128 * MIB] > growth[0] + 64 * MIB


def test_compare_table_shows_the_peak_in_mib(tmp_path):
    def run(method: str, peak: float | None) -> RunResult:
        quantity = {"value": peak, "unit": "B", "kind": "measured" if peak else "unavailable", "source": "s"}
        summary = {
            "epochs_run": 1,
            "epochs_replaced": 0,
            "acc1": 50.0,
            "acc5": 90.0,
            "flops": {k: {"value": 1e12} for k in ("forward", "backward")},
            "time": {"train": {"value": 1.0}},
            "energy": {"value": None, "kind": "unavailable", "source": "none"},
            "peak_memory": quantity,
        }
        return RunResult(method, 0, tmp_path, {"summary": summary})

    rows = report.aggregate([run("baseline", 300 * MIB), run("vcas", None)])
    assert [r["peak_memory_mib"] for r in rows] == [300.0, None]
    table = report.format_table(rows, markdown=True)
    assert "Peak mem (MiB)" in table.splitlines()[0]
    assert table.splitlines()[2].endswith("| 300 |") and table.splitlines()[3].endswith("| n/a |")


def test_the_run_peak_is_the_highest_epoch_and_old_records_are_not_zero():
    from greenprop.train.summary import _peak_memory

    def epoch(value: float | None) -> dict:
        kind = "unavailable" if value is None else "measured"
        return {"memory": {"peak": {"value": value, "unit": "B", "kind": kind, "source": "s"}}}

    assert _peak_memory([epoch(5.0), epoch(None), epoch(9.0), epoch(7.0)])["value"] == 9.0
    assert _peak_memory([epoch(None)])["kind"] == "unavailable"
    old = _peak_memory([{"epoch": 0}])  # written before peak memory was recorded
    assert old["value"] is None and "not recorded" in old["source"]


def test_tensor_bytes_counts_the_most_held_at_once_and_what_is_left():
    kept = []

    def span() -> None:
        a = torch.ones(MIB // 4)  # 1 MiB
        b = torch.ones(MIB // 2)  # 2 MiB: 3 held at once
        del a
        kept.append(torch.ones(MIB // 8))  # 0.5 MiB, still held at the end
        del b

    first, second = memory.tensor_bytes(span), memory.tensor_bytes(span)
    assert first == second  # the allocator's count, not the heap's layout: the same each time
    assert 3 * MIB <= first.peak < 3 * MIB + 64 * 1024
    assert MIB // 2 <= first.held < MIB // 2 + 64 * 1024
    assert memory.tensor_bytes(lambda: None) is None
