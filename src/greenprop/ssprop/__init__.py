"""ssProp: scheduled channel-sparse backpropagation for Conv2d (and, opt-in, Linear).

In sparse steps each converted layer computes its backward with only the ``k`` output
channels whose gradient has the largest mean magnitude (``k = floor(keep * C_out)``),
as smaller dense kernels; the forward is unchanged. See :class:`SSPropConfig`,
:func:`apply_ssprop` and the :class:`SSProp` controller.

Source: Zhong, Huang, Shi, "ssProp: Energy-Efficient Training for Convolutional Neural
Networks with Scheduled Sparse Back Propagation".
"""

from greenprop.ssprop.config import SSPropConfig
from greenprop.ssprop.controller import SSProp
from greenprop.ssprop.functional import sparse_conv2d, sparse_linear
from greenprop.ssprop.layers import SparseConv2d, SparseLinear
from greenprop.ssprop.schedule import KeepSchedule
from greenprop.ssprop.surgery import apply_ssprop, remove_ssprop, sparse_layers

__all__ = [
    "KeepSchedule",
    "SSProp",
    "SSPropConfig",
    "SparseConv2d",
    "SparseLinear",
    "apply_ssprop",
    "remove_ssprop",
    "sparse_conv2d",
    "sparse_layers",
    "sparse_linear",
]
