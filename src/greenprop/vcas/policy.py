"""VCAS's measured token policy: sample tokens for a weight gradient only where it is faster.

Token sampling (:func:`~greenprop.vcas.samplers.sampled_weight_grad`) replaces the
weight gradient ``dy^T x`` by a matmul on ``nu`` of the tokens, but first scores every
token, draws and gathers. On a narrow layer the matmul is so cheap that this overhead
eats the saving (``benchmarks/vcas_linear.py``: the tiny ViT's 128-wide layers gain
nothing). So with ``VCASConfig(token_policy="measured")`` each distinct Linear shape is
timed once on this machine, dense against sampled at a few ratios
(:func:`time_weight_grad`); a straight line through the sampled times gives the
*break-even ratio* below which sampling is faster (:func:`break_even`), and each
layer samples tokens only while the controller's ratio is below its break-even
(``VCASLinear.vcas_token_break_even``; 0 switches token sampling off). The controller's
variance control is unchanged: ``nu`` is still the ratio the variance allows, and a
layer runs exact where sampling at ``nu`` would not pay.

The decision is a pure function of the timings (:func:`break_evens`), so the same
measurements give the same policy; timings can be kept in a JSON file
(:class:`TimingCache`, ``VCASConfig.timing_cache``) and are then read instead of
measured again.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from greenprop.errors import GreenpropError
from greenprop.train.checkpoint import write_json
from greenprop.vcas.samplers import sampled_weight_grad

__all__ = [
    "PROBE_RATIOS",
    "TimingCache",
    "WeightGradShape",
    "WeightGradTiming",
    "break_even",
    "break_evens",
    "measured_break_evens",
    "recorded_shapes",
    "set_break_evens",
    "time_weight_grad",
]

#: Token ratios the sampled weight gradient is timed at.
PROBE_RATIOS: tuple[float, ...] = (0.2, 0.5, 0.8)
_FORMAT = 1


@dataclass(frozen=True)
class WeightGradShape:
    """What a weight gradient's time depends on: ``dy`` is ``tokens x d_out``, ``x`` ``tokens x d_in``."""

    tokens: int
    d_in: int
    d_out: int
    dtype: str = "float32"
    device: str = "cpu"

    def key(self) -> str:
        """The cache key: the shape, and the machine settings the time depends on."""
        threads = torch.get_num_threads()
        return (
            f"{self.device}/{self.dtype}/threads={threads}/torch={torch.__version__}/"
            f"{self.tokens}x{self.d_in}->{self.d_out}"
        )


@dataclass(frozen=True)
class WeightGradTiming:
    """Median seconds of the dense weight gradient and of the sampled one at each of ``ratios``."""

    dense_s: float
    sampled_s: tuple[float, ...]
    ratios: tuple[float, ...] = PROBE_RATIOS

    def __post_init__(self) -> None:
        times = (self.dense_s, *self.sampled_s)
        if len(self.sampled_s) != len(self.ratios) or len(self.ratios) < 2:
            raise GreenpropError(f"a timing needs >= 2 ratios and one time per ratio, got {self}")
        if not all(isinstance(t, (int, float)) and t > 0 and t < float("inf") for t in times):
            raise GreenpropError(f"timings must be positive finite seconds, got {times}")


def break_even(timing: WeightGradTiming) -> float:
    """The token ratio below which sampling is faster than the dense weight gradient, in [0, 1].

    The sampled time is about ``a + b * nu`` (scoring, drawing and gathering all tokens,
    plus a matmul on ``nu`` of them); ``a`` and ``b`` are fitted by least squares to the
    probes and the result is where the line meets the dense time, clipped to [0, 1].
    0: sampling never pays (switched off); 1: it pays at every ratio below 1.
    """
    a, b = _fit_line(timing.ratios, timing.sampled_s)
    if b <= 0.0:  # flat or falling in nu (noise): pays everywhere or nowhere
        return 1.0 if a < timing.dense_s else 0.0
    return min(1.0, max(0.0, (timing.dense_s - a) / b))


def _fit_line(xs: tuple[float, ...], ys: tuple[float, ...]) -> tuple[float, float]:
    """Intercept and slope of the least-squares line through ``(xs, ys)``."""
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mean_x) ** 2 for x in xs)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / sxx
    return mean_y - slope * mean_x, slope


def break_evens(
    shapes: Mapping[str, WeightGradShape], timings: Mapping[WeightGradShape, WeightGradTiming]
) -> dict[str, float]:
    """Each layer's break-even ratio from the timing of its shape (deterministic in the timings)."""
    missing = sorted({shape.key() for shape in shapes.values() if shape not in timings})
    if missing:
        raise GreenpropError(f"no timing for the weight-gradient shape(s) {', '.join(missing)}")
    return {name: break_even(timings[shape]) for name, shape in shapes.items()}


def time_weight_grad(
    shape: WeightGradShape, *, repeats: int = 9, warmup: int = 2, seed: int = 0
) -> WeightGradTiming:
    """Time ``dy^T x`` against :func:`sampled_weight_grad` at :data:`PROBE_RATIOS`, interleaved.

    Random ``dy`` and ``x`` of the shape; every repeat runs each variant once in a
    rotating order, and the result holds the medians.
    """
    gen = torch.Generator().manual_seed(seed)
    dtype = getattr(torch, shape.dtype)
    dy = torch.randn(shape.tokens, shape.d_out, generator=gen).to(shape.device, dtype)
    x = torch.randn(shape.tokens, shape.d_in, generator=gen).to(shape.device, dtype)
    draws = torch.Generator().manual_seed(seed + 1)
    variants = [lambda: dy.t() @ x] + [
        (lambda nu=nu: sampled_weight_grad(dy, x, nu, draws)) for nu in PROBE_RATIOS
    ]
    times: list[list[float]] = [[] for _ in variants]
    for repeat in range(warmup + repeats):
        for i in range(len(variants)):
            j = (i + repeat) % len(variants)
            seconds = _seconds(variants[j], shape.device)
            if repeat >= warmup:
                times[j].append(seconds)
    medians = [statistics.median(t) for t in times]
    return WeightGradTiming(medians[0], tuple(medians[1:]))


def _seconds(call: Any, device: str) -> float:
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    start = time.perf_counter()
    call()
    sync()
    return time.perf_counter() - start


class TimingCache:
    """Timings by :meth:`WeightGradShape.key`, optionally kept in a JSON file (None: in memory only).

    A file that cannot be read as this cache is an error naming it, never silently
    overwritten; new timings are added and the file rewritten atomically.
    """

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = None if path is None else Path(path)
        self.timings: dict[str, WeightGradTiming] = {}
        if self.path is not None and self.path.exists():
            self.timings = _read(self.path)

    def get(self, shape: WeightGradShape, **timing_options: Any) -> WeightGradTiming:
        """The cached timing of ``shape``, measured (and saved) first if there is none."""
        return self.lookup(shape.key(), lambda: time_weight_grad(shape, **timing_options))

    def lookup(self, key: str, measure: Callable[[], WeightGradTiming]) -> WeightGradTiming:
        """The cached timing under ``key``, ``measure()``-d (and saved) first if there is none."""
        if key not in self.timings:
            self.timings[key] = measure()
            if self.path is not None:
                entries = {k: asdict(t) for k, t in self.timings.items()}
                write_json({"format": _FORMAT, "timings": entries}, self.path)
        return self.timings[key]


def _read(path: Path) -> dict[str, WeightGradTiming]:
    try:
        data = json.loads(path.read_text())
        if data.get("format") != _FORMAT:
            raise ValueError(f"format {data.get('format')!r}, expected {_FORMAT}")
        return {
            key: WeightGradTiming(t["dense_s"], tuple(t["sampled_s"]), tuple(t["ratios"]))
            for key, t in data["timings"].items()
        }
    except (OSError, ValueError, KeyError, TypeError, AttributeError, GreenpropError) as err:
        raise GreenpropError(f"timing_cache {str(path)!r} is not a VCAS timing file ({err})") from err


def measured_break_evens(
    shapes: Mapping[str, WeightGradShape], cache: str | Path | None = None
) -> dict[str, float]:
    """Each layer's break-even ratio, its shape timed here (or read from the ``cache`` file)."""
    timings = TimingCache(cache)
    return break_evens(shapes, {shape: timings.get(shape) for shape in set(shapes.values())})


def set_break_evens(linears: Mapping[str, nn.Module], decided: Mapping[str, float]) -> None:
    """Give each VCAS Linear its break-even ratio (1, token sampling wherever allowed, if none)."""
    for name, layer in linears.items():
        layer.vcas_token_break_even = decided.get(name, 1.0)


@contextmanager
def recorded_shapes(
    linears: Mapping[str, nn.Linear], scale: float = 1.0
) -> Iterator[dict[str, WeightGradShape]]:
    """Record each Linear's weight-gradient shape in the forwards run inside the block.

    ``scale`` multiplies the token count (the forward ran on a sub-batch of the training
    batch: the shape is the training batch's).
    """
    shapes: dict[str, WeightGradShape] = {}

    def hook(name: str, module: nn.Module, args: tuple[Any, ...]) -> None:
        x = args[0]
        if isinstance(x, Tensor) and x.dim() >= 1 and name not in shapes:
            tokens = max(1, round(x.numel() // max(1, x.shape[-1]) * scale))
            device = x.device.type if x.device.type == "cpu" else str(x.device)
            dtype = (
                str(torch.get_autocast_dtype(x.device.type)).removeprefix("torch.")
                if (torch.is_autocast_enabled(x.device.type))
                else str(x.dtype).removeprefix("torch.")
            )
            shapes[name] = WeightGradShape(tokens, module.in_features, module.out_features, dtype, device)

    handles = [
        layer.register_forward_pre_hook(lambda module, args, name=name: hook(name, module, args))
        for name, layer in linears.items()
    ]
    try:
        yield shapes
    finally:
        for handle in handles:
            handle.remove()
