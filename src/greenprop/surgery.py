"""The class swap every method's surgery uses: turn modules into a method's layer class in place, and back.

A swap changes only ``module.__class__`` and adds the plain attributes the method's
layer needs; it creates no module, Parameter or buffer. So every reference to the
module (a parent, a hook, an optimizer's param group) stays valid, ``state_dict`` keys
are unchanged, and a checkpoint moves freely between the converted and the plain
model. The swap records the original class and the attributes it added, so the undo
restores the module exactly. The methods' ``apply_*`` functions decide which modules
to swap; this module holds what their contract shares (option checks, the warning
when nothing is swapped, the error of a controller on an unconverted model).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

from torch import nn

from greenprop.errors import GreenpropError

__all__ = [
    "ModuleFilter",
    "NothingConverted",
    "SurgeryWarning",
    "Swap",
    "check_config",
    "check_filter",
    "conversion_required",
    "converted_layers",
    "not_converted",
    "swap",
    "unswap",
    "warn_nothing_swapped",
]

#: ``module_filter_fn(module, qualified_name) -> bool``: whether a layer is converted.
ModuleFilter = Callable[[nn.Module, str], bool]

_RECORD = "_greenprop_swap"  # (original class, names of the attributes the swap added)
C = TypeVar("C")


class SurgeryWarning(UserWarning):
    """An ``apply_*`` call that converted nothing (the model is left as it was)."""


class NothingConverted(GreenpropError):
    """A method's builder converted no layer (see :func:`conversion_required`)."""


@dataclass(frozen=True)
class Swap:
    """One planned swap: ``module`` becomes ``cls``, then ``init(module)`` sets its attributes."""

    module: nn.Module
    cls: type[nn.Module]
    init: Callable[[nn.Module], None]


def swap(plan: Sequence[Swap]) -> None:
    """Carry out every swap of ``plan``, in order; on an error, undo the ones done and re-raise."""
    done: list[nn.Module] = []
    try:
        for item in plan:
            _swap_one(item)
            done.append(item.module)
    except BaseException:
        for module in reversed(done):
            unswap(module)
        raise


def _swap_one(item: Swap) -> None:
    module, original = item.module, type(item.module)
    before = set(module.__dict__)
    module.__class__ = item.cls
    try:
        item.init(module)
    except BaseException:
        for name in module.__dict__.keys() - before:
            del module.__dict__[name]
        module.__class__ = original
        raise
    module.__dict__[_RECORD] = (original, tuple(k for k in module.__dict__ if k not in before))


def converted_layers(model: nn.Module) -> list[str]:
    """Qualified names of the layers some method's :func:`swap` converted, in model order."""
    return [name for name, module in model.named_modules() if _RECORD in module.__dict__]


def unswap(module: nn.Module) -> bool:
    """Give a swapped ``module`` back its original class and drop what the swap added.

    Returns False (and changes nothing) for a module no :func:`swap` converted.
    """
    record = module.__dict__.pop(_RECORD, None)
    if record is None:
        return False
    original, added = record
    for name in added:
        module.__dict__.pop(name, None)
    module.__class__ = original
    return True


def check_config(config: C | None, cls: type[C]) -> C:
    """``config``, or ``cls()`` for None; anything else is refused before the model is touched."""
    if config is None:
        return cls()
    if not isinstance(config, cls):
        raise GreenpropError(f"config must be a {cls.__name__}, got {type(config).__name__}")
    return config


def check_filter(module_filter_fn: ModuleFilter | None) -> None:
    """Refuse a ``module_filter_fn`` that is neither None nor callable."""
    if module_filter_fn is not None and not callable(module_filter_fn):
        raise GreenpropError(
            "module_filter_fn must be a function (module, qualified_name) -> bool, "
            f"got {type(module_filter_fn).__name__}"
        )


def warn_nothing_swapped(apply_name: str, reason: str) -> None:
    """The one warning of an ``apply_*`` call that converted no layer (raised at its caller)."""
    warnings.warn(f"{apply_name} converted no layer: {reason}", SurgeryWarning, stacklevel=3)


@contextmanager
def conversion_required(what: str) -> Iterator[None]:
    """Inside, an ``apply_*`` that converts nothing raises instead of warning.

    For the CLI's method builders: a run whose method converted no layer would measure
    dense training under the method's name. The error names ``what`` (the method and the
    options that decided it) and the reason.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("error", SurgeryWarning)
        try:
            yield
        except SurgeryWarning as warning:
            reason = str(warning).partition("converted no layer: ")[2] or str(warning)
            raise NothingConverted(f"{what} converted no layer: {reason}") from None


def not_converted(method: str, apply_name: str) -> GreenpropError:
    """The error of a controller built on a model its ``apply_*`` has not converted."""
    return GreenpropError(f"the model has no {method} layers: call {apply_name}(model) first")
