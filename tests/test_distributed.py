"""Data-parallel training: 2 gloo processes on loopback for every method, resume, launcher, failures.

The multi-process runs are real: torchrun (``torch.distributed.run``) starts
``tests/ddp_worker.py`` for every method setting of ``method_settings.SETTINGS`` (and the
ssProp settings whose ranks select differently, ``PER_RANK_SETTINGS``) at once,
and ``greenprop train --nproc 2`` goes through greenprop's own launcher. Every launch
has a deadline: a rank that waits for a collective the others never join fails the
test instead of hanging it, and the launcher with its workers is stopped in any case.
"""

from __future__ import annotations

import json
import os
import random
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from greenprop.cli import main
from greenprop.errors import GreenpropError
from greenprop.train.checkpoint import load_checkpoint
from greenprop.train.distributed import DataParallel, Shard, SingleProcess
from greenprop.train.trainer import CHECKPOINT, METRICS, Trainer
from method_settings import PER_RANK_SETTINGS, SETTINGS
from test_reliability import _cli_args as cli_args

ROOT = Path(__file__).resolve().parents[1]
#: Every setting 2 ranks train; all but the timing-calibrated one also resume exactly.
DDP_SETTINGS = [s for s in (*SETTINGS, *PER_RANK_SETTINGS) if s.distributed]
DDP_IDS = [s.id for s in DDP_SETTINGS]
EXACT_RESUME = [s for s in DDP_SETTINGS if "calibrate" not in s.config.method]
TORCHRUN = [
    *(sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"),
    *("--rdzv-backend", "c10d", "--rdzv-endpoint", "127.0.0.1:0", "--local-addr", "127.0.0.1"),
]
TINY = ["--dataset", "digits", "--model", "cnn", "--epochs", "2", "--batch-size", "64"]
TINY += ["--subset", "256", "--test-subset", "128", "--flops-samples", "8", "--no-progress"]


def run_bounded(command: list[str], timeout: float, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    """Run a launcher; past ``timeout`` stop it (it stops its workers) and fail the test."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        command, cwd=cwd, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)  # the elastic agent stops its workers on SIGTERM
        try:
            out, err = proc.communicate(timeout=40)
        except subprocess.TimeoutExpired:
            proc.kill()  # the workers die with it (PR_SET_PDEATHSIG)
            out, err = proc.communicate()
        pytest.fail(f"{command[2:5]} hung for more than {timeout} s:\n{err[-3000:]}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return subprocess.CompletedProcess(command, proc.returncode, out, err)


def assert_stopped(folder: Path) -> None:
    """Every worker that wrote its pid to ``folder`` has exited."""
    pids = [int(p.read_text()) for p in folder.glob("pid*")]
    assert len(pids) == 2
    deadline = time.monotonic() + 10
    for pid in pids:
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(pid), f"worker {pid} outlived its launcher"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split(")")[-1].split()[0] == "Z")


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every method setting trained by 2 ranks: uninterrupted, then cut and resumed."""
    out = tmp_path_factory.mktemp("ddp")
    result = run_bounded([*TORCHRUN, "tests/ddp_worker.py", str(out), *DDP_IDS], timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_stopped(out)
    return out


def load_ranks(folder: Path) -> list[dict[str, Any]]:
    return [torch.load(folder / f"rank{r}.pt", weights_only=True) for r in range(2)]


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"differ: {different[:5]}"


# --------------------------------------------------------------------- 2 ranks, every method
@pytest.mark.parametrize("setting", DDP_SETTINGS, ids=DDP_IDS)
def test_ranks_end_with_identical_models(ddp_runs, setting):
    rank0, rank1 = load_ranks(ddp_runs / setting.id)
    assert_same_tensors(rank0["full"], rank1["full"])  # parameters and BatchNorm buffers
    assert rank0["full_state"] == rank1["full_state"]  # GradSamp's sampled epochs, VCAS's ratios
    metrics = json.loads((ddp_runs / setting.id / "full" / "metrics.json").read_text())
    dist = metrics["distributed"]
    assert (dist["world_size"], dist["backend"], dist["master_addr"]) == (2, "gloo", "127.0.0.1")
    assert dist["parameter_spread"] == 0.0
    replaced = [r["epoch"] for r in metrics["epochs"] if r["replaced_by"]]
    assert replaced == list(setting.replaced)
    assert all(r["steps"] == 0 for r in metrics["epochs"] if r["replaced_by"])


@pytest.mark.parametrize("setting", EXACT_RESUME, ids=[s.id for s in EXACT_RESUME])
def test_resume_under_ddp_equals_the_uninterrupted_run(ddp_runs, setting):
    for rank in load_ranks(ddp_runs / setting.id):
        assert_same_tensors(rank["full"], rank["resumed"])
        assert rank["full_state"] == rank["resumed_state"]
    cut = json.loads((ddp_runs / setting.id / "cut" / "metrics.json").read_text())
    full = json.loads((ddp_runs / setting.id / "full" / "metrics.json").read_text())
    assert [r["loss"] for r in cut["epochs"]] == [r["loss"] for r in full["epochs"]]


def test_gradsamp_samples_the_same_epochs_on_both_ranks(ddp_runs):
    for setting in SETTINGS:
        if "gradsamp" in setting.controllers:
            sampled = [rank["full_state"]["sampled"] for rank in load_ranks(ddp_runs / setting.id)]
            assert sampled == [list(setting.replaced)] * 2


def test_vcas_adapts_the_same_ratios_on_both_ranks(ddp_runs):
    rank0, rank1 = load_ranks(ddp_runs / "vcas")
    assert rank0["full_state"]["vcas"] == rank1["full_state"]["vcas"]
    assert rank0["full_state"]["vcas"]["s"] != 0.5  # the ratios moved: the pooled estimates were used
    vcas = json.loads((ddp_runs / "vcas" / "full" / "metrics.json").read_text())["epochs"][-1]["vcas"]
    assert vcas["updates"] > 0


@pytest.mark.parametrize("method", ["baseline", "ssprop"])
def test_counted_flops_are_the_single_process_run_s(ddp_runs, method):
    """The total batch is split over the ranks: summed FLOPs equal one process's."""
    setting = next(s for s in SETTINGS if s.id == method)
    single = Trainer(setting.config).fit()["summary"]["flops"]
    ddp = json.loads((ddp_runs / method / "full" / "metrics.json").read_text())["summary"]["flops"]
    for phase in ("forward", "backward"):
        assert ddp[phase]["value"] == pytest.approx(single[phase]["value"], rel=1e-9)


def test_a_failing_rank_stops_the_others(tmp_path):
    start = time.monotonic()
    result = run_bounded([*TORCHRUN, "tests/ddp_worker.py", str(tmp_path), "--fail-rank", "1"], timeout=120)
    assert result.returncode != 0
    assert "rank 1 fails on purpose" in result.stderr
    assert time.monotonic() - start < 60  # not the collective's 60 s timeout: the launcher stopped rank 0
    assert_stopped(tmp_path)


def test_ranks_that_call_different_collectives_fail_instead_of_hanging(tmp_path):
    """What a skip decision taken on one rank only would do: the run fails within the timeout."""
    command = [*TORCHRUN, "tests/ddp_worker.py", str(tmp_path), "--skip-rank", "1", "--timeout", "10"]
    result = run_bounded(command, timeout=150)
    assert result.returncode != 0
    assert re.search(r"[Tt]imed out waiting 10000ms", result.stderr)  # gloo's timeout ended it
    assert_stopped(tmp_path)


@pytest.mark.slow
def test_a_ddp_run_killed_by_sigkill_resumes_to_the_uninterrupted_weights(tmp_path):
    """Both ranks SIGKILLed at a random step of a later real epoch; ``--resume`` under torchrun."""
    setting = next(s for s in SETTINGS if s.id == "gradsamp+ssprop")  # epoch 2 is sampled
    steps = 4  # 256 examples, 128 per rank, 32 a step
    batch = random.Random("ddp-sigkill").randrange(steps + 1, 3 * steps) + 1  # in epoch 1 or 3
    args = [*cli_args(setting.config)]
    runner = [*TORCHRUN, str(ROOT / "tests" / "fault_runner.py")]
    killed = run_bounded([*runner, f"signal:KILL:{batch}", "--", *args, "--out", "run"], 180, tmp_path)
    assert killed.returncode != 0 and "Signal 9 (SIGKILL)" in killed.stderr, killed.stderr[-2000:]
    assert not json.loads((tmp_path / "run" / METRICS).read_text())["complete"]
    assert load_checkpoint(tmp_path / "run" / CHECKPOINT)["epoch"] in (1, 3)  # resumes mid-run
    resumed = run_bounded([*runner, "none", "--", *args, "--out", "run", "--resume"], 180, tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    whole = run_bounded([*runner, "none", "--", *args, "--out", "whole"], 180, tmp_path)
    assert whole.returncode == 0, whole.stderr[-2000:]
    final, expected = (load_checkpoint(tmp_path / name / CHECKPOINT) for name in ("run", "whole"))
    assert final["epoch"] == expected["epoch"] == setting.config.epochs
    assert_same_tensors(final["model"], expected["model"])


# --------------------------------------------------------------------- greenprop train --nproc
def test_greenprop_train_nproc_runs_ddp_and_reports_errors_once(tmp_path, capsys):
    out = tmp_path / "run"
    command = [sys.executable, "-m", "greenprop", "train", "--nproc", "2", *TINY, "--out", str(out)]
    done = run_bounded(command, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("done: acc@1") == 1  # rank 0 reports, rank 1 is quiet
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["complete"] and metrics["distributed"]["world_size"] == 2
    assert metrics["distributed"]["parameter_spread"] == 0.0
    assert torch.load(out / "checkpoint.pt", weights_only=False)["world_size"] == 2
    # Both workers refuse to overwrite: the launcher prints the error once, as one line.
    again = run_bounded(command, timeout=120)
    assert again.returncode == 2
    errors = [line for line in again.stderr.splitlines() if "error" in line.lower()]
    assert errors == [
        f"greenprop: error: {out} already holds results; pass --resume to continue them "
        "or --overwrite to replace them"
    ]
    # One process cannot continue what two started: the data order would differ.
    assert main(["train", *TINY, "--out", str(out), "--resume"]) == 2
    assert "written by a run on 2 process(es), this run has 1" in capsys.readouterr().err


def test_a_method_that_replaces_the_step_is_refused_under_ddp_in_one_line(tmp_path):
    refused = [s for s in SETTINGS if not s.distributed]
    assert refused, "a setting marked distributed=False is expected (MeZO)"
    for setting in refused:
        command = [sys.executable, "-m", "greenprop", "train", "--nproc", "2", *TINY]
        command += ["--method", setting.config.method, "--out", str(tmp_path / setting.id)]
        done = run_bounded(command, timeout=120)
        assert done.returncode == 2, done.stderr[-3000:]
        errors = [line for line in done.stderr.splitlines() if "error" in line.lower()]
        assert len(errors) == 1 and "replaces the training step" in errors[0], errors


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--nproc", "3"], "--nproc 3 must be a positive divisor of batch_size=64"),
        (["--nproc", "0"], "--nproc 0 must be a positive divisor"),
        (["--dist-timeout", "nan"], "--dist-timeout nan must be a positive number of seconds"),
    ],
)
def test_bad_launch_options_are_one_clear_error(tmp_path, capsys, extra, message):
    assert main(["train", *TINY, "--out", str(tmp_path / "x"), *extra]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_nproc_inside_torchrun_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert main(["train", *TINY, "--out", str(tmp_path / "x"), "--nproc", "2"]) == 2
    err = capsys.readouterr().err
    assert "(rank 1) --nproc inside torchrun" in err


# --------------------------------------------------------------------- docs/distributed.md
DOC = ROOT / "docs" / "distributed.md"
#: How the doc's commands run here: this interpreter, this checkout's greenprop.
LAUNCHERS = {
    "greenprop": [sys.executable, "-m", "greenprop"],
    "torchrun": [sys.executable, "-m", "torch.distributed.run"],
}


def doc_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", DOC.read_text(), flags=re.DOTALL)


def doc_commands() -> list[list[str]]:
    """Every command of the doc's ``bash`` blocks (a trailing backslash continues a line)."""
    lines = [line for block in doc_blocks("bash") for line in block.replace("\\\n", " ").splitlines()]
    return [words for line in lines if (words := shlex.split(line, comments=True))]


@pytest.mark.parametrize("words", doc_commands(), ids=[f"{i}-{w[0]}" for i, w in enumerate(doc_commands())])
def test_the_doc_s_commands_train_two_identical_ranks(tmp_path, words):
    """Each command of docs/distributed.md, run as written, in a folder holding the doc's scripts."""
    for block in doc_blocks("python"):
        if name := re.match(r"# (\S+\.py)\b", block):
            (tmp_path / name.group(1)).write_text(block)
    result = run_bounded([*LAUNCHERS[words[0]], *words[1:]], timeout=180, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    [written] = tmp_path.rglob("metrics.json")
    metrics = json.loads(written.read_text())
    assert metrics["complete"]
    assert metrics["distributed"]["world_size"] == 2
    assert metrics["distributed"]["parameter_spread"] == 0.0


# --------------------------------------------------------------------- shards (no processes)
def test_rank_shards_split_each_epoch_into_equal_disjoint_parts(digits):
    ranks = [DataParallel(rank, 2, "gloo") for rank in range(2)]
    train = digits.train  # 1437 examples: one is repeated to make the shards equal
    seen = {}
    for epoch in range(2):
        batches = [list(r.epoch_batches(train, 64, seed=0, epoch=epoch)) for r in ranks]
        assert [len(b) for b in batches] == [ranks[0].steps_per_epoch(len(train), 64)] * 2 == [23, 23]
        assert all(len(y) <= 32 for b in batches for _, y in b)
        xs = [torch.cat([x for x, _ in b]) for b in batches]
        assert len(xs[0]) == len(xs[1]) == 719
        flat = torch.cat(xs).flatten(1)
        assert len(torch.unique(flat, dim=0)) == len(torch.unique(train.inputs.flatten(1), dim=0))
        seen[epoch] = xs[0][:5]
    assert not torch.equal(seen[0], seen[1])  # reshuffled every epoch


def test_the_total_batch_must_split_evenly():
    with pytest.raises(GreenpropError, match="batch_size=65 must be a multiple of the world size 2"):
        DataParallel(0, 2, "gloo").steps_per_epoch(100, 65)
    assert SingleProcess().steps_per_epoch(100, 65) == 2


def test_a_shard_indexes_its_dataset(digits):
    shard = Shard(digits.test, torch.arange(1, 11, 2))
    x, y = shard[torch.tensor([0, 4])]
    assert torch.equal(x, digits.test.inputs[[1, 9]]) and torch.equal(y, digits.test.labels[[1, 9]])
    assert len(shard) == 5 and torch.equal(shard[2][0], digits.test.inputs[5])
