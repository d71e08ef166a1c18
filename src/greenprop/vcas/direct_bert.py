"""The direct rule of Hugging Face transformers' ``BertLayer`` (eager attention, post-norm).

What all-MiniLM-L6-v2 (:mod:`greenprop.models.hf`) runs in each of its 6 layers::

    q, k, v = query(x), key(x), value(x)                 # split into heads
    probs   = softmax(q k^T * d**-0.5 + mask)            # mask: additive, (B, 1, T, T) or None
    context = dropout(probs) v                           # heads merged back
    a       = LayerNorm1(dropout(attention_dense(context)) + x)
    out     = LayerNorm2(dropout(output_dense(gelu(intermediate_dense(a)))) + a)

The forward runs those ops with the kernels the layer's own forward uses (bit for bit the
same output) and draws its dropout masks with the same calls in the same order, so the
random generator ends where the layer's forward would leave it. It keeps, batch first:
the input, the query, key and value heads (the contiguous copies ``torch.matmul`` makes
of them anyway, so the backward's matmuls copy nothing), the attention probabilities,
the context, both LayerNorms' inputs and statistics, the first LayerNorm's output, the
intermediate layer's input and output of GELU, and the dropout masks as bool (dense
autograd keeps the same tensors plus float masks and the dropped probabilities). The
backward gathers each tensor's kept rows just before it uses them
(:class:`~greenprop.vcas.direct.KeptRows`) and runs aten's backward kernels on them and
the VCAS Linears' :func:`~greenprop.vcas.layers.linear_backward`, in the order autograd's
engine runs them on the re-run's graph (value, key, query last), so the token samplers
draw the same numbers on either path.

In a training backward, tokens whose gradient is exactly zero are left out
(:class:`_Tokens`): every op but the attention core acts per token, so a token with a zero
gradient at the layer's output (padding under the attention mask; in the last layer every
token but the one the classifier reads) has a zero gradient up to the attention, and the
query, key and value Linears run on the tokens their gradients reach. The Linears' token
draw is still made over all kept tokens, so the gradients are those of the full
computation; the FLOP tally books what ran (the skipped zero tokens' work as saved, and the
attention's four backward ``bmm``s on the kept rows against the full batch's), so the
account of a step is the FLOP count of what it ran.

Calls it cannot reproduce are refused (the re-run path takes them): cross-attention, a
cache, ``output_attentions``, any argument it does not know, another attention kernel
than eager, another activation than GELU, feed-forward chunking, submodules with hooks
or of other classes, a Linear VCAS left unconverted, dropout probability 1, and devices
other than the CPU (CUDA's dropout kernel draws differently, and nothing was checked on a
GPU).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.activations import GELUActivation
from transformers.models.bert import modeling_bert as bert

from greenprop.rows import scatter_rows
from greenprop.vcas.direct import (
    KeptRows,
    bypassed,
    layer_norm,
    layer_norm_backward,
    live_layer_grads,
    live_positions,
    nonzero_tokens,
    skips_zero_tokens,
    tally_kept_rows,
)
from greenprop.vcas.layers import VCASLinear

__all__ = ["RULE", "BertLayerRule"]

#: BertLayer.forward's parameters, in order (``past_key_values`` is the deprecated name of ``cache``).
_POSITIONAL = ("hidden_states", "attention_mask", "encoder_hidden_states", "encoder_attention_mask", "cache")
#: Arguments that must be None (or False) for a plain self-attention layer.
_ABSENT = ("encoder_hidden_states", "encoder_attention_mask", "cache", "past_key_values", "output_attentions")
#: Arguments eager self-attention passes on and never reads.
_UNREAD = ("position_ids", "output_hidden_states")

#: The submodules' classes the rule was written from (exact: a subclass may change the forward).
_PARTS = {
    "attention": bert.BertAttention,
    "attention.self": bert.BertSelfAttention,
    "attention.output": bert.BertSelfOutput,
    "intermediate": bert.BertIntermediate,
    "output": bert.BertOutput,
}
_LINEARS = (
    "attention.self.query",
    "attention.self.key",
    "attention.self.value",
    "attention.output.dense",
    "intermediate.dense",
    "output.dense",
)
_NORMS = ("attention.output.LayerNorm", "output.LayerNorm")
#: Where :meth:`BertLayerRule.forward` puts each saved tensor.
X, Q, KEY_T, V, PROBS, KEEP_PROBS, CONTEXT, KEEP_ATTENTION, S1, MEAN1, RSTD1 = range(11)
A, PRE, ACT, KEEP_OUTPUT, S2, MEAN2, RSTD2 = range(11, 18)


def _bind(args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any] | None:
    """BertLayer.forward's arguments by name; None if there are more positional ones than it takes."""
    if len(args) > len(_POSITIONAL):
        return None
    return {**dict(zip(_POSITIONAL, args, strict=False)), **kwargs}


def _gelu_approximation(act: nn.Module) -> str | None:
    """``F.gelu``'s ``approximate`` for the layers' activation, or None if it is not plain GELU."""
    if type(act) is GELUActivation and act.act is F.gelu:
        return "none"
    if type(act) is nn.GELU:
        return act.approximate
    return None


def _attention_dropout(block: nn.Module) -> float:
    """What eager attention passes to ``F.dropout`` for the probabilities."""
    attention = block.attention.self
    return attention.dropout.p if attention.training else 0.0


def _hidden_dropout(part: nn.Module) -> float:
    """What ``part.dropout`` (an ``nn.Dropout``) drops in this mode."""
    return part.dropout.p if part.dropout.training else 0.0


def _dropout(x: Tensor, p: float) -> tuple[Tensor, Tensor]:
    """``F.dropout(x, p, training=True)`` on the CPU, and its mask (bool; ``(B, 0)`` when nothing drops).

    The same calls as ATen's CPU dropout (``bernoulli_(1 - p)`` into a tensor like ``x``,
    divided by ``1 - p`` in place, times ``x``): the same draw and the same values.
    """
    if p == 0.0:
        return x, x.new_empty((x.shape[0], 0), dtype=torch.bool)
    noise = torch.empty_like(x).bernoulli_(1 - p)
    keep = noise.to(torch.bool)
    return x * noise.div_(1 - p), keep


def _dropout_backward(grad: Tensor, keep: Tensor, p: float) -> Tensor:
    """Dropout's backward: ``grad`` times the forward's noise (rebuilt from the mask, same values)."""
    if keep.shape[-1] == 0:  # the (B, 0) stand-in: nothing dropped (real masks have the features' dim)
        return grad
    return grad * keep.to(grad.dtype).div_(1 - p)


def _heads(t: Tensor, head_size: int) -> Tensor:
    """``(B, T, H * d)`` -> ``(B, H, T, d)``, as BertSelfAttention splits its projections."""
    return t.view(*t.shape[:-1], -1, head_size).transpose(1, 2)


def _adds_in_place(scores: Tensor, mask: Tensor) -> bool:
    """Whether ``scores.add_(mask)`` gives ``scores + mask`` (same dtype, broadcast into ``scores``)."""
    return mask.dtype == scores.dtype and torch.broadcast_shapes(scores.shape, mask.shape) == scores.shape


def _merge(t: Tensor) -> Tensor:
    """``(B, H, T, d)`` -> ``(B, T, H * d)``."""
    return t.transpose(1, 2).reshape(t.shape[0], t.shape[2], -1)


class _Tokens:
    """The tokens the per-token ops of a backward run on (everything but the attention core).

    A token whose gradient at the block's output is zero (padding under the attention mask,
    every token but the one a classifier reads in the last layer) keeps a zero gradient
    through the LayerNorms, dropout, GELU, the residual adds and the attention output and
    feed-forward Linears, which all act per token. So in a training backward those ops run
    on the *live* tokens only, as ``(tokens, features)`` matrices gathered from the saved
    tensors; the Linears' token draw is still the one over all kept tokens (``among``),
    so the gradients are the same, zeros included. ``live`` None: every token, the saved
    tensors' kept rows as they are.
    """

    def __init__(self, saved: KeptRows, shape: torch.Size, live: Tensor | None) -> None:
        self.saved, self.live = saved, live
        self.shape = shape  # (kept samples, T, hidden)
        self.among: tuple[Tensor, int] | None = None
        if live is not None:
            n_tokens = shape[1]
            sample = live.div(n_tokens, rounding_mode="floor")
            if saved.rows is not None:
                sample = saved.rows.index_select(0, sample)
            self.in_batch = sample * n_tokens + live.remainder(n_tokens)  # flat index in the full batch
            self.among = (live, shape[0] * n_tokens)

    @classmethod
    def of(cls, block: nn.Module, saved: KeptRows, grad: Tensor) -> _Tokens:
        """The tokens to run on, given the block's output gradient ``grad``."""
        return cls(saved, grad.shape, cls.live(block, grad))

    @staticmethod
    def live(block: nn.Module, grad: Tensor) -> Tensor | None:
        """The live tokens (flat) of the block's output gradient ``grad``, or None: every token."""
        if not skips_zero_tokens(block.intermediate.dense.vcas_runtime):
            return None
        return live_positions(nonzero_tokens(grad))

    def widened(self, *grads: Tensor) -> _Tokens:
        """These tokens and those where any of ``grads`` (``(kept samples, T, hidden)``) is non-zero:
        the attention's key and value gradients reach tokens whose own gradient was zero."""
        if self.live is None:
            return self
        alive = torch.zeros(self.shape[0] * self.shape[1], dtype=torch.bool, device=self.live.device)
        alive.index_fill_(0, self.live, True)
        for t in grads:
            alive.logical_or_(nonzero_tokens(t))
        return _Tokens(self.saved, self.shape, live_positions(alive))

    def pick(self, t: Tensor) -> Tensor:
        """A ``(kept samples, T, ...)`` tensor on these tokens."""
        return t if self.live is None else t.flatten(0, 1).index_select(0, self.live)

    def take(self, *at: int) -> tuple[Tensor, ...]:
        """The saved tensors at these positions, on these tokens."""
        return self.saved.take(*at) if self.live is None else self.saved.take_tokens(self.in_batch, *at)

    def full(self, t: Tensor) -> Tensor:
        """A ``(tokens, hidden)`` result back at ``(kept samples, T, hidden)``, zeros at the other tokens."""
        if self.live is None:
            return t
        total = self.shape[0] * self.shape[1]
        return scatter_rows(t, self.live, torch.Size((total, t.shape[-1]))).view(*self.shape[:2], -1)


class BertLayerRule:
    """:class:`~greenprop.vcas.direct.DirectRule` of ``transformers``' ``BertLayer``."""

    def refuse(self, block: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
        call = _bind(args, kwargs)
        if call is None:
            return f"{len(args)} positional arguments"
        unknown = sorted(set(call) - set(_POSITIONAL) - set(_ABSENT) - set(_UNREAD))
        if unknown:
            return f"argument {unknown[0]!r}"
        present = [name for name in _ABSENT if call.get(name) is not None and call[name] is not False]
        if present:
            return f"{present[0]} given (cross-attention, a cache or attention outputs)"
        x, mask = call["hidden_states"], call.get("attention_mask")
        if not isinstance(x, Tensor) or x.dim() != 3 or not x.is_floating_point():
            return "hidden_states is not a float (batch, tokens, hidden) tensor"
        if mask is not None and not isinstance(mask, Tensor):
            return f"attention_mask is a {type(mask).__name__}"
        if x.device.type != "cpu":
            return f"hidden_states on {x.device.type} (the rule is checked on the CPU only)"
        return self._refuse_structure(block) or self._refuse_dropout(block)

    def _refuse_structure(self, block: nn.Module) -> str | None:
        modules = dict(block.named_modules())
        for name, cls in _PARTS.items():
            if type(modules.get(name)) is not cls:
                return f"{name} is not a {cls.__name__}"
        if block.attention.is_cross_attention:
            return "its attention is cross-attention"
        implementation = block.attention.self.config._attn_implementation
        if implementation != "eager":
            return f"attention implementation {implementation!r} (the rule writes out eager attention)"
        if block.chunk_size_feed_forward:
            return "feed-forward chunking"
        if _gelu_approximation(block.intermediate.intermediate_act_fn) is None:
            return f"activation {type(block.intermediate.intermediate_act_fn).__name__} (not GELU)"
        for name in _LINEARS:
            if type(modules[name]) is not VCASLinear:
                return f"{name} is a {type(modules[name]).__name__}, not a VCAS Linear"
        for name in _NORMS:
            norm = modules[name]
            if type(norm) is not nn.LayerNorm or norm.weight is None or norm.bias is None:
                return f"{name} is not an affine LayerNorm"
        linears = {modules[name] for name in _LINEARS}
        hooked = [name for name, m in modules.items() if m is not block and m not in linears and bypassed(m)]
        if hooked:  # e.g. transformers' output capture on BertSelfAttention (output_attentions)
            return f"{hooked[0]} has hooks, and the rule does not call it"
        return None

    def _refuse_dropout(self, block: nn.Module) -> str | None:
        rates = (
            _attention_dropout(block),
            _hidden_dropout(block.attention.output),
            _hidden_dropout(block.output),
        )
        return "dropout probability 1" if any(p >= 1.0 for p in rates) else None

    def forward(
        self, block: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[Tensor, list[Tensor]]:
        call = _bind(args, kwargs)
        assert call is not None  # refuse() checked it
        x, mask = call["hidden_states"], call.get("attention_mask")
        attention, attention_out, output = block.attention.self, block.attention.output, block.output
        size = attention.attention_head_size
        # The contiguous copies torch.matmul would make of the heads itself (the same bmm runs on
        # the same layout): kept for the backward, whose matmuls then copy nothing.
        q = _heads(attention.query(x), size).contiguous()
        key_t = _heads(attention.key(x), size).transpose(2, 3).contiguous()
        v = _heads(attention.value(x), size).contiguous()
        # In place where the layer's forward makes a new tensor (the scores are this call's own):
        # the same values, fewer allocations.
        scores = torch.matmul(q, key_t).mul_(attention.scaling)
        if mask is not None:
            scores = scores.add_(mask) if _adds_in_place(scores, mask) else scores + mask
        probs = F.softmax(scores, dim=-1)
        del scores
        dropped, keep_probs = _dropout(probs, _attention_dropout(block))
        context = _merge(torch.matmul(dropped, v)).contiguous()
        h, keep_attention = _dropout(attention_out.dense(context), _hidden_dropout(attention_out))
        s1 = h + x
        a, mean1, rstd1 = layer_norm(attention_out.LayerNorm, s1)
        pre = block.intermediate.dense(a)
        act = F.gelu(pre, approximate=_gelu_approximation(block.intermediate.intermediate_act_fn))
        h, keep_output = _dropout(output.dense(act), _hidden_dropout(output))
        s2 = h + a
        out, mean2, rstd2 = layer_norm(output.LayerNorm, s2)
        attention_half = [x, q, key_t, v, probs, keep_probs, context, keep_attention, s1, mean1, rstd1]
        return out, [*attention_half, a, pre, act, keep_output, s2, mean2, rstd2]

    #: The backward takes a :class:`~greenprop.vcas.direct.KeptRows` and gathers as it goes.
    gathers = True
    #: Each saved tensor goes once taken (gathered), not when the backward returns (lower peak).
    frees_saved = True

    def live_tokens(self, block: nn.Module, grad: Tensor) -> bool:
        """Whether :meth:`backward` runs the per-token ops on the live tokens only for this
        output gradient (:meth:`_Tokens.live`)."""
        return _Tokens.live(block, grad) is not None

    def backward(
        self, block: nn.Module, saved: KeptRows, grad: Tensor, need_input: bool
    ) -> tuple[Tensor | None, dict[nn.Parameter, Tensor]]:
        """Both halves in turn; each saved tensor's kept rows are gathered just before their
        step and dropped once used (one step's copies at a time)."""
        found: dict[nn.Parameter, Tensor] = {}
        tokens = _Tokens.of(block, saved, grad)
        da = self._feed_forward_backward(block, tokens, tokens.pick(grad), found)
        return self._attention_backward(block, tokens, da, need_input, found), found

    def _feed_forward_backward(self, block: nn.Module, tokens: _Tokens, grad: Tensor, found: dict) -> Tensor:
        """LayerNorm2, dropout, output dense, GELU, intermediate dense, residual: the gradient at ``a``."""
        output, intermediate = block.output, block.intermediate.dense
        ds2 = layer_norm_backward(output.LayerNorm, grad, *tokens.take(S2, MEAN2, RSTD2), True, found)
        (keep_output,) = tokens.take(KEEP_OUTPUT)
        dh = _dropout_backward(ds2, keep_output, _hidden_dropout(output))
        del keep_output
        d_act = live_layer_grads(output.dense, dh, *tokens.take(ACT), True, found, tokens.among)
        del dh
        approximate = _gelu_approximation(block.intermediate.intermediate_act_fn)
        d_pre = torch.ops.aten.gelu_backward(d_act, *tokens.take(PRE), approximate=approximate)
        del d_act
        return live_layer_grads(intermediate, d_pre, *tokens.take(A), True, found, tokens.among).add_(ds2)

    def _attention_backward(
        self, block: nn.Module, tokens: _Tokens, grad: Tensor, need_input: bool, found: dict
    ) -> Tensor | None:
        """LayerNorm1, dropout, attention output dense, attention, residual: the input's gradient."""
        attention, attention_out = block.attention.self, block.attention.output
        size = attention.attention_head_size
        saved = tokens.saved
        ds1 = layer_norm_backward(attention_out.LayerNorm, grad, *tokens.take(S1, MEAN1, RSTD1), True, found)
        (keep_attention,) = tokens.take(KEEP_ATTENTION)
        dh = _dropout_backward(ds1, keep_attention, _hidden_dropout(attention_out))
        del keep_attention
        (context,) = tokens.take(CONTEXT)
        d_context = live_layer_grads(attention_out.dense, dh, context, True, found, tokens.among)
        del context
        d_context = _heads(tokens.full(d_context), size).contiguous()
        del dh
        probs, keep_probs, v = saved.take(PROBS, KEEP_PROBS, V)
        # The four bmms below (two per attention matmul), each 2 * numel(probs) * head size FLOPs.
        tally_kept_rows(attention.query, 8.0 * probs.numel() * size, probs)
        p = _attention_dropout(block)
        dropped = probs if p == 0.0 else probs * keep_probs.to(probs.dtype).div_(1 - p)
        dv = _merge(torch.matmul(dropped.transpose(2, 3), d_context))
        del dropped
        d_probs = _dropout_backward(torch.matmul(d_context, v.transpose(2, 3)), keep_probs, p)
        del d_context, v, keep_probs
        d_scores = torch.ops.aten._softmax_backward_data(d_probs, probs, -1, probs.dtype).mul_(
            attention.scaling
        )
        del d_probs, probs
        q, key_t = saved.take(Q, KEY_T)
        dq = _merge(torch.matmul(d_scores, key_t.transpose(2, 3)))
        dk = _merge(torch.matmul(d_scores.transpose(2, 3), q))
        del d_scores, q, key_t
        # The query's gradient is zero where the context's is; the key's and value's are not.
        inputs = tokens.widened(dk, dv)
        (x,) = inputs.take(X)
        ds1 = tokens.full(ds1)
        dx = inputs.pick(ds1) if need_input else None  # fresh, no longer read elsewhere: summed into
        del ds1
        # autograd's order on the re-run's graph: value, key, query (the token samplers draw in turn)
        for layer, dy in ((attention.value, dv), (attention.key, dk), (attention.query, dq)):
            dx_part = live_layer_grads(layer, inputs.pick(dy), x, need_input, found, inputs.among)
            if dx is not None:
                dx.add_(dx_part)
        return None if dx is None else inputs.full(dx)


#: The rule :mod:`greenprop.vcas.direct` registers for ``BertLayer``.
RULE = BertLayerRule()
