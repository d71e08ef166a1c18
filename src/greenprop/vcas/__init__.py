"""VCAS: variance-controlled adaptive sampling of the backward pass (arXiv:2402.17227).

Layers, from the bottom: pure stateless samplers (:mod:`greenprop.vcas.samplers`), the
control law's pure functions (:mod:`greenprop.vcas.control`), the settings
(:class:`VCASConfig`), the autograd layers (:mod:`greenprop.vcas.layers`), the model
surgery (:func:`apply_vcas`, :func:`remove_vcas`) and the controller (:class:`VCAS`).
"""

from greenprop.vcas.config import VCASConfig
from greenprop.vcas.controller import VCAS
from greenprop.vcas.samplers import activation_sample, sampled_weight_grad
from greenprop.vcas.surgery import VCASHandle, apply_vcas, find_blocks, remove_vcas, vcas_handle

__all__ = [
    "VCAS",
    "VCASConfig",
    "VCASHandle",
    "activation_sample",
    "apply_vcas",
    "find_blocks",
    "remove_vcas",
    "sampled_weight_grad",
    "vcas_handle",
]
