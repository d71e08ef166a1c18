"""The direct rule of the zoo ResNet's GroupNorm ``BasicBlock``: its backward on the kept rows by hand.

The block is ``relu(gn2(conv2(relu(gn1(conv1(x))))) + shortcut(x))``, the shortcut the
identity or ``gn(conv(x))`` (1x1, strided). Its forward keeps, batch first, what dense
autograd keeps apart from the first norm's activation: the input ``x`` and the output
(both kept anyway: the neighbouring blocks' input and output), each conv's output, and
each norm's mean and rstd (one number per sample and group). In backward the first
norm's activation ``relu(gn1(conv1 x))``, conv2's input, is computed again on the kept
rows from conv1's output and the forward's mean and rstd (one fused multiply-add and a
ReLU over the kept rows, equal to the forward's within rounding): one activation per
block less to keep than dense autograd, as many as the re-run path keeps. Then, op by
op on the kept rows: the output ReLU's mask from the output,
``native_group_norm_backward``, each conv's :func:`~greenprop.vcas.layers.conv_backward`,
and the residual sum. Its saved tensors are held beside autograd's (``frees_saved``): each
goes as soon as its kept rows are gathered, not when the block's backward returns, so near
ratio 1 the backward does not hold a full-size tensor beside its kept copy (the step's
peak stays at or below dense autograd's: ``benchmarks/vcas_step.py``'s tensor peak).

BatchNorm blocks never reach VCAS (:func:`~greenprop.vcas.apply_vcas` refuses them); any
other structure (a norm other than GroupNorm, a shortcut other than those two, a conv
that is not a :class:`~greenprop.vcas.layers.VCASConv2d`, hooks on a norm) is refused and
takes the re-run path.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from greenprop.vcas.direct import bypassed, layer_grads
from greenprop.vcas.layers import VCASConv2d

__all__ = ["RULE", "BasicBlockRule"]


def _norm_forward(norm: nn.GroupNorm, h: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``F.group_norm``'s output (the same aten call it makes) with its mean and rstd.

    Returns the normalised tensor, the input as the kernel saw it (what the backward
    needs), and mean and rstd of shape ``(N, groups)``.
    """
    if h.device.type == "cpu":  # what at::group_norm does before its native_group_norm call
        if h.dim() == 4 and h.is_contiguous(memory_format=torch.channels_last) and not h.is_contiguous():
            h = h.contiguous(memory_format=torch.channels_last)
        else:
            h = h.contiguous()
    else:
        h = h.contiguous()
    n, c = h.shape[:2]
    y, mean, rstd = torch.native_group_norm(
        h, norm.weight, norm.bias, n, c, math.prod(h.shape[2:]), norm.num_groups, norm.eps
    )
    return y, h, mean, rstd


def _norm_apply(norm: nn.GroupNorm, h: Tensor, mean: Tensor, rstd: Tensor) -> Tensor:
    """The norm's output from its input and the forward's mean and rstd: ``h * scale + shift`` per
    sample and channel (equal to the forward's within rounding, whatever kernel or layout)."""
    n, c = h.shape[:2]
    per_group = c // norm.num_groups
    scale = rstd.repeat_interleave(per_group, dim=1)
    if norm.weight is not None:
        scale = scale * norm.weight
    shift = -mean.repeat_interleave(per_group, dim=1) * scale
    if norm.bias is not None:
        shift = shift + norm.bias
    shape = (n, c) + (1,) * (h.dim() - 2)
    return torch.addcmul(shift.view(shape), h, scale.view(shape))


def _norm_backward(
    norm: nn.GroupNorm, dy: Tensor, h: Tensor, mean: Tensor, rstd: Tensor
) -> tuple[Tensor, dict[nn.Parameter, Tensor]]:
    """The norm's input gradient and its parameters' gradients (those that need one)."""
    n, c = h.shape[:2]
    mask = [True] + [p is not None and p.requires_grad for p in (norm.weight, norm.bias)]
    dh, dw, db = torch.ops.aten.native_group_norm_backward(
        dy, h, mean, rstd, norm.weight, n, c, math.prod(h.shape[2:]), norm.num_groups, mask
    )
    grads = {}
    if mask[1]:
        grads[norm.weight] = dw
    if mask[2]:
        grads[norm.bias] = db
    return dh, grads


def _relu_backward_(grad: Tensor, result: Tensor) -> Tensor:
    """The ReLU's input gradient, written over ``grad`` (one tensor fewer) where the two share a
    layout; else a new tensor in the layout ``threshold_backward`` gives it (the norm backward
    after it reads its gradient in its input's layout: NCHW against channels_last is wrong)."""
    if grad.stride() == result.stride():
        return torch.ops.aten.threshold_backward.grad_input(grad, result, 0, grad_input=grad)
    return torch.ops.aten.threshold_backward(grad, result, 0)


def _plain_norm(module: nn.Module) -> bool:
    """A GroupNorm that ``_norm_forward`` computes as the module would (no hooks to skip)."""
    return type(module) is nn.GroupNorm and not bypassed(module)


class BasicBlockRule:
    """:class:`~greenprop.vcas.direct.DirectRule` of ``greenprop.models.resnet.BasicBlock`` with GroupNorm."""

    #: The backward writes the output ReLU's gradient over ``grad`` (its caller's own copy).
    changes_grad = True
    #: Each saved tensor goes once its kept rows are gathered (not at the backward's end).
    frees_saved = True

    def refuse(self, block: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
        if kwargs or len(args) != 1 or not isinstance(args[0], Tensor) or args[0].dim() != 4:
            return "the block takes one 4-d tensor"
        if not (isinstance(block.conv1, VCASConv2d) and isinstance(block.conv2, VCASConv2d)):
            return "its convs are not VCAS convs"
        if not (_plain_norm(block.bn1) and _plain_norm(block.bn2)):
            return "its norms are not plain GroupNorms"
        shortcut = block.shortcut
        if type(shortcut) is nn.Identity:
            return None
        if (
            type(shortcut) is nn.Sequential
            and len(shortcut) == 2
            and isinstance(shortcut[0], VCASConv2d)
            and _plain_norm(shortcut[1])
        ):
            return None
        return "its shortcut is neither the identity nor a VCAS conv and a GroupNorm"

    def forward(
        self, block: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[Tensor, list[Tensor]]:
        (x,) = args
        a1, h1, mean1, rstd1 = _norm_forward(block.bn1, block.conv1(x))
        a2, h2, mean2, rstd2 = _norm_forward(block.bn2, block.conv2(a1.relu_()))
        saved = [x, h1, mean1, rstd1, h2, mean2, rstd2]
        if type(block.shortcut) is nn.Identity:
            residual = x
        else:
            conv, norm = block.shortcut
            residual, hs, mean_s, rstd_s = _norm_forward(norm, conv(x))
            saved += [hs, mean_s, rstd_s]
        out = a2.add_(residual).relu_()  # what relu(a2 + residual) gives, without two more tensors
        return out, [*saved, out]

    def backward(
        self, block: nn.Module, saved: list[Tensor], grad: Tensor, need_input: bool
    ) -> tuple[Tensor | None, dict[nn.Parameter, Tensor]]:
        x, h1, mean1, rstd1, h2, mean2, rstd2, *shortcut, out = saved
        saved.clear()  # the kept rows are this call's own: each goes once used (lower peak memory)
        dz = _relu_backward_(grad, out)
        del out, grad
        dh2, grads = _norm_backward(block.bn2, dz, h2, mean2, rstd2)
        del h2
        d_residual: Tensor | None = dz
        if shortcut:
            hs, mean_s, rstd_s = shortcut
            conv, norm = block.shortcut
            dhs, grads_s = _norm_backward(norm, dz, hs, mean_s, rstd_s)
            del hs, shortcut, dz
            grads.update(grads_s)
            d_residual = layer_grads(conv, dhs, x, need_input, grads)
            del dhs
        r1 = _norm_apply(block.bn1, h1, mean1, rstd1).relu_()  # conv2's input, not kept
        dr1 = layer_grads(block.conv2, dh2, r1, True, grads)
        del dh2
        dr1 = _relu_backward_(dr1, r1)
        del r1
        dh1, grads1 = _norm_backward(block.bn1, dr1, h1, mean1, rstd1)
        del dr1, h1
        grads.update(grads1)
        dx = layer_grads(block.conv1, dh1, x, need_input, grads)
        return (dx.add_(d_residual) if need_input else None), grads


RULE = BasicBlockRule()
