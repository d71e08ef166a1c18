"""CLI entry point of VCAS: ``--method vcas:update_every=20,tau_act=0.05``."""

from __future__ import annotations

from torch import nn

from greenprop.controller import Controller
from greenprop.vcas.config import VCASConfig
from greenprop.vcas.controller import VCAS
from greenprop.vcas.report import report_extras
from greenprop.vcas.surgery import apply_vcas

__all__ = ["OPTIONS", "REPORT_EXTRAS", "build"]

#: Figures VCAS adds to a comparison report (its controller's ratios over training).
REPORT_EXTRAS = report_extras

#: Option name -> help text, for ``greenprop methods``.
OPTIONS: dict[str, str] = {
    "tau_act": "tolerated activation-sampling variance / SGD variance (default 0.025)",
    "tau_w": "tolerated token-sampling variance / SGD variance, per Linear (default 0.025)",
    "update_every": "F: steps between variance estimations (default 100; short runs need fewer)",
    "mc_repeats": "M: batches per estimation, >= 2 (default 2)",
    "s_step": "step of the global norm-mass keep s per update (default 0.01)",
    "weight_ratio_multiplier": "token ratios are multiplied or divided by this (default 0.95)",
    "ema_decay": "smoothing of the block ratios (default 0.6)",
    "variance_sample_fraction": "fraction of weight entries the variances are measured on (default 0.01)",
    "initial_keep": "starting s (default 1: start exact)",
    "initial_weight_ratio": "starting token ratio (default 1)",
    "min_ratio": "floor of every ratio (default 0.05)",
    "seed": "seed of the samplers (default: the run's seed)",
    "check_rows": "true: verify that skipped rows carry no gradient (debug; default false)",
}


def build(
    model: nn.Module, options: dict[str, str], *, epochs: int, steps_per_epoch: int, seed: int
) -> list[Controller]:
    """Validate ``options``, apply VCAS to the model's repeated blocks, return the controller."""
    config = VCASConfig.from_dict({"seed": seed, **options})
    apply_vcas(model, config)
    return [VCAS(model, config)]
