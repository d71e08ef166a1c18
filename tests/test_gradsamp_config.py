"""GradSampConfig: defaults, validation naming the option, round trip, and the CLI's build."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import pytest
from torch import nn

import greenprop
from greenprop.gradsamp import DEFAULT_BETA_BOUNDS, GradSamp, GradSampConfig
from greenprop.gradsamp.method import CONFIG, build


def _model() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def test_defaults_and_exports():
    c = GradSampConfig()
    assert (c.strategy, c.tolerance, c.tolerance_mode, c.update) == ("pe:5", 1e-3, "relative", "ggd")
    assert (c.update_scale, c.fit_method, c.guard_threshold, c.seed) == (1.0, "moments", None, 0)
    assert not c.allow_consecutive and not c.record_fits
    assert c.clamp_draws and c.beta_bounds == DEFAULT_BETA_BOUNDS == (0.2, 8.0)
    assert greenprop.GradSampConfig is GradSampConfig and "GradSampConfig" in greenprop.__all__
    assert CONFIG is GradSampConfig
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.tolerance = 0.1  # type: ignore[misc]


def test_paper_mode_turns_the_clamp_and_the_bounds_off_unless_given():
    paper = GradSampConfig(tolerance_mode="paper")
    assert not paper.clamp_draws and paper.beta_bounds == (0.0, math.inf)
    given = GradSampConfig(tolerance_mode="paper", clamp=True, beta_min=0.3)
    assert given.clamp_draws and given.beta_bounds == (0.3, math.inf)
    assert GradSampConfig(beta_max=4.0).beta_bounds == (0.2, 4.0)


@pytest.mark.parametrize(
    "config",
    [
        GradSampConfig(),
        GradSampConfig(
            strategy="dr:0.3",
            tolerance=0.01,
            tolerance_mode="paper",
            update="ggd-signed",
            update_scale=0.5,
            clamp=True,
            beta_min=0.1,
            beta_max=math.inf,
            fit_method="mle",
            guard_threshold=0.0,
            allow_consecutive=True,
            seed=7,
            record_fits=True,
        ),
    ],
)
def test_dict_round_trip(config):
    d = config.to_dict()
    assert set(d) == {f.name for f in dataclasses.fields(GradSampConfig)}
    assert GradSampConfig.from_dict(d) == config


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"strategy": "pe:0"}, "P"),
        ({"strategy": "pr:1.0"}, "rho"),
        ({"strategy": "pr:-0.2"}, "rho"),
        ({"update": "gauss"}, "update"),
        ({"tolerance": -1e-3}, "tolerance"),
        ({"tolerance": math.nan}, "tolerance"),
        ({"tolerance_mode": "sometimes"}, "tolerance_mode"),
        ({"update_scale": -1.0}, "update_scale"),
        ({"beta_min": 2.0, "beta_max": 1.0}, "beta_m"),
        ({"guard_threshold": -0.1}, "guard_threshold"),
        ({"fit_method": "bayes"}, "fit_method"),
        ({"clamp": 1}, "clamp"),
        ({"seed": 1.5}, "seed"),
    ],
)
def test_bad_settings_raise_value_error_naming_them(kwargs: dict[str, Any], name: str):
    with pytest.raises(ValueError, match=name):
        GradSampConfig(**kwargs)


def test_the_controller_needs_a_run_length():
    with pytest.raises(ValueError, match="epochs"):
        GradSamp(_model(), GradSampConfig(), epochs=0)


def test_build_parses_cli_options():
    (gs,) = build(
        _model(),
        {
            "strategy": "pr:0.2",
            "tolerance": "0.01",
            "tolerance_mode": "absolute",
            "update": "ggd-signed",
            "update_scale": "0.5",
            "clamp": "false",
            "beta_min": "0.3",
            "allow_consecutive": "true",
            "guard_threshold": "0.1",
            "fit_method": "mle",
            "record_fits": "yes",
        },
        epochs=20,
        steps_per_epoch=5,
        seed=4,
    )
    assert isinstance(gs, GradSamp)
    assert gs.strategy.label == "Pr=0.2" and gs.strategy.allow_consecutive
    assert gs.strategy.seed == 4 and gs.epochs == 20
    assert (gs.tolerance, gs.tolerance_mode, gs.update) == (0.01, "absolute", "ggd-signed")
    assert (gs.update_scale, gs.clamp, gs.beta_bounds) == (0.5, False, (0.3, 8.0))
    assert (gs.guard_threshold, gs.fit_method, gs.record_fits) == (0.1, "mle", True)
    (default,) = build(_model(), {}, epochs=20, steps_per_epoch=5, seed=0)
    assert default.strategy.label == "Pe=5" and default.tolerance_mode == "relative"
    assert default.clamp and default.guard_threshold is None
    (paper,) = build(_model(), {"tolerance_mode": "paper"}, epochs=20, steps_per_epoch=5, seed=0)
    assert not paper.clamp and paper.beta_bounds == (0.0, math.inf)


@pytest.mark.parametrize(
    ("options", "name"),
    [
        ({"bogus": "1"}, "bogus"),
        ({"scale": "0.5"}, "scale"),  # the old CLI name is an unknown option now
        ({"strategy": "pe:0"}, "strategy"),
        ({"strategy": "zz:3"}, "strategy"),
        ({"tolerance": "-1"}, "tolerance"),
        ({"tolerance": "abc"}, "tolerance"),
        ({"tolerance_mode": "fuzzy"}, "tolerance_mode"),
        ({"update": "nope"}, "update"),
        ({"clamp": "maybe"}, "clamp"),
        ({"update_scale": "-2"}, "update_scale"),
        ({"guard_threshold": "lots"}, "guard_threshold"),
        ({"beta_min": "3", "beta_max": "2"}, "beta_m"),
        ({"beta_max": "nan"}, "beta_max"),
        ({"fit_method": "ls"}, "fit_method"),
        ({"allow_consecutive": "2"}, "allow_consecutive"),
    ],
)
def test_build_rejects_bad_options_naming_them(options, name):
    with pytest.raises(ValueError, match=name):
        build(_model(), options, epochs=10, steps_per_epoch=1, seed=0)


def test_every_option_has_help_and_the_method_registry_finds_it():
    help_texts = GradSampConfig.option_help()
    assert set(help_texts) == {f.name for f in dataclasses.fields(GradSampConfig)}
    assert all(isinstance(v, str) and v for v in help_texts.values())
    from greenprop.methods import build_method, parse_method

    spec = parse_method("gradsamp:strategy=dp:5,update=extrapolate")
    (gs,) = build_method(spec, _model(), epochs=40, steps_per_epoch=2, seed=0)
    assert gs.skipped_epochs() == [25, 31, 37] and gs.update == "extrapolate"


def test_guard_zero_is_the_strictest_threshold_not_off():
    model = nn.Linear(4, 2)
    (strict,) = build(model, {"guard_threshold": "0"}, epochs=10, steps_per_epoch=1, seed=0)
    (off,) = build(model, {"guard_threshold": "off"}, epochs=10, steps_per_epoch=1, seed=0)
    assert strict.guard_threshold == 0.0 and off.guard_threshold is None
