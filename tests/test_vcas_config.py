"""VCASConfig: the paper's defaults, validation naming the option, dict round-trip."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from greenprop.errors import GreenpropError
from greenprop.vcas import VCASConfig


def test_defaults_are_the_papers() -> None:
    c = VCASConfig()
    assert c.tau_act == 0.025 and c.tau_w == 0.025
    assert c.update_every == 100  # F
    assert c.mc_repeats == 2  # M
    assert c.s_step == 0.01
    assert c.weight_ratio_multiplier == 0.95
    assert c.ema_decay == 0.6
    assert c.variance_sample_fraction == 0.01
    assert c.initial_s == 1.0 and c.initial_weight_ratio == 1.0
    assert c.min_ratio == 0.05  # our choice
    assert c.seed == 0


def test_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        VCASConfig().tau_act = 0.1  # type: ignore[misc]


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("tau_act", 0.0),
        ("tau_act", float("inf")),
        ("tau_act", float("nan")),
        ("tau_w", -0.1),
        ("update_every", 0),
        ("update_every", 2.5),
        ("update_every", True),
        ("mc_repeats", 1),
        ("s_step", 0.0),
        ("s_step", 1.0),
        ("weight_ratio_multiplier", 1.0),
        ("weight_ratio_multiplier", 0.0),
        ("ema_decay", 1.0),
        ("ema_decay", -0.1),
        ("variance_sample_fraction", 0.0),
        ("variance_sample_fraction", 1.5),
        ("initial_s", 0.0),
        ("initial_s", 1.01),
        ("initial_weight_ratio", 1.2),
        ("initial_weight_ratio", 0.01),  # below min_ratio
        ("min_ratio", 0.0),
        ("min_ratio", "0.1"),
        ("seed", 1.5),
    ],
)
def test_bad_option_names_the_option(name: str, value: Any) -> None:
    with pytest.raises(GreenpropError, match=name):
        VCASConfig(**{name: value})


def test_greenprop_error_is_value_error() -> None:
    with pytest.raises(ValueError, match="mc_repeats"):
        VCASConfig(mc_repeats=0)


def test_boundaries_accepted() -> None:
    c = VCASConfig(ema_decay=0, variance_sample_fraction=1, min_ratio=1, initial_weight_ratio=1)
    assert c.ema_decay == 0.0 and isinstance(c.ema_decay, float)
    assert c.min_ratio == 1.0


def test_dict_round_trip() -> None:
    c = VCASConfig(tau_act=0.05, update_every=20, mc_repeats=3, min_ratio=0.1, initial_weight_ratio=0.5)
    d = c.to_dict()
    assert d["tau_act"] == 0.05 and d["update_every"] == 20
    assert VCASConfig.from_dict(d) == c
    assert VCASConfig.from_dict(VCASConfig().to_dict()) == VCASConfig()


def test_from_dict_parses_cli_strings() -> None:
    c = VCASConfig.from_dict({"tau_w": "0.1", "update_every": " 50 ", "ema_decay": "0", "seed": "3"})
    assert c.tau_w == 0.1 and c.update_every == 50 and c.ema_decay == 0.0 and c.seed == 3
    assert isinstance(c.update_every, int)


@pytest.mark.parametrize(
    ("values", "needle"),
    [
        ({"tau": 0.1}, "tau"),
        ({"update_every": "ten"}, "update_every"),
        ({"update_every": "2.5"}, "update_every"),
        ({"s_step": "abc"}, "s_step"),
        ({"s_step": "2"}, "s_step"),
    ],
)
def test_from_dict_errors_name_the_option(values: dict[str, Any], needle: str) -> None:
    with pytest.raises(GreenpropError, match=needle):
        VCASConfig.from_dict(values)


# ---------------------------------------------------------------------------------------------
# check_rows


def test_check_rows_option_parses_and_validates():
    assert VCASConfig.from_dict({"check_rows": "true"}).check_rows is True
    assert VCASConfig.from_dict({"check_rows": "0"}).check_rows is False
    with pytest.raises(GreenpropError, match=r"check_rows=.*: expected true or false"):
        VCASConfig.from_dict({"check_rows": "maybe"})
    with pytest.raises(GreenpropError, match=r"check_rows=.*: expected true or false"):
        VCASConfig(check_rows=1)
