"""The training methods that the CLI and `compare` can run by name.

A method is given as a spec string ``name`` or ``name:key=value,key=value``
(values may themselves contain ``:``, e.g. ``gradsamp:strategy=pe:5``). A method module
defines ``build(model, options, *, epochs, steps_per_epoch, seed)``, which applies the
method to a model in place and returns the controllers that drive it, and optionally
``CONFIG`` (its settings' dataclass, the source of its option help) and ``REPORT_EXTRAS``
(a callable the comparison report may use).

The built-in methods are a static table, imported on first use so ``import greenprop``
does not import every method's dependencies. Nothing registers itself at import time;
tests and experiments add a method for a while with :func:`temporary_method`.
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import itertools
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cache
from typing import Any

from torch import nn

from greenprop.controller import Controller
from greenprop.errors import GreenpropError
from greenprop.surgery import NothingConverted, converted_layers

__all__ = [
    "BUILTIN_METHODS",
    "Method",
    "MethodSpec",
    "available_methods",
    "build_method",
    "get_method",
    "parse_method",
    "temporary_method",
]


@dataclass(frozen=True)
class MethodSpec:
    """A parsed method spec: its name and raw string options.

    Several methods combine with ``;`` (``gradsamp:strategy=pe:5;ssprop:keep=0.6``):
    the combination's ``parts`` are applied in order and their controllers all run.
    """

    name: str
    options: dict[str, str] = field(default_factory=dict)
    parts: tuple[MethodSpec, ...] = ()

    @property
    def label(self) -> str:
        """The spec as written back, used to name runs and table rows."""
        if self.parts:
            return ";".join(part.label for part in self.parts)
        if not self.options:
            return self.name
        return self.name + ":" + ",".join(f"{k}={v}" for k, v in self.options.items())


@dataclass(frozen=True)
class Method:
    """A method by name. ``builder(model, options, *, epochs, steps_per_epoch, seed)``
    applies it to ``model`` in place and returns its controllers; ``options`` maps each
    option to its help; ``report_extras`` is the module's ``REPORT_EXTRAS`` (or None)."""

    name: str
    builder: Callable[..., list[Controller]]
    help: str
    options: dict[str, str] = field(default_factory=dict)
    #: ``report_extras(results, out_dir) -> [(caption, path)]``: figures for compare's report.
    report_extras: Callable[..., Any] | None = None


#: Built-in methods: name -> (module defining ``build``, one-line help); the baseline has none.
BUILTIN_METHODS: dict[str, tuple[str | None, str]] = {
    "baseline": (None, "dense training, the reference every saving is measured against"),
    "ssprop": ("greenprop.ssprop.method", "channel-sparse backward for Conv2d/Linear"),
    "gradsamp": ("greenprop.gradsamp.method", "skip epochs, apply GGD-sampled updates"),
    "vcas": ("greenprop.vcas.method", "variance-controlled sampling of activation and weight gradients"),
    "mezo": ("greenprop.mezo.method", "forward passes only: a seeded two-point gradient estimate per step"),
}

_TEMPORARY: dict[str, Method] = {}


def _baseline(model: nn.Module, options: dict[str, str], **_: int) -> list[Controller]:
    if options:
        raise GreenpropError(f"method 'baseline' takes no options, got {sorted(options)}")
    return []


@contextmanager
def temporary_method(
    name: str,
    builder: Callable[..., list[Controller]],
    *,
    help: str,
    options: dict[str, str] | None = None,
) -> Iterator[Method]:
    """Make ``name`` available to ``--method`` and ``compare`` inside the ``with`` block."""
    if name in BUILTIN_METHODS or name in _TEMPORARY:
        raise GreenpropError(f"method {name!r} exists already")
    method = Method(name, builder, help, dict(options or {}))
    _TEMPORARY[name] = method
    try:
        yield method
    finally:
        del _TEMPORARY[name]


@cache
def _load_builtin(name: str) -> Method:
    module_name, help_text = BUILTIN_METHODS[name]
    if module_name is None:
        return Method(name, _baseline, help_text)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        raise GreenpropError(f"method {name!r} is not available in this install: {err}") from err
    config = getattr(module, "CONFIG", None)
    options = config.option_help() if config is not None else {}
    return Method(name, module.build, help_text, options, getattr(module, "REPORT_EXTRAS", None))


def get_method(name: str) -> Method:
    """Look up a method, importing its module on first use."""
    if name in _TEMPORARY:
        return _TEMPORARY[name]
    if name in BUILTIN_METHODS:
        return _load_builtin(name)
    raise GreenpropError(f"unknown method {name!r}; choose from {', '.join(available_methods())}")


def available_methods() -> list[str]:
    """Names of the methods this install can run (built-in ones whose module imports)."""
    names = set(_TEMPORARY)
    for name, (module_name, _) in BUILTIN_METHODS.items():
        if module_name is None or importlib.util.find_spec(module_name) is not None:
            names.add(name)
    return sorted(names)


def parse_method(spec: str) -> MethodSpec:
    """Parse ``name[:key=value,...]`` or several joined by ``;``; errors name the bad part."""
    if ";" in spec:
        parts = tuple(_parse_single(part) for part in spec.split(";"))
        names = [part.name for part in parts]
        if "baseline" in names:
            raise GreenpropError(f"'baseline' cannot be combined with other methods ({spec!r})")
        if len(set(names)) != len(names):
            raise GreenpropError(
                f"a method appears twice in {spec!r}; give each method once, with all its options "
                "joined by ',' (e.g. 'ssprop:keep=0.5,layers=conv+linear')"
            )
        return MethodSpec("+".join(names), {}, parts)
    return _parse_single(spec)


def _parse_single(spec: str) -> MethodSpec:
    spec = spec.strip()
    name, _, rest = spec.partition(":")
    if not name:
        raise GreenpropError(f"empty method name in {spec!r}")
    options: dict[str, str] = {}
    if rest:
        for item in rest.split(","):
            key, sep, value = item.partition("=")
            if not sep or not key.strip() or not value.strip():
                hint = ""
                if not sep and options:  # "layers=conv,linear": a list value split on ","
                    last = list(options)[-1]
                    hint = (
                        f"; options are separated by ',', so a list value joins with '+' "
                        f"({last}={options[last]}+{item.strip()})"
                    )
                raise GreenpropError(f"method option {item!r} in {spec!r} is not key=value{hint}")
            options[key.strip()] = value.strip()
    get_method(name)  # fail early on unknown names
    return MethodSpec(name, options)


def build_method(
    spec: MethodSpec, model: nn.Module, *, epochs: int, steps_per_epoch: int, seed: int
) -> list[Controller]:
    """Apply ``spec`` to ``model`` in place; bad options become one clear GreenpropError."""
    if spec.parts:
        run = {"epochs": epochs, "steps_per_epoch": steps_per_epoch, "seed": seed}
        return _build_combination(spec, model, run)
    method = get_method(spec.name)
    try:
        return method.builder(
            model, dict(spec.options), epochs=epochs, steps_per_epoch=steps_per_epoch, seed=seed
        )
    except GreenpropError:
        raise
    except ValueError as err:
        raise GreenpropError(f"method {spec.label!r}: {err}") from err


def _build_combination(spec: MethodSpec, model: nn.Module, run: dict[str, int]) -> list[Controller]:
    """Apply the parts in order; a part left without layers by earlier ones is named as a clash."""
    pristine = copy.deepcopy(model)  # to tell a clash from a part that converts nothing anyway
    controllers: list[Controller] = []
    owners: dict[str, str] = {}  # converted layer -> label of the part that converted it
    for part in spec.parts:
        try:
            controllers += build_method(part, model, **run)
        except NothingConverted as err:
            clash = _clash(spec, part, owners, pristine, run) if owners else None
            if clash is None:
                raise
            raise clash from err
        owners.update({name: part.label for name in converted_layers(model) if name not in owners})
    return controllers


def _builds(parts: tuple[MethodSpec, ...], pristine: nn.Module, run: dict[str, int]) -> nn.Module | None:
    """The model with ``parts`` applied in this order to a copy of ``pristine``; None if one fails."""
    model = copy.deepcopy(pristine)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            for part in parts:
                build_method(part, model, **run)
        except GreenpropError:
            return None
    return model


def _clash(
    spec: MethodSpec, part: MethodSpec, owners: dict[str, str], pristine: nn.Module, run: dict[str, int]
) -> GreenpropError | None:
    """What clashes and how to combine instead; None if ``part`` converts nothing alone either."""
    alone = _builds((part,), pristine, run)
    taken = [name for name in converted_layers(alone) if name in owners] if alone is not None else []
    if not taken:
        return None
    takers = " and ".join(dict.fromkeys(repr(owners[name]) for name in taken))
    shown = ", ".join(taken[:3]) + (f", ... ({len(taken)} in all)" if len(taken) > 3 else "")
    first_taker = next(p for p in spec.parts if p.label == owners[taken[0]])
    others = [p for p in spec.parts if p is not part]
    at = others.index(first_taker)
    moved = [*others[:at], part, *others[at:]]
    candidates = [tuple(moved), *itertools.permutations(spec.parts)]  # the smallest change first
    order = next((o for o in candidates if o != spec.parts and _builds(o, pristine, run) is not None), None)
    if order is not None:
        advice = (
            f"list them as {';'.join(p.label for p in order)!r} "
            "(each method converts only the layers the ones before it left)"
        )
    else:
        choosers = [p.name for p in spec.parts if "layers" in get_method(p.name).options]
        advice = "no order of them works on this model: " + (
            f"give {' or '.join(choosers)} other layers with its layers= option, or run them separately"
            if choosers
            else "run them separately"
        )
    return GreenpropError(
        f"methods clash in {spec.label!r}: {part.label!r} would convert layers that {takers} converted "
        f"first ({shown}), and a layer takes one method; {advice}"
    )
