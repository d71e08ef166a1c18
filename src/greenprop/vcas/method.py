"""CLI entry point of VCAS: ``--method vcas:update_every=20,tau_act=0.05``."""

from __future__ import annotations

from torch import nn

from greenprop.controller import Controller
from greenprop.surgery import conversion_required
from greenprop.vcas.config import VCASConfig
from greenprop.vcas.controller import VCAS
from greenprop.vcas.report import report_extras
from greenprop.vcas.surgery import apply_vcas

__all__ = ["CONFIG", "REPORT_EXTRAS", "build"]

#: Figures VCAS adds to a comparison report (its controller's ratios over training).
REPORT_EXTRAS = report_extras

#: The settings' dataclass: option names, defaults and help for ``greenprop methods``.
CONFIG = VCASConfig


def build(
    model: nn.Module, options: dict[str, str], *, epochs: int, steps_per_epoch: int, seed: int
) -> list[Controller]:
    """Validate ``options``, apply VCAS to the model's blocks, return the controller.

    The blocks are the model's ``vcas_block_types`` where it names them (the DDPM U-Net's
    residual blocks), else its repeated layers (:func:`~greenprop.vcas.surgery.find_blocks`).
    """
    config = VCASConfig.from_dict({"seed": seed, **options})
    with conversion_required("vcas"):
        apply_vcas(model, config, block_types=getattr(model, "vcas_block_types", None))
    return [VCAS(model, config)]
