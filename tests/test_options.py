"""The options core: one string vocabulary, one error format, help derived from the fields."""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Literal

import pytest

from greenprop import models as gp_models
from greenprop.errors import GreenpropError
from greenprop.gradsamp import GradSampConfig
from greenprop.methods import build_method, get_method, parse_method
from greenprop.options import (
    FALSE_WORDS,
    TRUE_WORDS,
    MethodConfig,
    check_interval,
    option,
)
from greenprop.ssprop import SSPropConfig
from greenprop.vcas import VCASConfig

CONFIGS = [SSPropConfig, VCASConfig, GradSampConfig]


@dataclass(frozen=True)
class Toy(MethodConfig):
    """Every kind of field the core handles."""

    METHOD = "toy"

    flag: bool = option(False, "a switch")
    count: int = option(3, "an integer >= 1")
    ratio: float = option(0.5, "a number")
    ceiling: float = option(math.inf, "may be infinite", allow_inf=True)
    mode: Literal["fast", "slow"] = option("fast", "a Literal choice")
    kind: str = option("a", "a declared choice", choices=("a", "b"))
    label: str = option("x", "free text")
    limit: float | None = option(None, "optional number", default_text="no limit")
    auto: bool | None = option(None, "optional bool")
    parts: tuple[str, ...] = option(("a",), "names joined by +", choices=("a", "b", "c"))

    def __post_init__(self) -> None:
        super().__post_init__()
        check_interval(self, "count", "[1, inf)")


def _bool_fields(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.type in ("bool", bool)]


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda c: c.__name__)
def test_one_bool_vocabulary_for_every_method(cls):
    names = _bool_fields(cls)
    assert names, cls
    for name in names:
        for word in TRUE_WORDS:
            for text in (word, word.upper(), f" {word} "):
                assert getattr(cls.from_dict({name: text}), name) is True, (name, text)
        for word in FALSE_WORDS:
            assert getattr(cls.from_dict({name: word}), name) is False, (name, word)
        with pytest.raises(GreenpropError, match=re.escape(f"{cls.METHOD} option {name}='maybe': ")):
            cls.from_dict({name: "maybe"})


def test_calibrate_and_check_rows_read_on_alike():
    # They disagreed before the core: ssprop read "on", vcas refused it.
    assert SSPropConfig.from_dict({"calibrate": "on"}).calibrate is True
    assert VCASConfig.from_dict({"check_rows": "on"}).check_rows is True
    assert VCASConfig.from_dict({"check_rows": "off"}).check_rows is False


def test_vcas_check_rows_on_builds_through_the_registry():
    model = gp_models.create("vit", num_classes=4, in_channels=1, image_size=8, width=16, depth=2, heads=2)
    spec = parse_method("vcas:check_rows=on")
    (controller,) = build_method(spec, model, epochs=1, steps_per_epoch=1, seed=0)
    assert controller.config.check_rows is True


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda c: c.__name__)
def test_unknown_option_is_named_with_the_known_ones(cls):
    with pytest.raises(GreenpropError) as caught:
        cls.from_dict({"frobnicate": "1"})
    message = str(caught.value)
    assert message.startswith(f"{cls.METHOD} option frobnicate='1': unknown option; known: ")
    assert all(f.name in message for f in dataclasses.fields(cls))


@pytest.mark.parametrize(
    ("cls", "name", "text"),
    [
        (SSPropConfig, "min_channels", "lots"),
        (SSPropConfig, "keep", "nan"),
        (SSPropConfig, "selection", "best"),
        (VCASConfig, "update_every", "2.5"),
        (VCASConfig, "tau_act", "inf"),
        (VCASConfig, "s_step", "2"),
        (GradSampConfig, "tolerance", "abc"),
        (GradSampConfig, "update", "nope"),
        (GradSampConfig, "guard_threshold", "-1"),
    ],
)
def test_bad_value_is_named_in_one_format(cls, name, text):
    with pytest.raises(GreenpropError, match=rf"^{cls.METHOD} option {name}=\S+: \w"):
        cls.from_dict({name: text})


def test_every_kind_of_field_parses_from_strings():
    toy = Toy.from_dict(
        {
            "flag": "yes",
            "count": " 7 ",
            "ratio": "0.25",
            "ceiling": "inf",
            "mode": "SLOW",
            "kind": "b",
            "label": " Free Text ",
            "limit": "2",
            "auto": "off",
            "parts": "a+c",
        }
    )
    assert toy == Toy(True, 7, 0.25, math.inf, "slow", "b", "Free Text", 2.0, False, ("a", "c"))
    assert Toy.from_dict({"limit": "none", "auto": "none"}) == Toy()
    assert Toy.from_dict({"limit": "off"}).limit is None  # "off" is None unless the field is a bool
    assert Toy.from_dict({"parts": "b,a"}).parts == ("b", "a")
    assert Toy.from_dict({"count": 2, "ratio": 1}).ratio == 1.0  # Python values pass as they are
    assert isinstance(Toy(ratio=1).ratio, float)
    assert Toy(parts=["b"]).parts == ("b",)


@pytest.mark.parametrize(
    ("values", "fragment"),
    [
        ({"count": "0"}, "toy option count=0: must be >= 1"),
        ({"count": "1.5"}, "toy option count='1.5': expected an integer"),
        ({"count": True}, "toy option count=True: expected an integer"),
        ({"ratio": "nan"}, "toy option ratio=nan: expected a finite number"),
        ({"ratio": "inf"}, "toy option ratio=inf: expected a finite number"),
        ({"ceiling": "nan"}, "toy option ceiling=nan: expected a finite number"),
        ({"mode": "medium"}, "toy option mode='medium': choose from fast, slow"),
        ({"kind": "c"}, "toy option kind='c': choose from a, b"),
        ({"parts": "a+d"}, "toy option parts=('a', 'd'): unknown 'd'; choose from a, b, c"),
        ({"flag": 1}, "toy option flag=1: expected true or false"),
        ({"label": None}, "toy option label=None: a value is required"),
    ],
)
def test_errors_say_what_was_expected(values, fragment):
    with pytest.raises(GreenpropError) as caught:
        Toy.from_dict(values)
    assert str(caught.value) == fragment


def test_help_is_derived_from_field_metadata_with_defaults_written_out():
    help_texts = Toy.option_help()
    assert list(help_texts) == [f.name for f in dataclasses.fields(Toy)]
    assert help_texts["flag"] == "a switch (default false)"
    assert help_texts["count"] == "an integer >= 1 (default 3)"
    assert help_texts["ceiling"] == "may be infinite (default inf)"
    assert help_texts["limit"] == "optional number (default no limit)"
    assert help_texts["auto"] == "optional bool (default none)"
    assert help_texts["parts"] == "names joined by + (default a)"
    for cls in CONFIGS:
        derived = cls.option_help()
        assert list(derived) == [f.name for f in dataclasses.fields(cls)]
        for f in dataclasses.fields(cls):
            assert derived[f.name].startswith(f.metadata["help"] + " (default "), f.name
        assert get_method(cls.METHOD).options == derived  # what `greenprop methods` prints


def test_ssprop_layers_default_and_help_show_the_cli_spelling():
    assert "(default conv)" in SSPropConfig.option_help()["layers"]
    assert SSPropConfig.from_dict({"layers": "conv+linear"}).layers == ("conv", "linear")
    assert SSPropConfig(layers="linear").layers == ("linear",)


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda c: c.__name__)
def test_to_dict_from_dict_round_trip(cls):
    config = cls()
    assert cls.from_dict(config.to_dict()) == config
    as_strings = {k: _cli_text(v) for k, v in config.to_dict().items()}
    assert cls.from_dict(as_strings) == config


def _cli_text(value: object) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return "+".join(value)
    return "none" if value is None else str(value)
