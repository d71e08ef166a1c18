"""Conv2d / Linear subclasses whose backward keeps only a fraction of output channels.

The layers hold ssProp's state (``keep``, ``round_to``, the channel selector with its
generator and optional calibration, the per-channel cost of the last forward) and compute
through :func:`~greenprop.ssprop.functional.sparse_conv2d` /
:func:`~greenprop.ssprop.functional.sparse_linear`, which are the plain op whenever every
channel is kept or no gradient is recorded. They are real subclasses of
``nn.Conv2d`` / ``nn.Linear`` with no extra parameters or buffers, so
:func:`greenprop.apply_ssprop` can convert existing modules *in place*: ``state_dict``
keys, ``isinstance`` checks, optimizers and hooks are untouched.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from greenprop.ssprop.functional import ChannelSelector, Grads, Run, keep_count, sparse_conv2d, sparse_linear

__all__ = ["SparseConv2d", "SparseLayer", "SparseLinear", "is_sparse_layer"]

# Repetitions of each variant when a layer calibrates (after one untimed warm-up run).
_CALIBRATION_REPEATS = 3


def _in_dispatch_mode() -> bool:
    """True under a TorchDispatchMode such as FlopCounterMode (calibration waits)."""
    try:
        from torch.utils._python_dispatch import is_in_torch_dispatch_mode
    except ImportError:  # pragma: no cover - private API moved
        return False
    return bool(is_in_torch_dispatch_mode())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _LayerSelector(ChannelSelector):
    """The layer's channel selector, with the optional one-off timing calibration.

    With ``calibrate=True`` the first sparse backward at a given ``k`` times the dense
    and the sparse backward on the real gradient (one warm-up, then the best of
    ``_CALIBRATION_REPEATS``) and remembers, per ``k``, whether sparse was faster; at a
    ``k`` where it was not, the layer runs the plain dense op. Backwards under a dispatch
    mode (FlopCounterMode) run sparse and do not calibrate, so neither the timings nor
    the counted FLOPs are distorted.
    """

    def __init__(self, selection: str, seed: int, calibrate: bool) -> None:
        super().__init__(selection, torch.Generator().manual_seed(seed))
        self.calibrate = calibrate
        #: k -> True when sparse was measured faster than dense at that k.
        self.decisions: dict[int, bool] = {}
        #: k -> (dense seconds, sparse seconds) as measured.
        self.timings: dict[int, tuple[float, float]] = {}

    def dense_at(self, k: int) -> bool:
        return self.decisions.get(k) is False

    def __call__(self, grad_output: Tensor, k: int, groups: int, channel_dim: int, run: Run) -> Grads:
        decision = self.decisions.get(k) if self.calibrate else True
        if decision is None and not _in_dispatch_mode():

            def sparse() -> Grads:
                return run(self.indices(grad_output, k, groups, channel_dim))

            return self._calibrate(k, grad_output.device, sparse, lambda: run(None))
        if decision is False:  # a graph built before calibration decided for dense
            return run(None)
        return super().__call__(grad_output, k, groups, channel_dim, run)

    def _calibrate(
        self, k: int, device: torch.device, sparse: Callable[[], Grads], dense: Callable[[], Grads]
    ) -> Grads:
        """Time ``dense``, then ``sparse``; record which was faster at ``k``; return its result."""
        best: dict[str, float] = {}
        result: dict[str, Grads] = {}
        for name, fn in (("dense", dense), ("sparse", sparse)):
            result[name] = fn()  # warm-up (oneDNN primitive creation, allocator)
            best[name] = float("inf")
            for _ in range(_CALIBRATION_REPEATS):
                _sync(device)
                start = time.perf_counter()
                result[name] = fn()
                _sync(device)
                best[name] = min(best[name], time.perf_counter() - start)
        faster = best["sparse"] < best["dense"]
        self.decisions[k] = faster
        self.timings[k] = (best["dense"], best["sparse"])
        return result["sparse" if faster else "dense"]


class SparseLayer:
    """Mixin with the ssProp state shared by :class:`SparseConv2d` and :class:`SparseLinear`.

    Keyword-only settings (after the parent class's own arguments):
        keep: fraction of output channels whose gradient is computed (1.0 = dense).
            Settable at any time; the value at forward time applies to that backward.
        selection: ``"topk"`` (by mean |dy|, the paper) or ``"random"`` (its ablation).
        round_to: ``k`` is rounded up to a multiple of this (capped at the channels).
        calibrate: time dense vs sparse once per ``k`` and run whichever was faster.
        seed: seed of the layer's generator for ``selection="random"``.
    """

    _keep: float
    round_to: int
    _selector: _LayerSelector
    weight: nn.Parameter
    #: Backward cost of one output channel in the last forward (multiply-adds of one
    #: weight row over all output positions); used to weight the effective keep.
    ssprop_channel_cost: int

    def __init__(
        self,
        *args: Any,
        keep: float = 1.0,
        selection: str = "topk",
        round_to: int = 1,
        calibrate: bool = False,
        seed: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self._init_ssprop(keep=keep, selection=selection, round_to=round_to, calibrate=calibrate, seed=seed)

    def _init_ssprop(self, *, keep: float, selection: str, round_to: int, calibrate: bool, seed: int) -> None:
        selector = _LayerSelector(selection, seed, calibrate)  # checks the selection
        if isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1:
            raise ValueError(f"round_to must be an integer >= 1, got {round_to!r}")
        self.keep = keep
        self.round_to = round_to
        self._selector = selector
        self.ssprop_channel_cost = 0

    def _strip_ssprop(self) -> None:
        for name in ("_keep", "round_to", "_selector", "ssprop_channel_cost"):
            self.__dict__.pop(name, None)

    @property
    def keep(self) -> float:
        return self._keep

    @keep.setter
    def keep(self, value: float) -> None:
        value = float(value)
        if not 0.0 < value <= 1.0:
            raise ValueError(f"keep must be in (0, 1], got {value!r}")
        self._keep = value

    @property
    def selection(self) -> str:
        return self._selector.selection

    @property
    def calibrate(self) -> bool:
        return self._selector.calibrate

    @property
    def generator(self) -> torch.Generator:
        """The CPU generator behind ``selection="random"`` (saved by the controller)."""
        return self._selector.generator  # type: ignore[return-value]

    @property
    def calibration(self) -> dict[int, bool]:
        """Per ``k``: True when calibration found the sparse backward faster."""
        return self._selector.decisions

    def _channels_per_group(self) -> int:
        raise NotImplementedError

    def k_for(self, keep: float | None = None) -> int:
        """Channels (per group) whose gradient is computed at ``keep`` (default: current)."""
        return keep_count(self._keep if keep is None else keep, self._channels_per_group(), self.round_to)

    def kept_fraction(self, keep: float | None = None) -> float:
        """Fraction of output channels actually kept, counting calibrated-dense as 1."""
        per_group = self._channels_per_group()
        k = self.k_for(keep)
        if k >= per_group or self._selector.dense_at(k):
            return 1.0
        return k / per_group

    def _settings(self) -> dict[str, Any]:
        """The keyword arguments of the pure function for this layer's state."""
        return {"keep": self._keep, "round_to": self.round_to, "selector": self._selector}

    def _record_cost(self, out: Tensor) -> Tensor:
        """Remember one output channel's backward cost in this forward; returns ``out``."""
        channels = self.weight.shape[0]
        self.ssprop_channel_cost = (self.weight.numel() // channels) * (out.numel() // channels)
        return out

    def extra_repr(self) -> str:
        s = f"{super().extra_repr()}, keep={self._keep:g}, selection={self.selection}"  # type: ignore[misc]
        if self.round_to > 1:
            s += f", round_to={self.round_to}"
        if self.calibrate:
            s += ", calibrate=True"
        return s


class SparseConv2d(SparseLayer, nn.Conv2d):
    """:class:`torch.nn.Conv2d` with the ssProp channel-sparse backward.

    Accepts every ``nn.Conv2d`` argument plus the keyword-only settings of
    :class:`SparseLayer`. With ``groups > 1`` ``k`` is counted per group (each group
    keeps its own top-k), so depthwise convolutions (one channel per group) stay dense.
    """

    def _channels_per_group(self) -> int:
        return self.out_channels // self.groups

    def forward(self, input: Tensor) -> Tensor:
        padding = self.padding
        if self.padding_mode != "zeros":  # as nn.Conv2d: pad explicitly, convolve unpadded
            input = F.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding = (0, 0)
        out = sparse_conv2d(
            input,
            self.weight,
            self.bias,
            self.stride,
            padding,
            self.dilation,
            self.groups,
            **self._settings(),
        )
        return self._record_cost(out)


class SparseLinear(SparseLayer, nn.Linear):
    """:class:`torch.nn.Linear` with the ssProp sparse backward over output features.

    Any leading dims are treated as rows; a "channel" is an output feature.
    """

    def _channels_per_group(self) -> int:
        return self.out_features

    def forward(self, input: Tensor) -> Tensor:
        return self._record_cost(sparse_linear(input, self.weight, self.bias, **self._settings()))


def is_sparse_layer(module: nn.Module) -> bool:
    """True for modules converted by (or built as) an ssProp layer."""
    return isinstance(module, SparseLayer)
