"""The autograd side of VCAS: a gradient sampler after each block, row-sparse Linear / Conv2d.

* :class:`BlockSampler` sits on a block's output (a forward hook). Forward is the
  identity; backward keeps each sample's gradient with its soft top-k probability and
  ``1/p`` scale (:func:`~greenprop.vcas.samplers.activation_sample`), zeroing the others.
* :class:`VCASLinear` / :class:`VCASConv2d` run their backward on the samples (rows of
  dim 0) the block's sampler kept, gathered into a smaller dense tensor; the Linear also
  samples tokens for its weight gradient
  (:func:`~greenprop.vcas.samplers.sampled_weight_grad`) with its own ratio. In the
  exact blocks at the model's end (:meth:`VCASRuntime.exact_tail`) they run plain
  ``F.linear`` / ``conv2d`` instead: no row is dropped there, and autograd's own
  backward costs less than a custom Function's.

The layers between them (LayerNorm, attention, GELU, dropout, residual adds) act on each
sample separately, so a zero row stays zero on its way back through a block; that is what
lets the layers skip rows. BatchNorm mixes samples in its backward, so
:func:`~greenprop.vcas.surgery.apply_vcas` refuses blocks that contain it. A
:class:`VCASRuntime` shared by one model's samplers and layers holds the mode, the
generators and the tally of backward FLOPs done versus dense.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from greenprop.errors import GreenpropError
from greenprop.rows import scatter_rows
from greenprop.vcas.samplers import activation_sample, row_norms, sampled_weight_grad

__all__ = [
    "BackwardTally",
    "BlockSampler",
    "Mode",
    "VCASConv2d",
    "VCASLinear",
    "VCASRuntime",
    "conv_backward",
    "linear_backward",
]


class Mode(enum.Enum):
    """What the backward pass samples."""

    EXACT = "exact"  # dense autograd, nothing sampled (FLOP counting, SGD variance)
    ACTIVATION = "activation"  # block samplers only (activation-variance estimate)
    FULL = "full"  # block samplers and token sampling in the Linear layers (training)


@dataclass
class BackwardTally:
    """What sampled backward passes did: VCAS-layer FLOPs run vs dense, samples, rows kept per block."""

    done: float = 0.0
    dense: float = 0.0
    samples: int = 0  # batch rows entering the backward (counted at the last block)
    rows: dict[int, list[int]] = field(default_factory=dict)  # block -> [rows kept, rows seen]

    @property
    def saved(self) -> float:
        return self.dense - self.done

    def add(self, other: BackwardTally) -> None:
        self.done += other.done
        self.dense += other.dense
        self.samples += other.samples
        for block, (kept, seen) in other.rows.items():
            mine = self.rows.setdefault(block, [0, 0])
            mine[0] += kept
            mine[1] += seen


@dataclass
class VCASRuntime:
    """State shared by the samplers and VCAS layers of one model (not a Parameter)."""

    activation_generator: torch.Generator
    weight_generator: torch.Generator
    mode: Mode = Mode.FULL
    check_rows: bool = False  # debug: verify that skipped rows are zero (VCASConfig.check_rows)
    sample_max_ratio: float = 1.0  # blocks above this ratio run exact (VCASConfig.sample_max_ratio)
    record_norms: bool = False
    norms: dict[int, Tensor] = field(default_factory=dict)  # block index -> per-sample norms
    tally: BackwardTally = field(default_factory=BackwardTally)
    # block -> (batch size, indices of the samples whose gradient is non-zero after that
    # block's sampler; None = all): set by the sampler, read by the layers inside the block.
    # No entry: the layers find the zero rows themselves (see _rows_to_compute).
    alive: dict[int, tuple[int, Tensor | None]] = field(default_factory=dict)
    # Set by a compacted block (greenprop.vcas.compaction) while it runs: records the layers'
    # outputs in its graph-free forward and hands them back when it re-runs on the kept rows.
    cache: Any = None
    # block -> (rows re-run, batch rows) while a compacted block's backward re-runs it: the
    # layers tally their dense cost at the full batch.
    compact: dict[int, tuple[int, int]] = field(default_factory=dict)
    # The input gradient the last compacted block's backward returned, with its non-zero rows
    # still compact (greenprop.vcas.compaction.GradientRows): the block before reads those.
    handoff: Any = None
    # Set by the variance estimation: called in its backward (mode ACTIVATION, or EXACT where no
    # block samples) with each VCASLinear's (layer, dy, x) token matrices, to draw its token
    # sampler on the side (estimation.py).
    token_probe: Callable[[VCASLinear, Tensor, Tensor], None] | None = None
    # The model's samplers, in block (forward) order: each registers itself.
    samplers: list[BlockSampler] = field(default_factory=list)
    # Whether layers of the exact blocks at the model's end may take the plain autograd ops
    # (see exact_tail); the variance estimation turns it off for its forward, whose sampled
    # backward hands every Linear's tokens to its token probe.
    plain_exact: bool = True
    # block -> backward FLOPs of its layers that ran plain autograd ops in this forward, handed
    # to the block's sampler (which tallies them in backward as dense and done).
    plain_flops: dict[int, float] = field(default_factory=dict)

    def take_tally(self) -> BackwardTally:
        """The tally since the last call, and a fresh one started."""
        tally, self.tally = self.tally, BackwardTally()
        return tally

    def exact_tail(self, block: int) -> bool:
        """Whether a training step's backward keeps every row of ``block``'s gradient: this block and
        every block after it run exact (``BlockSampler.drawn_ratio`` 1: ratio 1, or above the block's limit).

        No later sampler drops a row, so every row of the block's gradient is computed anyway:
        its layers can run autograd's own ops (:meth:`VCASLinear.forward`), and its sampler
        needs no norms to find zero rows (:meth:`BlockSampler.draw`). Only in mode FULL; a
        block without a sampler is not exact.
        """
        if self.mode is not Mode.FULL:
            return False
        found = False
        for sampler in self.samplers:
            if sampler.index >= block:
                if sampler.drawn_ratio < 1.0:
                    return False
                found = found or sampler.index == block
        return found

    def kept_ratio(self, block: int) -> float:
        """The fraction of rows ``block``'s backward keeps at most, in expectation: the lowest
        ``BlockSampler.drawn_ratio`` of its sampler and every later one (1 if none).

        Each sampler keeps rows among those the later ones left non-zero, so a block at ratio 1
        behind a block at 0.5 keeps about half the rows (its path is chosen by this fraction:
        :class:`~greenprop.vcas.compaction.CompactedForward`).
        """
        return min((s.drawn_ratio for s in self.samplers if s.index >= block), default=1.0)

    def plain_layer(self, block: int) -> bool:
        """Whether a layer of ``block`` runs autograd's own ops in this training forward: an
        exact tail block, not inside a compacted block's run, not during the estimation."""
        return self.plain_exact and self.cache is None and self.exact_tail(block)

    def add_plain_flops(self, block: int, flops: float) -> None:
        """Book a plain layer's backward FLOPs for its block's sampler to tally."""
        self.plain_flops[block] = self.plain_flops.get(block, 0.0) + flops


class _SampleGradient(torch.autograd.Function):
    """Identity forward; the block sampler's soft top-k row sampling in backward."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, sampler: BlockSampler, plain_flops: float) -> Tensor:
        ctx.sampler, ctx.plain_flops = sampler, plain_flops
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        if ctx.plain_flops:  # the block's plain layers' backward, which runs next: dense = done
            tally = ctx.sampler.runtime.tally
            tally.dense += ctx.plain_flops
            tally.done += ctx.plain_flops
        return ctx.sampler.sample(grad), None, None


class BlockSampler:
    """Samples the gradient at one block's output; ``ratio`` is its expected kept fraction."""

    def __init__(
        self, index: int, name: str, runtime: VCASRuntime, *, ratio: float = 1.0, last: bool = False
    ) -> None:
        self.index = index
        self.name = name
        self.runtime = runtime
        self.ratio = ratio
        self.last = last  # the last block's gradient is the first sampled: it counts the samples
        # Whether the sampled output is the only way gradient enters the block's layers; not
        # when other items of a tuple output carry gradient (they are not sampled).
        self.sole_path = True
        # This block's own limit (a measured block policy, block_policy.py); None: the runtime's.
        self.sample_max_ratio: float | None = None
        runtime.samplers.append(self)

    def __repr__(self) -> str:
        return f"BlockSampler(index={self.index}, name={self.name!r}, ratio={self.ratio:g})"

    @property
    def drawn_ratio(self) -> float:
        """The ratio the draws use: ``ratio``, or 1 (exact) above the block's own ``sample_max_ratio``
        (else the runtime's), where the sampling's own passes would cost more than the few rows it drops."""
        limit = self.runtime.sample_max_ratio if self.sample_max_ratio is None else self.sample_max_ratio
        return self.ratio if self.ratio <= limit else 1.0

    def hook(self, module: nn.Module, args: Any, output: Any) -> Any:
        """Forward hook: route the block's output (or the first item of a tuple) through the sampler."""
        if not (module.training and torch.is_grad_enabled()):
            return output
        plain_flops = self.runtime.plain_flops.pop(self.index, 0.0)
        if isinstance(output, Tensor):
            self.sole_path = True
            return _SampleGradient.apply(output, self, plain_flops)
        if isinstance(output, tuple) and output and isinstance(output[0], Tensor):
            self.sole_path = not _carries_grad(output[1:])
            if not self.sole_path:
                self.runtime.alive.pop(self.index, None)
            return (_SampleGradient.apply(output[0], self, plain_flops), *output[1:])
        return output

    def _record(self, n: int, alive: Tensor | None) -> None:
        if self.sole_path:
            self.runtime.alive[self.index] = (n, alive)

    def draw(
        self, grad: Tensor, nonzero: tuple[Tensor, Tensor] | None = None
    ) -> tuple[Tensor | None, Tensor | None]:
        """Soft top-k over the per-sample gradient norms: the kept rows and their ``1/p`` scales.

        ``(None, None)``: every row, unscaled (exact mode, or an exact tail block: see
        :meth:`VCASRuntime.exact_tail`). At ratio 1 elsewhere the scales are None (all 1) and
        the rows those with a non-zero gradient (None if all are). ``nonzero``, when known:
        row indices of ``grad`` and those rows (``grad[rows]``), every other row being zero;
        the norms are then taken of those rows only (the same numbers).
        """
        runtime = self.runtime
        n = grad.shape[0]
        self._record(n, None)
        if runtime.mode is Mode.EXACT and not runtime.record_norms:
            return None, None
        if not runtime.record_norms and runtime.exact_tail(self.index):
            # No later block dropped a row, so a norm pass to find zero rows finds none worth it.
            self._tally_rows(n, n)
            return None, None
        if nonzero is None:
            norms = row_norms(grad.detach())
        else:
            rows, values = nonzero
            at_rows = row_norms(values.detach())
            norms = at_rows.new_zeros(n).index_copy_(0, rows, at_rows)
        if runtime.record_norms:
            runtime.norms[self.index] = norms.double().cpu()
        if runtime.mode is Mode.EXACT:
            return None, None
        ratio = self.drawn_ratio
        alive, scale = activation_sample(grad, ratio, runtime.activation_generator, norms=norms)
        self._tally_rows(alive.numel(), n)
        every = alive.numel() == n
        self._record(n, None if every else alive)
        if ratio >= 1.0:  # nothing drawn: every non-zero row kept with scale 1
            return (None if every else alive), None
        return alive, scale

    def _tally_rows(self, kept: int, n: int) -> None:
        """Count the rows kept of the ``n`` seen (and the batch's samples at the last block)."""
        tally = self.runtime.tally
        tally.samples += n if self.last else 0
        rows = tally.rows.setdefault(self.index, [0, 0])
        rows[0] += kept
        rows[1] += n

    def sample(self, grad: Tensor) -> Tensor:
        """The gradient with the dropped rows zeroed and the kept ones Horvitz-Thompson rescaled."""
        alive, scale = self.draw(grad)
        if scale is None:  # exact, or ratio 1: a zero row kept or dropped is the same
            return grad
        # One pass: each row times its weight, 1/p if kept and 0 if dropped (the draw refused
        # non-finite rows, so 0 * row is 0). Zeros + gather + scale + scatter read and wrote
        # the kept rows three times more. The product is in fp32 at least (bf16 * fp32 weights).
        weights = scale.new_zeros(grad.shape[0]).index_copy_(0, alive, scale)
        return (grad * weights.view((-1,) + (1,) * (grad.dim() - 1))).to(grad.dtype)


def scaled_rows(grad: Tensor, rows: Tensor, scale: Tensor) -> Tensor:
    """``grad[rows] * scale`` per row (Horvitz-Thompson ``1/p``), in ``grad``'s dtype.

    Scaled in place in the gathered copy where ``scale`` has ``grad``'s dtype (fp32 /
    fp64: the same products, one tensor fewer); otherwise (bf16 / fp16 gradients) the
    product is taken in ``scale``'s fp32 and cast back, as before.
    """
    return scale_rows_(grad.index_select(0, rows), scale)


def scale_rows_(kept: Tensor, scale: Tensor) -> Tensor:
    """``kept`` times ``scale`` per row (dim 0): in place where the dtypes agree, else a new tensor."""
    shape = (-1,) + (1,) * (kept.dim() - 1)
    if scale.dtype == kept.dtype:
        return kept.mul_(scale.view(shape))
    return (kept * scale.view(shape)).to(kept.dtype)


def _carries_grad(obj: Any) -> bool:
    """Whether a (nested tuple / list / dict of) tensor(s) requires grad."""
    if isinstance(obj, Tensor):
        return obj.requires_grad
    if isinstance(obj, (tuple, list)):
        return any(_carries_grad(item) for item in obj)
    if isinstance(obj, dict):
        return any(_carries_grad(item) for item in obj.values())
    return False


def _nonzero_rows(grad: Tensor) -> Tensor | None:
    """Indices of the samples (dim 0) whose gradient is not all zero; None if all are."""
    alive = grad.reshape(grad.shape[0], -1).ne(0).any(dim=1)
    if bool(alive.all()):
        return None
    return alive.nonzero().squeeze(1)


def _rows_to_compute(layer: VCASLinear | VCASConv2d, grad: Tensor) -> Tensor | None:
    """The samples (dim 0) whose output gradient may be non-zero; None for all of them.

    The block's sampler recorded which samples it (and every sampler after it) left
    non-zero; every op between it and this layer acts per sample, so the others' rows
    here are exactly zero. Reading that record costs nothing, where scanning ``grad``
    for zero rows would read the whole tensor. If the record does not fit this
    gradient (another batch size), all rows are computed. Without a record (a tuple
    output whose other items carry gradient past the sampler, or no sampler ran) the
    zero rows are found by scanning ``grad``.
    """
    runtime = layer.vcas_runtime
    if runtime.mode is Mode.EXACT or grad.dim() < 2:
        return None
    record = runtime.alive.get(layer.vcas_block)
    if record is None:
        return _nonzero_rows(grad)
    batch, rows = record
    if batch != grad.shape[0]:
        return None
    if runtime.check_rows and rows is not None:
        _check_skipped_rows_are_zero(layer, grad, rows)
    return rows


def _dense_factor(layer: VCASLinear | VCASConv2d, grad: Tensor) -> float:
    """Batch rows per row of ``grad``: above 1 inside a compacted block's re-run on the kept rows."""
    rows, batch = layer.vcas_runtime.compact.get(layer.vcas_block, (0, 0))
    return batch / rows if rows == grad.shape[0] and rows > 0 else 1.0


def _check_skipped_rows_are_zero(layer: nn.Module, grad: Tensor, rows: Tensor) -> None:
    """Raise if a row the layer is about to skip carries gradient (the samplers' assumptions fail)."""
    skipped = torch.ones(grad.shape[0], dtype=torch.bool, device=grad.device)
    skipped[rows] = False
    leaked = grad[skipped].ne(0).reshape(int(skipped.sum()), -1).any(dim=1)
    if bool(leaked.any()):
        raise GreenpropError(
            f"VCAS check_rows: {type(layer).__name__} in block {layer.vcas_block} received gradient on "
            f"{int(leaked.sum())} sample(s) its block's sampler dropped; gradient reaches this layer "
            "other than through the block's output (an auxiliary loss on the block's internals, or "
            "a block that is not batch-first), so VCAS would be biased here"
        )


def _gather_rows(rows: Tensor | None, *tensors: Tensor) -> tuple[Tensor, ...]:
    """The kept samples of each tensor as a smaller dense tensor (all of them if ``rows`` is None)."""
    return tensors if rows is None else tuple(t.index_select(0, rows) for t in tensors)


def _save(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, layer: nn.Module) -> None:
    """What both layers' backward needs: the input, the weight, the layer, whether there is a bias."""
    ctx.save_for_backward(x, weight)
    ctx.layer, ctx.has_bias = layer, bias is not None


class _VCASLinearFunction(torch.autograd.Function):
    """``y = x W^T + b`` with a backward on the non-zero samples and sampled tokens."""

    @staticmethod
    def forward(
        ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, layer: VCASLinear, ready: Tensor | None
    ) -> Tensor:
        _save(ctx, x, weight, bias, layer)
        return ready if ready is not None else F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        layer: VCASLinear = ctx.layer
        rows = _rows_to_compute(layer, grad_out)
        dy, xs = _gather_rows(rows, grad_out, x)
        tokens_dense = grad_out.numel() // weight.shape[0] * _dense_factor(layer, grad_out)
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = ctx.has_bias and ctx.needs_input_grad[2]
        grad_x, grad_w, grad_b = _linear_grads(layer, dy, xs, weight, (need_x, need_w, need_b), tokens_dense)
        if grad_x is not None:
            grad_x = grad_x if rows is None else scatter_rows(grad_x, rows, x)
        return grad_x, grad_w, grad_b, None, None


def _linear_grads(
    layer: VCASLinear,
    dy: Tensor,
    x: Tensor,
    weight: Tensor,
    needs: tuple[bool, bool, bool],
    tokens_dense: float,
    among: tuple[Tensor, int] | None = None,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """``grad_x`` of the rows given, the token-sampled ``grad_W`` and ``grad_b``; tallies the FLOPs.

    ``tokens_dense``: the tokens a dense backward would have run (the full batch's).
    ``among``: see :func:`linear_backward`.
    """
    runtime = layer.vcas_runtime
    need_x, need_w, need_b = needs
    # Under autocast the saved fp32 weight meets a bf16/fp16 gradient: compute in the
    # gradient's dtype, return the weight's gradient in the weight's dtype.
    x, w = x.to(dy.dtype), weight.to(dy.dtype)
    out_features, in_features = weight.shape
    # Tokens left out for their zero gradient are tallied as done: the tally counts what
    # sampling saves, the same on every path.
    tokens = dy.numel() // out_features if among is None else among[1]
    dense = done = 0.0
    grad_x = grad_w = grad_b = None
    if need_x:
        grad_x = dy @ w
        dense += 2.0 * tokens_dense * out_features * in_features
        done += 2.0 * tokens * out_features * in_features
    dy2, x2 = dy.reshape(-1, out_features), x.reshape(-1, in_features)
    if need_w:
        if runtime.token_probe is not None:  # the estimation's side draw (exact or activation pass)
            runtime.token_probe(layer, dy2, x2)
        ratio = layer.token_ratio if runtime.mode is Mode.FULL else 1.0
        grad_w, kept_tokens = sampled_weight_grad(dy2, x2, ratio, runtime.weight_generator, among=among)
        kept_tokens = tokens if among is not None and ratio >= 1.0 else kept_tokens
        grad_w = grad_w.to(weight.dtype)
        dense += 2.0 * tokens_dense * out_features * in_features
        done += 2.0 * kept_tokens * out_features * in_features
    if need_b:
        grad_b = dy2.sum(0).to(weight.dtype)
    runtime.tally.dense += dense
    runtime.tally.done += done
    return grad_x, grad_w, grad_b


def _needs(layer: nn.Module, need_x: bool) -> tuple[bool, bool, bool]:
    """Which of ``grad_x``, ``grad_W``, ``grad_b`` a direct backward computes: frozen or absent
    parameters get none."""
    bias = layer.bias
    return need_x, layer.weight.requires_grad, bias is not None and bias.requires_grad


def linear_backward(
    layer: VCASLinear, dy: Tensor, x: Tensor, need_x: bool = True, *, among: tuple[Tensor, int] | None = None
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """One VCAS Linear's backward on rows that are all computed (a known block's direct backward).

    ``dy`` and ``x`` are the kept samples' rows. Returns ``grad_x`` (None unless
    ``need_x``), the token-sampled ``grad_W`` and ``grad_b`` (None for frozen or absent
    parameters); tallies the FLOPs against the full batch's dense cost.

    ``among = (positions, total)``: ``dy`` and ``x`` are ``(tokens, features)`` matrices of
    the kept samples' tokens at ``positions`` (ascending, flattened) of their ``total``
    tokens, the others' ``dy`` being zero: ``grad_x`` is computed for the tokens given only,
    the weight gradient's token draw and the tally are those of all ``total`` tokens.
    """
    if among is None:
        tokens_dense = dy.numel() // layer.out_features * _dense_factor(layer, dy)
    else:
        rows, batch = layer.vcas_runtime.compact.get(layer.vcas_block, (0, 0))
        tokens_dense = among[1] * (batch / rows if rows > 0 else 1.0)
    return _linear_grads(layer, dy, x, layer.weight, _needs(layer, need_x), tokens_dense, among)


class VCASLinear(nn.Linear):
    """``nn.Linear`` whose backward skips all-zero samples and samples tokens for ``grad_W``.

    Created only by changing the class of an existing ``nn.Linear`` in place
    (:func:`~greenprop.vcas.surgery.apply_vcas`), so Parameters and ``state_dict``
    keys stay the same. ``vcas_weight_ratio`` is the expected fraction of tokens used
    for the weight gradient (1 = exact).
    """

    vcas_runtime: VCASRuntime
    vcas_weight_ratio: float
    vcas_block: int  # index of the block (and its sampler) this layer sits in
    #: Token sampling runs only at ratios below this (1: whenever the ratio is below 1);
    #: a measured token policy lowers it where sampling does not pay (policy.py).
    vcas_token_break_even: float = 1.0

    @property
    def token_ratio(self) -> float:
        """The token ratio a training backward samples at: ``vcas_weight_ratio``, or 1 (exact) at or
        above the break-even, where sampling would not pay (policy.py)."""
        ratio = self.vcas_weight_ratio
        return ratio if ratio < self.vcas_token_break_even else 1.0

    def forward(self, x: Tensor) -> Tensor:
        cache = self.vcas_runtime.cache
        if not (self.training and torch.is_grad_enabled()):
            y = F.linear(x, self.weight, self.bias)
            return y if cache is None else cache.record(self, y)
        if self.token_ratio >= 1.0:  # no token sampling
            runtime = self.vcas_runtime
            if runtime.plain_layer(self.vcas_block):  # every row kept: autograd's own backward
                passes = int(x.requires_grad) + int(self.weight.requires_grad)
                flops = 2.0 * (x.numel() // self.in_features) * self.out_features * self.in_features
                runtime.add_plain_flops(self.vcas_block, passes * flops)
                return F.linear(x, self.weight, self.bias)
        ready = None if cache is None else cache.replay(self, x, (*x.shape[:-1], self.out_features))
        return _VCASLinearFunction.apply(x, self.weight, self.bias, self, ready)

    def extra_repr(self) -> str:
        ratio = self.vcas_weight_ratio
        return f"{super().extra_repr()}, vcas_block={self.vcas_block}, vcas_weight_ratio={ratio:g}"


class _VCASConv2dFunction(torch.autograd.Function):
    """``conv2d(x, W, b)`` with one ``convolution_backward`` on the kept samples only."""

    @staticmethod
    def forward(
        ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, layer: VCASConv2d, ready: Tensor | None
    ) -> Tensor:
        _save(ctx, x, weight, bias, layer)
        if ready is not None:
            return ready
        return F.conv2d(x, weight, bias, layer.stride, layer.padding, layer.dilation, layer.groups)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        layer: VCASConv2d = ctx.layer
        rows = _rows_to_compute(layer, grad_out)
        dy, xs = _gather_rows(rows, grad_out, x)
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = ctx.has_bias and ctx.needs_input_grad[2]
        dense_rows = grad_out.shape[0] * _dense_factor(layer, grad_out)
        grad_x, grad_w, grad_b = _conv_grads(layer, dy, xs, weight, (need_x, need_w, need_b), dense_rows)
        if need_x and dy.shape[0] == 0:
            grad_x = torch.zeros_like(x)
        elif need_x and rows is not None:
            grad_x = scatter_rows(grad_x, rows, x)
        return grad_x, grad_w, grad_b, None, None


def _conv_grads(
    layer: VCASConv2d,
    dy: Tensor,
    x: Tensor,
    weight: Tensor,
    needs: tuple[bool, bool, bool],
    dense_rows: float,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """One ``convolution_backward`` on the rows given; tallies the FLOPs against ``dense_rows`` samples."""
    need_x, need_w, need_b = needs
    grad_x = grad_w = grad_b = None
    if dy.shape[0] > 0 and (need_x or need_w or need_b):
        grad_x, grad_w, grad_b = torch.ops.aten.convolution_backward(
            dy,
            x,
            weight,
            [weight.shape[0]] if layer.bias is not None else None,
            list(layer.stride),
            list(layer.padding),
            list(layer.dilation),
            False,
            [0, 0],
            layer.groups,
            [need_x, need_w, need_b],
        )
    elif dy.shape[0] == 0:  # every sample dropped: nothing to compute
        grad_w = torch.zeros_like(weight) if need_w else None
        grad_b = weight.new_zeros(weight.shape[0]) if need_b else None
    # Each of grad_x and grad_W costs what the forward does: 2 * outputs * (C_in / groups) * kh * kw.
    per_sample = 2.0 * math.prod(dy.shape[1:]) * weight[0].numel()
    passes = int(need_x) + int(need_w)
    runtime = layer.vcas_runtime
    runtime.tally.dense += passes * per_sample * dense_rows
    runtime.tally.done += passes * per_sample * dy.shape[0]
    return (grad_x if need_x else None), (grad_w if need_w else None), (grad_b if need_b else None)


def conv_backward(
    layer: VCASConv2d, dy: Tensor, x: Tensor, need_x: bool = True
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """One VCAS Conv2d's backward on rows that are all computed (a known block's direct backward).

    ``dy`` and ``x`` are the kept samples' rows; returns ``grad_x`` (None unless
    ``need_x``), ``grad_W`` and ``grad_b`` (None for frozen or absent parameters).
    """
    dense_rows = dy.shape[0] * _dense_factor(layer, dy)
    return _conv_grads(layer, dy, x, layer.weight, _needs(layer, need_x), dense_rows)


class VCASConv2d(nn.Conv2d):
    """``nn.Conv2d`` whose backward runs on the samples its block's sampler kept.

    Convolutions get the data-dimension saving only (no weight-gradient sampling: the
    paper samples tokens in Linear layers). Created by :func:`~greenprop.vcas.surgery.apply_vcas`
    changing the class of a plain, zero-padded ``nn.Conv2d`` with numeric padding.
    """

    vcas_runtime: VCASRuntime
    vcas_block: int

    def forward(self, x: Tensor) -> Tensor:
        cache = self.vcas_runtime.cache
        if not (self.training and torch.is_grad_enabled()):
            y = super().forward(x)
            return y if cache is None else cache.record(self, y)
        runtime = self.vcas_runtime
        if runtime.plain_layer(self.vcas_block):  # every row kept: autograd's own backward
            y = super().forward(x)
            passes = int(x.requires_grad) + int(self.weight.requires_grad)
            per_output = 2.0 * math.prod(self.weight.shape[1:])  # (C_in / groups) * kh * kw
            runtime.add_plain_flops(self.vcas_block, passes * per_output * y.numel())
            return y
        ready = None if cache is None else cache.replay(self, x, self._output_shape(x))
        return _VCASConv2dFunction.apply(x, self.weight, self.bias, self, ready)

    def _output_shape(self, x: Tensor) -> tuple[int, ...]:
        """The shape ``forward(x)`` returns (numeric zero padding: what VCAS converts)."""
        spatial = (
            (size + 2 * pad - dil * (k - 1) - 1) // stride + 1
            for size, pad, dil, k, stride in zip(
                x.shape[-2:], self.padding, self.dilation, self.kernel_size, self.stride, strict=True
            )
        )
        return (*x.shape[:-3], self.out_channels, *spatial)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, vcas_block={self.vcas_block}"
