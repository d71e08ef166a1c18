"""CLI entry point of GradSamp: ``--method gradsamp:strategy=pr:0.2,guard_threshold=0.1``."""

from __future__ import annotations

from torch import nn

from greenprop.controller import Controller
from greenprop.gradsamp.config import GradSampConfig
from greenprop.gradsamp.controller import GradSamp

__all__ = ["CONFIG", "build"]

#: The settings' dataclass: option names, defaults and help for ``greenprop methods``.
CONFIG = GradSampConfig


def build(
    model: nn.Module, options: dict[str, str], *, epochs: int, steps_per_epoch: int, seed: int
) -> list[Controller]:
    """Validate ``options`` (the run's seed unless given) and return ``[GradSamp(model, ...)]``."""
    config = GradSampConfig.from_dict({"seed": seed, **options})
    return [GradSamp(model, config, epochs=epochs)]
