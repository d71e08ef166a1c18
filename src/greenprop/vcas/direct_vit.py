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
At ratio 1 its gradients are dense autograd's, bit for bit, but for blocks whose output
gradient is zero at most tokens (below).

Live tokens: the ViT classifies from the cls token only, so in the last block every
other token's output gradient is exactly zero, and stays zero through the per-token ops
(the MLP, LayerNorm 2, the residual adds, the attention's output projection) and the
attention's queries. In a training backward (not the controller's estimation, which
draws on every token) a non-causal block whose output gradient is non-zero at no more
than :data:`~greenprop.vcas.direct.LIVE_MAX_FRACTION` of its token positions runs
those ops, and the attention backward's queries, on the live positions only (the same
in every kept sample: :class:`_Columns`); the keys and values, and so the ``qkv`` Linear
and LayerNorm 1, still take every token. The Linears' token draw is still the one over
every token (``among``), so the draws and gradients are those of the backward on every
token (up to float rounding: sums over fewer zeros). The FLOP tally books what ran (its
saving includes the skipped tokens' work, so the account of a step stays the FLOP count
of what it ran; the re-run path runs every token and saves less).

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
from greenprop.vcas.direct import (
    bypassed,
    layer_grads,
    layer_norm,
    layer_norm_backward,
    live_layer_grads,
    live_positions,
    nonzero_tokens,
    skips_zero_tokens,
    tally_kept_rows,
)
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

    #: Each saved tensor goes once its kept rows are gathered, not when the backward returns.
    frees_saved = True

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

    def live_tokens(self, block: nn.Module, grad: Tensor) -> bool:
        """Whether :meth:`backward` runs the per-token ops on the live tokens only for this
        output gradient (:meth:`_Columns.of`)."""
        return _Columns.of(block, grad) is not None

    def backward(
        self, block: nn.Module, saved: list[Tensor], grad: Tensor, need_input: bool
    ) -> tuple[Tensor | None, dict[nn.Parameter, Tensor]]:
        # The rule owns ``saved``: the kept rows are this call's own, and each half of the
        # backward pops what it needs, so every tensor goes once used (lower peak memory).
        # recompute=False adds a, mean1, rstd1, c, mean2, rstd2, g after the first six.
        kept = saved[6:]
        del saved[6:]
        found: dict[nn.Parameter, Tensor] = {}
        live = _Columns.of(block, grad)
        if live is not None:  # the MLP half on the live tokens: pick their rows of what it reads
            grad = live.pick(grad)
            saved[4:] = map(live.pick, saved[4:])
            kept[3:] = map(live.pick, kept[3:])
        dx1 = _mlp_backward(block.norm2, block.mlp, grad, saved, kept[3:], found, live)
        del grad
        dx = _attention_backward(block, dx1, saved, kept[:3], need_input, found, live)
        if not need_input:
            return None, found
        if live is not None:
            return (live.full(dx1) if dx is None else dx.index_add_(1, live.columns, dx1)), found
        return (dx1 if dx is None else dx.add_(dx1)), found


class _Columns:
    """The token positions a block's per-token backward runs on: those where the output gradient
    is non-zero in some kept sample (the same positions in every sample, so the attention
    backward runs on them as its queries). In the ViT's last block: the cls token."""

    def __init__(self, columns: Tensor, shape: torch.Size) -> None:
        batch, tokens = shape[:2]
        self.columns, self.shape = columns, shape
        flat = (torch.arange(batch, device=columns.device).unsqueeze(1) * tokens + columns).flatten()
        self.among = (flat, batch * tokens)  # their flat positions among the kept tokens (Linears' draws)

    @classmethod
    def of(cls, block: Block, grad: Tensor) -> _Columns | None:
        """The live positions given the block's output gradient, or None to run on every token."""
        if block.attn.causal or not skips_zero_tokens(block.mlp.fc1.vcas_runtime):
            return None  # causal: every position is usually live
        if grad.shape[0] > 1 and live_positions(nonzero_tokens(grad[0])) is None:
            return None  # one sample is live at too many positions: so are all together (1/B of the scan)
        columns = live_positions(nonzero_tokens(grad).view(grad.shape[:2]).any(dim=0))
        return None if columns is None else cls(columns, grad.shape)

    def linear_grads(
        self, layer: VCASLinear, dy: Tensor, x: Tensor, need_x: bool, found: dict[nn.Parameter, Tensor]
    ) -> Tensor | None:
        """:func:`~greenprop.vcas.direct.live_layer_grads` on the live tokens (the zero tokens'
        FLOPs booked as saved)."""
        return live_layer_grads(layer, dy, x, need_x, found, self.among)

    def pick(self, t: Tensor, dim: int = 1) -> Tensor:
        """The live positions of a tensor whose ``dim`` runs over the tokens."""
        return t.index_select(dim, self.columns)

    def full(self, t: Tensor, dim: int = 1) -> Tensor:
        """A live positions' result back at every position, zeros at the others."""
        shape = list(t.shape)
        shape[dim] = self.shape[1]
        return t.new_zeros(shape).index_copy_(dim, self.columns, t)


def _mlp_backward(
    norm: nn.LayerNorm,
    mlp: Mlp,
    grad: Tensor,
    saved: list[Tensor],
    kept: list[Tensor],
    found: dict[nn.Parameter, Tensor],
    live: _Columns | None = None,
) -> Tensor:
    """The gradient of ``x1`` through ``y = x1 + fc2(gelu(fc1(norm(x1))))``.

    Takes ``x1`` and ``h`` off the end of ``saved``. Intermediates are dropped as soon as
    they are used (the kept rows' backward holds a block's worth of them otherwise: above
    dense autograd's peak at ratios near 1); the norm's output is computed again only
    right before ``fc1``'s backward needs it. ``live``: the tokens given are these of the
    kept ones, the others' gradient being zero.
    """
    grads = layer_grads if live is None else live.linear_grads
    h = saved.pop()
    x1 = saved.pop()
    approximate = mlp.act.approximate
    g = kept[3] if kept else F.gelu(h, approximate=approximate)
    dg = grads(mlp.fc2, grad, g, True, found)
    del g
    dh = torch.ops.aten.gelu_backward(dg, h, approximate=approximate)
    del dg, h
    c, mean, rstd = kept[:3] if kept else layer_norm(norm, x1)
    del kept
    dc = grads(mlp.fc1, dh, c, True, found)
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
    live: _Columns | None = None,
) -> Tensor | None:
    """The gradient of ``x`` through ``proj(attention(qkv(norm1(x))))`` (None unless ``need_input``).

    Takes ``x``, ``qkv``, the attention output and its logsumexp out of ``saved`` (emptying it).
    ``live``: ``dx1`` is given at these positions only (zero at the others), so ``proj`` and the
    attention's queries run on them; the keys and values (and ``qkv``, ``norm1``) on every token.
    """
    attn, norm = block.attn, block.norm1
    x, qkv, o2, lse = saved
    saved.clear()
    q, k, v = _heads(qkv, attn.heads)
    # Done and dense at every query (the gradient's shape is the queries'); the live ones' below.
    flops = attention_backward_flops(q, q, k, v)
    tally_kept_rows(attn.qkv, flops, q)
    grads = layer_grads
    if live is not None:
        o2, q, lse = live.pick(o2), live.pick(q, 2), live.pick(lse, 2)
        # The non-live queries did not run: their share of the tally's done comes off.
        attn.qkv.vcas_runtime.tally.done -= flops - attention_backward_flops(q, q, k, v)
        grads = live.linear_grads
    do2 = grads(attn.proj, dx1, o2, True, found)
    per_head = q.transpose(1, 2).shape  # (B, T, heads, head_dim): the layout of o and its gradient
    o, do = (t.reshape(per_head).transpose(1, 2) for t in (o2, do2))
    del do2, o2
    dq, dk, dv = _flash_backward(do, q, k, v, o, lse, 0.0, attn.causal)
    del do, o, q, k, v, lse
    if live is not None:
        dq = live.full(dq, 2)
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
