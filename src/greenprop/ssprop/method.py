"""CLI entry point of ssProp: ``--method ssprop:keep=0.6,schedule=cosine,min_keep=0.2``."""

from __future__ import annotations

from torch import nn

from greenprop.controller import Controller
from greenprop.ssprop.config import SSPropConfig
from greenprop.ssprop.controller import SSProp
from greenprop.ssprop.surgery import apply_ssprop
from greenprop.surgery import conversion_required

__all__ = ["CONFIG", "build"]

#: The settings' dataclass: option names, defaults and help for ``greenprop methods``.
CONFIG = SSPropConfig


def build(
    model: nn.Module, options: dict[str, str], *, epochs: int, steps_per_epoch: int, seed: int
) -> list[Controller]:
    """Validate ``options``, convert ``model`` in place, return ``[SSProp controller]``.

    Everything is validated before the model is touched, so a bad option leaves the
    model as it was.
    """
    config = SSPropConfig.from_dict({"seed": seed, **options})
    schedule = config.keep_schedule(epochs, steps_per_epoch)
    schedule.check_length()
    decided_by = f"layers={'+'.join(config.layers)}, min_channels={config.min_channels}"
    with conversion_required(f"ssprop ({decided_by})"):
        apply_ssprop(model, config)
    return [SSProp(model, schedule)]
