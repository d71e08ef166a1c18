"""SIGKILL at a random training step in each adapter, then resume: the weights of an uninterrupted run.

Real subprocesses (tests/adapter_runner.py); the method is GradSamp pe:2 with ssProp, so
the run crosses a sampled epoch.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import adapter_runner
from adapter_runner import EPOCHS, SAMPLED, STEPS

ROOT = Path(__file__).resolve().parents[1]
RUNNER = Path(__file__).with_name("adapter_runner.py")
FRAMEWORKS = [
    pytest.param(
        "lightning",
        marks=pytest.mark.skipif(
            __import__("importlib").util.find_spec("lightning") is None, reason="needs lightning"
        ),
    ),
    pytest.param(
        "hf",
        marks=pytest.mark.skipif(
            __import__("importlib").util.find_spec("accelerate") is None,
            reason="needs transformers+accelerate",
        ),
    ),
]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT / 'tests'}"}
    return subprocess.run(
        [sys.executable, str(RUNNER), *args], capture_output=True, text=True, timeout=300, env=env, cwd=ROOT
    )


def _reference(framework: str, out: Path) -> dict[str, torch.Tensor]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the runner does
    try:
        return adapter_runner.train(framework, out)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_sigkill_at_a_random_step_then_resume_gives_the_uninterrupted_weights(framework, tmp_path):
    real_epochs = [e for e in range(EPOCHS) if e not in SAMPLED]
    rng = random.Random(f"{framework}-{os.environ.get('PYTEST_XDIST_WORKER', '')}")
    ordinal = rng.choice([i for i, e in enumerate(real_epochs) if e >= 1])  # after a checkpoint
    batch = ordinal * STEPS + rng.randrange(STEPS) + 1
    out = tmp_path / "run"
    out.mkdir()
    killed = _run(framework, str(out), "--kill-at", str(batch))
    assert killed.returncode == -signal.SIGKILL, (batch, killed.stderr[-2000:])
    assert not (out / "final.pt").exists()
    resumed = _run(framework, str(out), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    final = torch.load(out / "final.pt", weights_only=True)
    expected = _reference(framework, tmp_path / "reference")
    assert final.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(final[name], tensor), f"{name} differs (killed at batch {batch})"
