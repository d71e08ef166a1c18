"""greenprop: cheaper neural-network training by doing less backpropagation.

Public API (methods are imported on first use, so ``import greenprop`` stays light):

- ssProp: :func:`apply_ssprop`, :func:`remove_ssprop`, :class:`SSPropConfig`, :class:`SSProp`
- GradSamp: :class:`GradSamp` (strategies in :mod:`greenprop.gradsamp.schedule`, GGD in
  :mod:`greenprop.gradsamp.ggd`)
- VCAS: :func:`apply_vcas`, :func:`remove_vcas`, :class:`VCASConfig`, :class:`VCAS`
- the hook interface :class:`Controller` (and the :class:`RunContext` it receives), and
  :class:`Quantity` for measured figures
"""

from __future__ import annotations

import importlib
from typing import Any

from greenprop.controller import Controller, RunContext
from greenprop.errors import GreenpropError
from greenprop.metering.quantity import Quantity
from greenprop.surgery import SurgeryWarning

__version__ = "0.1.0"

_LAZY = {
    "apply_ssprop": "greenprop.ssprop",
    "remove_ssprop": "greenprop.ssprop",
    "SSPropConfig": "greenprop.ssprop",
    "SSProp": "greenprop.ssprop",
    "GradSamp": "greenprop.gradsamp",
    "GradSampConfig": "greenprop.gradsamp",
    "apply_vcas": "greenprop.vcas",
    "remove_vcas": "greenprop.vcas",
    "VCASConfig": "greenprop.vcas",
    "VCAS": "greenprop.vcas",
}

__all__ = [
    "VCAS",
    "Controller",
    "GradSamp",
    "GradSampConfig",
    "GreenpropError",
    "Quantity",
    "RunContext",
    "SSProp",
    "SSPropConfig",
    "SurgeryWarning",
    "VCASConfig",
    "__version__",
    "apply_ssprop",
    "apply_vcas",
    "remove_ssprop",
    "remove_vcas",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'greenprop' has no attribute {name!r}")
