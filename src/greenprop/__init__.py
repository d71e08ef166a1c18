"""greenprop: cheaper neural-network training by doing less backpropagation.

Public API (methods are imported on first use, so ``import greenprop`` stays light):

- ssProp: :func:`apply_ssprop`, :func:`remove_ssprop`, :class:`SSPropConfig`, :class:`SSProp`
- GradSamp: :class:`GradSamp` (strategies in :mod:`greenprop.schedules`, GGD in :mod:`greenprop.ggd`)
- the trainer's hook interface :class:`Controller`, and :class:`Quantity` for measured figures
"""

from __future__ import annotations

import importlib
from typing import Any

from greenprop.errors import GreenpropError
from greenprop.metering.quantity import Quantity
from greenprop.train.hooks import Controller

__version__ = "0.1.0"

_LAZY = {
    "apply_ssprop": "greenprop.ssprop",
    "remove_ssprop": "greenprop.ssprop",
    "SSPropConfig": "greenprop.ssprop",
    "SSProp": "greenprop.ssprop",
    "GradSamp": "greenprop.gradsamp",
}

__all__ = [
    "Controller",
    "GradSamp",
    "GreenpropError",
    "Quantity",
    "SSProp",
    "SSPropConfig",
    "__version__",
    "apply_ssprop",
    "remove_ssprop",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'greenprop' has no attribute {name!r}")
