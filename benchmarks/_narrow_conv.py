"""The first-k reference of the ssProp benchmarks: the zero-overhead floor of a channel-sparse backward.

:class:`NarrowConv2d` runs the same ``k``-channel ``convolution_backward`` as greenprop's
:class:`~greenprop.ssprop.SparseConv2d`, but on the *first* ``k`` output channels, with no
ranking, gather or scatter. Whatever greenprop costs above it is greenprop's own overhead.
``tests/test_benchmarks_smoke.py`` checks that both give the same gradients when
greenprop's top-k channels are the first ``k``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _memory_format(t: Tensor) -> torch.memory_format:
    """The memory format ``t`` is physically in (channels_last only when unambiguous)."""
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _pad_rows(rows: Tensor, like: Tensor) -> Tensor:
    """``rows`` followed by zero rows, shaped and laid out like ``like``.

    ``empty_like`` + one copy + one memset writes every byte once, the least any
    padding can do, and autograd's AccumulateGrad can steal the fresh tensor as .grad.
    """
    out = torch.empty_like(like)
    k = rows.shape[0]
    out.narrow(0, 0, k).copy_(rows)
    out.narrow(0, k, out.shape[0] - k).zero_()
    return out


class _NarrowConv2dFunction(torch.autograd.Function):
    """conv2d whose backward uses only the first ``k`` output channels (groups=1)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        input: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        stride: tuple[int, int],
        padding: tuple[int, int],
        dilation: tuple[int, int],
        k: int,
    ) -> Tensor:
        ctx.save_for_backward(input, weight)
        ctx.conv = (stride, padding, dilation, bias is not None)
        ctx.k = k
        return F.conv2d(input, weight, bias, stride, padding, dilation)

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        input, weight = ctx.saved_tensors
        stride, padding, dilation, has_bias = ctx.conv
        need_in, need_w, need_b = ctx.needs_input_grad[:3]
        need_b = need_b and has_bias
        k = ctx.k
        # Any kernel needs the kept slice of dy dense, so this one copy is unavoidable.
        dy = grad_output.narrow(1, 0, k).contiguous(memory_format=_memory_format(grad_output))
        gi, gw, gb = torch.ops.aten.convolution_backward(
            dy,
            input,
            weight.narrow(0, 0, k),
            [k] if has_bias else None,
            list(stride),
            list(padding),
            list(dilation),
            False,
            [0, 0],
            1,
            [need_in, need_w, need_b],
        )
        grad_weight = _pad_rows(gw, weight) if need_w else None
        grad_bias = _pad_rows(gb, weight.new_empty(weight.shape[0])) if need_b else None
        return (gi if need_in else None, grad_weight, grad_bias, None, None, None, None)


class NarrowConv2d(nn.Conv2d):
    """Conv2d whose backward computes the first ``narrow_k`` output channels only.

    The benchmark's zero-overhead floor for ssProp: the same small
    ``convolution_backward`` greenprop runs, minus channel ranking, gather and scatter.
    Gradients are those of greenprop's sparse backward when its top-k channels happen
    to be the first ``k`` (tested in ``tests/test_benchmarks_smoke.py``). Supports
    ``groups=1``, numeric padding and ``padding_mode="zeros"`` (all ResNet-18 convs).
    """

    narrow_k: int

    def __init__(self, *args: Any, narrow_k: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.narrow_k = narrow_k
        _check_supported(self)

    def forward(self, input: Tensor) -> Tensor:
        if not torch.is_grad_enabled() or self.narrow_k >= self.out_channels:
            return super().forward(input)
        return _NarrowConv2dFunction.apply(
            input,
            self.weight,
            self.bias,
            self.stride,
            self.padding,
            self.dilation,
            self.narrow_k,
        )


def _check_supported(conv: nn.Conv2d) -> None:
    if conv.groups != 1 or isinstance(conv.padding, str) or conv.padding_mode != "zeros":
        raise ValueError("NarrowConv2d supports groups=1, numeric padding and padding_mode='zeros' only")


def apply_reference(model: nn.Module, ks: Mapping[str, int]) -> nn.Module:
    """Turn the plain Conv2d layers named in ``ks`` into :class:`NarrowConv2d`, in place.

    Swaps the class like ``apply_ssprop`` does, so parameters stay the same objects.
    """
    modules = dict(model.named_modules())
    for name, k in ks.items():
        module = modules[name]
        if type(module) is not nn.Conv2d:
            raise TypeError(f"{name} is a {type(module).__name__}, expected a plain nn.Conv2d")
        _check_supported(module)
        module.__class__ = NarrowConv2d
        module.narrow_k = k  # type: ignore[attr-defined]
    return model
