"""The dense frontier: budgets, interpolation on a synthetic table, and compare's frontier end to end."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from greenprop.cli import main
from greenprop.errors import GreenpropError
from greenprop.experiments.compare import RunResult
from greenprop.experiments.frontier import (
    ONE_SEED,
    budget_epochs,
    compare_with_frontier,
    cost_points,
    format_frontier_table,
    frontier_metrics,
    frontier_report,
    frontier_runs,
    frontier_text,
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


def _result(
    method: str, seed: int, epochs: int, flops: float, time: float, value: float | None,
    metric: tuple[str, bool] = ("acc1", True), **others: float | None,
) -> RunResult:
    """A finished run's metrics.json as the frontier reads it; ``metric``: (key, higher is better).

    An Acc@1 run names no task (as runs written before tasks existed), so the classification
    default is read; other metrics name theirs (with ``others``' keys after it).
    """
    key, higher = metric
    metrics = {
        "config": {"method": "baseline" if method.startswith(("baseline", "dense@")) else method,
                   "epochs": epochs},
        "complete": True,
        "summary": {
            key: value,
            **others,
            "flops": {"forward": {"value": flops / 3}, "backward": {"value": 2 * flops / 3}},
            "time": {"train": {"value": time}},
        },
    }
    if key != "acc1":
        listed = [key, *others]
        metrics["task"] = {"name": "test", "metrics": [
            {"key": k, "label": k.upper(), "higher_is_better": higher if k == key else False} for k in listed
        ]}
    return RunResult(method, seed, Path("."), metrics)


#: The same synthetic table in both directions: Acc@1 (higher is better) and a lower-is-better
#: score that is 100 minus it. Every verdict must come out the same; every Δ flips its sign.
DIRECTIONS = [
    pytest.param(("acc1", True), id="higher-is-better"),
    pytest.param(("fd", False), id="lower-is-better"),
]


@pytest.mark.parametrize("metric", DIRECTIONS)
def test_methods_are_matched_with_the_same_seeds_frontier_on_a_synthetic_table(metric):
    key, higher = metric
    value = (lambda acc: acc) if higher else (lambda acc: 100.0 - acc)
    sign = 1.0 if higher else -1.0

    def run(method, seed, epochs, flops, time, acc):
        return _result(method, seed, epochs, flops, time, value(acc), metric)

    # Frontier (FLOPs, time, acc) per seed: 1 ep (10, 1 s), 2 ep (20, 2 s), 4 ep (40, 4 s).
    results = []
    for seed, accs in ((0, (50.0, 70.0, 80.0)), (1, (54.0, 74.0, 84.0))):
        for epochs, acc in zip((4, 1, 2), (accs[2], accs[0], accs[1]), strict=True):
            name = "baseline" if epochs == 4 else f"dense@{epochs}ep"
            results.append(run(name, seed, epochs, 10.0 * epochs, 1.0 * epochs, acc))
    # The method: 15 FLOPs (halfway between 1 and 2 epochs), 3 s (halfway between 2 and 4 epochs).
    results += [run("m", 0, 4, 15.0, 3.0, 65.0), run("m", 1, 4, 15.0, 3.0, 66.0)]
    # A method cheaper than the smallest budget, and one dearer in time than full dense.
    results += [run("tiny", s, 4, 5.0, 0.5, 40.0) for s in (0, 1)]
    results += [run("slow", s, 4, 30.0, 5.0, 90.0 + s) for s in (0, 1)]
    diverged = run("lost", 0, 4, 15.0, 3.0, 0.0)
    diverged.metrics["diverged"] = {"epoch": 1}
    rows = {row["method"]: row for row in compare_with_frontier([*results, diverged])}
    assert rows.pop("lost")["verdict_flops"] == "no finished run (every seed diverged)"
    assert set(rows) == {"m", "tiny", "slow"}
    m = rows["m"]
    assert m["metrics"] == [key]
    # seed 0: dense 60 at 15 FLOPs, 75 at 3 s; seed 1: 64 and 79 (in Acc@1 terms).
    assert m[f"dense_{key}_at_flops"] == pytest.approx(value(62.0))
    assert m[f"delta_{key}_flops"] == pytest.approx(sign * (5.0 + 2.0) / 2)
    assert m[f"delta_{key}_flops_std"] == pytest.approx(2.1213203, rel=1e-6)  # stdev(5, 2)
    assert m[f"dense_{key}_at_time"] == pytest.approx(value(77.0))
    assert m[f"delta_{key}_time"] == pytest.approx(sign * (-10.0 - 13.0) / 2)
    # Above the frontier = better than dense, whichever way the metric points.
    assert m[f"verdict_{key}_flops"] == m["verdict_flops"] == "above the frontier"
    assert m[f"verdict_{key}_time"] == m["verdict_time"] == "below the frontier"
    assert rows["tiny"][f"dense_{key}_at_flops"] is None and rows["tiny"]["position_flops"] == "below"
    assert rows["slow"][f"position_{key}_time"] == rows["slow"]["position_time"] == "beyond"
    assert rows["slow"][f"dense_{key}_at_time"] == pytest.approx(value(82.0))  # full dense, mean of 80, 84
    assert "costs more than full dense" in rows["slow"]["verdict_time"]
    words = verdict_lines(list(rows.values()), frontier_metrics(results)[0])
    assert words[0].startswith("At the same FLOPs:") and "above the frontier: `m`, `slow`" in words[0]
    table = format_frontier_table(list(rows.values()), metric=frontier_metrics(results)[0])
    assert f"Δ {key.upper() if key != 'acc1' else 'Acc@1'}{'' if higher else ' ↓'} (FLOPs)" in table
    # Acc@1 in percentage points to 2 decimals (as always); other metrics to 4 significant digits.
    assert (" 62.00 " if higher else " 38 ") in table
    assert ("+3.50 ± 2.12" if higher else "-3.5 ± 2.121") in table


def test_perplexity_is_interpolated_in_its_logarithm_the_test_loss():
    assert interpolate([1.0, 3.0], [100.0, 10_000.0], 2.0, log=True) == (pytest.approx(1000.0), "inside")
    assert interpolate([1.0, 3.0], [100.0, 10_000.0], 2.0) == (pytest.approx(5050.0), "inside")
    assert interpolate([1.0, 3.0], [100.0, 10_000.0], 4.0, log=True) == (10_000.0, "beyond")
    assert interpolate([1.0, 3.0], [100.0, 10_000.0], 0.5, log=True) == (None, "below")
    # A causal LM's runs: perplexity = exp(test loss), so the loss is left out as a repeat.
    lm = ("ppl", False)
    dense = [
        _result("dense@1ep", 0, 1, 10.0, 1.0, math.exp(6.0), lm, test_loss=6.0),
        _result("baseline", 0, 3, 30.0, 3.0, math.exp(4.0), lm, test_loss=4.0),
    ]
    method = _result("m", 0, 3, 20.0, 2.5, math.exp(4.5), lm, test_loss=4.5)
    (metric,) = frontier_metrics([*dense, method])
    assert (metric.key, metric.higher_is_better, metric.log) == ("ppl", False, True)
    (row,) = compare_with_frontier([*dense, method])
    assert row["metrics"] == ["ppl"] and "delta_test_loss_flops" not in row
    # Halfway in FLOPs: dense's loss 5.0, so its perplexity e^5; the method's e^4.5 is lower: better.
    assert row["dense_ppl_at_flops"] == pytest.approx(math.exp(5.0))
    assert row["delta_ppl_flops"] == pytest.approx(math.exp(4.5) - math.exp(5.0))
    assert row["verdict_ppl_flops"] == "above the frontier" + ONE_SEED
    assert row["dense_ppl_at_time"] == pytest.approx(math.exp(4.5))  # 2.5 s: 3/4 of the way
    assert row["verdict_time"] == "on the frontier"


def test_each_task_metric_gets_its_frontier_and_an_unmeasured_one_says_so(tmp_path):
    # Diffusion: FD and the test noise MSE, both lower is better; FD unscored on one budget
    # and on the method "late".
    dense = [
        _result("dense@1ep", 0, 1, 10.0, 1.0, None, ("fd", False), test_loss=0.30),
        _result("dense@2ep", 0, 2, 20.0, 2.0, 150.0, ("fd", False), test_loss=0.20),
        _result("baseline", 0, 4, 40.0, 4.0, 100.0, ("fd", False), test_loss=0.10),
    ]
    methods = [
        _result("m", 0, 4, 30.0, 3.0, 130.0, ("fd", False), test_loss=0.14),
        _result("late", 0, 4, 15.0, 1.5, None, ("fd", False), test_loss=0.22),
    ]
    assert [m.key for m in frontier_metrics(dense)] == ["fd", "test_loss"]
    rows = {row["method"]: row for row in compare_with_frontier([*dense, *methods])}
    m, late = rows["m"], rows["late"]
    assert m["dense_fd_at_flops"] == pytest.approx(125.0) and m["delta_fd_flops"] == pytest.approx(5.0)
    assert m["verdict_fd_flops"] == "below the frontier" + ONE_SEED  # a higher FD is worse
    assert m["dense_test_loss_at_flops"] == pytest.approx(0.15)
    assert m["verdict_test_loss_flops"] == "above the frontier" + ONE_SEED  # a lower loss is better
    # "late" (15 FLOPs) lies under FD's cheapest measured point (20) but inside the loss's.
    assert late["verdict_fd_flops"] == "not measured (the method or every dense budget lacks this metric)"
    assert late["dense_test_loss_at_flops"] == pytest.approx(0.25)
    assert late["verdict_test_loss_flops"] == "above the frontier" + ONE_SEED
    assert late["verdict_flops"] == late["verdict_fd_flops"]  # the ranking metric's, under the old name
    # No dense budget scored: nothing to compare FD with (not "cheaper than the smallest budget").
    unscored = [
        _result(r.method, 0, r.metrics["config"]["epochs"], 10.0 * r.metrics["config"]["epochs"],
                1.0, None, ("fd", False), test_loss=r.metrics["summary"]["test_loss"])
        for r in dense
    ]
    (lone,) = compare_with_frontier([*unscored, methods[0]])
    assert lone["position_fd_flops"] == "unmeasured" and lone["dense_fd_at_flops"] is None
    _, lines, paths = frontier_report([*unscored, methods[0]], tmp_path)
    assert "No FD plot: no dense budget has it.\n" in lines
    assert sorted(path.name for path in paths.values()) == [
        "frontier_test_loss_flops.png",
        "frontier_test_loss_time.png",
    ]
    text = "\n".join(frontier_text(list(rows.values()), frontier_metrics(dense), markdown=True))
    assert "### FD ↓ (lower is better)" in text and "### TEST_LOSS ↓ (lower is better)" in text
    assert "- FD ↓, at the same FLOPs: below the frontier (one seed: no spread to judge by): `m`" in text


@pytest.mark.parametrize("metric", DIRECTIONS)
def test_the_frontier_plot_puts_better_up(metric, tmp_path, monkeypatch):
    from greenprop.experiments import plots

    higher = metric[1]
    drawn = []
    monkeypatch.setattr(plots, "save_figure", lambda fig, path, **kwargs: drawn.append(fig))
    results = [
        _result("dense@1ep", 0, 1, 10.0, 1.0, 50.0, metric),
        _result("baseline", 0, 2, 20.0, 2.0, 80.0 if higher else 20.0, metric),
        _result("m", 0, 2, 15.0, 1.5, 70.0 if higher else 30.0, metric),
    ]
    (frontier_metric,) = frontier_metrics(results)
    plots.plot_frontier(cost_points(results), "flops", tmp_path / "f.png", frontier_metric)
    (ax,) = drawn[0].axes
    assert bool(ax.yaxis_inverted()) is (not higher)
    assert ("lower is better" in ax.get_ylabel()) is (not higher)
    top = ax.get_ylim()[1]  # the value drawn at the top (the smaller one when inverted)
    better, worse = (80.0, 50.0) if higher else (20.0, 50.0)
    assert (top - better) ** 2 < (top - worse) ** 2  # the better dense point is nearer the top


def test_a_perplexity_frontier_plot_is_logarithmic(tmp_path, monkeypatch):
    from greenprop.experiments import plots

    drawn = []
    monkeypatch.setattr(plots, "save_figure", lambda fig, path, **kwargs: drawn.append(fig))
    lm = ("ppl", False)
    results = [_result("dense@1ep", 0, 1, 10.0, 1.0, 900.0, lm)]
    results.append(_result("baseline", 0, 2, 20.0, 2.0, 30.0, lm))
    plots.plot_frontier(cost_points(results), "time", tmp_path / "f.png", frontier_metrics(results)[0])
    assert drawn[0].axes[0].get_yscale() == "log" and bool(drawn[0].axes[0].yaxis_inverted())


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
