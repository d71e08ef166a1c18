"""MeZO: the two-point estimate is the directional derivative, runs repeat and resume
exactly, no backward ever runs (counted backward FLOPs are 0), bad options are named."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from fixtures import Recorder, cross_entropy_loss, digits_batches, digits_run, digits_subset
from greenprop.cli import main
from greenprop.controller import RunContext
from greenprop.errors import GreenpropError
from greenprop.metering.flops import count_flops, count_step_flops
from greenprop.methods import build_method, parse_method
from greenprop.mezo import MeZO, MeZOConfig
from greenprop.mezo.controller import step_seed
from greenprop.mezo.zo import directions, projected_gradient, zo_update
from greenprop.train.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")


def _mlp(dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 10)).to(dtype)


def test_projected_gradient_with_tiny_eps_is_z_dot_grad():
    model = _mlp(torch.float64)
    x, y = digits_batches(digits_subset(256, 64), 1, size=64)[0]
    batch = (x.double(), y)
    params = list(model.parameters())
    loss = cross_entropy_loss(model, batch)
    grads = torch.autograd.grad(loss, params)
    for seed in (0, 7):
        z_dot_grad = sum(float((z * g).sum()) for z, g in zip(directions(params, seed), grads, strict=True))
        before = [p.detach().clone() for p in params]
        estimate, _, _ = projected_gradient(lambda: cross_entropy_loss(model, batch), params, seed, 1e-6)
        assert estimate == pytest.approx(z_dot_grad, rel=1e-6)
        for p, b in zip(params, before, strict=True):  # the perturbation is undone
            assert torch.allclose(p, b, atol=1e-12)


def test_directions_come_back_from_their_seed_and_the_update_follows_z():
    params = [torch.zeros(3, 4), torch.zeros(5)]
    first = [z.clone() for z in directions(params, 11)]
    assert all(torch.equal(a, b) for a, b in zip(first, directions(params, 11), strict=True))
    assert not torch.equal(first[0], next(directions(params, 12)))
    zo_update(params, 11, grad=2.0, lr=0.5)
    for p, z in zip(params, first, strict=True):
        assert torch.allclose(p, -1.0 * z)


def test_a_step_updates_the_model_by_minus_lr_g_z_without_any_grad():
    model = _mlp()
    config = MeZOConfig(eps=1e-3, lr=0.01, seed=3)
    mezo = MeZO(model, config)
    mezo.on_train_start(RunContext(model, epochs=1, steps_per_epoch=1, loss_fn=cross_entropy_loss))
    batch = digits_batches(digits_subset(256, 64), 1)[0]
    before = [p.detach().clone() for p in model.parameters()]
    loss = mezo.replace_step(0, 0, batch)
    mezo.on_step_end(0, 0, float(loss))
    g = mezo.last_grad
    for p, b, z in zip(model.parameters(), before, directions(before, step_seed(3, 0, 0)), strict=True):
        assert torch.allclose(p, b - 0.01 * g * z, atol=1e-6)
        assert p.grad is None


def _run(tmp_path, name, epochs=2, seed=0, method="mezo:eps=1e-3,lr=1e-3", **fields):
    config = digits_run(
        model="mlp",
        width=16,
        epochs=epochs,
        batch_size=64,
        subset=256,
        test_subset=64,
        seed=seed,
        method=method,
        **fields,
    )
    trainer = Trainer(config, tmp_path / name, data=digits_subset(256, 64))
    return trainer, trainer.fit()


def test_same_seed_same_run_and_no_backward_is_ever_run(tmp_path, monkeypatch):
    def refuse(name):
        def refused(*args, **kwargs):
            raise AssertionError(f"MeZO called {name}")

        return refused

    for owner, name in ((torch.Tensor, "backward"), (torch.autograd, "backward"), (torch.autograd, "grad")):
        monkeypatch.setattr(owner, name, refuse(name))
    a, metrics = _run(tmp_path, "a")
    b, _ = _run(tmp_path, "b")
    c, _ = _run(tmp_path, "c", seed=1)
    for pa, pb in zip(a.model.parameters(), b.model.parameters(), strict=True):
        assert torch.equal(pa, pb) and pa.grad is None
    assert any(
        not torch.equal(pa, pc) for pa, pc in zip(a.model.parameters(), c.model.parameters(), strict=True)
    )
    for record in metrics["epochs"]:
        assert record["flops"]["backward"]["value"] == 0.0
        assert record["flops"]["forward"]["value"] > 0
        assert record["mezo"]["steps"] == a.steps_per_epoch and record["lr"] is None
    assert metrics["epochs"][-1]["mezo"]["steps_taken"] == 2 * a.steps_per_epoch


def test_counted_forward_flops_are_two_forward_passes(tmp_path):
    trainer, metrics = _run(tmp_path, "m", epochs=1)
    x, y = trainer.data.train[torch.arange(16)]
    dense = count_flops(trainer.model, x, y, nn.CrossEntropyLoss())
    samples = metrics["epochs"][0]["samples"]
    assert metrics["epochs"][0]["flops"]["forward"]["value"] == pytest.approx(
        2 * dense.forward / 16 * samples
    )


def test_count_step_flops_splits_a_dense_step_as_count_flops_does():
    model = _mlp()
    x, y = digits_batches(digits_subset(256, 64), 1, size=16)[0]
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    def step():
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()

    split = count_step_flops(model, step)
    assert split == count_flops(model, x, y, nn.CrossEntropyLoss())
    assert split.backward > 0
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))


def test_resume_is_exact(tmp_path):
    whole, metrics = _run(tmp_path, "whole", epochs=3)
    config = whole.config
    data = digits_subset(256, 64)
    with pytest.raises(KeyboardInterrupt):
        Trainer(config, tmp_path / "cut", data=data, controllers=[Recorder(stop_at=2)]).fit()
    resumed = Trainer(config, tmp_path / "cut", data=data, resume=True, controllers=[Recorder()])
    assert resumed.controllers[0].steps_taken == 2 * resumed.steps_per_epoch
    again = resumed.fit()
    for a, b in zip(whole.model.parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(a, b)
    assert [e["loss"] for e in again["epochs"]] == [e["loss"] for e in metrics["epochs"]]


def test_resume_refuses_other_mezo_settings(tmp_path):
    trainer, _ = _run(tmp_path, "r", epochs=1)
    state = trainer.controllers[0].state_dict()
    other = MeZO(trainer.model, MeZOConfig(eps=1e-2, lr=1e-3))
    with pytest.raises(ValueError, match="differ"):
        other.load_state_dict(state)


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ("mezo:eps=0", "mezo option eps=0.0: must be > 0"),
        ("mezo:lr=-1", "mezo option lr=-1.0: must be > 0"),
        ("mezo:lr=fast", "mezo option lr='fast': expected a number"),
        ("mezo:weight_decay=-0.1", "mezo option weight_decay=-0.1"),
        ("mezo:step=3", "mezo option step='3': unknown option"),
    ],
)
def test_bad_options_are_named(spec, fragment):
    with pytest.raises(GreenpropError, match=fragment.replace("(", r"\(").replace("[", r"\[")):
        build_method(parse_method(spec), _mlp(), epochs=1, steps_per_epoch=1, seed=0)


def test_cli_error_is_one_line(tmp_path, capsys):
    args = [
        "train",
        "--dataset",
        "digits",
        "--model",
        "mlp",
        "--subset",
        "64",
        "--test-subset",
        "32",
        "--method",
        "mezo:eps=nan",
        "--no-progress",
        "--out",
        str(tmp_path / "x"),
    ]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("greenprop: error: ") and "eps" in err[0]


def test_cli_run_writes_zero_backward(tmp_path):
    out = tmp_path / "cli"
    args = [
        "train",
        "--dataset",
        "digits",
        "--model",
        "mlp",
        "--width",
        "16",
        "--subset",
        "128",
        "--test-subset",
        "64",
        "--epochs",
        "1",
        "--method",
        "mezo:lr=1e-3",
        "--no-progress",
        "--out",
        str(out),
    ]
    assert main(args) == 0
    record = json.loads((out / "metrics.json").read_text())["epochs"][0]
    assert record["flops"]["backward"]["value"] == 0.0 and record["train_acc"] is None


def test_framework_adapters_refuse_mezo():
    from greenprop.integrations.driver import MethodDriver

    with pytest.raises(GreenpropError, match="replaces the training step"):
        MethodDriver("mezo", framework="Lightning").apply(_mlp(), epochs=1, steps_per_epoch=1, seed=0)


def test_mezo_combines_with_gradsamp(tmp_path):
    _, metrics = _run(tmp_path, "g", epochs=3, method="mezo:lr=1e-3;gradsamp:strategy=pe:1")
    kinds = [e["replaced_by"] for e in metrics["epochs"]]
    assert kinds == [None, "gradsamp", None]
    assert all(e["flops"]["backward"]["value"] == 0.0 for e in metrics["epochs"])
    assert metrics["epochs"][1]["flops"]["forward"]["value"] == 0.0
