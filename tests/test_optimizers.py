"""Optimizer specs: every optimizer trains and resumes exactly; bad options name the option."""

from __future__ import annotations

import pytest
import torch

from fixtures import Recorder, digits_run, digits_subset
from greenprop.errors import GreenpropError
from greenprop.gradsamp import GradSamp, GradSampConfig
from greenprop.models import create
from greenprop.train.optimizers import OPTIMIZERS, make_optimizer, parse_optimizer
from greenprop.train.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

SPECS = [
    "sgd:nesterov=true",
    "adamw",
    "adam:amsgrad=true",
    "adagrad",
    "adadelta:rho=0.8",
    "rmsprop:momentum=0.5",
]


@pytest.mark.parametrize("spec", SPECS)
def test_each_optimizer_trains_and_resumes_exactly(spec, tmp_path):
    config = digits_run(
        model="mlp", width=16, epochs=2, batch_size=64, subset=128, test_subset=64, optimizer=spec
    )
    data = digits_subset(128, 64)
    whole = Trainer(config, tmp_path / "whole", data=data)
    before = [p.detach().clone() for p in whole.model.parameters()]
    whole.fit()
    assert type(whole.optimizer).__name__.lower() == spec.split(":")[0]
    assert any(not torch.equal(a, b) for a, b in zip(before, whole.model.parameters(), strict=True))
    with pytest.raises(KeyboardInterrupt):
        Trainer(config, tmp_path / "cut", data=data, controllers=[Recorder(stop_at=1)]).fit()
    resumed = Trainer(config, tmp_path / "cut", data=data, resume=True, controllers=[Recorder()])
    resumed.fit()
    for a, b in zip(whole.model.parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_sgd_keeps_the_runs_momentum_unless_given():
    model = create("mlp", width=8, image_size=8)
    old = parse_optimizer("sgd").build(model.parameters(), lr=0.1, weight_decay=0.0, momentum=0.9)
    assert old.param_groups[0]["momentum"] == 0.9 and not old.param_groups[0]["nesterov"]
    new = parse_optimizer("sgd:momentum=0.5,nesterov=on").build(
        model.parameters(), lr=0.1, weight_decay=0, momentum=0.9
    )
    assert new.param_groups[0]["momentum"] == 0.5 and new.param_groups[0]["nesterov"]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("adagrad:eps=0", "optimizer adagrad option eps=0.0: must be > 0"),
        ("adadelta:rho=1.5", "optimizer adadelta option rho=1.5: must be in [0, 1)"),
        ("sgd:nesterov=maybe", "optimizer sgd option nesterov='maybe'"),
        ("rmsprop:beta1=0.9", "optimizer rmsprop option beta1='0.9': unknown option"),
        ("lamb", "unknown optimizer 'lamb'"),
        ("adam:eps", "is not key=value"),
    ],
)
def test_bad_optimizer_options_name_the_option(spec, message):
    with pytest.raises(
        GreenpropError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")
    ):
        digits_run(optimizer=spec)
    assert set(OPTIMIZERS) == {"sgd", "adamw", "adam", "adagrad", "adadelta", "rmsprop"}


@pytest.mark.parametrize("activation", ["relu", "sigmoid", "tanh", "gelu"])
def test_cnn_and_mlp_take_an_activation(activation):
    for name in ("cnn", "mlp"):
        model = create(f"{name}:activation={activation}", width=8, image_size=8)
        kinds = {type(m).__name__.lower() for m in model.modules()}
        assert activation in kinds and (activation == "relu" or "relu" not in kinds)
    with pytest.raises(GreenpropError, match="activation='swish'"):
        create("cnn:activation=swish", image_size=8)


def _adadelta_first_step(g: torch.Tensor, lr: float) -> torch.Tensor:
    rho, eps = 0.9, 1e-6  # torch's defaults: the step is lr * sqrt(eps) / sqrt((1 - rho) g^2 + eps) * g
    return -lr * (eps**0.5) / ((1 - rho) * g * g + eps).sqrt() * g


# The first step of each optimizer from zero state, written out: what GradSamp must store.
FIRST_STEPS = {
    "sgd:momentum=0": lambda g, lr: -lr * g,
    "adagrad": lambda g, lr: -lr * g / (g.abs() + 1e-10),  # -lr * sign(g) where |g| >> eps
    "adam": lambda g, lr: -lr * g / (g.abs() + 1e-8),  # bias-corrected m = g, v = g^2
    "rmsprop": lambda g, lr: -lr * g / ((1 - 0.99) ** 0.5 * g.abs() + 1e-8),
    "adadelta": _adadelta_first_step,
}


@pytest.mark.parametrize("spec", sorted(FIRST_STEPS))
def test_gradsamp_fits_the_update_of_the_optimizer_in_use(spec):
    """After one real step, GradSamp's stored update is that optimizer's step, e.g. Adagrad's
    -lr * sign(g) (not an SGD step -lr * g): the rule works on whatever the optimizer did."""
    model = create("mlp", width=8, image_size=8)
    lr = 0.01
    optimizer = make_optimizer(spec, model.parameters(), lr=lr, weight_decay=0.0, momentum=0.0)
    gs = GradSamp(model, GradSampConfig(strategy="pe:1"), epochs=3)
    x, y = digits_subset(64, 32).train[torch.arange(64)]
    gs.on_epoch_start(0)
    torch.nn.functional.cross_entropy(model(x), y).backward()
    grads = [p.grad.detach().clone() for p in model.parameters()]
    optimizer.step()
    gs.on_epoch_end(0)
    stored = gs.state_dict()
    assert stored["buffer_kind"] == "delta"
    for delta, g in zip(stored["buffer"], grads, strict=True):
        assert torch.allclose(delta, FIRST_STEPS[spec](g, lr), rtol=1e-4, atol=1e-7)
    if spec != "sgd:momentum=0":  # an SGD step would have been a different update
        assert not torch.allclose(stored["buffer"][0], -lr * grads[0], rtol=1e-2)


def _fused(spec, params):
    return make_optimizer(spec, params, lr=0.1, weight_decay=0.0, momentum=0.0).defaults["fused"]


def test_adam_and_adamw_take_the_fused_kernel_where_the_parameters_allow():
    floats = torch.nn.Linear(3, 2)
    assert _fused("adamw", floats.parameters()) and _fused("adam", floats.parameters())
    assert not _fused("adamw:fused=false", floats.parameters())
    counts = torch.nn.Parameter(torch.zeros(3, dtype=torch.int64), requires_grad=False)
    assert not _fused("adamw", [{"params": [floats.weight, counts]}])
    with pytest.raises(GreenpropError, match=r"fused=True: a parameter is torch.int64"):
        _fused("adam:fused=true", [counts])


def test_the_fused_adamw_step_matches_the_plain_one():
    results = []
    for spec in ("adamw:fused=true", "adamw:fused=false"):
        torch.manual_seed(0)
        model = torch.nn.Linear(8, 4)
        opt = make_optimizer(spec, model.parameters(), lr=0.01, weight_decay=0.05, momentum=0.0)
        for _ in range(3):
            opt.zero_grad()
            model(torch.randn(16, 8)).square().mean().backward()
            opt.step()
        results.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
