"""The dense frontier: budgets, interpolation on a synthetic table, and compare's frontier end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from greenprop.cli import main
from greenprop.errors import GreenpropError
from greenprop.experiments.compare import RunResult
from greenprop.experiments.frontier import (
    budget_epochs,
    compare_with_frontier,
    frontier_runs,
    interpolate,
    verdict_lines,
)
from greenprop.train.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
QUICK = ["--dataset", "digits", "--model", "mlp", "--batch-size", "64", "--subset", "256",
         "--test-subset", "128", "--no-progress", "--seeds", "0"]
METHOD = "ssprop:keep=0.5,layers=linear"


@pytest.mark.parametrize(
    ("epochs", "fractions", "expected"),
    [
        (4, (0.25, 0.5, 0.75), [1, 2, 3]),
        (20, (0.25, 0.5, 0.75), [5, 10, 15]),
        (6, (0.25, 0.5, 0.75), [2, 3, 5]),  # 1.5 and 4.5 round half up
        (2, (0.25, 0.5, 0.75), [1]),  # 0.75 of 2 rounds to the full budget: the baseline itself
        (1, (0.25, 0.5, 0.75), []),
    ],
)
def test_budgets_are_the_asked_shares_of_the_epochs(epochs, fractions, expected):
    assert budget_epochs(epochs, fractions) == expected


@pytest.mark.parametrize("bad", [0.0, 1.0, 1.5, -0.25])
def test_a_budget_outside_0_1_is_refused_naming_it(bad):
    with pytest.raises(GreenpropError, match=str(bad)):
        budget_epochs(8, (0.5, bad))


def test_frontier_runs_are_the_baseline_with_fewer_epochs_and_a_shrunk_step_schedule():
    base = TrainConfig(method="ssprop:keep=0.5", epochs=20, lr_schedule="step", step_size=8, lr=0.1)
    runs = frontier_runs(base, (0.25, 0.5))
    assert [label for label, _ in runs] == ["dense@5ep", "dense@10ep"]
    assert [(c.method, c.epochs, c.step_size) for _, c in runs] == [("baseline", 5, 2), ("baseline", 10, 4)]
    assert all(c.lr == 0.1 and c.lr_schedule == "step" for _, c in runs)


def test_interpolation_is_piecewise_linear_inside_and_says_where_outside():
    costs, accs = [4.0, 1.0, 2.0], [40.0, 10.0, 30.0]  # unsorted on purpose
    assert interpolate(costs, accs, 1.5) == (pytest.approx(20.0), "inside")
    assert interpolate(costs, accs, 3.0) == (pytest.approx(35.0), "inside")
    assert interpolate(costs, accs, 2.0) == (pytest.approx(30.0), "inside")
    assert interpolate(costs, accs, 0.5) == (None, "below")
    assert interpolate(costs, accs, 5.0) == (40.0, "beyond")


def _result(method: str, seed: int, epochs: int, flops: float, time: float, acc1: float) -> RunResult:
    metrics = {
        "config": {"method": "baseline" if method.startswith(("baseline", "dense@")) else method,
                   "epochs": epochs},
        "complete": True,
        "summary": {
            "acc1": acc1,
            "flops": {"forward": {"value": flops / 3}, "backward": {"value": 2 * flops / 3}},
            "time": {"train": {"value": time}},
        },
    }
    return RunResult(method, seed, Path("."), metrics)


def test_methods_are_matched_with_the_same_seeds_frontier_on_a_synthetic_table():
    # Frontier (FLOPs, time, acc) per seed: 1 ep (10, 1 s), 2 ep (20, 2 s), 4 ep (40, 4 s).
    results = []
    for seed, accs in ((0, (50.0, 70.0, 80.0)), (1, (54.0, 74.0, 84.0))):
        for epochs, acc in zip((4, 1, 2), (accs[2], accs[0], accs[1]), strict=True):
            name = "baseline" if epochs == 4 else f"dense@{epochs}ep"
            results.append(_result(name, seed, epochs, 10.0 * epochs, 1.0 * epochs, acc))
    # The method: 15 FLOPs (halfway between 1 and 2 epochs), 3 s (halfway between 2 and 4 epochs).
    results += [_result("m", 0, 4, 15.0, 3.0, 65.0), _result("m", 1, 4, 15.0, 3.0, 66.0)]
    # A method cheaper than the smallest budget, and one dearer in time than full dense.
    results += [_result("tiny", s, 4, 5.0, 0.5, 40.0) for s in (0, 1)]
    results += [_result("slow", s, 4, 30.0, 5.0, 90.0 + s) for s in (0, 1)]
    diverged = _result("lost", 0, 4, 15.0, 3.0, 0.0)
    diverged.metrics["diverged"] = {"epoch": 1}
    rows = {row["method"]: row for row in compare_with_frontier([*results, diverged])}
    assert rows.pop("lost")["verdict_flops"] == "no finished run (every seed diverged)"
    assert set(rows) == {"m", "tiny", "slow"}
    m = rows["m"]
    # seed 0: dense 60 at 15 FLOPs, 75 at 3 s; seed 1: 64 and 79.
    assert m["dense_acc1_at_flops"] == pytest.approx(62.0)
    assert m["delta_acc1_flops"] == pytest.approx((5.0 + 2.0) / 2)
    assert m["delta_acc1_flops_std"] == pytest.approx(2.1213203, rel=1e-6)  # stdev(5, 2)
    assert m["dense_acc1_at_time"] == pytest.approx(77.0)
    assert m["delta_acc1_time"] == pytest.approx((-10.0 - 13.0) / 2)
    assert m["verdict_flops"] == "above the frontier" and m["verdict_time"] == "below the frontier"
    assert rows["tiny"]["dense_acc1_at_flops"] is None and rows["tiny"]["position_flops"] == "below"
    assert rows["slow"]["position_time"] == "beyond"
    assert rows["slow"]["dense_acc1_at_time"] == pytest.approx(82.0)  # full dense, mean of 80 and 84
    assert "costs more than full dense" in rows["slow"]["verdict_time"]
    words = verdict_lines(list(rows.values()))
    assert words[0].startswith("At the same FLOPs:") and "above the frontier: `m`, `slow`" in words[0]


def test_no_frontier_without_a_second_budget():
    results = [_result("baseline", 0, 4, 40.0, 4.0, 80.0), _result("m", 0, 4, 15.0, 3.0, 65.0)]
    assert compare_with_frontier(results) == []


def _dense_flops(out: Path, label: str) -> float:
    summary = json.loads((out / label / "seed0" / "metrics.json").read_text())["summary"]
    return summary["flops"]["forward"]["value"] + summary["flops"]["backward"]["value"]


def test_compare_trains_the_frontier_reports_it_and_reuses_it(tmp_path, capsys):
    out = tmp_path / "cmp"
    args = ["compare", *QUICK, "--epochs", "4", "--methods", "baseline", METHOD, "--out", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "dense frontier at 1, 2, 3 of 4 epochs" in printed
    assert "Against the dense frontier" in printed and "At the same FLOPs:" in printed
    data = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in data["rows"]] == ["baseline", METHOD, "dense@1ep", "dense@2ep", "dense@3ep"]
    # The baseline is the frontier's full budget: trained once, not again as dense@4ep.
    assert not (out / "dense_4ep").exists()
    full = _dense_flops(out, "baseline")
    for epochs in (1, 2, 3):  # counted FLOPs scale with the epochs
        assert _dense_flops(out, f"dense_{epochs}ep") == pytest.approx(full * epochs / 4, rel=1e-9)
        config = json.loads((out / f"dense_{epochs}ep" / "seed0" / "metrics.json").read_text())["config"]
        assert config["epochs"] == epochs and config["method"] == "baseline"
    (row,) = data["frontier"]
    assert row["method"] == METHOD and row["position_flops"] == "inside"
    assert row["delta_acc1_flops"] is not None and row["delta_acc1_flops_std"] is None  # one seed
    report = (out / "report.md").read_text()
    assert "## Against the dense frontier" in report and "frontier_flops.png" in report
    for name in ("frontier_flops.png", "frontier_time.png"):
        assert (out / name).stat().st_size > 0
    assert main(args) == 0
    assert capsys.readouterr().out.count("finished earlier, reusing") == 5


def test_no_frontier_and_chosen_budgets(tmp_path, capsys):
    out = tmp_path / "cmp"
    base = ["compare", *QUICK, "--epochs", "2", "--methods", "baseline", METHOD]
    assert main([*base, "--no-frontier", "--out", str(out)]) == 0
    data = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in data["rows"]] == ["baseline", METHOD] and data["frontier"] == []
    assert not (out / "frontier_flops.png").exists()
    assert "Against the dense frontier" not in capsys.readouterr().out
    # The same folder with the frontier: the two runs are reused, only dense@1ep trains.
    assert main([*base, "--frontier-budgets", "0.5", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.count("finished earlier, reusing") == 2 and "training dense@1ep seed 0" in printed
    assert main([*base, "--frontier-budgets", "1.5", "--out", str(out)]) == 2
    assert "1.5" in capsys.readouterr().err
    assert main([*base, "--no-frontier", "--frontier-budgets", "0.5", "--out", str(out)]) == 2


@pytest.mark.slow  # a subprocess and two comparisons: ~45 s on the busy 2-core machine
def test_a_compare_with_frontier_interrupted_resumes_to_the_same_table(tmp_path, capsys):
    """Ctrl-C mid-comparison, then the same command: every run (frontier too) completes."""
    out = tmp_path / "cmp"
    args = ["compare", *QUICK, "--epochs", "3", "--methods", "baseline", METHOD, "--out", str(out)]
    # 4 steps per epoch, 36 batches in all; one after the first epochs of every run in
    # sequence (dense@2ep's 2nd epoch) or round-robin by epoch (the method's 3rd).
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT / 'tests'}"}
    stopped = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "fault_runner.py"), "signal:INT:34", "--", *args],
        capture_output=True, text=True, timeout=300, env=env, cwd=ROOT,
    )
    assert stopped.returncode == 130, stopped.stderr
    assert "interrupted" in stopped.stderr
    assert main(args) == 0
    assert "resuming" in capsys.readouterr().out
    expected = {"baseline": 3, "ssprop_keep=0.5_layers=linear": 3, "dense_1ep": 1, "dense_2ep": 2}
    for label, epochs in expected.items():
        metrics = json.loads((out / label / "seed0" / "metrics.json").read_text())
        assert metrics["complete"] and len(metrics["epochs"]) == epochs, label
    assert json.loads((out / "results.json").read_text())["frontier"][0]["method"] == METHOD
