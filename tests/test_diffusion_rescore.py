"""Scoring a saved diffusion run afterwards (``greenprop score-diffusion``) against scoring in-run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fixtures import digits_run, digits_subset
from greenprop.cli import main
from greenprop.diffusion.rescore import score_saved_run
from greenprop.errors import GreenpropError
from greenprop.train.checkpoint import load_checkpoint
from greenprop.train.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

#: A 2-epoch U-Net run on 64 digits (8x8, padded to 32), T = 4, scored after each epoch.
TINY = {
    "model": "ddpm-unet",
    "width": 4,
    "subset": 64,
    "test_subset": 32,
    "epochs": 2,
    "batch_size": 32,
    "optimizer": "adamw",
    "lr": 1e-3,
    "weight_decay": 0.0,
    "lr_schedule": "none",
    "diffusion_steps": 4,
    "score_every": 1,
    "method": "ssprop:keep=0.5",
    "seed": 3,
}


def _train(out: Path, **fields) -> dict:
    config = digits_run(**{**TINY, **fields})
    return Trainer(config, out, data=digits_subset(64, 32)).fit()


def test_scoring_a_saved_run_equals_scoring_in_run(tmp_path):
    in_run = _train(tmp_path / "in-run", score_samples=8)
    deferred = _train(tmp_path / "deferred", score_samples=0)
    assert [r["fd"] for r in deferred["epochs"]] == [None, None]  # nothing sampled, the models kept
    assert sorted(p.name for p in (tmp_path / "deferred").glob("model_epoch*.pt")) == [
        "model_epoch1.pt",
        "model_epoch2.pt",
    ]
    results = score_saved_run(tmp_path / "deferred", samples=8, epochs=[1, 2])
    for epoch, result in zip((1, 2), results, strict=True):
        expected = in_run["epochs"][epoch - 1]
        assert result["fd"] == pytest.approx(expected["fd"], rel=1e-9, abs=1e-12)
        assert result["fd_floor"] == pytest.approx(expected["fd_floor"], rel=1e-9, abs=1e-12)
        assert result["fd_samples"] == expected["fd_samples"] == 8 and not result["skipped"]
        assert result["sample_grid"] == f"samples_epoch{epoch}.png"
        png = tmp_path / "deferred" / result["sample_grid"]
        assert png.read_bytes() == (tmp_path / "in-run" / expected["sample_grid"]).read_bytes()
    assert results[0]["fd"] != results[1]["fd"]  # different models, different scores
    saved = json.loads((tmp_path / "deferred" / "metrics.json").read_text())
    assert saved["summary"]["fd"] == results[1]["fd"] and saved["summary"]["fd_samples"] == 8
    assert saved["summary"]["best_fd"] == min(r["fd"] for r in results)
    history = load_checkpoint(tmp_path / "deferred" / "checkpoint.pt", required=("history",))["history"]
    assert [r["fd"] for r in history] == [r["fd"] for r in results]  # a resume keeps the scores


def test_scoring_resumes_and_rescores_with_another_count(tmp_path):
    _train(tmp_path / "run", score_samples=0, score_every=None)  # keeps the last epoch's model only
    first = score_saved_run(tmp_path / "run", samples=6)
    assert [r["epoch"] for r in first] == [2] and not first[0]["skipped"]
    again = score_saved_run(tmp_path / "run", samples=6)
    assert again[0]["skipped"] and again[0]["fd"] == first[0]["fd"]
    more = score_saved_run(tmp_path / "run", samples=10)
    assert not more[0]["skipped"] and more[0]["fd_samples"] == 10 and more[0]["fd"] != first[0]["fd"]
    record = json.loads((tmp_path / "run" / "metrics.json").read_text())["epochs"][1]
    assert record["fd"] == more[0]["fd"] and record["fd_samples"] == 10


def test_score_diffusion_errors_are_named(tmp_path, capsys):
    run = tmp_path / "run"
    _train(run, score_samples=0, score_every=None, epochs=1)
    with pytest.raises(GreenpropError, match=r"epoch 3 of .* has no kept model .*epochs with one: 1"):
        score_saved_run(run, samples=4, epochs=[3])
    with pytest.raises(GreenpropError, match="deferred scoring: pass --samples"):
        score_saved_run(run)
    with pytest.raises(GreenpropError, match="samples=1 must be an integer >= 2"):
        score_saved_run(run, samples=1)
    with pytest.raises(GreenpropError, match=r"no metrics\.json"):
        score_saved_run(tmp_path / "nothing")
    classifier = tmp_path / "cnn"
    Trainer(digits_run(epochs=1, subset=64, test_subset=32), classifier, data=digits_subset(64, 32)).fit()
    with pytest.raises(GreenpropError, match="trained 'cnn', not a diffusion model"):
        score_saved_run(classifier, samples=4)
    snapshot = load_checkpoint(run / "checkpoint.pt")
    torch.save(
        {"epoch": 1, "model": {"stem.weight": snapshot["model"]["stem.weight"]}}, run / "model_epoch5.pt"
    )
    assert main(["score-diffusion", str(run), "--samples", "4", "--epochs", "5"]) == 2
    assert "has no record of epoch 5" in capsys.readouterr().err
    assert main(["score-diffusion", str(run), "--samples", "4"]) == 0
    assert "epoch 1: FD " in capsys.readouterr().out
    with pytest.raises(GreenpropError, match="score_samples=1"):
        _train(tmp_path / "one", score_samples=1)
