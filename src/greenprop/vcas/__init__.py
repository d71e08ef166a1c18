"""VCAS: variance-controlled adaptive sampling of the backward pass (arXiv:2402.17227).

Layers, from the bottom: pure stateless samplers (:mod:`greenprop.vcas.samplers`), the
control law's pure functions (:mod:`greenprop.vcas.control`), the settings
(:class:`VCASConfig`), the autograd layers (:mod:`greenprop.vcas.layers`), the model
surgery (:func:`apply_vcas`, :func:`remove_vcas`) and the controller (:class:`VCAS`).
"""

from greenprop.vcas.config import VCASConfig
from greenprop.vcas.control import (
    block_keep_ratio,
    ema,
    update_activation_keep,
    update_weight_ratio,
    variance_ratio,
)
from greenprop.vcas.controller import VCAS
from greenprop.vcas.samplers import (
    activation_sample,
    leverage_sample,
    leverage_scores,
    sample_mask,
    sample_rows,
    sampled_weight_grad,
    soft_topk_probabilities,
)
from greenprop.vcas.surgery import apply_vcas, find_blocks, remove_vcas

__all__ = [
    "VCAS",
    "VCASConfig",
    "activation_sample",
    "apply_vcas",
    "block_keep_ratio",
    "ema",
    "find_blocks",
    "leverage_sample",
    "leverage_scores",
    "remove_vcas",
    "sample_mask",
    "sample_rows",
    "sampled_weight_grad",
    "soft_topk_probabilities",
    "update_activation_keep",
    "update_weight_ratio",
    "variance_ratio",
]
