"""Method specs: parsing, unknown names, option errors."""

from __future__ import annotations

import pytest
from torch import nn

from greenprop import GreenpropError
from greenprop.methods import build_method, parse_method, register_method


def _echo(model, options, *, epochs, steps_per_epoch, seed):
    if "bad" in options:
        raise ValueError(f"option bad={options['bad']!r} is not allowed")
    return []


register_method("echo-test", _echo, help="test method")
register_method("echo-test2", _echo, help="second test method")


def test_parse_plain_name():
    spec = parse_method("baseline")
    assert spec.name == "baseline" and spec.options == {} and spec.label == "baseline"


def test_parse_options_with_colons_in_values():
    spec = parse_method("echo-test:strategy=pe:5, keep=0.6")
    assert spec.options == {"strategy": "pe:5", "keep": "0.6"}
    assert parse_method(spec.label) == spec


def test_builder_value_errors_become_clear_errors():
    spec = parse_method("echo-test:bad=7")
    with pytest.raises(GreenpropError, match=r"echo-test:bad=7.*bad='7'"):
        build_method(spec, nn.Linear(2, 2), epochs=1, steps_per_epoch=1, seed=0)


@pytest.mark.parametrize("bad", ["", ":keep=1", "baseline:keep", "baseline:=3", "nosuch"])
def test_malformed_specs_are_errors(bad):
    with pytest.raises(GreenpropError):
        parse_method(bad)


def test_baseline_rejects_options():
    spec = parse_method("baseline:keep=0.5")
    with pytest.raises(GreenpropError, match="keep"):
        build_method(spec, nn.Linear(2, 2), epochs=1, steps_per_epoch=1, seed=0)


def test_methods_combine_with_semicolons():
    spec = parse_method("echo-test:a=1; echo-test2:b=2")
    assert [p.name for p in spec.parts] == ["echo-test", "echo-test2"]
    assert spec.label == "echo-test:a=1;echo-test2:b=2"
    assert parse_method(spec.label) == spec


@pytest.mark.parametrize("bad", ["baseline;echo-test", "echo-test;echo-test", "echo-test;"])
def test_bad_combinations_are_errors(bad):
    with pytest.raises(GreenpropError):
        parse_method(bad)
