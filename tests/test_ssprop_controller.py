"""SSProp controller (schedule -> layers, accounting, resume) and the CLI builder."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from greenprop import GreenpropError
from greenprop.controller import RunContext
from greenprop.ssprop import SSProp, SSPropConfig, apply_ssprop, sparse_layers
from greenprop.ssprop.method import CONFIG, build
from greenprop.ssprop.schedule import KeepSchedule


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 5),
    )


def _converted(config: SSPropConfig) -> nn.Module:
    model = _model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        apply_ssprop(model, config)
    return model


def _run(controller: SSProp, model: nn.Module, epochs, steps, opt=None, start=0):
    records = []
    for epoch in range(start, epochs):
        controller.on_epoch_start(epoch)
        for step in range(steps):
            controller.on_step_start(epoch, step)
            loss = model(torch.randn(2, 3, 6, 6)).logsumexp(1).mean()
            loss.backward()
            if opt is not None:
                opt.step()
                opt.zero_grad()
            controller.on_step_end(epoch, step, loss.item())
        records.append(controller.on_epoch_end(epoch, {}))
    return records


def test_controller_sets_keep_per_epoch_and_accounts_for_dense_steps():
    config = SSPropConfig(keep=0.5, warmup=1)
    model = _converted(config)
    ctl = SSProp(model, config, epochs=3, steps_per_epoch=2)
    ctl.on_train_start(RunContext(model, epochs=3, steps_per_epoch=2))
    records = _run(ctl, model, 3, 2)
    assert [r["keep"] for r in records] == [1.0, 0.5, 0.5]
    assert records[-1]["realised_keep"] == pytest.approx((1.0 + 0.5 + 0.5) / 3)
    assert records[0]["effective_keep"] == 1.0
    # 16 and 32 channels at keep 0.5 keep exactly half.
    assert records[-1]["effective_keep"] == pytest.approx((1.0 + 0.5 + 0.5) / 3)
    assert all(layer.keep == 0.5 for layer in sparse_layers(model).values())


def test_per_step_schedule_changes_keep_within_an_epoch():
    config = SSPropConfig(keep=0.8, schedule="linear", min_keep=0.2, period=3)
    model = _converted(config)
    ctl = SSProp(model, config, epochs=1, steps_per_epoch=3)
    seen = []
    for step in range(3):
        ctl.on_step_start(0, step)
        seen.append(model[0].keep)
    assert seen == pytest.approx([0.8, 0.5, 0.2])
    assert ctl.realised_keep == pytest.approx(0.5)


def test_effective_keep_counts_rounding():
    config = SSPropConfig(keep=0.4, round_to=16)
    model = _converted(config)
    ctl = SSProp(model, config)
    _run(ctl, model, 1, 1)
    # 16 channels: k=6 -> 16 (dense); 32 channels: k=12 -> 16 (half).
    assert ctl.realised_keep == pytest.approx(0.4)
    assert 0.5 < ctl.effective_keep < 1.0


def test_resume_continues_exactly_with_random_selection():
    config = SSPropConfig(keep=0.3, selection="random", schedule="cosine", min_keep=0.1)

    def fresh():
        model = _converted(config)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        return model, opt, SSProp(model, config, epochs=4, steps_per_epoch=2)

    torch.manual_seed(1)
    model_a, opt_a, ctl_a = fresh()
    full = _run(ctl_a, model_a, 4, 2, opt_a)

    torch.manual_seed(1)
    model_b, opt_b, ctl_b = fresh()
    _run(ctl_b, model_b, 2, 2, opt_b)
    saved = (model_b.state_dict(), opt_b.state_dict(), ctl_b.state_dict(), torch.get_rng_state())
    model_c, opt_c, ctl_c = fresh()
    model_c.load_state_dict(saved[0])
    opt_c.load_state_dict(saved[1])
    ctl_c.load_state_dict(saved[2])
    torch.set_rng_state(saved[3])
    resumed = _run(ctl_c, model_c, 4, 2, opt_c, start=2)

    assert resumed == full[2:]
    for a, c in zip(model_a.parameters(), model_c.parameters(), strict=True):
        torch.testing.assert_close(a, c, rtol=0, atol=0)


def test_controller_needs_converted_layers_and_matching_state():
    with pytest.raises(GreenpropError, match="apply_ssprop"):
        SSProp(_model(), 0.5)
    ctl = SSProp(_converted(SSPropConfig()), 0.5)
    with pytest.raises(GreenpropError, match="does not match"):
        ctl.load_state_dict({"steps": 0, "keep_sum": 0, "effective_sum": 0, "generators": {}})


def test_controller_accepts_a_float_or_schedule():
    model = _converted(SSPropConfig())
    assert SSProp(model, 0.7).schedule.keep_at(3) == 0.7
    sched = KeepSchedule("bar", keep=0.6, min_keep=0.2)
    ctl = SSProp(model, sched, epochs=4, steps_per_epoch=1)
    assert [ctl.schedule.keep_at(e) for e in range(4)] == [0.6, 0.6, 0.2, 0.2]


# ---------------------------------------------------------------- CLI builder


def test_build_parses_string_options_and_converts_in_place():
    model = _model()
    options = {
        "keep": "0.4",
        "schedule": "linear",
        "min_keep": "0.2",
        "warmup": "1",
        "interleave": "true",
        "selection": "random",
        "layers": "conv+linear",
        "min_channels": "8",
        "round_to": "4",
    }
    (ctl,) = build(model, options, epochs=5, steps_per_epoch=3, seed=7)
    assert isinstance(ctl, SSProp)
    assert set(sparse_layers(model)) == {"0", "2"}  # the Linear is the output layer
    assert model[0].selection == "random" and model[0].round_to == 4
    assert ctl.schedule.epochs == 5 and ctl.schedule.interleave


@pytest.mark.parametrize(
    ("options", "name"),
    [
        ({"keep": "0"}, "keep"),
        ({"keep": "1.5"}, "keep"),
        ({"keep": "lots"}, "keep"),
        ({"schedule": "exponential"}, "schedule"),
        ({"schedule": "linear", "min_keep": "0.2", "period": "-3"}, "period"),
        ({"schedule": "linear", "min_keep": "0.2", "period": "0"}, "period"),
        ({"schedule": "linear"}, "min_keep"),
        ({"min_keep": "0.9", "keep": "0.5"}, "min_keep"),
        ({"warmup": "-1"}, "warmup"),
        ({"interleave": "maybe"}, "interleave"),
        ({"selection": "best"}, "selection"),
        ({"layers": "conv,attention"}, "layers"),
        ({"min_channels": "0"}, "min_channels"),
        ({"round_to": "0"}, "round_to"),
        ({"frobnicate": "1"}, "frobnicate"),
    ],
)
def test_build_rejects_bad_options_naming_them_and_leaves_model_alone(options, name):
    model = _model()
    with pytest.raises(ValueError, match=name):
        build(model, options, epochs=3, steps_per_epoch=2, seed=0)
    assert not sparse_layers(model)


def test_build_fails_clearly_when_nothing_is_converted():
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(GreenpropError, match="converted no layer"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        build(model, {}, epochs=1, steps_per_epoch=1, seed=0)


def test_options_help_covers_every_config_field():
    fields = set(SSPropConfig.__dataclass_fields__)
    assert set(CONFIG.option_help()) == fields
    assert SSPropConfig.from_dict({"layers": "conv+linear", "period": "none"}).layers == (
        "conv",
        "linear",
    )
    cfg = SSPropConfig(keep=0.5, layers=("conv", "linear"))
    assert SSPropConfig.from_dict(cfg.to_dict()) == cfg
