"""VCAS: variance-controlled adaptive sampling of the backward pass (arXiv:2402.17227).

This package holds the first layer: pure, stateless samplers
(:mod:`greenprop.vcas.samplers`), the control law's pure functions
(:mod:`greenprop.vcas.control`) and the settings (:class:`VCASConfig`). Layers, surgery
and the variance controller come next.
"""

from greenprop.vcas.config import VCASConfig
from greenprop.vcas.control import (
    block_keep_ratio,
    ema,
    update_activation_keep,
    update_weight_ratio,
    variance_ratio,
)
from greenprop.vcas.samplers import (
    activation_sample,
    leverage_sample,
    leverage_scores,
    sample_mask,
    sample_rows,
    sampled_weight_grad,
    soft_topk_probabilities,
)

__all__ = [
    "VCASConfig",
    "activation_sample",
    "block_keep_ratio",
    "ema",
    "leverage_sample",
    "leverage_scores",
    "sample_mask",
    "sample_rows",
    "sampled_weight_grad",
    "soft_topk_probabilities",
    "update_activation_keep",
    "update_weight_ratio",
    "variance_ratio",
]
