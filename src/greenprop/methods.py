"""Registry of training methods that the CLI and `compare` can run by name.

A method is given as a spec string ``name`` or ``name:key=value,key=value``
(values may themselves contain ``:``, e.g. ``gradsamp:strategy=pe:5``). A builder
applies the method to a model in place and returns the controllers that drive it.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

from greenprop.errors import GreenpropError
from greenprop.train.hooks import Controller


@dataclass(frozen=True)
class MethodSpec:
    """A parsed method spec: its registered name and raw string options.

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
    """A registered method. ``builder(model, options, *, epochs, steps_per_epoch, seed)``
    applies it to ``model`` in place and returns its controllers."""

    name: str
    builder: Callable[..., list[Controller]]
    help: str
    options: dict[str, str]


_REGISTRY: dict[str, Method] = {}

# Methods that live in their own subpackage register lazily, so importing greenprop
# does not import every method's dependencies.
_LAZY: dict[str, tuple[str, str]] = {
    "ssprop": ("greenprop.ssprop.method", "channel-sparse backward for Conv2d/Linear"),
    "gradsamp": ("greenprop.gradsamp.method", "skip epochs, apply GGD-sampled updates"),
    "vcas": ("greenprop.vcas.method", "variance-controlled sampling of activation and weight gradients"),
}


def _baseline(model: nn.Module, options: dict[str, str], **_: int) -> list[Controller]:
    if options:
        raise GreenpropError(f"method 'baseline' takes no options, got {sorted(options)}")
    return []


def register_method(
    name: str,
    builder: Callable[..., list[Controller]],
    *,
    help: str,
    options: dict[str, str] | None = None,
) -> None:
    """Make ``name`` available to ``greenprop train --method`` and ``compare``."""
    _REGISTRY[name] = Method(name, builder, help, dict(options or {}))


register_method("baseline", _baseline, help="dense training, the reference every saving is measured against")


def get_method(name: str) -> Method:
    """Look up a method, importing its module on first use."""
    if name not in _REGISTRY and name in _LAZY:
        module_name, help_text = _LAZY[name]
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            raise GreenpropError(f"method {name!r} is not available in this install: {err}") from err
        config = getattr(module, "CONFIG", None)
        register_method(name, module.build, help=help_text, options=config.option_help() if config else {})
    if name not in _REGISTRY:
        raise GreenpropError(f"unknown method {name!r}; choose from {', '.join(available_methods())}")
    return _REGISTRY[name]


def available_methods() -> list[str]:
    names = set(_REGISTRY)
    for lazy_name, (module_name, _) in _LAZY.items():
        if importlib.util.find_spec(module_name) is not None:
            names.add(lazy_name)
    return sorted(names)


def parse_method(spec: str) -> MethodSpec:
    """Parse ``name[:key=value,...]`` or several joined by ``;``; errors name the bad part."""
    if ";" in spec:
        parts = tuple(_parse_single(part) for part in spec.split(";"))
        names = [part.name for part in parts]
        if "baseline" in names:
            raise GreenpropError(f"'baseline' cannot be combined with other methods ({spec!r})")
        if len(set(names)) != len(names):
            raise GreenpropError(f"a method appears twice in {spec!r}")
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
                raise GreenpropError(f"method option {item!r} in {spec!r} is not key=value")
            options[key.strip()] = value.strip()
    get_method(name)  # fail early on unknown names
    return MethodSpec(name, options)


def build_method(
    spec: MethodSpec, model: nn.Module, *, epochs: int, steps_per_epoch: int, seed: int
) -> list[Controller]:
    """Apply ``spec`` to ``model`` in place; bad options become one clear GreenpropError."""
    if spec.parts:
        return [
            controller
            for part in spec.parts
            for controller in build_method(
                part, model, epochs=epochs, steps_per_epoch=steps_per_epoch, seed=seed
            )
        ]
    method = get_method(spec.name)
    try:
        return method.builder(
            model, dict(spec.options), epochs=epochs, steps_per_epoch=steps_per_epoch, seed=seed
        )
    except GreenpropError:
        raise
    except ValueError as err:
        raise GreenpropError(f"method {spec.label!r}: {err}") from err
