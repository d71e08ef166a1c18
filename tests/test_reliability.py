"""Nothing lost, nothing trusted blindly: kills, signals, locks, full disks, foreign checkpoints.

The fault cases run the real CLI in a subprocess (tests/fault_runner.py injects the fault).
"""

from __future__ import annotations

import dataclasses
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from greenprop.cli import _TRAIN_OPTIONS, main
from greenprop.errors import GreenpropError
from greenprop.train.checkpoint import load_checkpoint, save_checkpoint
from greenprop.train.config import MAX_SEED, TrainConfig
from greenprop.train.lock import OutputLock
from greenprop.train.trainer import CHECKPOINT, METRICS, Trainer
from method_settings import SETTINGS

ROOT = Path(__file__).resolve().parents[1]
RUNNER = Path(__file__).with_name("fault_runner.py")
DEFAULTS = TrainConfig()


def _cli_args(config: TrainConfig) -> list[str]:
    """``greenprop train`` flags for ``config`` (fields that differ from the defaults)."""
    args = ["train", "--no-progress"]
    for flag, dest, _ in _TRAIN_OPTIONS:
        value = getattr(config, dest)
        if value != getattr(DEFAULTS, dest) and dest != "progress":
            args += [flag] if isinstance(value, bool) else [flag, str(value)]
    return args


def _run(fault: str, args: list[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT / 'tests'}"}
    return subprocess.run(
        [sys.executable, str(RUNNER), fault, "--", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=ROOT,
    )


def _reference_weights(config: TrainConfig) -> dict[str, torch.Tensor]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the runner does
    try:
        trainer = Trainer(config.replace(progress=False))
        trainer.fit()
    finally:
        torch.set_num_threads(threads)
    return trainer.model.state_dict()


def _one_line_error(proc: subprocess.CompletedProcess[str]) -> str:
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


# ---------------------------------------------------------------- SIGKILL, then --resume
KILL_CASES = [
    s if s.id in ("baseline", "gradsamp+ssprop") else pytest.param(s, marks=pytest.mark.slow)
    for s in SETTINGS
]


@pytest.mark.parametrize("setting", KILL_CASES, ids=[s.id for s in SETTINGS])
def test_sigkill_at_a_random_step_then_resume_gives_the_same_weights(setting, tmp_path):
    config = setting.config
    steps = -(-config.subset // config.batch_size)
    real_epochs = [e for e in range(config.epochs) if e not in setting.replaced]
    # After the first epoch's checkpoint, at a random step of a later real epoch.
    rng = random.Random(f"{setting.id}-{os.environ.get('PYTEST_XDIST_WORKER', '')}")
    later = [i for i, e in enumerate(real_epochs) if e >= 1]
    ordinal = rng.choice(later)
    batch = ordinal * steps + rng.randrange(steps) + 1
    out = tmp_path / "run"
    args = [*_cli_args(config), "--out", str(out)]
    killed = _run(f"signal:KILL:{batch}", args)
    assert killed.returncode == -signal.SIGKILL, (batch, killed.stderr)
    assert not (out / METRICS).exists() or '"complete": false' in (out / METRICS).read_text()
    (out / f".{CHECKPOINT}.abc123.tmp").write_bytes(b"half a checkpoint")  # a kill mid-write
    assert (out / ".greenprop.lock").exists()  # left by the killed run; recovered below
    resumed = _run("none", [*args, "--resume"])
    assert resumed.returncode == 0, resumed.stderr
    assert not list(out.glob(".*.tmp")), "stale temp files are removed on the next start"
    final = load_checkpoint(out / CHECKPOINT)
    assert final["epoch"] == config.epochs
    expected = _reference_weights(config)
    assert final["model"].keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(final["model"][name], tensor), f"{name} differs (killed at batch {batch})"


# ---------------------------------------------------------------- Ctrl-C and SIGTERM
@pytest.mark.parametrize(("name", "code"), [("INT", 130), pytest.param("TERM", 143, marks=pytest.mark.slow)])
def test_a_signal_stops_cleanly_with_one_line_and_resume_continues_exactly(name, code, tmp_path):
    config = SETTINGS[0].config  # 3 epochs of 4 steps
    out = tmp_path / "run"
    args = [*_cli_args(config), "--out", str(out)]
    stopped = _run(f"signal:{name}:7", args)  # epoch 2, step 3
    assert stopped.returncode == code, stopped.stderr
    line = _one_line_error(stopped)
    assert "interrupted in epoch 2/3 at step 3/4" in line
    assert "checkpoint after epoch 1 is kept" in line and "--resume" in line
    assert load_checkpoint(out / CHECKPOINT)["epoch"] == 1
    resumed = _run("none", [*args, "--resume"])
    assert resumed.returncode == 0, resumed.stderr
    expected = _reference_weights(config)
    final = load_checkpoint(out / CHECKPOINT)["model"]
    assert all(torch.equal(final[k], v) for k, v in expected.items())


def test_ctrl_c_in_a_round_robin_compare_then_the_same_command_gives_the_same_weights(tmp_path):
    base, ssprop = SETTINGS[0].config, SETTINGS[1].config  # 3 epochs of 4 steps each
    out = tmp_path / "cmp"
    args = ["compare", *_cli_args(base)[1:], "--methods", "baseline", ssprop.method, "--seeds", "0"]
    args += ["--no-frontier", "--out", str(out)]
    stopped = _run("signal:INT:11", args)  # round 2: baseline epoch 2 step 3 (ssprop has epoch 1)
    assert stopped.returncode == 130, stopped.stderr
    line = stopped.stderr.strip().splitlines()[-1]
    assert "interrupted in epoch 2/3 at step 3/4" in line and "run the same compare command again" in line
    assert "Traceback" not in stopped.stderr
    ssprop_dir = out / "ssprop_keep=0.5_selection=random" / "seed0"
    assert load_checkpoint(ssprop_dir / CHECKPOINT)["epoch"] == 1
    again = _run("none", args)
    assert again.returncode == 0, again.stderr
    for config, run_dir in ((base, out / "baseline" / "seed0"), (ssprop, ssprop_dir)):
        final = load_checkpoint(run_dir / CHECKPOINT)["model"]
        expected = _reference_weights(config.replace(seed=0))
        assert all(torch.equal(final[k], v) for k, v in expected.items()), config.method


# ---------------------------------------------------------------- one run per folder
def test_a_second_run_into_the_same_folder_is_refused_naming_the_holder(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    holder = OutputLock(out).acquire()  # as a running `greenprop train` holds it
    try:
        proc = _run("none", [*_cli_args(SETTINGS[0].config), "--out", str(out)])
    finally:
        holder.release()
    assert proc.returncode == 2
    line = _one_line_error(proc)
    assert f"in use by another greenprop run (pid {os.getpid()} on " in line and "started" in line
    assert not (out / METRICS).exists()


@pytest.mark.slow
def test_a_lock_left_by_a_killed_run_is_recovered(tmp_path):
    out = tmp_path / "run"
    args = [*_cli_args(SETTINGS[0].config), "--out", str(out)]
    assert _run("signal:KILL:6", args).returncode == -signal.SIGKILL
    assert (out / ".greenprop.lock").exists()
    assert _run("none", [*args, "--resume"]).returncode == 0


# ---------------------------------------------------------------- full disk
@pytest.mark.parametrize("file_name", [CHECKPOINT, METRICS])
def test_a_full_disk_is_one_line_and_keeps_the_previous_file(file_name, tmp_path):
    out = tmp_path / "run"
    args = [*_cli_args(SETTINGS[0].config), "--out", str(out)]
    proc = _run(f"enospc:{file_name}:2", args)  # epoch 1's write succeeds, epoch 2's fails
    assert proc.returncode == 2
    line = _one_line_error(proc)
    assert f"could not write {out / file_name} (No space left on device)" in line
    assert not list(out.glob(".*.tmp"))
    if file_name == CHECKPOINT:
        assert load_checkpoint(out / CHECKPOINT)["epoch"] == 1
    else:
        import json

        assert len(json.loads((out / METRICS).read_text())["epochs"]) == 1


def test_a_full_disk_while_writing_the_compare_report_or_a_plot(tmp_path):
    import greenprop.experiments.report as report_module
    import greenprop.train.checkpoint as checkpoint_module
    from greenprop.experiments.compare import run_compare

    config = SETTINGS[0].config.replace(epochs=1)
    results = run_compare(config, ["baseline"], [0], tmp_path)
    paths = report_module.write_report(results, tmp_path, title="t")
    real = checkpoint_module._open_temp
    for name in ("report.md", "results.csv", "curves.png", "accuracy_vs_saving.png"):
        good = paths_by_name(paths)[name].read_bytes()

        def open_temp(path, name=name):
            tmp, handle = real(path)
            if Path(path).name == name:
                from fault_runner import _FullDisk

                return tmp, _FullDisk(handle, room=16)
            return tmp, handle

        checkpoint_module._open_temp = open_temp
        try:
            with pytest.raises(
                GreenpropError, match=rf"could not write .*{name} \(No space left on device\)"
            ):
                report_module.write_report(results, tmp_path, title="t")
        finally:
            checkpoint_module._open_temp = real
        assert (tmp_path / name).read_bytes() == good
        assert not list(tmp_path.glob(".*.tmp"))


def paths_by_name(paths: dict[str, Path]) -> dict[str, Path]:
    return {p.name: p for p in paths.values()}


# ---------------------------------------------------------------- untrusted checkpoints
class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_a_checkpoint_carrying_a_pickled_callable_is_refused_and_never_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    assert main([*_cli_args(SETTINGS[0].config.replace(epochs=1)), "--out", str(run)]) == 0
    state = torch.load(run / CHECKPOINT, weights_only=True)
    state["history"] = [_RunsCode()]
    torch.save(state, run / CHECKPOINT)
    with pytest.raises(GreenpropError, match=r"refused without running them .*(posix|os)\.system"):
        load_checkpoint(run / CHECKPOINT)
    assert not (tmp_path / "pwned").exists()


@pytest.mark.slow
def test_every_methods_checkpoint_loads_with_weights_only(tmp_path):
    for setting in SETTINGS:
        out = tmp_path / setting.id
        Trainer(setting.config.replace(epochs=2), out).fit()
        torch.load(out / CHECKPOINT, weights_only=True)  # raises on anything but safe types


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        (lambda s: s.pop("config"), "not a greenprop checkpoint of this run (missing config)"),
        (
            lambda s: s["model"].pop(next(iter(s["model"]))),
            "not a greenprop checkpoint of this run (model tensors missing: ",
        ),
        (
            lambda s: s["model"].update({k: torch.zeros(3) for k in list(s["model"])[:1]}),
            "shapes differ (saved vs this model)",
        ),
        (lambda s: s.update(config={"epochs": "x"}), "not a greenprop checkpoint of this run (its config"),
    ],
    ids=["no-config", "missing-tensor", "bad-shape", "bad-config"],
)
def test_a_foreign_checkpoint_is_one_clear_line(damage, expected, tmp_path, capsys):
    args = [*_cli_args(SETTINGS[0].config.replace(epochs=2)), "--out", str(tmp_path / "run")]
    assert main(args) == 0
    path = tmp_path / "run" / CHECKPOINT
    state = torch.load(path, weights_only=True)
    state["epoch"] = 1
    damage(state)
    save_checkpoint(state, path)
    capsys.readouterr()
    assert main([*args, "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected in err, err


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--device", "meta"], "device='meta' cannot train"),
        (["--seed", str(2**63)], "seed=9223372036854775808 must be an integer in [0, "),
    ],
)
def test_bad_device_and_seed_are_one_line(flags, expected, tmp_path, capsys):
    args = [*_cli_args(SETTINGS[0].config.replace(epochs=1)), *flags, "--out", str(tmp_path / "r")]
    assert main(args) == 2
    assert expected in capsys.readouterr().err


def test_the_largest_seed_trains():
    config = dataclasses.replace(SETTINGS[0].config, epochs=1, seed=MAX_SEED, subset=64)
    Trainer(config).fit()


def test_a_list_split_on_commas_names_the_plus_syntax():
    from greenprop.methods import parse_method

    with pytest.raises(GreenpropError, match=r"list value joins with '\+' \(layers=conv\+linear\)"):
        parse_method("ssprop:layers=conv,linear")
    assert parse_method("ssprop:layers=conv+linear").options == {"layers": "conv+linear"}
