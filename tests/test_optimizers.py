"""Optimizer specs: every optimizer trains and resumes exactly; bad options name the option."""

from __future__ import annotations

import pytest
import torch

from fixtures import Recorder, digits_run, digits_subset
from greenprop.errors import GreenpropError
from greenprop.models import create
from greenprop.train.optimizers import OPTIMIZERS, parse_optimizer
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
