"""VCAS's measured block policy: each block samples only at ratios where that is faster than exact.

Near ratio 1 a block's sampling (row norms, the draw, gathers, compaction) costs more than
the few rows it drops; ``VCASConfig.sample_max_ratio`` sets one limit for every block, and
the break-even differs per model (about 0.7 on the zoo ResNet-18-GN, 0.85 on the ViT, 0.9
on MiniLM on CPU). With ``VCASConfig(block_policy="measured")`` the controller instead
times, at its first update, each distinct block (type, argument shapes, parameter shapes)
on its input from that update's batch: a forward and backward of a random output gradient
through the path training takes (compacted, direct or plain), exact (ratio 1) and sampled at
:data:`BLOCK_PROBE_RATIOS`. The break-even of a line through the sampled times
(:func:`~greenprop.vcas.policy.break_even`) becomes that block's own limit
(``BlockSampler.sample_max_ratio``): above it the block runs exact.

The decision is a pure function of the timings (:func:`block_limits`); timings are kept
in the token policy's :class:`~greenprop.vcas.policy.TimingCache` file under keys
starting ``block/``. Everything the timing touches (random generators, the runtime's
tally and mode, the samplers' ratios, the model's buffers) is put back afterwards, and
parameter gradients are taken with ``torch.autograd.grad``, so ``.grad`` is untouched.
"""

from __future__ import annotations

import functools
import statistics
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_map

from greenprop.errors import GreenpropError
from greenprop.vcas.layers import BlockSampler, Mode, VCASRuntime
from greenprop.vcas.policy import TimingCache, WeightGradTiming, _seconds, break_even

__all__ = [
    "BLOCK_PROBE_RATIOS",
    "block_key",
    "block_limits",
    "measured_block_limits",
    "recorded_inputs",
    "set_block_limits",
    "time_block",
]

#: Block sampler ratios the sampled forward + backward is timed at (besides exact, ratio 1).
BLOCK_PROBE_RATIOS: tuple[float, ...] = (0.5, 0.7, 0.9)

Call = tuple[tuple[Any, ...], dict[str, Any]]


def block_limits(keys: Mapping[str, str], timings: Mapping[str, WeightGradTiming]) -> dict[str, float]:
    """Each block's limit, the break-even ratio of its key's timing (deterministic in the timings).

    ``keys``: block name -> :func:`block_key`; ``timings``: key -> the exact time
    (``dense_s``) and the sampled times at ``ratios``.
    """
    missing = sorted({key for key in keys.values() if key not in timings})
    if missing:
        raise GreenpropError(f"no timing for the block(s) {', '.join(missing)}")
    return {name: break_even(timings[key]) for name, key in keys.items()}


def set_block_limits(samplers: list[BlockSampler], limits: Mapping[str, float]) -> None:
    """Give each sampler its own limit (None, the runtime's ``sample_max_ratio``, if it has none)."""
    for sampler in samplers:
        sampler.sample_max_ratio = limits.get(sampler.name)


def block_key(block: nn.Module, call: Call) -> str:
    """What a block's time depends on: its type, its arguments' and parameters' shapes, the machine."""
    leaves = tree_flatten(call)[0]
    tensors = [t for t in leaves if isinstance(t, Tensor)]
    shapes = ",".join(f"{str(t.dtype).removeprefix('torch.')}{list(t.shape)}" for t in tensors)
    params = ",".join(str(list(p.shape)) for p in block.parameters() if p.requires_grad)
    device = tensors[0].device if tensors else torch.device("cpu")
    return (
        f"block/{device}/threads={torch.get_num_threads()}/torch={torch.__version__}/"
        f"{type(block).__module__}.{type(block).__qualname__}/in={shapes}/params={params}"
    )


@contextmanager
def recorded_inputs(blocks: Mapping[str, nn.Module]) -> Iterator[dict[str, Call]]:
    """Record each block's (detached) arguments at its first call in the forwards run inside."""
    calls: dict[str, Call] = {}

    def hook(name: str, args: tuple, kwargs: dict) -> None:
        if name not in calls:
            calls[name] = tree_map(lambda v: v.detach() if isinstance(v, Tensor) else v, (args, dict(kwargs)))

    handles = [
        block.register_forward_pre_hook(
            lambda module, args, kwargs, name=name: hook(name, args, kwargs), with_kwargs=True
        )
        for name, block in blocks.items()
    ]
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()


def _forward_backward(block: nn.Module, call: Call, grad: Tensor) -> None:
    """The block's training forward and the backward of ``grad`` to its first input and parameters."""
    args, kwargs = call
    x = args[0].detach().requires_grad_(True)
    out = block(x, *args[1:], **kwargs)
    main = out[0] if isinstance(out, tuple) else out
    wrt = [x] + [p for p in block.parameters() if p.requires_grad]
    torch.autograd.grad(main, wrt, grad, allow_unused=True)


def time_block(
    block: nn.Module,
    sampler: BlockSampler,
    call: Call,
    *,
    ratios: tuple[float, ...] = BLOCK_PROBE_RATIOS,
    repeats: int = 5,
    warmup: int = 1,
    seed: int = 0,
) -> WeightGradTiming:
    """Median seconds of the block's forward + backward exact (ratio 1) and sampled at ``ratios``.

    The sampler is forced to each ratio (its own limit lifted to 1) and set back after;
    variants run interleaved in a rotating order. The generators and the runtime's tally
    advance: :func:`measured_block_limits` puts them back.
    """
    args, _ = call
    if not args or not isinstance(args[0], Tensor):
        raise GreenpropError(f"block {sampler.name!r}: its first argument is not a tensor, cannot time it")
    with torch.no_grad():
        out = block(*call[0], **call[1])
    main = out[0] if isinstance(out, tuple) else out
    gen = torch.Generator().manual_seed(seed)
    grad = torch.randn(main.shape, generator=gen, dtype=main.dtype).to(main.device)
    variants = (1.0, *ratios)
    times: list[list[float]] = [[] for _ in variants]
    before = sampler.ratio, sampler.sample_max_ratio
    sampler.sample_max_ratio = 1.0
    try:
        for repeat in range(warmup + repeats):
            for i in range(len(variants)):
                j = (i + repeat) % len(variants)
                sampler.ratio = variants[j]
                seconds = _seconds(lambda: _forward_backward(block, call, grad), main.device.type)
                if repeat >= warmup:
                    times[j].append(seconds)
    finally:
        sampler.ratio, sampler.sample_max_ratio = before
    medians = [statistics.median(t) for t in times]
    return WeightGradTiming(medians[0], tuple(medians[1:]), tuple(ratios))


def _rng_states() -> tuple[Tensor, list[Tensor]]:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    return torch.get_rng_state(), cuda


@contextmanager
def _untouched(model: nn.Module, runtime: VCASRuntime, samplers: list[BlockSampler]) -> Iterator[None]:
    """Put back everything a timing changes: generators, the runtime's tally / mode / records,
    the samplers' ratios and limits, the model's buffers."""
    rng = _rng_states()
    generators = (runtime.activation_generator.get_state(), runtime.weight_generator.get_state())
    tally, alive = runtime.take_tally(), dict(runtime.alive)
    mode = (runtime.mode, runtime.record_norms, runtime.token_probe)
    ratios = [(s.ratio, s.sample_max_ratio) for s in samplers]
    buffers = [(b, b.clone()) for b in model.buffers()]
    runtime.mode, runtime.record_norms, runtime.token_probe = Mode.FULL, False, None
    try:
        yield
    finally:
        torch.set_rng_state(rng[0])
        if rng[1]:
            torch.cuda.set_rng_state_all(rng[1])
        runtime.activation_generator.set_state(generators[0])
        runtime.weight_generator.set_state(generators[1])
        runtime.tally, runtime.alive = tally, alive
        runtime.mode, runtime.record_norms, runtime.token_probe = mode
        for sampler, (ratio, limit) in zip(samplers, ratios, strict=True):
            sampler.ratio, sampler.sample_max_ratio = ratio, limit
        with torch.no_grad():
            for buffer, value in buffers:
                buffer.copy_(value)


def measured_block_limits(
    model: nn.Module,
    runtime: VCASRuntime,
    samplers: list[BlockSampler],
    forward: Callable[[], Any],
    cache: str | Path | TimingCache | None = None,
    **timing_options: Any,
) -> dict[str, float]:
    """Each block's limit, timed on its inputs in ``forward()`` (one run without grad) or read from ``cache``
    (a :class:`~greenprop.vcas.policy.TimingCache`, its file, or None: time every block here).

    Blocks that ``forward`` does not reach, or calls without a positional tensor first,
    keep the runtime's limit (no entry).
    """
    blocks = {s.name: model.get_submodule(s.name) for s in samplers}
    by_name = {s.name: s for s in samplers}
    timings = cache if isinstance(cache, TimingCache) else TimingCache(cache)
    keys: dict[str, str] = {}
    with _untouched(model, runtime, samplers):
        with recorded_inputs(blocks) as calls, torch.no_grad():
            forward()
        found: dict[str, WeightGradTiming] = {}
        for name, call in calls.items():
            if not call[0] or not isinstance(call[0][0], Tensor):
                continue  # the gradient must enter through a first positional tensor: not timed
            key = keys[name] = block_key(blocks[name], call)
            if key not in found:
                measure = functools.partial(time_block, blocks[name], by_name[name], call, **timing_options)
                found[key] = timings.lookup(key, measure)
    return block_limits(keys, found)
