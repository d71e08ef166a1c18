"""Pure functions of ssProp: channel selection and the channel-sparse backward.

:func:`sparse_conv2d` / :func:`sparse_linear` are ``F.conv2d`` / ``F.linear`` whose
backward computes the gradient through only ``k`` output channels (top-k by ``|dy|``, or
drawn at random). The backward runs *smaller dense kernels* on the gathered channels (one
``convolution_backward`` with ``k`` output channels, or two ``k``-wide matmuls) and
scatters the kept rows of grad_weight / grad_bias back; nothing is masked, so
:class:`torch.utils.flop_counter.FlopCounterMode` counts the saving.

Scoring, gathering and scattering follow the tensor's *physical* layout (a channels_last
``dy`` is read as a contiguous ``(N*H*W, C)`` matrix): generic reductions over the logical
channel dim of a channels_last tensor are slow. Everything here is stateless; the layers in
:mod:`greenprop.ssprop.layers` hold the state and call these functions.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.modules.utils import _pair

from greenprop import kernels
from greenprop.rows import physical_channels_last, scatter_rows

__all__ = [
    "SELECTIONS",
    "ChannelSelector",
    "channel_scores",
    "channel_scores_torch",
    "conv2d_sparse_backward",
    "gather_channels",
    "keep_count",
    "linear_sparse_backward",
    "select_channels",
    "sparse_conv2d",
    "sparse_linear",
    "top_k",
]

#: How kept channels are chosen: the paper's top-k by mean |dy|, or its random ablation.
SELECTIONS: tuple[str, ...] = ("topk", "random")

# floor(keep * C) must not lose a channel to binary rounding (0.29 * 100 = 28.999...).
_FLOOR_EPS = 1e-9


def keep_count(keep: float, channels: int, round_to: int = 1) -> int:
    """Number of channels kept: ``max(1, floor(keep * channels))``, then rounded up.

    Rounding up to a multiple of ``round_to`` (capped at ``channels``) exists because
    oneDNN and tensor cores pad channel counts to a multiple (16 on oneDNN): an odd ``k``
    costs as much as the next multiple, so the extra channels come for free.
    """
    if channels < 1:
        raise ValueError(f"channels must be >= 1, got {channels}")
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"keep must be in (0, 1], got {keep!r}")
    if round_to < 1:
        raise ValueError(f"round_to must be >= 1, got {round_to!r}")
    k = max(1, math.floor(keep * channels + _FLOOR_EPS))
    if round_to > 1:
        k = -(-k // round_to) * round_to
    return min(k, channels)


def _channel_view(t: Tensor, channel_dim: int) -> Tensor:
    """An ``(outer, C, inner)`` view of ``t``'s physical layout.

    NCHW is ``(N, C, H*W)`` (copied only if strided), channels_last and Linear rows
    ``(rows, C, 1)`` (contiguous unless a Linear gradient is strided).
    """
    c = t.shape[channel_dim]
    if channel_dim == t.dim() - 1:
        return t.reshape(-1, c, 1)  # Linear: rows are samples/tokens, columns are features
    if channel_dim == 1 and physical_channels_last(t):
        return t.permute(0, 2, 3, 1).reshape(-1, c, 1)
    return t.contiguous().view(math.prod(t.shape[:channel_dim]), c, -1)


def channel_scores(grad_output: Tensor, channel_dim: int = 1) -> Tensor:
    """Importance of each output channel: sum of ``|dy|`` over all other dims (float32).

    A sum ranks exactly like the paper's mean. The reduction follows the physical
    layout (see the module docstring) and accumulates in float32 so bfloat16 gradients
    do not produce spurious ties. On CPU it is one read of ``dy`` in the C++ op of
    :mod:`greenprop.kernels` when that is built; otherwise (and on other devices)
    ``|dy|`` is materialised and summed with PyTorch ops.
    """
    view, use_kernel = _scoring_view(grad_output, channel_dim)
    return kernels.channel_abs_sum(view) if use_kernel else channel_scores_torch(view)


def _scoring_view(grad_output: Tensor, channel_dim: int) -> tuple[Tensor, bool]:
    """The ``(outer, C, inner)`` view scores are read from, and whether the C++ ops take it
    (built, on CPU, contiguous: a strided Linear gradient stays with PyTorch ops)."""
    if channel_dim < 0:
        channel_dim += grad_output.dim()
    view = _channel_view(grad_output, channel_dim)
    return view, view.is_contiguous() and kernels.available(view)


def channel_scores_torch(view: Tensor) -> Tensor:
    """The PyTorch-ops scoring of an ``(outer, C, inner)`` view (the kernel's fallback)."""
    if view.shape[2] == 1:
        return view.squeeze(2).abs().sum(0, dtype=torch.float32)
    return view.abs().sum(dim=(0, 2), dtype=torch.float32)


def top_k(scores: Tensor, k: int) -> Tensor:
    """Indices of the ``k`` largest ``scores`` of each row; ties go to the lower index.

    A stable descending sort, so the choice is deterministic and the same as the C++
    ``topk_channels`` op's (NaN ranks highest in both); ``torch.topk`` breaks ties
    arbitrarily.
    """
    return torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]


def select_channels(
    grad_output: Tensor,
    k: int,
    *,
    channel_dim: int = 1,
    selection: str = "topk",
    groups: int = 1,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Indices (int64, ascending) of the ``k`` channels *per group* to keep.

    ``topk`` ranks channels by :func:`channel_scores` of ``grad_output`` (ties to the
    lower index, see :func:`top_k`; on CPU one call of the C++ op when it is built); ``random``
    draws uniformly from ``generator`` (a CPU generator, indices moved to the
    gradient's device) and never reads the gradient, so the ablation is reproducible.
    With ``groups > 1`` the channels split into ``groups`` equal blocks and ``k`` are
    kept in every block, so the gathered weight is again a valid grouped-conv weight.
    """
    if selection not in SELECTIONS:
        raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}")
    c = grad_output.shape[channel_dim]
    if groups < 1 or c % groups:
        raise ValueError(f"groups={groups} does not divide {c} channels")
    per_group = c // groups
    if not 1 <= k <= per_group:
        raise ValueError(f"k must be in [1, {per_group}], got {k}")
    if selection == "topk":
        view, use_kernel = _scoring_view(grad_output, channel_dim)
        if use_kernel:
            return kernels.topk_channels(view, k, groups)  # scores, ranks and sorts in one call
        chosen = top_k(channel_scores_torch(view).view(groups, per_group), k)
    else:
        chosen = torch.stack([torch.randperm(per_group, generator=generator)[:k] for _ in range(groups)]).to(
            grad_output.device, non_blocking=True
        )
    chosen = chosen.sort(dim=1).values  # ascending indices keep the gathers cache-friendly
    if groups > 1:
        chosen = chosen + torch.arange(0, c, per_group, device=chosen.device).unsqueeze(1)
    return chosen.reshape(-1)


def gather_channels(t: Tensor, idx: Tensor, channel_dim: int = 1) -> Tensor:
    """``t`` restricted to channels ``idx``, dense, in the same memory format as ``t``.

    Gathers run on the contiguous physical ``(outer, C, inner)`` view of
    :func:`_channel_view` (for channels_last the ``(N*H*W, C)`` matrix): on CPU in the C++
    op of :mod:`greenprop.kernels` when that is built, otherwise ``index_select``.
    """
    if channel_dim < 0:
        channel_dim += t.dim()
    view = _channel_view(t, channel_dim)
    if view.is_contiguous() and kernels.available(view):
        kept = kernels.gather_channels(view, idx)
    else:
        kept = view.index_select(1, idx)
    if channel_dim == 1 and physical_channels_last(t):
        n, _, h, w = t.shape
        return kept.view(n, h, w, -1).permute(0, 3, 1, 2)
    shape = list(t.shape)
    shape[channel_dim] = idx.numel()
    return kept.view(shape)


def _take_rows(t: Tensor, idx: Tensor) -> Tensor:
    """``t`` restricted to rows ``idx`` of dim 0, in ``t``'s memory format.

    A plain ``index_select`` returns a channels_last weight as contiguous NCHW, which
    ``convolution_backward`` would copy back to channels_last before running.
    (``index_select`` over dim 0 copies whole rows already; the C++ gather is no faster.)
    """
    if physical_channels_last(t):
        return t.permute(0, 2, 3, 1).index_select(0, idx).permute(0, 3, 1, 2)
    return t.index_select(0, idx)


def _bias_sizes(bias_present: bool, channels: int) -> list[int] | None:
    return [channels] if bias_present else None


def conv2d_sparse_backward(
    grad_output: Tensor,
    input: Tensor,
    weight: Tensor,
    idx: Tensor | None,
    *,
    stride: tuple[int, int] | list[int],
    padding: tuple[int, int] | list[int],
    dilation: tuple[int, int] | list[int],
    groups: int = 1,
    has_bias: bool = True,
    output_mask: tuple[bool, bool, bool] = (True, True, True),
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Gradients of ``conv2d(input, weight, bias)`` using only output channels ``idx``.

    ``idx=None`` means all channels (the dense backward, no gather). Returns
    ``(grad_input, grad_weight, grad_bias)`` with ``None`` where ``output_mask`` is
    False (and for the bias when ``has_bias`` is False). grad_input is the input
    gradient of the kept channels alone; grad_weight / grad_bias hold the kept rows and
    zeros elsewhere. ``padding`` must be numeric (resolve ``"same"`` beforehand).
    """
    need_in, need_w, need_b = output_mask
    need_b = need_b and has_bias
    if not (need_in or need_w or need_b):
        return None, None, None
    c_out = weight.shape[0]
    if idx is None:
        dy, w = grad_output, weight
    else:
        dy = gather_channels(grad_output, idx)
        w = _take_rows(weight, idx)
    gi, gw, gb = torch.ops.aten.convolution_backward(
        dy,
        input,
        w,
        _bias_sizes(has_bias, w.shape[0]),
        list(stride),
        list(padding),
        list(dilation),
        False,
        [0, 0],
        groups,
        [need_in, need_w, need_b],
    )
    if idx is not None:
        if need_w:
            gw = scatter_rows(gw, idx, weight)
        if need_b:
            gb = scatter_rows(gb.to(weight.dtype), idx, torch.Size([c_out]))
    return (gi if need_in else None, gw if need_w else None, gb if need_b else None)


def linear_sparse_backward(
    grad_output: Tensor,
    input: Tensor,
    weight: Tensor,
    idx: Tensor | None,
    *,
    has_bias: bool = True,
    output_mask: tuple[bool, bool, bool] = (True, True, True),
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Gradients of ``linear(input, weight, bias)`` using only output features ``idx``.

    Any leading dims are flattened into rows. grad_input = ``dy[:, idx] @ W[idx]`` (an
    ``in x k`` contraction), grad_weight rows ``idx`` = ``dy[:, idx]^T @ x``, zeros
    elsewhere. ``idx=None`` is the dense backward.
    """
    need_in, need_w, need_b = output_mask
    need_b = need_b and has_bias
    out_f, in_f = weight.shape
    dy = grad_output.reshape(-1, out_f)
    if idx is not None:
        dy = gather_channels(dy, idx)
        w = weight.index_select(0, idx)
    else:
        w = weight
    gi = gw = gb = None
    if need_in:
        gi = (dy @ w).view(*grad_output.shape[:-1], in_f)
    if need_w:
        gw = dy.t() @ input.reshape(-1, in_f)
    if need_b:
        gb = dy.sum(0)
    if idx is not None:
        if gw is not None:
            gw = scatter_rows(gw, idx, weight)
        if gb is not None:
            gb = scatter_rows(gb.to(weight.dtype), idx, torch.Size([out_f]))
    return gi, gw, gb


Grads = tuple[Tensor | None, Tensor | None, Tensor | None]
#: ``run(idx)``: the gradients through output channels ``idx`` (``None`` = all, dense).
Run = Callable[[Tensor | None], Grads]


class ChannelSelector:
    """Chooses the kept channels inside a backward and runs the (sparse) gradient.

    The default picks ``k`` channels per group with :func:`select_channels`; the layers
    subclass it to add their one-off timing calibration.
    """

    def __init__(self, selection: str = "topk", generator: torch.Generator | None = None):
        if selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}")
        self.selection = selection
        self.generator = generator

    def dense_at(self, k: int) -> bool:
        """Whether keeping ``k`` channels should run as the plain dense op instead."""
        return False

    def indices(self, grad_output: Tensor, k: int, groups: int, channel_dim: int) -> Tensor:
        return select_channels(
            grad_output,
            k,
            channel_dim=channel_dim,
            selection=self.selection,
            groups=groups,
            generator=self.generator,
        )

    def __call__(self, grad_output: Tensor, k: int, groups: int, channel_dim: int, run: Run) -> Grads:
        return run(self.indices(grad_output, k, groups, channel_dim))


class _Op(NamedTuple):
    """One layer type for :class:`_SparseFunction`: its forward, sparse backward and channel layout."""

    forward: Callable[[Tensor, Tensor, Tensor | None], Tensor]
    backward: Callable[..., Grads]  # (dy, input, weight, idx, *, has_bias, output_mask)
    groups: int
    channel_dim: int


class _SparseFunction(torch.autograd.Function):
    """``op.forward(input, weight, bias)`` whose backward keeps ``k`` output channels per group."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        input: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        op: _Op,
        k: int,
        selector: ChannelSelector,
    ) -> Tensor:
        ctx.save_for_backward(input, weight)
        ctx.op, ctx.k, ctx.selector, ctx.has_bias = op, k, selector, bias is not None
        return op.forward(input, weight, bias)

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        input, weight = ctx.saved_tensors
        op, mask = ctx.op, tuple(ctx.needs_input_grad[:3])

        def run(idx: Tensor | None) -> Grads:
            return op.backward(grad_output, input, weight, idx, has_bias=ctx.has_bias, output_mask=mask)

        grads = ctx.selector(grad_output, ctx.k, op.groups, op.channel_dim, run)
        return (*grads, None, None, None)


def _conv2d_op(
    stride: tuple[int, int], padding: tuple[int, int], dilation: tuple[int, int], groups: int
) -> _Op:
    def forward(input: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return F.conv2d(input, weight, bias, stride, padding, dilation, groups)

    backward = partial(
        conv2d_sparse_backward, stride=stride, padding=padding, dilation=dilation, groups=groups
    )
    return _Op(forward, backward, groups, 1)


_LINEAR_OP = _Op(F.linear, linear_sparse_backward, 1, -1)


def _runs_plain(k: int, channels: int, selector: ChannelSelector | None) -> bool:
    """Whether the plain op runs: every channel kept, no gradient recorded, or calibrated dense."""
    return k >= channels or not torch.is_grad_enabled() or (selector is not None and selector.dense_at(k))


def _apply_sparse(
    op: _Op, input: Tensor, weight: Tensor, bias: Tensor | None, k: int, selector: ChannelSelector | None
) -> Tensor:
    """Run :class:`_SparseFunction`, casting like autocast would *outside* it.

    Conv and linear run in autocast's lower precision; inside a custom Function autocast
    would cast only the forward's operands, leaving the saved fp32 tensors to clash with
    a low-precision ``dy``. Casting here lets autograd record the casts (gradients flow
    back to fp32 parameters) and the Function runs with autocast off.
    """
    selector = selector or ChannelSelector()
    device_type = input.device.type
    if not torch.is_autocast_enabled(device_type):
        return _SparseFunction.apply(input, weight, bias, op, k, selector)
    dtype = torch.get_autocast_dtype(device_type)
    input, weight, bias = (
        t.to(dtype) if t is not None and t.is_floating_point() else t for t in (input, weight, bias)
    )
    with torch.autocast(device_type, enabled=False):
        return _SparseFunction.apply(input, weight, bias, op, k, selector)


def _numeric_padding(
    input: Tensor,
    weight: Tensor,
    padding: str | int | tuple[int, int],
    stride: tuple[int, int],
    dilation: tuple[int, int],
) -> tuple[Tensor, tuple[int, int]]:
    """Numeric padding for the backward kernel; an asymmetric ``"same"`` pads ``input`` instead.

    ``"same"`` splits ``dilation * (kernel - 1)`` with the odd one on the bottom / right,
    as ``nn.Conv2d`` does.
    """
    if not isinstance(padding, str):
        return input, _pair(padding)
    if padding == "valid":
        return input, (0, 0)
    if padding != "same":
        raise ValueError(f"padding must be numeric, 'same' or 'valid', got {padding!r}")
    if any(s != 1 for s in stride):
        raise ValueError(f"padding='same' needs stride 1, got {stride}")
    th, tw = (d * (k - 1) for d, k in zip(dilation, weight.shape[2:], strict=True))
    if th % 2 == 0 and tw % 2 == 0:
        return input, (th // 2, tw // 2)
    return F.pad(input, (tw // 2, tw - tw // 2, th // 2, th - th // 2)), (0, 0)


def sparse_conv2d(
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: int | tuple[int, int] = 1,
    padding: str | int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
    groups: int = 1,
    *,
    keep: float = 1.0,
    round_to: int = 1,
    selector: ChannelSelector | None = None,
) -> Tensor:
    """``F.conv2d`` with an ssProp backward that keeps a ``keep`` fraction of channels.

    ``k = keep_count(keep, C_out / groups, round_to)`` channels are kept per group. The
    forward is exactly ``F.conv2d``. When ``k`` reaches every channel, gradients are off or
    ``selector.dense_at(k)``, this *is* ``F.conv2d`` under plain autograd: no ranking, no
    custom Function. ``selector`` (default top-k) chooses the channels in the backward.
    """
    per_group = weight.shape[0] // groups
    k = keep_count(keep, per_group, round_to)
    if _runs_plain(k, per_group, selector):
        return F.conv2d(input, weight, bias, stride, padding, dilation, groups)
    stride, dilation = _pair(stride), _pair(dilation)
    input, numeric = _numeric_padding(input, weight, padding, stride, dilation)
    return _apply_sparse(_conv2d_op(stride, numeric, dilation, groups), input, weight, bias, k, selector)


def sparse_linear(
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    keep: float = 1.0,
    round_to: int = 1,
    selector: ChannelSelector | None = None,
) -> Tensor:
    """``F.linear`` with an ssProp backward that keeps a ``keep`` fraction of output features.

    Leading dims of ``input`` are rows; the plain-op rule is that of :func:`sparse_conv2d`.
    """
    k = keep_count(keep, weight.shape[0], round_to)
    if _runs_plain(k, weight.shape[0], selector):
        return F.linear(input, weight, bias)
    return _apply_sparse(_LINEAR_OP, input, weight, bias, k, selector)
