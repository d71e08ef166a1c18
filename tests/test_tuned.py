"""``--tuned``: the same runtime settings for baseline and methods, recorded per run; the
CLI re-executes itself once with the glibc malloc tunables and keeps its exit code."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from greenprop.cli import main
from greenprop.train import tuning
from greenprop.train.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
QUICK = ["--dataset", "digits", "--model", "cnn", "--width", "4", "--epochs", "1", "--batch-size", "64"]
QUICK += ["--subset", "128", "--test-subset", "64", "--flops-samples", "4", "--no-progress"]


@pytest.fixture()
def keep_threads():
    """--tuned sets torch's thread count for the process: give the next test its own back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _bare_env(**extra: str) -> dict[str, str]:
    """This environment without the tunables or the re-exec marker, running this checkout's src."""
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", tuning.REEXEC_MARKER)}
    return {**env, "PYTHONPATH": str(ROOT / "src"), **extra}


def _greenprop(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "greenprop", *args]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)


def test_tuned_compare_applies_the_same_settings_to_baseline_and_method(
    tmp_path, capsys, monkeypatch, keep_threads
):
    torch.set_num_threads(2)
    monkeypatch.setattr(tuning, "tuned_threads", lambda processes=None: 1)  # differs from the 2 set
    out = tmp_path / "cmp"
    args = ["compare", *QUICK, "--tuned", "--no-frontier", "--methods", "baseline", "ssprop:keep=0.5"]
    assert main([*args, "--out", str(out)]) == 0
    runs = [json.loads(p.read_text()) for p in sorted(out.glob("*/seed0/metrics.json"))]
    assert sorted(r["method"]["label"] for r in runs) == ["baseline", "ssprop:keep=0.5"]
    for run in runs:
        env = run["environment"]
        assert run["config"]["tuned"] and run["config"]["channels_last"]
        assert env["tuned"] and env["channels_last"]
        assert env["threads"] == 1
        assert env["GLIBC_TUNABLES"] == os.environ.get("GLIBC_TUNABLES")  # what this process saw
    settings = ("tuned", "channels_last", "threads", "GLIBC_TUNABLES", "reexecuted_for_tunables")
    assert [{k: r["environment"][k] for k in settings} for r in runs].count(
        {k: runs[0]["environment"][k] for k in settings}
    ) == 2
    assert "Runtime settings: --tuned, for the baseline and every method alike" in capsys.readouterr().out
    report = (out / "report.md").read_text()
    assert report.startswith("# greenprop compare: cnn (--tuned)") and "Runtime settings: --tuned" in report


def test_untuned_runs_say_so():
    from greenprop.experiments.compare import RunResult
    from greenprop.experiments.report import tuning_line

    def result(tuned: bool) -> RunResult:
        env = {"tuned": tuned, "threads": 2, "channels_last": tuned, "GLIBC_TUNABLES": None}
        return RunResult("baseline", 0, Path("."), {"environment": env})

    assert tuning_line([result(False), result(False)]) == "Runtime settings: not tuned (no --tuned)."
    assert "MIXED" in tuning_line([result(True), result(False)])
    assert "2 threads, channels_last on, GLIBC_TUNABLES=unset" in tuning_line([result(True)])


def test_reexec_sets_the_tunables_once(monkeypatch):
    calls = []
    monkeypatch.setattr(tuning.os, "execve", lambda path, argv, env: calls.append((path, argv, env)))
    monkeypatch.setattr(tuning.sys, "platform", "linux")
    monkeypatch.delenv(tuning.REEXEC_MARKER, raising=False)
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.pthread.rseq=0")
    tuning.reexec_tuned(["train", "--tuned"])
    [(path, argv, env)] = calls
    assert argv == [sys.executable, "-m", "greenprop", "train", "--tuned"] and path == sys.executable
    assert env["GLIBC_TUNABLES"] == f"glibc.pthread.rseq=0:{tuning.MALLOC_TUNABLES}"  # kept, then ours
    assert env[tuning.REEXEC_MARKER] == "1"
    # The re-executed process does not go again, even should the variable have been dropped.
    monkeypatch.setenv(tuning.REEXEC_MARKER, "1")
    monkeypatch.delenv("GLIBC_TUNABLES")
    tuning.reexec_tuned(["train", "--tuned"])
    assert len(calls) == 1


def test_cli_reexecutes_with_the_tunables_and_keeps_the_exit_code(tmp_path):
    if not sys.platform.startswith("linux"):
        pytest.skip("the glibc malloc tunables are Linux only")
    out = tmp_path / "run"
    done = _greenprop(["train", *QUICK, "--tuned", "--out", str(out)], _bare_env())
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("done: acc@1") == 1  # one training, not two
    env = json.loads((out / "metrics.json").read_text())["environment"]
    assert env["GLIBC_TUNABLES"] == tuning.MALLOC_TUNABLES and env["reexecuted_for_tunables"]
    assert env["tuned"] and env["channels_last"] and env["threads"] == tuning.tuned_threads()
    # A failing run's exit code and one error line come through the re-exec unchanged.
    failed = _greenprop(
        ["train", *QUICK, "--tuned", "--epochs", "0", "--out", str(tmp_path / "x")], _bare_env()
    )
    assert failed.returncode == 2
    assert failed.stderr.strip().splitlines() == ["greenprop: error: epochs=0 must be a positive integer"]


def test_untuned_cli_does_not_reexecute(tmp_path):
    out = tmp_path / "run"
    done = _greenprop(["train", *QUICK, "--out", str(out)], _bare_env())
    assert done.returncode == 0, done.stderr[-2000:]
    env = json.loads((out / "metrics.json").read_text())["environment"]
    assert env["GLIBC_TUNABLES"] is None and not env["reexecuted_for_tunables"] and not env["tuned"]


def test_config_without_the_field_still_loads():
    saved = TrainConfig(dataset="digits").to_dict()
    del saved["tuned"]  # written before --tuned existed
    old = TrainConfig.from_dict(saved)
    assert not old.tuned and not old.channels_last
    assert old.differences(TrainConfig(dataset="digits")) == {}
    assert TrainConfig(tuned=True).channels_last  # tuned implies channels_last


def test_tuned_threads_share_the_physical_cores(monkeypatch):
    monkeypatch.setattr(tuning.psutil, "cpu_count", lambda logical=True: 8)
    monkeypatch.setattr(tuning.os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert tuning.tuned_threads() == 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # torch's launcher: processes on this machine
    assert tuning.tuned_threads() == 2
    assert tuning.tuned_threads(processes=2) == 4 and tuning.tuned_threads(processes=16) == 1
    monkeypatch.setattr(tuning.os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    assert tuning.tuned_threads(processes=1) == 3  # only the cores this process may run on
