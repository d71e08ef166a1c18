"""VCAS: variance-controlled adaptive sampling of the backward pass (arXiv:2402.17227).

This package currently holds the first layer: pure, stateless samplers
(:mod:`greenprop.vcas.samplers`) and the settings (:class:`VCASConfig`).
"""

from greenprop.vcas.config import VCASConfig
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
    "leverage_sample",
    "leverage_scores",
    "sample_mask",
    "sample_rows",
    "sampled_weight_grad",
    "soft_topk_probabilities",
]
