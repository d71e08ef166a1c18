"""CLI entry point of MeZO: ``--method mezo:eps=1e-3,lr=1e-5``."""

from __future__ import annotations

from torch import nn

from greenprop.controller import Controller
from greenprop.mezo.config import MeZOConfig
from greenprop.mezo.controller import MeZO

__all__ = ["CONFIG", "build"]

#: The settings' dataclass: option names, defaults and help for ``greenprop methods``.
CONFIG = MeZOConfig


def build(
    model: nn.Module, options: dict[str, str], *, epochs: int, steps_per_epoch: int, seed: int
) -> list[Controller]:
    """Validate ``options`` (the run's seed unless given) and return ``[MeZO(model, ...)]``."""
    return [MeZO(model, MeZOConfig.from_dict({"seed": seed, **options}))]
