"""Known blocks' backward written out on the kept rows: compaction without a re-run.

A compacted block (:mod:`greenprop.vcas.compaction`) normally re-runs its forward on
the samples its sampler kept and backpropagates through that small graph: every op's
forward runs a second time on the kept rows. For block types whose ops are known, a
:class:`DirectRule` instead keeps what the backward needs from the one graph-free
forward (batch first) and computes the kept rows' gradients op by op from the kept rows
of those tensors (aten's backward kernels: ``native_layer_norm_backward``,
``native_group_norm_backward``, the flash-attention backward, ``threshold_backward``...),
with the VCAS layers' own backward (:func:`~greenprop.vcas.layers.linear_backward`,
:func:`~greenprop.vcas.layers.conv_backward`: token sampling and FLOP tally included).
No op runs twice; the price is keeping the activations dense autograd keeps.

Rules are registered per block class (:func:`register`); a block whose class has no
rule, or whose rule refuses the call (dropout on, autocast, an unexpected argument),
takes the re-run path. At ratio 1 a rule's gradients must equal dense autograd's.
"""

from __future__ import annotations

import importlib
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from greenprop.vcas.layers import (
    Mode,
    VCASConv2d,
    VCASLinear,
    VCASRuntime,
    _dense_factor,
    _gather_rows,
    conv_backward,
    linear_backward,
)

__all__ = [
    "DirectRule",
    "KeptRows",
    "bypassed",
    "layer_grads",
    "layer_norm",
    "layer_norm_backward",
    "live_layer_grads",
    "live_positions",
    "nonzero_tokens",
    "register",
    "rule_for",
    "skips_zero_tokens",
    "tally_kept_rows",
    "zero_token_flops",
]


class DirectRule(Protocol):
    """How one block class runs graph-free and backpropagates its kept rows by hand."""

    def refuse(self, block: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
        """Why this call cannot take the direct path (the re-run path runs it), or None."""

    def forward(
        self, block: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[Any, list[Tensor]]:
        """The block's output, exactly as its own forward gives it, and what the backward needs.

        Runs without grad. Every saved tensor has the batch as its first dimension (the
        caller keeps only the kept samples' rows of each). VCAS layers are called as
        modules (their hooks fire; without grad they run plainly).
        """

    def backward(
        self, block: nn.Module, saved: list[Tensor], grad: Tensor, need_input: bool
    ) -> tuple[Tensor | None, dict[nn.Parameter, Tensor]]:
        """The kept rows' gradient w.r.t. the block's first argument and its parameters' gradients.

        ``saved``: the kept rows of :meth:`forward`'s tensors, in a list the rule owns (it may
        empty it, so that each tensor goes once used); ``grad``: the kept rows of the
        gradient of the block's (first) output, already rescaled by ``1/p``. Returns the
        input gradient of those rows (None unless ``need_input``) and a gradient for each
        trainable parameter (parameters left out get none).

        A rule whose class sets ``gathers = True`` gets a :class:`KeptRows` instead of the
        list and takes each tensor's kept rows where it uses them. One that sets
        ``changes_grad = True`` may write over ``grad`` (always a tensor of its own then:
        the caller copies autograd's, which other nodes may hold too), so that its first
        step's gradient needs no tensor of its own. One that sets ``frees_saved = True``
        has its saved tensors let go as soon as their kept rows are gathered (or as it
        empties ``saved``) instead of when its backward returns; they are not autograd's
        saved tensors then, so ``saved_tensors_hooks`` do not see them.
        """


#: A rule may also define ``live_tokens(block, grad) -> bool``: whether its backward runs the
#: per-token ops on the live tokens only (zero-gradient tokens left out) for this output
#: gradient. A block above its direct path's ratio limit (at ratio 1, say) then takes the direct
#: path while its output gradient is so (:class:`~greenprop.vcas.compaction.CompactedForward`).


#: The rules that ship, by block class (``module.qualname``) -> ``module:attribute`` of the
#: rule, imported on first use (so transformers is imported only for its own blocks).
_KNOWN: dict[str, str] = {
    "transformers.models.bert.modeling_bert.BertLayer": "greenprop.vcas.direct_bert:RULE",
    "greenprop.models.vit.Block": "greenprop.vcas.direct_vit:RULE",
    "greenprop.models.resnet.BasicBlock": "greenprop.vcas.direct_resnet:RULE",
}

_RULES: dict[str, DirectRule] = {}


def _class_name(block_type: type) -> str:
    return f"{block_type.__module__}.{block_type.__qualname__}"


def register(block_type: type[nn.Module] | str, rule: DirectRule) -> None:
    """Let blocks of exactly ``block_type`` (a class or its ``module.qualname``) take the direct path."""
    _RULES[block_type if isinstance(block_type, str) else _class_name(block_type)] = rule


def rule_for(block: nn.Module) -> DirectRule | None:
    """The rule for this block's class, if any."""
    name = _class_name(type(block))
    if name not in _RULES and name in _KNOWN:
        module, attribute = _KNOWN[name].split(":")
        _RULES[name] = getattr(importlib.import_module(module), attribute)
    return _RULES.get(name)


def bypassed(module: nn.Module) -> bool:
    """Whether a rule that computes ``module``'s op itself would skip something the module
    does when called: forward or backward hooks, or a ``forward`` patched on the instance."""
    return bool(
        module._forward_hooks
        or module._forward_pre_hooks
        or module._backward_hooks
        or module._backward_pre_hooks
        or "forward" in vars(module)
    )


#: The per-token ops run on the live tokens only when at most this fraction of the kept tokens
#: is live. Gathering tokens one by one, the scan and the scatters back cost more than the rows
#: they spare above it: MiniLM's backward at block ratio 0.5, token ratio 0.3, 1 thread, busy
#: machine, live path / every token with 60%, 75%, 91% and 100% of the tokens live: 0.88,
#: 0.985, 1.07-1.08 and 1.01 (the last layer's few live tokens take the live path in both).
LIVE_MAX_FRACTION = 0.75


def nonzero_tokens(t: Tensor) -> Tensor:
    """Whether each token of a ``(kept samples, T, hidden)`` gradient is non-zero, flat.

    Reductions that allocate nothing full-size (a norm could underflow to 0, ``aminmax`` over
    a dim is several times slower here); a NaN counts as live, so it reaches the result.
    """
    return (t.amax(dim=-1) != 0).logical_or_(t.amin(dim=-1) != 0).flatten()


def live_positions(alive: Tensor) -> Tensor | None:
    """The positions where ``alive`` is true, or None where nearly all are (run on every token)."""
    live = alive.nonzero().squeeze(1)
    return None if live.numel() > LIVE_MAX_FRACTION * alive.numel() else live


def skips_zero_tokens(runtime: VCASRuntime) -> bool:
    """Whether a backward may leave zero-gradient tokens out: a training backward only (the
    variance estimation's token probe draws on every token)."""
    return runtime.mode is Mode.FULL and runtime.token_probe is None


class KeptRows:
    """A block's saved (batch-first) tensors whose kept samples' rows are gathered when taken.

    A rule that takes each tensor just before the backward step that uses it holds one
    step's gathered copies at a time instead of the whole block's (lower peak memory).
    Each tensor can be taken once.
    """

    def __init__(self, saved: list[Tensor], rows: Tensor | None) -> None:
        self._saved: list[Tensor | None] = list(saved)
        self.rows = rows  # the kept samples (None: all of them)

    def take(self, *at: int) -> tuple[Tensor, ...]:
        """The kept rows of the saved tensors at these positions (the full ones are let go)."""
        return _gather_rows(self.rows, *self.take_full(*at))

    def take_tokens(self, tokens: Tensor, *at: int) -> tuple[Tensor, ...]:
        """Like :meth:`take`, but only the given tokens of ``(batch, tokens, ...)`` tensors, as
        ``(len(tokens), ...)`` tensors; ``tokens``: flattened ``sample * T + token`` indices into
        the full batch. Tensors with an empty last dimension (stand-ins) come back as they are."""
        tensors = self.take_full(*at)
        return tuple(t if t.shape[-1] == 0 else t.flatten(0, 1).index_select(0, tokens) for t in tensors)

    def take_full(self, *at: int) -> tuple[Tensor, ...]:
        """The saved tensors at these positions, every sample's rows (the caller picks what it reads)."""
        tensors = [self._saved[i] for i in at]
        if any(t is None for t in tensors):
            raise RuntimeError(f"KeptRows: a tensor at {at} was taken before")
        for i in at:
            self._saved[i] = None
        return tuple(tensors)  # type: ignore[arg-type]


# What the rules share: a VCAS layer's and a LayerNorm's backward with the parameter
# gradients collected into the rule's ``found`` dict.


def layer_grads(
    layer: VCASLinear | VCASConv2d,
    dy: Tensor,
    x: Tensor,
    need_x: bool,
    found: dict[nn.Parameter, Tensor],
    among: tuple[Tensor, int] | None = None,
) -> Tensor | None:
    """A VCAS layer's backward on the kept rows (token sampling, FLOP tally); its parameters'
    gradients go into ``found``; returns the input gradient (None unless ``need_x``).
    ``among``: a Linear's live tokens (:func:`~greenprop.vcas.layers.linear_backward`)."""
    if isinstance(layer, VCASConv2d):
        dx, dw, db = conv_backward(layer, dy, x, need_x)
    else:
        dx, dw, db = linear_backward(layer, dy, x, need_x, among=among)
    found.update({p: d for p, d in ((layer.weight, dw), (layer.bias, db)) if d is not None})
    return dx


def zero_token_flops(layer: VCASLinear, among: tuple[Tensor, int] | None, need_x: bool) -> float:
    """FLOPs :func:`~greenprop.vcas.layers.linear_backward` tallies as done for the tokens ``among``
    leaves out (zero gradient: nothing ran for them): the input gradient's, and the weight
    gradient's where it is exact (token ratio 1); a sampled one is tallied at the tokens drawn."""
    if among is None:
        return 0.0
    runs = int(need_x) + int(layer.weight.requires_grad and layer.token_ratio >= 1.0)
    return 2.0 * (among[1] - among[0].numel()) * layer.in_features * layer.out_features * runs


def live_layer_grads(
    layer: VCASLinear,
    dy: Tensor,
    x: Tensor,
    need_x: bool,
    found: dict[nn.Parameter, Tensor],
    among: tuple[Tensor, int] | None,
) -> Tensor | None:
    """:func:`layer_grads` on the live tokens ``among`` (every token if None), the zero tokens'
    FLOPs booked as saved: the tally holds what ran, as a FLOP count of the step does."""
    dx = layer_grads(layer, dy, x, need_x, found, among)
    layer.vcas_runtime.tally.done -= zero_token_flops(layer, among, need_x)
    return dx


def tally_kept_rows(layer: VCASLinear | VCASConv2d, flops: float, kept: Tensor) -> None:
    """Tally an op outside the VCAS layers (attention) that ran ``flops`` on the kept rows ``kept``
    (batch first) of ``layer``'s block: done, against the full batch's FLOPs as dense.

    The dense step's count includes such ops at the full batch; without this tally the
    account would take them at that count although the compacted backward ran fewer.
    """
    tally = layer.vcas_runtime.tally
    tally.done += flops
    tally.dense += flops * _dense_factor(layer, kept)


def layer_norm(norm: nn.LayerNorm, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``norm(x)`` as nn.LayerNorm computes it, with the mean and rstd its backward needs."""
    return torch.native_layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


def layer_norm_backward(
    norm: nn.LayerNorm,
    grad: Tensor,
    x: Tensor,
    mean: Tensor,
    rstd: Tensor,
    need_input: bool,
    found: dict[nn.Parameter, Tensor],
) -> Tensor | None:
    """The input gradient (None unless ``need_input``); the norm's parameter gradients go into ``found``."""
    params = (norm.weight, norm.bias)
    mask = [need_input, *(p is not None and p.requires_grad for p in params)]
    dx, *dparams = torch.ops.aten.native_layer_norm_backward(
        grad, x, norm.normalized_shape, mean, rstd, norm.weight, norm.bias, mask
    )
    found.update({p: d for p, d in zip(params, dparams, strict=True) if p is not None and d is not None})
    return dx
