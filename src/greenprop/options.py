"""Method options: typed config fields, string parsing, checks, help text, one error format.

Each method's settings are a frozen dataclass deriving from :class:`MethodConfig`, whose
fields are declared with :func:`option` (the help text lives in the field's metadata).
From those fields this module derives what every method needs, so no method writes it
again: the parsing of the CLI's strings by annotated type, type checks of Python values,
``from_dict`` / ``to_dict``, the option list with the defaults written out, and the
error ``"<method> option <name>=<value!r>: <why>"``. Range rules stay in each config's
``__post_init__``, written with :func:`check_interval` and :func:`require`.

String vocabulary, the same for every method: bools are ``true/false/1/0/yes/no/on/off``;
an optional field (``X | None``) reads ``none`` (and ``off``, unless it is a bool) as None;
a tuple field splits on ``+`` or ``,`` (``layers=conv+linear``); a choice (a ``Literal``
or a declared ``choices``) is matched case-insensitively; a float refuses NaN, and
infinity unless the field allows it.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, NoReturn, TypeVar

from greenprop.errors import GreenpropError

__all__ = [
    "FALSE_WORDS",
    "NONE_WORDS",
    "TRUE_WORDS",
    "MethodConfig",
    "check_interval",
    "fail",
    "option",
    "require",
]

#: Strings read as True / False by every bool option.
TRUE_WORDS: tuple[str, ...] = ("true", "1", "yes", "on")
FALSE_WORDS: tuple[str, ...] = ("false", "0", "no", "off")
#: Strings read as None by an optional option ("off" only where the field is not a bool).
NONE_WORDS: tuple[str, ...] = ("none", "off")


def option(
    default: Any,
    help: str,
    *,
    choices: tuple[str, ...] | None = None,
    allow_inf: bool = False,
    default_text: str | None = None,
) -> Any:
    """A config field: ``dataclasses.field(default=..., metadata={"help": ...})``.

    ``choices`` restricts a ``str`` field (or the items of a tuple field); ``allow_inf``
    lets a float be infinite; ``default_text`` replaces the default in the help when the
    value alone would mislead (e.g. a seed the CLI fills with the run's seed).
    """
    metadata: dict[str, Any] = {"help": help}
    if choices is not None:
        metadata["choices"] = tuple(choices)
    if allow_inf:
        metadata["allow_inf"] = True
    if default_text is not None:
        metadata["default_text"] = default_text
    return dataclasses.field(default=default, metadata=metadata)


def fail(method: str, name: str, value: Any, why: str) -> NoReturn:
    """Raise the one option error: ``"<method> option <name>=<value!r>: <why>"``."""
    raise GreenpropError(f"{method} option {name}={value!r}: {why}")


@dataclass(frozen=True)
class _Kind:
    """What a field accepts, read once from its annotation and metadata."""

    base: type  # bool, int, float, str or tuple (of str)
    optional: bool
    choices: tuple[str, ...] | None
    allow_inf: bool


@functools.cache
def _kinds(cls: type) -> dict[str, _Kind]:
    hints = typing.get_type_hints(cls)
    kinds = {}
    for f in dataclasses.fields(cls):
        hint, optional = hints[f.name], False
        if typing.get_origin(hint) in (typing.Union, types.UnionType):
            rest = [a for a in typing.get_args(hint) if a is not type(None)]
            optional = len(rest) < len(typing.get_args(hint))
            (hint,) = rest
        choices = f.metadata.get("choices")
        if typing.get_origin(hint) is Literal:
            base: type = str
            choices = tuple(typing.get_args(hint))
        elif typing.get_origin(hint) is tuple:
            base = tuple
        else:
            base = hint
        if base not in (bool, int, float, str, tuple):
            raise TypeError(f"{cls.__name__}.{f.name}: options cannot hold {hint!r}")
        kinds[f.name] = _Kind(base, optional, choices, bool(f.metadata.get("allow_inf")))
    return kinds


def _parse(method: str, name: str, kind: _Kind, text: str) -> Any:
    """Turn the CLI's string into a value of the field's type (checked afterwards)."""
    s = text.strip()
    low = s.lower()
    if kind.optional and (low == "none" or (low in NONE_WORDS and kind.base is not bool)):
        return None
    if kind.base is bool:
        if low in TRUE_WORDS:
            return True
        if low in FALSE_WORDS:
            return False
        fail(method, name, text, f"expected true or false ({'/'.join(TRUE_WORDS)}, {'/'.join(FALSE_WORDS)})")
    if kind.base is int:
        try:
            return int(s)
        except ValueError:
            fail(method, name, text, "expected an integer")
    if kind.base is float:
        try:
            return float(s)
        except ValueError:
            fail(method, name, text, "expected a number")
    if kind.base is tuple:
        return tuple(part.strip().lower() for part in s.replace("+", ",").split(",") if part.strip())
    return low if kind.choices else s


def _checked(method: str, name: str, kind: _Kind, value: Any) -> Any:
    """``value`` if it has the field's type (ints widened to float), else the option error."""
    if value is None:
        if kind.optional:
            return None
        fail(method, name, value, "a value is required")
    if kind.base is bool:
        if not isinstance(value, bool):
            fail(method, name, value, "expected true or false")
        return value
    if kind.base in (int, float):
        if isinstance(value, bool) or not isinstance(value, (int, float) if kind.base is float else int):
            fail(method, name, value, "expected an integer" if kind.base is int else "expected a number")
        if kind.base is int:
            return value
        if math.isnan(value) or (math.isinf(value) and not kind.allow_inf):
            fail(method, name, value, "expected a finite number")
        return float(value)
    if kind.base is tuple:
        if isinstance(value, str):
            value = _parse(method, name, kind, value)
        value = tuple(value) if isinstance(value, list) else value
        if not isinstance(value, tuple) or not value or not all(isinstance(v, str) for v in value):
            fail(method, name, value, "expected a non-empty tuple of names")
        bad = [v for v in value if kind.choices and v not in kind.choices]
        if bad:
            fail(method, name, value, f"unknown {bad[0]!r}; choose from {', '.join(kind.choices or ())}")
        return value
    if not isinstance(value, str):
        fail(method, name, value, "expected a string")
    if kind.choices and value not in kind.choices:
        fail(method, name, value, f"choose from {', '.join(kind.choices)}")
    return value


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "none"
    if isinstance(value, tuple):
        return "+".join(map(str, value))
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


_Config = TypeVar("_Config", bound="MethodConfig")


class MethodConfig:
    """Base of the methods' frozen config dataclasses: type checks, dict and help by field.

    A subclass sets ``METHOD`` (the name in error messages), declares its fields with
    :func:`option` and, in its own ``__post_init__``, calls ``super().__post_init__()``
    before its range checks.
    """

    METHOD: ClassVar[str] = ""

    def __post_init__(self) -> None:
        for name, kind in _kinds(type(self)).items():
            object.__setattr__(self, name, _checked(self.METHOD, name, kind, getattr(self, name)))

    @classmethod
    def from_dict(cls: type[_Config], values: Mapping[str, Any]) -> _Config:
        """Build from Python values or the CLI's strings (``"0.6"``, ``"on"``, ``"conv+linear"``).

        An unknown key or a bad value raises :class:`GreenpropError` naming the option.
        """
        kinds = _kinds(cls)
        kwargs: dict[str, Any] = {}
        for key, value in values.items():
            if key not in kinds:
                fail(cls.METHOD, key, value, f"unknown option; known: {', '.join(kinds)}")
            kwargs[key] = _parse(cls.METHOD, key, kinds[key], value) if isinstance(value, str) else value
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python settings (lists for tuples), for logs, YAML and :meth:`from_dict`."""
        return {
            name: list(v) if isinstance(v := getattr(self, name), tuple) else v for name in _kinds(type(self))
        }

    @classmethod
    def option_help(cls) -> dict[str, str]:
        """Option name -> help with its default, for ``greenprop methods``."""
        out = {}
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            default = f.metadata.get("default_text", _show(f.default))
            out[f.name] = f"{f.metadata.get('help', '')} (default {default})".strip()
        return out


def require(config: MethodConfig, name: str, ok: bool, rule: str) -> None:
    """Raise the option error ``<name> ... must be <rule>`` unless ``ok``."""
    if not ok:
        fail(config.METHOD, name, getattr(config, name), f"must be {rule}")


def check_interval(config: MethodConfig, name: str, interval: str) -> None:
    """Check that a number field lies in ``interval``, written ``"(0, 1]"``, ``"[1, inf)"``."""
    low_text, high_text = interval[1:-1].split(",")
    low, high = float(low_text), float(high_text)
    value = getattr(config, name)
    above = low < value if interval[0] == "(" else low <= value
    below = value < high if interval[-1] == ")" else value <= high
    if math.isinf(high) and interval[-1] == ")":
        rule = f"{'>' if interval[0] == '(' else '>='} {low_text.strip()}"
    else:
        rule = f"in {interval}"
    require(config, name, above and below, rule)
