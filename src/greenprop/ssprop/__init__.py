"""ssProp: scheduled channel-sparse backpropagation for Conv2d (and, opt-in, Linear).

In sparse steps each converted layer computes its backward with only the ``k`` output
channels whose gradient has the largest mean magnitude (``k = floor(keep * C_out)``),
as smaller dense kernels; the forward is unchanged. See :class:`SSPropConfig`,
:func:`apply_ssprop` and the :class:`SSProp` controller.

Source: Zhong, Huang, Shi, "ssProp: Energy-Efficient Training for Convolutional Neural
Networks with Scheduled Sparse Back Propagation".
"""

from greenprop.ssprop.config import LAYER_TYPES, SSPropConfig
from greenprop.ssprop.controller import SSProp
from greenprop.ssprop.functional import (
    SELECTIONS,
    ChannelSelector,
    channel_scores,
    conv2d_sparse_backward,
    gather_channels,
    keep_count,
    linear_sparse_backward,
    select_channels,
    sparse_conv2d,
    sparse_linear,
)
from greenprop.ssprop.layers import SparseConv2d, SparseLayer, SparseLinear, is_sparse_layer
from greenprop.ssprop.schedule import SCHEDULE_KINDS, KeepSchedule, keep_shape
from greenprop.ssprop.surgery import (
    apply_ssprop,
    output_layer_names,
    remove_ssprop,
    sparse_layers,
)

__all__ = [
    "LAYER_TYPES",
    "SCHEDULE_KINDS",
    "SELECTIONS",
    "ChannelSelector",
    "KeepSchedule",
    "SSProp",
    "SSPropConfig",
    "SparseConv2d",
    "SparseLayer",
    "SparseLinear",
    "apply_ssprop",
    "channel_scores",
    "conv2d_sparse_backward",
    "gather_channels",
    "is_sparse_layer",
    "keep_count",
    "keep_shape",
    "linear_sparse_backward",
    "output_layer_names",
    "remove_ssprop",
    "select_channels",
    "sparse_conv2d",
    "sparse_layers",
    "sparse_linear",
]
