"""The reference trainer: metrics, hooks, checkpoints, resume refusals and FLOP recounts.

Exact resume, FLOP accounting and the CLI round trip of every method: test_method_settings.py.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch

from fixtures import Recorder, weights
from greenprop import Controller, GreenpropError
from greenprop.controller import RunContext
from greenprop.train import checkpoint as ckpt
from greenprop.train.config import TrainConfig
from greenprop.train.trainer import CHECKPOINT, METRICS, Trainer


def test_fit_writes_metrics_with_counted_flops(tmp_path, quick_config, digits):
    metrics = Trainer(quick_config, tmp_path, data=digits).fit()
    on_disk = json.loads((tmp_path / METRICS).read_text())
    assert on_disk["complete"] and on_disk["summary"] == metrics["summary"]
    assert len(metrics["epochs"]) == 2
    for record in metrics["epochs"]:
        assert 0 <= record["acc1"] <= record["acc5"] <= 100
        assert record["flops"]["forward"]["kind"] == "counted"
        assert set(record["time"]) >= {"data", "forward", "backward", "optimizer", "eval"}
    flops = metrics["summary"]["flops"]
    ratio = flops["backward"]["value"] / flops["forward"]["value"]
    # Dense backward costs about twice the forward (input and weight gradients); the
    # first layer needs no input gradient, so slightly less.
    assert 1.6 < ratio <= 2.05
    energy = metrics["summary"]["energy"]
    assert energy["kind"] in {"measured", "unavailable"}
    assert (energy["value"] is None) == (energy["kind"] == "unavailable")
    assert metrics["summary"]["acc1"] > 30  # it learned something on digits
    assert (tmp_path / CHECKPOINT).exists()


def test_estimated_energy_is_labelled(quick_config, digits):
    metrics = Trainer(quick_config.replace(epochs=1, watts=10.0), data=digits).fit()
    energy = metrics["summary"]["energy"]
    if energy["kind"] != "measured":
        assert energy["kind"] == "estimated" and energy["value"] > 0
        assert "10" in energy["source"]


def test_hooks_are_called_in_order_and_can_replace_an_epoch(quick_config, digits):
    recorder = Recorder(replace=1, extra={"seen": True})
    trainer = Trainer(quick_config.replace(epochs=3), controllers=[recorder], data=digits)
    steps = trainer.steps_per_epoch
    before_epoch_1 = None

    class Snapshot(Controller):
        def on_epoch_start(self, epoch: int) -> None:
            nonlocal before_epoch_1
            if epoch == 1:
                before_epoch_1 = weights(trainer.model)

    trainer.controllers.append(Snapshot())
    metrics = trainer.fit()
    names = recorder.hooks()
    assert names[0] == "on_train_start"
    [(run,)] = recorder.calls_to("on_train_start")
    assert (run.model, run.epochs, run.steps_per_epoch) == (trainer.model, 3, steps)
    assert names.count("on_step_start") == names.count("on_step_end") == 2 * steps
    assert ("replace_epoch", 1) in recorder.calls
    assert not any(c[0] == "on_step_start" and c[1] == 1 for c in recorder.calls)
    replaced = metrics["epochs"][1]
    assert replaced["replaced_by"] == "recorder" and replaced["recorder"]["sampled"]
    assert replaced["steps"] == 0 and replaced["flops"]["backward"]["value"] == 0
    # on_epoch_end runs after the evaluation; its fields are namespaced under the name.
    assert all(r["recorder"]["seen"] for r in metrics["epochs"])
    seen = [record["loss"] for _, record in recorder.calls_to("on_epoch_end")]
    assert seen == [r["loss"] for r in metrics["epochs"]]
    assert metrics["summary"]["epochs_replaced"] == 1
    assert before_epoch_1 is not None


def test_existing_results_are_not_overwritten(tmp_path, quick_config, digits):
    config = quick_config.replace(epochs=1)
    Trainer(config, tmp_path, data=digits).fit()
    before = (tmp_path / METRICS).read_bytes()
    with pytest.raises(GreenpropError, match="already holds results"):
        Trainer(config, tmp_path, data=digits)
    assert (tmp_path / METRICS).read_bytes() == before
    Trainer(config, tmp_path, overwrite=True, data=digits).fit()


def test_corrupt_checkpoint_is_a_clear_error_and_left_alone(tmp_path, quick_config, digits):
    (tmp_path / CHECKPOINT).write_bytes(b"not a checkpoint")
    with pytest.raises(GreenpropError, match="corrupt or unreadable"):
        Trainer(quick_config, tmp_path, resume=True, data=digits)
    assert (tmp_path / CHECKPOINT).read_bytes() == b"not a checkpoint"


def test_resume_with_other_options_is_refused(tmp_path, quick_config, digits):
    Trainer(quick_config.replace(epochs=1), tmp_path, data=digits).fit()
    with pytest.raises(GreenpropError, match="lr"):
        Trainer(quick_config.replace(epochs=1, lr=0.1), tmp_path, resume=True, data=digits)


def test_failed_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch):
    path = tmp_path / "state.pt"
    ckpt.save_checkpoint({"epoch": 1, "model": {}}, path)
    good = path.read_bytes()

    def broken_save(obj: Any, handle: Any) -> None:
        handle.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.torch, "save", broken_save)
    with pytest.raises(GreenpropError, match=r"could not write .*state.pt \(disk full\)"):
        ckpt.save_checkpoint({"epoch": 2, "model": {}}, path)
    assert path.read_bytes() == good
    assert [p.name for p in tmp_path.iterdir()] == ["state.pt"]  # no temp file left


def test_divergence_is_reported_not_silent(quick_config, digits):
    config = quick_config.replace(epochs=1, lr=1e8, model="mlp", momentum=0.0)
    with pytest.raises(GreenpropError, match="diverged"):
        Trainer(config, data=digits).fit()


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("epochs", 0),
        ("batch_size", -1),
        ("lr", float("nan")),
        ("optimizer", "lbfgs"),
        ("watts", 0.0),
        ("subset", 0),
        ("label_smoothing", 1.0),
    ],
)
def test_bad_config_values_name_the_option(field, value):
    with pytest.raises(GreenpropError, match=field):
        TrainConfig(**{field: value})


def test_a_controller_can_undo_an_epoch_after_evaluation(quick_config, digits):
    class Undo(Controller):
        name = "undo"

        def on_train_start(self, run: RunContext) -> None:
            self.run = run

        def on_epoch_start(self, epoch: int) -> None:
            self.saved = weights(trainer.model)

        def on_epoch_end(self, epoch: int, record: dict[str, Any]) -> None:
            if epoch == 1:
                trainer.model.load_state_dict(self.saved)
                self.run.control.should_evaluate = True

    trainer = Trainer(quick_config, controllers=[Undo()], data=digits)
    metrics = trainer.fit()
    first, second = metrics["epochs"]
    assert first["reevaluated_by"] is None and second["reevaluated_by"] == "undo"
    # The second record was re-evaluated on the restored weights: it equals the first's.
    assert second["loss"] == pytest.approx(first["loss"]) and second["acc1"] == first["acc1"]


def test_flops_are_recounted_when_the_keep_changes_within_an_epoch(quick_config, digits):
    # bar schedule stepped per iteration with period 2: dense step, sparse step, ...
    config = quick_config.replace(epochs=1, method="ssprop:keep=1,schedule=bar,min_keep=0.25,period=2")
    steady = quick_config.replace(epochs=1, method="ssprop:keep=0.25")
    dense = Trainer(quick_config.replace(epochs=1), data=digits).fit()["summary"]["flops"]["backward"]
    mixed = Trainer(config, data=digits).fit()["summary"]["flops"]["backward"]
    sparse = Trainer(steady, data=digits).fit()["summary"]["flops"]["backward"]
    assert sparse["value"] < mixed["value"] < dense["value"]
    # 1437 samples in 23 steps of 64: even steps are dense (11 full + the last 29), odd sparse.
    n = len(digits.train)
    dense_samples = 11 * 64 + (n - 22 * 64)
    expected = (dense["value"] * dense_samples + sparse["value"] * (n - dense_samples)) / n
    assert mixed["value"] == pytest.approx(expected, rel=1e-9)


def test_a_nan_test_loss_stops_the_run_before_saving(tmp_path, quick_config, digits):
    class Poison(Controller):
        name = "poison"

        def replace_epoch(self, epoch: int) -> dict[str, Any] | None:
            if epoch != 1:
                return None
            with torch.no_grad():
                next(trainer.model.parameters()).fill_(float("nan"))
            return {}

    trainer = Trainer(quick_config, tmp_path, controllers=[Poison()], data=digits)
    with pytest.raises(GreenpropError, match="test loss is nan after epoch 2"):
        trainer.fit()
    saved = json.loads((tmp_path / METRICS).read_text())
    assert len(saved["epochs"]) == 1
    assert ckpt.load_checkpoint(tmp_path / CHECKPOINT)["epoch"] == 1


def test_a_checkpoint_of_an_older_format_is_refused_naming_it(tmp_path, quick_config, digits):
    config = quick_config.replace(epochs=2)
    Trainer(config.replace(epochs=1), tmp_path, data=digits).fit()
    state = ckpt.load_checkpoint(tmp_path / CHECKPOINT)
    ckpt.save_checkpoint({**state, "format": 1, "controllers": []}, tmp_path / CHECKPOINT)
    with pytest.raises(GreenpropError, match=r"has format 1, this greenprop writes format 2"):
        Trainer(config.replace(epochs=1), tmp_path, resume=True, data=digits)


@pytest.mark.parametrize("name", ["loss", "acc1", "replaced_by"])
def test_a_controller_named_like_a_record_field_is_refused(quick_config, digits, name):
    class Clash(Controller):
        pass

    clash = Clash()
    clash.name = name
    with pytest.raises(GreenpropError, match=f"'{name}'.*overwrite"):
        Trainer(quick_config, controllers=[clash], data=digits)
