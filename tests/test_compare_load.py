"""compare under a busy machine: round-robin by epoch, exact slices, recorded background load."""

from __future__ import annotations

import json
import time

import pytest
import torch

from fixtures import digits_run
from greenprop.cli import main
from greenprop.experiments.compare import run_compare
from greenprop.experiments.round_robin import epoch_slices
from greenprop.metering import load as load_meter
from greenprop.train.signals import RunInterrupted
from greenprop.train.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = {"model": "mlp", "epochs": 2, "batch_size": 64, "subset": 128, "test_subset": 64}
METHODS = ["baseline", "ssprop:layers=linear,keep=0.5"]
CLI_SMALL = ["--dataset", "digits", "--model", "mlp", "--batch-size", "64", "--subset", "128"]
CLI_SMALL += ["--test-subset", "64", "--no-progress"]


def _slices(monkeypatch) -> list[tuple[str, int, int]]:
    """Record every trained epoch as (method, seed, epoch), in the order they ran."""
    seen: list[tuple[str, int, int]] = []
    real = Trainer._run_epoch

    def run_epoch(self, epoch):
        seen.append((self.config.method, self.config.seed, epoch))
        return real(self, epoch)

    monkeypatch.setattr(Trainer, "_run_epoch", run_epoch)
    return seen


def _weights(run_dir) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoint.pt", weights_only=True)["model"]


def _same_weights(a, b) -> bool:
    wa, wb = _weights(a), _weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_epoch_slices_interleave_runs_and_skip_finished_or_ahead_ones():
    done = {"a": 1, "b": 0, "c": 0}
    finished = {"a": False, "b": False, "c": True}
    order = []
    for run, epoch in epoch_slices(["a", "b", "c"], 3, done=done.get, finished=finished.get):
        order.append((run, epoch))
        done[run] = epoch
        if (run, epoch) == ("b", 2):
            finished["b"] = True  # b stops after its epoch 2 (diverged)
    assert order == [("b", 1), ("a", 2), ("b", 2), ("a", 3)]


def test_compare_trains_round_robin_by_epoch_and_slices_are_exact(tmp_path, monkeypatch, capsys):
    seen = _slices(monkeypatch)
    results = run_compare(digits_run(**SMALL), METHODS, [0, 1], tmp_path / "rr")
    base, ssprop = METHODS
    assert seen == [
        (base, 0, 0), (ssprop, 0, 0), (base, 1, 0), (ssprop, 1, 0),
        (base, 0, 1), (ssprop, 0, 1), (base, 1, 1), (ssprop, 1, 1),
    ]  # fmt: skip
    assert [(r.method, r.seed) for r in results] == [(base, 0), (ssprop, 0), (base, 1), (ssprop, 1)]
    assert all(r.metrics["complete"] for r in results)
    # Slicing changes nothing: the same run trained in one go ends with the same weights.
    alone = tmp_path / "alone"
    Trainer(digits_run(**SMALL, method=ssprop, seed=1), alone).fit()
    assert _same_weights(results[3].path, alone)
    alone_summary = json.loads((alone / "metrics.json").read_text())["summary"]
    assert alone_summary["acc1"] == results[3].metrics["summary"]["acc1"]


def test_an_interrupted_round_robin_compare_resumes_to_the_same_results(tmp_path, monkeypatch):
    config = digits_run(**SMALL)
    whole = run_compare(config, METHODS, [0], tmp_path / "whole")
    calls = []
    real = Trainer._run_epoch

    def interrupted(self, epoch):
        calls.append(epoch)
        if len(calls) == 3:  # the baseline's epoch 2: the ssprop run is one epoch behind
            raise KeyboardInterrupt
        return real(self, epoch)

    monkeypatch.setattr(Trainer, "_run_epoch", interrupted)
    stopped = r"checkpoint after epoch 1 is kept .*run the same compare command again"
    with pytest.raises(RunInterrupted, match=stopped):
        run_compare(config, METHODS, [0], tmp_path / "cut")
    monkeypatch.setattr(Trainer, "_run_epoch", real)
    seen = _slices(monkeypatch)
    again = run_compare(config, METHODS, [0], tmp_path / "cut")
    assert seen == [(METHODS[0], 0, 1), (METHODS[1], 0, 1)]  # each run goes on from its last epoch
    for a, b in zip(whole, again, strict=True):
        assert _same_weights(a.path, b.path)
        assert a.metrics["summary"]["acc1"] == b.metrics["summary"]["acc1"]
        assert a.metrics["summary"]["flops"] == b.metrics["summary"]["flops"]


def test_a_load_difference_marks_the_time_ratios_in_table_report_json_and_csv(tmp_path, monkeypatch, capsys):
    """Fake 1.5 busy cores of other work while the method (not the baseline) trains."""
    extra = {"cores": 0.0}
    real_epoch = Trainer._run_epoch

    def busy() -> float:  # the machine does nothing but this run and the faked work
        return load_meter.own_cpu_seconds() + extra["cores"] * time.perf_counter()

    def run_epoch(self, epoch):
        extra["cores"] = 0.0 if self.config.method == "baseline" else 1.5
        try:
            return real_epoch(self, epoch)
        finally:
            extra["cores"] = 0.0

    monkeypatch.setattr(load_meter, "machine_busy_seconds", busy)
    monkeypatch.setattr(Trainer, "_run_epoch", run_epoch)
    out = tmp_path / "cmp"
    args = ["compare", *CLI_SMALL, "--epochs", "2", "--no-frontier", "--out", str(out)]
    assert main([*args, "--methods", *METHODS]) == 0
    printed = capsys.readouterr().out
    assert "(load differs)" in printed and "WARNING: time ratios unreliable" in printed
    report = (out / "report.md").read_text()
    assert "(load differs)" in report and "WARNING: time ratios unreliable" in report
    saved = json.loads((out / "results.json").read_text())
    rows = {row["method"]: row for row in saved["rows"]}
    assert rows[METHODS[1]]["background_cores"] - rows["baseline"]["background_cores"] >= 1.4
    assert rows[METHODS[1]]["time_ratio_reliable"] is False
    assert rows["baseline"]["time_ratio_reliable"] is True
    assert all(run["load"]["epochs_measured"] == 2 for run in saved["runs"])
    assert "background_cores" in (out / "results.csv").read_text().splitlines()[0]
    metrics = json.loads((out / "ssprop_layers=linear_keep=0.5" / "seed0" / "metrics.json").read_text())
    assert all(epoch["load"]["background_cores"] >= 1.4 for epoch in metrics["epochs"])


def test_alike_loads_leave_the_time_ratios_unmarked(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", *CLI_SMALL, "--epochs", "1", "--out", str(out), "--methods", "baseline"]) == 0
    printed = capsys.readouterr().out
    assert "Background load while training" in printed and "load differs" not in printed
    row = json.loads((out / "results.json").read_text())["rows"][0]
    assert row["background_cores"] >= 0 and row["time_ratio_reliable"] is True
