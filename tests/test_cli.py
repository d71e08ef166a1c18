"""The command line: a real run, the comparison report, and one-line errors for bad input."""

from __future__ import annotations

import json

import pytest

from fixtures import diverging_method
from greenprop.cli import main

QUICK = [
    "--dataset",
    "digits",
    "--model",
    "mlp",
    "--epochs",
    "1",
    "--batch-size",
    "64",
    "--subset",
    "256",
    "--test-subset",
    "128",
    "--no-progress",
]


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("greenprop: error: ")
    return err[0]


def test_compare_writes_table_report_and_plots(tmp_path, capsys):
    out_dir = tmp_path / "cmp"
    args = ["compare", *QUICK, "--methods", "baseline", "--seeds", "0", "1", "--out", str(out_dir)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "Acc@1" in printed and "baseline" in printed
    for name in ("results.csv", "results.json", "report.md", "accuracy_vs_saving.png", "curves.png"):
        assert (out_dir / name).stat().st_size > 0, name
    rows = json.loads((out_dir / "results.json").read_text())["rows"]
    assert rows[0]["method"] == "baseline" and rows[0]["seeds"] == [0, 1]
    assert rows[0]["flops_saved_pct"] == pytest.approx(0.0)
    assert rows[0]["acc1_std"] is not None
    report = (out_dir / "report.md").read_text()
    assert "greenprop compare" in report and "| baseline |" in report
    # Running the same command again reuses the finished runs instead of training.
    assert main(args) == 0
    assert "finished earlier, reusing" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--model", "nosuchnet"], "nosuchnet"),
        (["--dataset", "imagenet"], "imagenet"),
        (["--method", "magic"], "magic"),
        (["--epochs", "0"], "epochs=0"),
        (["--batch-size", "0"], "batch_size=0"),
    ],
)
def test_bad_options_give_one_error_line_and_exit_2(tmp_path, capsys, args, fragment):
    base = [a for a in QUICK]
    assert main(["train", *base, *args, "--out", str(tmp_path / "x")]) == 2
    assert fragment in _error_line(capsys)


def test_missing_data_dir_is_a_clear_error(tmp_path, capsys):
    missing = tmp_path / "nothing-here"
    args = [
        "train",
        "--dataset",
        "fashion-mnist",
        "--data-dir",
        str(missing),
        "--no-progress",
        "--out",
        str(tmp_path / "x"),
    ]
    assert main(args) == 2
    assert str(missing) in _error_line(capsys)


def test_unwritable_output_is_a_clear_error(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a folder")
    assert main(["train", *QUICK, "--out", str(blocker / "run")]) == 2
    assert "not writable" in _error_line(capsys)


def test_corrupt_checkpoint_on_resume(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint.pt").write_bytes(b"\x00garbage")
    assert main(["train", *QUICK, "--out", str(run), "--resume"]) == 2
    assert "corrupt" in _error_line(capsys)
    assert (run / "checkpoint.pt").read_bytes() == b"\x00garbage"


def test_existing_results_need_resume_or_overwrite(tmp_path, capsys):
    run = str(tmp_path / "run")
    assert main(["train", *QUICK, "--out", run]) == 0
    capsys.readouterr()
    assert main(["train", *QUICK, "--out", run]) == 2
    assert "--resume" in _error_line(capsys)


def test_methods_and_presets_list(capsys):
    assert main(["methods"]) == 0
    listed = capsys.readouterr().out
    assert "baseline" in listed and "mezo:" in listed and "    eps: perturbation scale" in listed
    assert "optimizers (--optimizer" in listed and "  adagrad\n    lr_decay:" in listed
    assert main(["presets"]) == 0
    assert "demo" in capsys.readouterr().out


def test_default_out_folder_slugs_the_model_spec(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["train", *QUICK, "--model", "mlp:activation=tanh"]
    assert main(args) == 0
    (folder,) = (tmp_path / "runs").iterdir()
    assert folder.name == "mlp_activation=tanh-baseline-seed0"
    assert (folder / "metrics.json").exists()


def test_compare_checks_every_method_before_training(tmp_path, capsys):
    args = ["compare", *QUICK, "--methods", "baseline", "ssprop:keep=1.5", "--out", str(tmp_path / "c")]
    assert main(args) == 2
    assert "keep" in _error_line(capsys)
    assert not (tmp_path / "c" / "baseline").exists()  # nothing was trained


@pytest.fixture
def poison_method():
    with diverging_method("poison-test", at=1):
        yield


def test_compare_records_a_diverged_method_and_goes_on(tmp_path, capsys, poison_method):
    out_dir = tmp_path / "cmp"
    args = ["compare", *QUICK, "--epochs", "2", "--methods", "baseline", "poison-test",
            "--seeds", "0", "1", "--no-frontier", "--out", str(out_dir)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "diverged" in printed
    rows = {r["method"]: r for r in json.loads((out_dir / "results.json").read_text())["rows"]}
    assert rows["poison-test"]["diverged"] == 2 and rows["poison-test"]["acc1_mean"] is None
    assert rows["baseline"]["diverged"] == 0 and rows["baseline"]["acc1_mean"] > 0
    saved = json.loads((out_dir / "poison-test" / "seed0" / "metrics.json").read_text())
    assert saved["diverged"]["epoch"] == 1 and len(saved["epochs"]) == 1
    # A second run reuses the recorded divergence instead of diverging again.
    assert main(args) == 0
    assert capsys.readouterr().out.count("finished earlier, reusing") == 4


def test_compare_with_vcas_plots_step_losses_and_the_controller(tmp_path, capsys):
    out_dir = tmp_path / "vcas"
    args = ["compare", "--dataset", "digits", "--model", "vit", "--width", "16", "--epochs", "2"]
    args += ["--batch-size", "128", "--optimizer", "adamw", "--lr", "0.003", "--seeds", "0", "--no-frontier"]
    assert main([*args, "--methods", "baseline", "vcas:update_every=3", "--out", str(out_dir)]) == 0
    assert "vcas:update_every=3" in capsys.readouterr().out
    for name in ("loss_steps.png", "vcas_ratios.png"):
        assert (out_dir / name).stat().st_size > 0, name
    report = (out_dir / "report.md").read_text()
    assert "loss_steps.png" in report and "vcas_ratios.png" in report
    rows = {row["method"]: row for row in json.loads((out_dir / "results.json").read_text())["rows"]}
    # Forward FLOPs grow by the estimation passes; backward differs by saving and overhead.
    assert rows["vcas:update_every=3"]["tflops_forward"] > rows["baseline"]["tflops_forward"]
    assert rows["vcas:update_every=3"]["tflops_backward"] != rows["baseline"]["tflops_backward"]


@pytest.mark.parametrize("command", ["presets", "methods"])
def test_a_closed_stdout_ends_quietly_with_sigpipes_status(command):
    """``greenprop presets | head``: the reader went away; no traceback, status 128 + SIGPIPE."""
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    src = Path(__file__).resolve().parents[1] / "src"
    env = {**os.environ, "PYTHONPATH": f"{src}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    process = subprocess.Popen(
        [sys.executable, "-m", "greenprop", command], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
    )
    process.stdout.close()  # the reader is gone before anything is written
    _, err = process.communicate(timeout=120)
    assert err.decode() == "" and process.returncode == 128 + signal.SIGPIPE
