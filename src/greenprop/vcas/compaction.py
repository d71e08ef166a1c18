"""Compacted blocks: a VCAS block's backward re-runs the block on the samples its sampler kept.

Without compaction only the VCAS Linear/Conv2d layers skip the dropped samples; the
attention, norms, activations and residual adds between them run on the full, partly
zero tensors. A compacted block instead:

* **forward**: runs the block without an autograd graph, inside one autograd Function
  that saves the block's inputs, the outputs of its VCAS layers (no copy: they exist
  anyway) and, for a block that draws random numbers (dropout), every draw;
* **backward**: the block's sampler picks the rows (samples) to keep from the output
  gradient, exactly as without compaction; the block runs again, with grad, on the
  kept samples only, its VCAS layers handing back the kept rows of their saved
  outputs instead of redoing the matmul (:meth:`BlockCache.replay`) and its random ops
  the kept rows of their recorded draws (:class:`_RandomDraws`); backpropagating the
  ``1/p``-rescaled kept gradient through that small graph gives the parameter
  gradients and the kept samples' input gradients (zeros for the others). The VCAS
  layers still sample tokens for their weight gradients.

So every op of the block costs the kept fraction in backward, plus its non-matmul
forward ops again on the kept rows, and no block keeps its activation graph between
forward and backward. The estimate is the same Horvitz-Thompson one (unbiased), and at
ratio 1 the gradients are dense autograd's.

What it needs (checked where possible): every per-sample tensor argument of the block
has the batch first (tensors whose first dimension is the batch size are sliced, others
such as a ``(1, 1, T, T)`` mask are passed whole); samples are independent inside the
block (a re-run on a subset must reproduce those rows of the forward: checked on the
first re-run on a subset and always under ``check_rows``); gradient enters only
through the block's first output, and the block's parameters are its own. The first
training forward of each block runs the plain sampled path and checks the last two
(:meth:`CompactedForward._probe`); a block that fails them stays on the plain path
with a warning.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_unflatten

from greenprop.errors import GreenpropError
from greenprop.metering.flops import flop_counter
from greenprop.rows import scatter_rows
from greenprop.vcas.direct import DirectRule, KeptRows, rule_for, skips_zero_tokens
from greenprop.vcas.layers import (
    BlockSampler,
    Mode,
    VCASRuntime,
    _carries_grad,
    scale_rows_,
    scaled_rows,
)

__all__ = ["BlockCache", "CompactedForward", "CompactionWarning"]

#: Plain calls of a block that takes the direct path only for a token-sparse output gradient
#: (:meth:`CompactedForward.watch`) between two looks at its gradient, once it was found dense.
LIVE_RECHECK = 16

# Random ops whose recorded output cannot stand in for a re-run: their backward redraws
# (fused attention with dropout) or their output mixes the draw with the input (rrelu).
_UNREPLAYABLE = ("attention", "rrelu")


#: Argument types a block can take without state a re-run would change.
_PLAIN_ARGUMENTS = (type(None), bool, int, float, str, torch.dtype, torch.device)


def _stateful_argument(leaves: list[Any]) -> str | None:
    """The type name of the first argument that is neither a tensor nor a plain value."""
    for leaf in leaves:
        if not isinstance(leaf, (Tensor, *_PLAIN_ARGUMENTS)):
            return type(leaf).__name__
    return None


class CompactionWarning(UserWarning):
    """A block that cannot be compacted runs the plain sampled path instead."""


class BlockCache:
    """The outputs of one compacted block's VCAS layers: recorded in its forward, replayed in its re-run."""

    def __init__(self) -> None:
        self.outputs: dict[nn.Module, list[tuple[Tensor, int]]] = {}
        self.rows: Tensor | None = None  # re-run: the kept samples (None: all)
        self.recording = True
        self._position: dict[nn.Module, int] = {}

    def record(self, layer: nn.Module, y: Tensor) -> Tensor:
        """Keep a layer's output (with its version, to notice in-place changes); returns it."""
        if self.recording:
            self.outputs.setdefault(layer, []).append((y, y._version))
        return y

    def unchanged(self) -> list[Tensor]:
        """Drop the outputs changed in place after they were recorded; the others, flat."""
        for layer, entries in self.outputs.items():
            self.outputs[layer] = [(y, v) if y._version == v else (y, -1) for y, v in entries]
        return [y for entries in self.outputs.values() for y, v in entries if v >= 0]

    def restore(self, tensors: Iterator[Tensor]) -> None:
        """Take the kept outputs back from autograd's saved tensors (same order as :meth:`unchanged`)."""
        for layer, entries in self.outputs.items():
            self.outputs[layer] = [(next(tensors), 0) if v >= 0 else (y, -1) for y, v in entries]

    def release(self) -> None:
        """Let go of the outputs (autograd keeps them while it needs them), keeping which ones were kept."""
        for layer, entries in self.outputs.items():
            self.outputs[layer] = [(None, v) for _, v in entries]  # type: ignore[misc]

    def start_replay(self, rows: Tensor | None) -> None:
        self.recording, self.rows, self._position = False, rows, {}

    def replay(self, layer: nn.Module, x: Tensor, shape: tuple[int, ...]) -> Tensor | None:
        """The kept rows of this call's recorded output, or None: compute it (nothing fits).

        A copy, so in-place ops of the re-run cannot touch the record (the variance
        estimation re-runs a block three times). None when recording, when the layer
        was called more often than recorded, when its output was changed in place after
        the forward recorded it, or when the rows do not give ``shape`` (e.g. a block
        that flattens the batch into its tokens before this layer).
        """
        if self.recording:
            return None
        i = self._position.get(layer, 0)
        self._position[layer] = i + 1
        entries = self.outputs.get(layer, ())
        if i >= len(entries) or entries[i][1] < 0:
            return None
        y = entries[i][0]
        ready = y.clone() if self.rows is None else y.index_select(0, self.rows)
        return ready if tuple(ready.shape) == tuple(shape) else None


class _RandomDraws(TorchDispatchMode):
    """Records a block's random draws in its forward; hands back their kept rows in its re-run.

    Ops tagged ``nondeterministic_seeded`` (bernoulli_ of dropout, rand, native_dropout)
    are intercepted: recording keeps a copy of their outputs (an in-place Bernoulli draw,
    dropout's mask on CPU, as bool), replaying returns (or, for
    in-place draws, writes) the kept samples' rows of the recorded output instead of
    drawing, so a re-run sees the forward's dropout masks. A draw whose first dimension
    is not the batch is replayed whole.
    """

    def __init__(self, draws: list[Tensor], *, block: str, rows: Tensor | None, batch: int, record: bool):
        super().__init__()
        self.draws, self.block, self.rows, self.batch, self.record = draws, block, rows, batch, record
        self._next = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if torch.Tag.nondeterministic_seeded not in func.tags:
            return func(*args, **kwargs)
        name = func.name()
        if any(word in name for word in _UNREPLAYABLE):
            raise GreenpropError(
                f"VCAS compaction: block {self.block!r} draws random numbers in {name}, which cannot be "
                "replayed on the kept samples; use vcas:compact=false or switch that dropout off"
            )
        in_place = func._schema.is_mutable
        if self.record:
            out = func(*args, **kwargs)
            if in_place and name.startswith("aten::bernoulli"):
                # Dropout's mask on CPU: 0s and 1s written into a float tensor (then scaled in
                # place). Kept as bool, a quarter of float32's memory and copy; the replay's
                # copy_ into the float target gives the same 0s and 1s back.
                self.draws.append(out.to(torch.bool, copy=True))
                return out
            outs = out if isinstance(out, tuple) else (out,)
            self.draws.extend(t.clone() for t in outs if isinstance(t, Tensor))
            return out
        if in_place:
            target = args[0]
            target.copy_(self._take(tuple(target.shape)))
            return target
        n_out = len(func._schema.returns)
        outs = tuple(self._take(None) for _ in range(n_out))
        return outs if n_out > 1 else outs[0]

    def _take(self, shape: tuple[int, ...] | None) -> Tensor:
        if self._next >= len(self.draws):
            raise GreenpropError(
                f"VCAS compaction: block {self.block!r} drew more random numbers in its re-run than in "
                "its forward; use vcas:compact=false for it"
            )
        recorded = self.draws[self._next]
        self._next += 1
        per_sample = self.rows is not None and recorded.dim() > 0 and recorded.shape[0] == self.batch
        value = recorded.index_select(0, self.rows) if per_sample else recorded.clone()
        if shape is not None and tuple(value.shape) != shape:
            raise GreenpropError(
                f"VCAS compaction: block {self.block!r} draws random numbers of shape {shape} in its re-run "
                f"but {tuple(recorded.shape)} in its forward; use vcas:compact=false for it"
            )
        return value


class _AttentionCount:
    """Counts the fused attention a compacted block's re-run runs, forward and backward, with the
    project's FLOP counter (:func:`~greenprop.metering.flops.flop_counter`).

    The VCAS layers tally their own matmuls; attention is the other op the counter counts.
    A Python hook on every op (it made the zoo ViT's re-run step about 8% slower, batch 128,
    one thread), so a block counts once per input shape (:attr:`CompactedForward.attention_per_row`).
    """

    _FORWARD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    _BACKWARD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward

    def __init__(self) -> None:
        self.counter = flop_counter()

    def __enter__(self) -> _AttentionCount:
        self.counter.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.counter.__exit__(*exc)

    def per_row(self, rows: int) -> tuple[float, float]:
        """The forward and backward FLOPs counted, per row of the ``rows`` the re-run ran on."""
        counts = self.counter.get_flop_counts()["Global"]
        return counts.get(self._FORWARD, 0) / rows, counts.get(self._BACKWARD, 0) / rows


def _rng_state(device: torch.device) -> Tensor:
    """The generator state a block's random ops on ``device`` advance."""
    if device.type == "cuda":
        return torch.cuda.get_rng_state(device)
    return torch.get_rng_state()


def _set_rng_state(device: torch.device, state: Tensor) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


def _autocast_devices() -> tuple[str, ...]:
    return ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",)


class _Run:
    """One forward of a compacted block: its arguments, what it recorded, and how to re-run it."""

    def __init__(self, owner: CompactedForward, leaves: list[Any], spec: Any, tensor_at: list[int]) -> None:
        self.owner = owner
        self.leaves, self.spec, self.tensor_at = leaves, spec, tensor_at
        main = leaves[tensor_at[0]]
        self.batch = main.shape[0] if main.dim() > 0 else 0
        self.per_sample = [
            self.batch > 0 and t.dim() > 0 and t.shape[0] == self.batch for t in self.tensors()
        ]
        # The call as far as it decides the ops' FLOPs per sample: the tensors' shapes (per-sample
        # ones without the batch) and the other arguments.
        tensors = zip(self.tensors(), self.per_sample, strict=True)
        shapes = [tuple(t.shape[1:] if sliced else t.shape) for t, sliced in tensors]
        self.shapes = (*shapes, *(leaf for leaf in leaves if not isinstance(leaf, Tensor)))
        self.cache = BlockCache()
        self.draws: list[Tensor] = []
        self.extras: tuple[Any, ...] | None = None  # a tuple output's items after the first
        self.params = owner.trainable()  # the Function's inputs after the tensors
        self.autocast = {
            d: (torch.is_autocast_enabled(d), torch.get_autocast_dtype(d)) for d in _autocast_devices()
        }

    def tensors(self) -> list[Tensor]:
        return [self.leaves[i] for i in self.tensor_at]

    def call(self, tensors: list[Tensor]) -> Any:
        leaves = list(self.leaves)
        for i, t in zip(self.tensor_at, tensors, strict=True):
            leaves[i] = t
        args, kwargs = tree_unflatten(leaves, self.spec)
        return self.owner.plain(*args, **kwargs)

    @contextmanager
    def _layers(self) -> Iterator[None]:
        runtime = self.owner.runtime
        previous, runtime.cache = runtime.cache, self.cache
        try:
            yield
        finally:
            runtime.cache = previous

    def forward(self) -> Tensor:
        """The block's forward, graph-free; records layer outputs (and random draws if it draws any)."""
        owner = self.owner
        device = self.tensors()[0].device
        with self._layers():
            if owner.draws_random:
                out = self._recording_draws()
            else:
                state = _rng_state(device)
                out = self.call(self.tensors())
                if not torch.equal(state, _rng_state(device)):  # it draws: record its draws from now on
                    _set_rng_state(device, state)
                    owner.draws_random = True
                    self.cache = BlockCache()
                    with self._layers():
                        out = self._recording_draws()
        if isinstance(out, tuple):
            self.extras = out[1:]
            out = out[0]
        if not isinstance(out, Tensor):
            raise GreenpropError(
                f"VCAS compaction: block {owner.sampler.name!r} returned {type(out).__name__}, not a tensor "
                "(or a tuple starting with one); use vcas:compact=false"
            )
        return out

    def _recording_draws(self) -> Any:
        name = self.owner.sampler.name
        with _RandomDraws(self.draws, block=name, rows=None, batch=self.batch, record=True):
            return self.call(self.tensors())

    def rerun(
        self, saved: list[Tensor], rows: Tensor | None, needs_grad: list[bool]
    ) -> tuple[Tensor, list[Tensor]]:
        """The block again, with grad, on the kept ``rows``: its first output and its new input leaves."""
        self.cache.start_replay(rows)
        with ExitStack() as stack:
            stack.enter_context(torch.enable_grad())
            inputs = []
            for t, sliced, grad in zip(saved, self.per_sample, needs_grad, strict=True):
                leaf = t.detach()
                if sliced and rows is not None:
                    leaf = leaf.index_select(0, rows)
                if (
                    grad
                ):  # not a leaf: module hooks (FlopCounterMode's) cannot watch leaves inside autograd.grad
                    leaf = leaf.requires_grad_(True).view_as(leaf)
                inputs.append(leaf)
            for device, (enabled, dtype) in self.autocast.items():
                stack.enter_context(torch.autocast(device, dtype=dtype, enabled=enabled))
            stack.enter_context(self._layers())
            if self.draws:
                name = self.owner.sampler.name
                stack.enter_context(
                    _RandomDraws(self.draws, block=name, rows=rows, batch=self.batch, record=False)
                )
            out = self.call(inputs)
        return (out[0] if isinstance(out, tuple) else out), inputs


class _CompactedBlock(torch.autograd.Function):
    """Forward: the block without graph. Backward: sample rows, re-run on them, backpropagate, scatter."""

    @staticmethod
    def forward(ctx: Any, run: _Run, *inputs: Tensor) -> Tensor:
        ctx.set_materialize_grads(False)
        ctx.run = run
        out = run.forward()
        kept_outputs = run.cache.unchanged()
        ctx.n_tensors, ctx.n_cached = len(run.tensor_at), len(kept_outputs)
        ctx.save_for_backward(*run.tensors(), out, *kept_outputs, *run.draws)
        run.cache.release()
        run.leaves = [None if isinstance(leaf, Tensor) else leaf for leaf in run.leaves]  # saved above
        run.draws = []
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor | None) -> tuple[Tensor | None, ...]:
        run: _Run = ctx.run
        n_inputs = len(ctx.needs_input_grad) - 1
        if grad is None:
            return (None,) * (1 + n_inputs)
        saved = list(ctx.saved_tensors)
        tensors, out = saved[: ctx.n_tensors], saved[ctx.n_tensors]
        cached = saved[ctx.n_tensors + 1 : ctx.n_tensors + 1 + ctx.n_cached]
        run.cache.restore(iter(cached))
        run.draws = saved[ctx.n_tensors + 1 + ctx.n_cached :]
        owner = run.owner
        params = run.params
        needs = list(ctx.needs_input_grad[1 : 1 + len(tensors)])
        rows, kept = owner.kept_gradient(grad, owner.handed_over(grad))
        batch = grad.shape[0]
        if kept is None:  # every sample dropped: all gradients are zero
            zeros = [torch.zeros_like(t) if need else None for t, need in zip(tensors, needs, strict=True)]
            return (None, *zeros, *(torch.zeros_like(p) for p in params))
        runtime, block = owner.runtime, owner.sampler.index
        runtime.compact[block] = (kept.shape[0], batch)
        dense_before = runtime.tally.dense
        counted = owner.attention_per_row.get(run.shapes)
        attention = _AttentionCount() if counted is None else contextlib.nullcontext()
        try:
            with attention:
                out_kept, inputs = run.rerun(tensors, rows, needs)
                owner.verify(out_kept, out, rows)
                wrt = [t for t in inputs if t.requires_grad] + params
                grads = list(torch.autograd.grad(out_kept, wrt, kept, allow_unused=True)) if wrt else []
        finally:
            runtime.compact.pop(block, None)
            run.cache.release()  # a later backward of a retained graph takes them from ctx again
            run.draws = []
        if counted is None:
            counted = owner.attention_per_row[run.shapes] = attention.per_row(kept.shape[0])
        owner.tally_attention(counted, kept.shape[0], batch)
        owner.dense_per_row = (runtime.tally.dense - dense_before) / batch
        result: list[Tensor | None] = []
        for t, sliced, need in zip(tensors, run.per_sample, needs, strict=True):
            g = grads.pop(0) if need else None
            if g is not None and sliced and rows is not None:
                g = scatter_rows(g, rows, t)
            result.append(g)
        return (None, *result, *grads)


def _kept_rows(saved: list[Tensor], rows: Tensor | None, known: GradientRows | None = None) -> list[Tensor]:
    """The kept samples' rows of each saved (batch-first) tensor, as a list the rule owns; taken
    from the later block's gathered input where a saved tensor is that input (``known``).
    ``saved`` is emptied, each tensor as soon as its rows are taken (none held twice for long)."""
    if rows is None:
        kept = list(saved)
        saved.clear()
        return kept
    kept = []
    for i, t in enumerate(saved):
        taken = None if known is None else known.input_rows(t, rows)
        kept.append(t.index_select(0, rows) if taken is None else taken)
        saved[i] = None  # type: ignore[call-overload]
        del t
    saved.clear()
    return kept


class GradientRows:
    """A compacted block's input gradient as its backward returned it, its non-zero rows kept compact.

    ``full`` is what autograd passes on (zeros but at ``rows``), ``values`` those rows. When
    the block before receives exactly that tensor, unchanged (the same object at the same
    version: no other gradient was added to it, no hook changed it), its sampler takes the
    norms of ``values`` instead of reading every row of ``full``, and its kept rows come from
    ``values`` (all of them, no copy, when it keeps every non-zero row). ``block_input``: the
    block's input as the forward saved it and its rows at ``rows``, as the backward gathered
    them; the block before, whose output it is (a ResNet block's, kept for its ReLU), takes its
    kept rows from those in the same way. Each is used once.
    """

    def __init__(
        self, full: Tensor, rows: Tensor, values: Tensor, block_input: tuple[Tensor, Tensor] | None = None
    ) -> None:
        self.full, self.version, self.rows, self.values = full, full._version, rows, values
        self.input = None if block_input is None else (*block_input, *(t._version for t in block_input))

    def holds(self, grad: Tensor) -> bool:
        """Whether ``grad`` is the returned gradient, unchanged."""
        return grad is self.full and grad._version == self.version

    def _subset(self, values: Tensor, rows: Tensor) -> Tensor:
        """``values``' rows for ``rows``, a subset of :attr:`rows` (all of them: ``values`` itself)."""
        if rows.numel() == self.rows.numel():
            return values
        return values.index_select(0, torch.searchsorted(self.rows, rows))

    def kept(self, rows: Tensor, scale: Tensor | None) -> Tensor:
        """``full[rows]`` (``rows`` a subset of the non-zero rows), times ``scale`` per row if given."""
        kept = self._subset(self.values, rows)
        self.values = None  # type: ignore[assignment]  # used once (scaled in place below)
        return kept if scale is None else scale_rows_(kept, scale)

    def input_rows(self, t: Tensor, rows: Tensor) -> Tensor | None:
        """``t[rows]`` if ``t`` is the block's input, unchanged (the same memory, the same version, and
        its gathered rows unchanged too), else None."""
        if self.input is None:
            return None
        full, values, version, values_version = self.input
        same = t.data_ptr() == full.data_ptr() and t.shape == full.shape and t.stride() == full.stride()
        if not (same and t._version == version and values._version == values_version):
            return None
        self.input = None
        return self._subset(values, rows)


class _Held:
    """A direct block's saved tensors, for a rule that lets them go during its backward
    (``frees_saved``): autograd's saved tensors would stay until the block's backward returns,
    each beside its kept rows' copy. Kept whole for a backward that retains the graph.

    Detached (no reference cycle through the block's output and its autograd node); their
    versions are checked as autograd checks its saved tensors'.
    """

    def __init__(self, tensors: list[Tensor]) -> None:
        self.tensors: list[Tensor] | None = [t.detach() for t in tensors]
        self.versions = [t._version for t in tensors]

    def take(self, block: str) -> list[Tensor]:
        """The tensors; given away (this backward is their last) unless the graph is retained."""
        tensors = self.tensors
        if tensors is None:
            raise RuntimeError(
                f"VCAS compaction: block {block!r}'s backward ran a second time, but its saved tensors "
                "were freed after the first (use retain_graph=True the first time)"
            )
        for t, version in zip(tensors, self.versions, strict=True):
            if t._version != version:
                raise RuntimeError(
                    f"VCAS compaction: a tensor block {block!r} saved for its backward (shape "
                    f"{tuple(t.shape)}) was modified by an in-place operation after its forward"
                )
        if _keeps_graph():
            return list(tensors)
        self.tensors = None
        return tensors


def _keeps_graph() -> bool:
    """Whether the running backward retains the graph (``retain_graph=True``); True where torch
    cannot tell, so that nothing is let go too early."""
    keeps = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    return True if keeps is None else bool(keeps())


def _drop_when_backward_ends(runtime: VCASRuntime, handoff: GradientRows) -> None:
    """Let go of ``handoff`` when this backward ends, if no block took it: the first block's is
    never taken (nothing compacted before it), and it would keep its input gradient, those rows
    and its input alive until the next step's backward (memory dense autograd frees)."""

    def drop() -> None:
        if runtime.handoff is handoff:
            runtime.handoff = None

    torch.autograd.Variable._execution_engine.queue_callback(drop)


class _DirectBlock(torch.autograd.Function):
    """Forward: a known block's rule, graph-free. Backward: sample rows, the rule's backward on them.

    Inputs after the rule, ``live_only`` and the call: the block's first argument, then its
    trainable parameters. ``live_only``: the block takes this path for its token-sparse output
    gradient only (above its ratio limit): the backward tells the owner whether it still is.
    """

    @staticmethod
    def forward(
        ctx: Any,
        owner: CompactedForward,
        rule: DirectRule,
        live_only: bool,
        call: tuple[tuple, dict, list],
        x: Tensor,
        *params: Tensor,
    ) -> Tensor:
        ctx.set_materialize_grads(False)
        ctx.live_only = live_only
        args, kwargs, extras = call
        out, saved = rule.forward(owner.block, args, kwargs)
        if isinstance(out, tuple):
            extras.extend(out[1:])
            out = out[0]
        ctx.owner, ctx.rule, ctx.params = owner, rule, params
        ctx.input = (x.shape, x.dtype, x.device)
        ctx.input_at = next((i for i, t in enumerate(saved) if t is x), None)  # where the rule keeps x
        if getattr(rule, "frees_saved", False):
            ctx.held = _Held(saved)
        else:
            ctx.held = None
            ctx.save_for_backward(*saved)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor | None) -> tuple[Tensor | None, ...]:
        owner: CompactedForward = ctx.owner
        need_x = ctx.needs_input_grad[4]
        if grad is None:
            return (None,) * len(ctx.needs_input_grad)
        saved = list(ctx.saved_tensors) if ctx.held is None else ctx.held.take(owner.sampler.name)
        shape, dtype, device = ctx.input
        known = owner.handed_over(grad)
        rows, kept = owner.kept_gradient(grad, known)
        if kept is None:  # every sample dropped: all gradients are zero
            zeros = torch.zeros(shape, dtype=dtype, device=device) if need_x else None
            return (None, None, None, None, zeros, *map(torch.zeros_like, ctx.params))
        runtime, block = owner.runtime, owner.sampler.index
        batch = grad.shape[0]
        runtime.compact[block] = (kept.shape[0], batch)
        dense_before = runtime.tally.dense
        rule = ctx.rule
        if ctx.live_only:  # whether the next call takes this path again (the rule falls back itself)
            owner.live_gradient = rule.live_tokens(owner.block, kept)  # type: ignore[attr-defined]
        block_input = None
        if getattr(rule, "gathers", False):
            kept_rows: KeptRows | list[Tensor] = KeptRows(saved, rows)
        else:
            full_input = None if ctx.input_at is None else saved[ctx.input_at]
            kept_rows = _kept_rows(saved, rows, known)
            if full_input is not None:
                block_input = (full_input, kept_rows[ctx.input_at])
        saved.clear()  # held tensors go once their kept rows are gathered (the rule's, when it frees them)
        if kept is grad and getattr(rule, "changes_grad", False):
            kept = grad.clone()  # autograd's gradient may be another node's too: the rule gets its own
        try:
            grad_x, grads = rule.backward(owner.block, kept_rows, kept, need_x)
        finally:
            runtime.compact.pop(block, None)
        owner.dense_per_row = (runtime.tally.dense - dense_before) / batch
        if grad_x is not None and rows is not None:
            compact, grad_x = grad_x, scatter_rows(grad_x, rows, shape)
            runtime.handoff = GradientRows(grad_x, rows, compact, block_input)
            _drop_when_backward_ends(runtime, runtime.handoff)
        return (None, None, None, None, grad_x if need_x else None, *(grads.get(p) for p in ctx.params))


class CompactedForward:
    """Stands in for a block's ``forward`` (an instance attribute set by :func:`~greenprop.vcas.apply_vcas`).

    Training forwards with grad run the block compacted: on the direct path
    (:class:`_DirectBlock`, a rule of :mod:`greenprop.vcas.direct` knows the block) while
    the fraction of rows its backward keeps at most (:meth:`VCASRuntime.kept_ratio`: the
    lowest ratio of its sampler and every later one) is at most ``direct_max_ratio``
    (``VCASConfig.direct_max_ratio``), else re-run (:class:`_CompactedBlock`) while it is at
    most ``max_ratio`` (``VCASConfig.compact_max_ratio``); anything else (eval, no grad, the
    dense FLOP count in exact mode, a higher ratio) runs it plainly, and the first training
    forward runs the plain sampled path while checking that the block can be compacted
    (:meth:`_probe`).

    Above ``direct_max_ratio`` (at ratio 1, say: an exact tail block) a block whose rule
    leaves zero-gradient tokens out (``live_tokens``) still takes the direct path while its
    output gradient is zero at most tokens (the last block of a ViT or BERT classifier:
    cls only), so that its backward costs about its live fraction, not a dense autograd
    backward. The block does not know that before its backward, so it goes by what it saw
    last (:meth:`watch`): each such direct backward checks its gradient (the rule runs on
    every token when it is not sparse, exact either way), a plain call looks at it on the
    first call and every :data:`LIVE_RECHECK`-th after.
    """

    def __init__(
        self,
        block: nn.Module,
        sampler: BlockSampler,
        runtime: VCASRuntime,
        max_ratio: float = 1.0,
        *,
        direct: bool = True,
        direct_max_ratio: float = 1.0,
    ):
        self.block = block
        self.direct = direct  # known block types backpropagate their kept rows without a re-run
        self.direct_max_ratio = direct_max_ratio  # ... while the sampler's ratio is at most this
        self.sampler = sampler
        self.runtime = runtime
        self.max_ratio = max_ratio  # blocks whose sampler ratio is above run uncompacted
        self.compactable: bool | None = None  # None: not probed yet
        self.draws_random = False  # learnt from the generator's state: record the block's draws
        self.verified = False  # a re-run on a subset matched the forward
        # The layers' dense backward FLOPs per sample at the last re-run: what a backward that
        # drops every sample (and so runs nothing) tallies as its dense cost.
        self.dense_per_row = 0.0
        # The re-run's fused attention FLOPs (forward, backward) per kept row, by _Run.shapes.
        self.attention_per_row: dict[tuple[Any, ...], tuple[float, float]] = {}
        # Above direct_max_ratio: whether the output gradient was token-sparse when last seen
        # (None: not seen yet), and the plain calls since it was last looked at (watch).
        self.live_gradient: bool | None = None
        self.unwatched = 0

    @property
    def plain(self) -> Callable[..., Any]:
        """The block's own forward."""
        return functools.partial(type(self.block).forward, self.block)

    def trainable(self) -> list[nn.Parameter]:
        return [p for p in self.block.parameters() if p.requires_grad]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        block = self.block
        training = block.training and torch.is_grad_enabled() and self.runtime.mode is not Mode.EXACT
        # Above its path's ratio limit a compacted block costs more than the plain sampled one. The
        # rows it keeps are bounded by every later block's ratio too (a block at ratio 1 behind one
        # at 0.5 keeps about half the rows: compacted, it runs on those only).
        ratio = self.runtime.kept_ratio(self.sampler.index)
        rerun = ratio <= self.max_ratio
        known = rule = rule_for(block) if self.direct else None
        # Above its ratio limit the direct path pays only for a token-sparse output gradient.
        live_only = ratio > self.direct_max_ratio
        watched = live_only and training and self._may_go_live(known)
        if live_only and not (watched and self.live_gradient):
            rule = None
        training = training and (rerun or rule is not None)
        leaves, spec = tree_flatten((args, kwargs))
        tensor_at = [i for i, leaf in enumerate(leaves) if isinstance(leaf, Tensor)]
        if training and tensor_at and self.compactable is None:
            out, self.compactable = self._probe(args, kwargs, leaves[tensor_at[0]].device)
            if not self.compactable:
                return self.sampler.hook(block, args, out)
            # Its graph (the dense autograd block's saved tensors) would stay until the compacted
            # forward below returns: beside that forward's own tensors, 1.44x dense's peak in a
            # tiny BERT's probing step (tests/test_vcas_direct_bert.py).
            del out
        if not (training and tensor_at and self.compactable):
            out = self.plain(*args, **kwargs)
            if watched:
                self.watch(out, known)  # type: ignore[arg-type]  # watched: a rule with live_tokens
            return self.sampler.hook(block, args, out)
        if rule is not None and self._takes_direct(rule, args, kwargs, leaves):
            extras: list[Any] = []
            call = (args, kwargs, extras)
            out = _DirectBlock.apply(self, rule, live_only, call, args[0], *self.trainable())
            return (out, *extras) if extras else out
        if not rerun:  # the rule refused this call, and a re-run would not pay at this ratio
            return self.sampler.hook(block, args, self.plain(*args, **kwargs))
        run = _Run(self, leaves, spec, tensor_at)
        out = _CompactedBlock.apply(run, *run.tensors(), *run.params)
        return out if run.extras is None else (out, *run.extras)

    def _may_go_live(self, rule: DirectRule | None) -> bool:
        """Whether this training call could take the direct path above its ratio limit: the rule
        leaves zero-gradient tokens out, in a training backward (not the estimation's), and the
        block was not found uncompactable."""
        runtime = self.runtime
        return (
            hasattr(rule, "live_tokens")
            and skips_zero_tokens(runtime)
            and runtime.plain_exact
            and self.compactable is not False
        )

    def watch(self, out: Any, rule: DirectRule) -> None:
        """Look at the output gradient of this plain call in its backward (the first time, then
        every :data:`LIVE_RECHECK`-th call): is it token-sparse, so that the rule would run on its
        live tokens? A read of the gradient (two reductions), nothing changed."""
        main = out[0] if isinstance(out, tuple) and out else out
        due = self.live_gradient is None or self.unwatched >= LIVE_RECHECK
        if not (isinstance(main, Tensor) and main.requires_grad and due):
            self.unwatched += 1
            return
        self.unwatched = 0
        block = self.block

        def seen(grad: Tensor) -> None:
            self.live_gradient = rule.live_tokens(block, grad)  # type: ignore[attr-defined]

        main.register_hook(seen)

    def _takes_direct(self, rule: DirectRule, args: tuple, kwargs: dict, leaves: list[Any]) -> bool:
        """Whether this call can take the block's direct rule: gradient enters only through the
        first argument, no autocast (the rules compute in the tensors' dtype), the rule agrees."""
        if not args or not isinstance(args[0], Tensor):
            return False
        if any(isinstance(leaf, Tensor) and leaf.requires_grad and leaf is not args[0] for leaf in leaves):
            return False
        if any(torch.is_autocast_enabled(device) for device in _autocast_devices()):
            return False
        return rule.refuse(self.block, args, kwargs) is None

    def tally_attention(self, per_row: tuple[float, float], rows: int, batch: int) -> None:
        """Tally the fused attention a re-run on ``rows`` of the ``batch`` rows ran: its backward
        against the full batch's, its forward run again as done work only (the dense step runs
        it once, in the forward)."""
        forward, backward = per_row
        self.runtime.tally.done += rows * (forward + backward)
        self.runtime.tally.dense += batch * backward

    def handed_over(self, grad: Tensor) -> GradientRows | None:
        """The later block's :class:`GradientRows` if ``grad`` is that gradient, unchanged (taken anyway)."""
        handoff, self.runtime.handoff = self.runtime.handoff, None
        return handoff if handoff is not None and handoff.holds(grad) else None

    def kept_gradient(
        self, grad: Tensor, known: GradientRows | None = None
    ) -> tuple[Tensor | None, Tensor | None]:
        """The sampler's draw on the block's output gradient: the kept rows (None: all) and
        their ``1/p``-rescaled gradient (None: every sample dropped, its dense cost tallied).
        ``known``: ``grad``'s non-zero rows, compact (:meth:`handed_over`)."""
        rows, scale = self.sampler.draw(grad, None if known is None else (known.rows, known.values))
        if rows is not None and rows.numel() == 0:
            self.runtime.tally.dense += self.dense_per_row * grad.shape[0]
            return rows, None
        if rows is not None and known is not None:
            return rows, known.kept(rows, scale)
        if scale is not None:  # the draw gives scales only with rows
            return rows, scaled_rows(grad, rows, scale)
        return rows, (grad if rows is None else grad.index_select(0, rows))

    def _probe(self, args: tuple, kwargs: dict, device: torch.device) -> tuple[Any, bool]:
        """Run the block once with its autograd graph and check that gradient reaches it only
        through its inputs and own parameters and leaves it only through its first output.

        Returns that output and the verdict; a block that passes is then run compacted
        (the random generator is set back, so it draws the same numbers again).
        """
        state = _rng_state(device)
        before = self._tensor_attributes()
        stateful = _stateful_argument(tree_flatten((args, kwargs))[0])
        out = self.plain(*args, **kwargs)
        kept = [
            k
            for k, t in self._tensor_attributes().items()
            if t.grad_fn is not None and before.get(k) is not t
        ]
        main = out[0] if isinstance(out, tuple) and out else out
        if stateful is not None:
            reason = (
                f"it takes a {stateful} argument, which a re-run would update twice "
                "(e.g. a key/value cache: call the model with use_cache=False)"
            )
        elif kept:
            reason = f"its forward keeps a tensor that carries gradient in {kept[0]} (an auxiliary loss?)"
        elif not isinstance(main, Tensor):
            reason = f"it returns {type(out).__name__}, not a tensor or a tuple starting with one"
        elif isinstance(out, tuple) and _carries_grad(out[1:]):
            reason = "items of its tuple output after the first carry gradient"
        else:
            reason = self._foreign_leaf(main, tree_flatten((args, kwargs))[0])
        if reason is None:
            _set_rng_state(device, state)
            return out, True
        warnings.warn(
            f"VCAS compaction: block {self.sampler.name!r} runs uncompacted: {reason}",
            CompactionWarning,
            stacklevel=4,
        )
        return out, False

    def _tensor_attributes(self) -> dict[str, Tensor]:
        """Plain tensor attributes of the block and its submodules (not parameters or buffers), by name."""
        found = {}
        for prefix, module in self.block.named_modules():
            for key, value in vars(module).items():
                if isinstance(value, Tensor):
                    found[
                        f"{self.sampler.name}.{prefix}.{key}" if prefix else f"{self.sampler.name}.{key}"
                    ] = value
        return found

    def _foreign_leaf(self, out: Tensor, leaves: list[Any]) -> str | None:
        """A reason if ``out``'s graph reaches a trainable tensor that is not an input or own parameter."""
        if out.grad_fn is None:
            return None
        inputs = [leaf for leaf in leaves if isinstance(leaf, Tensor)]
        stops = {t.grad_fn for t in inputs if t.grad_fn is not None}
        own = {id(t) for t in inputs} | {id(p) for p in self.block.parameters()}
        seen, todo = set(), [out.grad_fn]
        while todo:
            node = todo.pop()
            if node is None or node in seen or node in stops:
                continue
            seen.add(node)
            variable = getattr(node, "variable", None)
            if variable is not None and id(variable) not in own:
                shape = tuple(variable.shape)
                return f"its forward uses a trainable tensor of shape {shape}, not an argument or its own"
            todo.extend(fn for fn, _ in node.next_functions)
        return None

    def verify(self, out_kept: Tensor, out: Tensor, rows: Tensor | None) -> None:
        """Raise if the re-run on the kept rows does not reproduce the forward's rows (samples interact)."""
        if rows is None or (self.verified and not self.runtime.check_rows):
            return
        expected = out.index_select(0, rows)
        scale = float(expected.abs().max()) if expected.numel() else 0.0
        diff = float((out_kept.detach() - expected).abs().max()) if expected.numel() else 0.0
        tolerance = 1e-4 * scale + 1e-6 if expected.dtype != torch.float64 else 1e-9 * scale + 1e-12
        if diff > tolerance or out_kept.shape != expected.shape:
            raise GreenpropError(
                f"VCAS compaction: block {self.sampler.name!r} gives other outputs when run on "
                f"{rows.numel()} of its {out.shape[0]} samples (max difference {diff:.3g}): its samples are "
                "not independent (a cross-sample op such as BatchNorm or a batch mean, or a batch that is "
                "not dim 0), so compaction would be biased; use vcas:compact=false"
            )
        self.verified = True
