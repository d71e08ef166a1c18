"""Method specs: parsing, unknown names, option errors, the table of methods."""

from __future__ import annotations

import pytest
from torch import nn

from greenprop import GreenpropError
from greenprop.methods import (
    BUILTIN_METHODS,
    available_methods,
    build_method,
    get_method,
    parse_method,
    temporary_method,
)


def _echo(model, options, *, epochs, steps_per_epoch, seed):
    if "bad" in options:
        raise ValueError(f"option bad={options['bad']!r} is not allowed")
    return []


@pytest.fixture(autouse=True)
def echo_methods():
    """Two fake methods, known only while a test of this file runs."""
    with temporary_method("echo-test", _echo, help="test method"), temporary_method(
        "echo-test2", _echo, help="second test method"
    ):
        yield


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


def test_temporary_methods_are_gone_afterwards():
    with temporary_method("gone-test", _echo, help="short-lived") as method:
        assert get_method("gone-test") is method and "gone-test" in available_methods()
    assert "gone-test" not in available_methods()
    with pytest.raises(GreenpropError, match="unknown method 'gone-test'"):
        parse_method("gone-test")


def test_a_temporary_method_cannot_shadow_a_builtin():
    with pytest.raises(GreenpropError, match="exists already"), temporary_method("ssprop", _echo, help="x"):
        pass


def test_builtin_methods_come_from_the_static_table_with_derived_options():
    assert set(BUILTIN_METHODS) <= set(available_methods())
    assert get_method("baseline").options == {} and get_method("baseline").report_extras is None
    for name in ("ssprop", "gradsamp", "vcas"):
        method = get_method(name)
        assert method.options and all(help_text.strip() for help_text in method.options.values()), name
        assert "seed" in method.options
        # Methods contribute their own report figures: VCAS its controller's ratios.
        assert (method.report_extras is None) == (name != "vcas"), name
