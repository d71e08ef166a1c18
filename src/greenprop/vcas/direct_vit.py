"""The direct rule of the zoo's transformer block (:class:`greenprop.models.vit.Block`, ViT and GPT).

The block is ``x1 = x + proj(attention(qkv(norm1(x))))``, ``y = x1 + fc2(gelu(fc1(norm2(x1))))``.
Its forward here runs the same kernels as the block's own (``native_layer_norm``, the
VCAS Linears called as modules, the CPU flash attention that
``F.scaled_dot_product_attention`` picks, GELU), so the output is the block's, bit for bit.

What it keeps for the backward, all batch-first: the input ``x``, the ``qkv`` output
(``3 dim`` per token; it exists anyway), the attention output (the ``proj`` input), the
attention's logsumexp (one number per token and head), ``x1`` and the ``fc1`` output
(``mlp_ratio dim``). That is 8 of the 12 ``dim``-wide tensors per token dense autograd
keeps at the ViT's MLP ratio 2: the LayerNorm outputs and the GELU output are not kept
but computed again in the backward on the kept rows only (``recompute=True``, the
default). With ``recompute=False`` the rule keeps them too (and the norms' mean / rstd):
no op runs twice, at dense autograd's memory; measured on the CPU it was also slower,
since gathering the kept rows of those tensors costs about what computing them does
(docs/vcas.md, "Direct path for the zoo's transformer block").

The backward runs aten's backward kernels on the kept rows (``native_layer_norm_backward``,
``gelu_backward``, ``_scaled_dot_product_flash_attention_for_cpu_backward``) and the VCAS
Linears' own (:func:`~greenprop.vcas.layers.linear_backward`: token sampling and FLOP tally);
the attention backward's FLOPs on the kept rows are tallied too (against the full batch's).
At ratio 1 its gradients are dense autograd's, bit for bit.

The rule refuses (the re-run path takes the call) what it cannot reproduce exactly:
attention off the CPU (the CUDA kernels are not checked here), dtypes other than float32
and float64, an SDPA choice other than flash attention (a disabled backend, an empty
sequence), modules it does not know inside the block (dropout, a swapped norm or
activation, a Linear that is not a VCAS one), a patched ``forward`` or hooks on the
modules it bypasses, and calls with other arguments than one ``(B, T, dim)`` tensor.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend

from greenprop.metering.flops import attention_backward_flops
from greenprop.models.tokens import Mlp
from greenprop.models.vit import Attention, Block
from greenprop.vcas.direct import bypassed, layer_grads, layer_norm, layer_norm_backward, tally_kept_rows
from greenprop.vcas.layers import VCASLinear

__all__ = ["RULE", "ViTBlockRule"]

_DTYPES = (torch.float32, torch.float64)
_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def _sdpa_picks_flash(x: Tensor, heads: int) -> bool:
    """Whether ``F.scaled_dot_product_attention`` takes the flash kernel for this block's q, k, v."""
    choose = getattr(torch, "_fused_sdp_choice", None)
    if choose is None:
        return False
    batch, tokens, dim = x.shape
    q = x.new_empty(dim // heads).expand(batch, heads, tokens, dim // heads)  # no memory: stride 0
    return int(choose(q, q, q, None, 0.0, False)) == int(SDPBackend.FLASH_ATTENTION.value)


class ViTBlockRule:
    """:class:`~greenprop.vcas.direct.DirectRule` of :class:`greenprop.models.vit.Block`.

    ``recompute``: compute the LayerNorm and GELU outputs again on the kept rows in the
    backward instead of keeping them from the forward (less memory; on the CPU not slower).
    """

    def __init__(self, recompute: bool = True) -> None:
        self.recompute = recompute

    def refuse(self, block: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
        if kwargs or len(args) != 1:
            return "the block takes one tensor"
        (x,) = args
        if x.dim() != 3 or x.shape[-1] != block.norm1.normalized_shape[-1]:
            return f"input of shape {tuple(x.shape)}, not (batch, tokens, dim)"
        if x.device.type != "cpu":
            return f"attention on {x.device.type}: only the CPU flash kernel is checked"
        if x.dtype not in _DTYPES:
            return f"dtype {x.dtype}: only float32 and float64 are checked"
        unknown = _unknown_module(block)
        if unknown is not None:
            return unknown
        if not _sdpa_picks_flash(x, block.attn.heads):
            return "scaled_dot_product_attention would not take the flash kernel"
        return None

    def forward(
        self, block: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[Tensor, list[Tensor]]:
        (x,) = args
        attn, mlp = block.attn, block.mlp
        a, mean1, rstd1 = layer_norm(block.norm1, x)
        qkv = attn.qkv(a)
        o, lse = _flash(*_heads(qkv, attn.heads), 0.0, attn.causal)
        o2 = o.transpose(1, 2).reshape(x.shape)  # the proj input (a view: flash's layout is (B, T, H, d))
        x1 = x + attn.proj(o2)
        c, mean2, rstd2 = layer_norm(block.norm2, x1)
        h = mlp.fc1(c)
        g = F.gelu(h, approximate=mlp.act.approximate)
        y = x1 + mlp.fc2(g)
        if self.recompute:
            return y, [x, qkv, o2, lse, x1, h]
        return y, [x, qkv, o2, lse, x1, h, a, mean1, rstd1, c, mean2, rstd2, g]

    def backward(
        self, block: nn.Module, saved: list[Tensor], grad: Tensor, need_input: bool
    ) -> tuple[Tensor | None, dict[nn.Parameter, Tensor]]:
        # The rule owns ``saved``: the kept rows are this call's own, and each half of the
        # backward pops what it needs, so every tensor goes once used (lower peak memory).
        # recompute=False adds a, mean1, rstd1, c, mean2, rstd2, g after the first six.
        kept = saved[6:]
        del saved[6:]
        found: dict[nn.Parameter, Tensor] = {}
        dx1 = _mlp_backward(block.norm2, block.mlp, grad, saved, kept[3:], found)
        del grad
        dx = _attention_backward(block, dx1, saved, kept[:3], need_input, found)
        if not need_input:
            return None, found
        return (dx1 if dx is None else dx.add_(dx1)), found


def _mlp_backward(
    norm: nn.LayerNorm,
    mlp: Mlp,
    grad: Tensor,
    saved: list[Tensor],
    kept: list[Tensor],
    found: dict[nn.Parameter, Tensor],
) -> Tensor:
    """The gradient of ``x1`` through ``y = x1 + fc2(gelu(fc1(norm(x1))))``.

    Takes ``x1`` and ``h`` off the end of ``saved``. Intermediates are dropped as soon as
    they are used (the kept rows' backward holds a block's worth of them otherwise: above
    dense autograd's peak at ratios near 1); the norm's output is computed again only
    right before ``fc1``'s backward needs it.
    """
    h = saved.pop()
    x1 = saved.pop()
    approximate = mlp.act.approximate
    g = kept[3] if kept else F.gelu(h, approximate=approximate)
    dg = layer_grads(mlp.fc2, grad, g, True, found)
    del g
    dh = torch.ops.aten.gelu_backward(dg, h, approximate=approximate)
    del dg, h
    c, mean, rstd = kept[:3] if kept else layer_norm(norm, x1)
    del kept
    dc = layer_grads(mlp.fc1, dh, c, True, found)
    del dh, c
    d_norm = layer_norm_backward(norm, dc, x1, mean, rstd, True, found)
    return grad if d_norm is None else d_norm.add_(grad)  # in place: a fresh tensor of ours


def _attention_backward(
    block: Block,
    dx1: Tensor,
    saved: list[Tensor],
    kept: list[Tensor],
    need_input: bool,
    found: dict[nn.Parameter, Tensor],
) -> Tensor | None:
    """The gradient of ``x`` through ``proj(attention(qkv(norm1(x))))`` (None unless ``need_input``).

    Takes ``x``, ``qkv``, the attention output and its logsumexp out of ``saved`` (emptying it).
    """
    attn, norm = block.attn, block.norm1
    x, qkv, o2, lse = saved
    saved.clear()
    do2 = layer_grads(attn.proj, dx1, o2, True, found)
    q, k, v = _heads(qkv, attn.heads)
    per_head = q.transpose(1, 2).shape  # (B, T, heads, head_dim): the layout of o and its gradient
    o, do = (t.reshape(per_head).transpose(1, 2) for t in (o2, do2))
    del do2, o2
    dq, dk, dv = _flash_backward(do, q, k, v, o, lse, 0.0, attn.causal)
    tally_kept_rows(attn.qkv, attention_backward_flops(do, q, k, v), do)
    del do, o, q, k, v, lse
    shape = qkv.shape
    del qkv
    dqkv = torch.stack([d.transpose(1, 2) for d in (dq, dk, dv)], dim=2).reshape(shape)
    del dq, dk, dv
    a, mean, rstd = kept or layer_norm(norm, x)
    del kept
    need_a = need_input or _trainable(norm)
    da = layer_grads(attn.qkv, dqkv, a, need_a, found)
    del dqkv, a
    return layer_norm_backward(norm, da, x, mean, rstd, need_input, found) if need_a else None


RULE = ViTBlockRule()


def _unknown_module(block: nn.Module) -> str | None:
    """Why the block is not exactly the zoo's (a module or hook the rule would skip), or None."""
    if type(block) is not Block or type(block.attn) is not Attention or type(block.mlp) is not Mlp:
        return "the block's attention or MLP is not the zoo's"
    if type(block.norm1) is not nn.LayerNorm or type(block.norm2) is not nn.LayerNorm:
        return "its norms are not nn.LayerNorm"
    if type(block.mlp.act) is not nn.GELU:
        return f"its activation is {type(block.mlp.act).__name__}, not GELU"
    linears = (block.attn.qkv, block.attn.proj, block.mlp.fc1, block.mlp.fc2)
    known = {block, block.attn, block.mlp, block.norm1, block.norm2, block.mlp.act, *linears}
    for name, module in block.named_modules():
        if module not in known:
            if isinstance(module, nn.Dropout) and module.p > 0 and module.training:
                return f"dropout {name} (p={module.p}) draws random numbers the rule does not replay"
            return f"module {name} ({type(module).__name__}) is not one the rule runs"
    for linear in linears:
        if not isinstance(linear, VCASLinear):
            return f"{type(linear).__name__} is not a VCAS Linear"
    if any(bypassed(m) for m in (block.attn, block.mlp, block.norm1, block.norm2, block.mlp.act)):
        return "a module the rule calls past has hooks or a patched forward"
    return None


def _trainable(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


def _heads(qkv: Tensor, heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """q, k, v as the block's Attention forms them: views ``(B, heads, T, head_dim)`` of ``qkv``."""
    batch, tokens, width = qkv.shape
    dim = width // 3
    q, k, v = qkv.reshape(batch, tokens, 3, heads, dim // heads).permute(2, 0, 3, 1, 4).unbind(0)
    return q, k, v
