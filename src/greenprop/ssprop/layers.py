"""Conv2d / Linear subclasses whose backward keeps only a fraction of output channels.

They are real subclasses of :class:`torch.nn.Conv2d` / :class:`torch.nn.Linear` with no
extra parameters or buffers: :func:`greenprop.apply_ssprop` turns existing modules into
them *in place* (the same module objects, the same Parameters), so ``state_dict`` keys,
``isinstance`` checks, optimizers and hooks are untouched.

The forward is the parent's forward. The backward is sparse only while ``keep < 1``
and gradients are being recorded; otherwise the layer *is* the plain module, with no
custom autograd Function in the graph.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from greenprop.ssprop.functional import (
    SELECTIONS,
    ChannelSelector,
    Grads,
    _SparseConv2dFunction,
    _SparseLinearFunction,
    keep_count,
)

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


def _autocast_off(device: torch.device | None) -> contextlib.AbstractContextManager[Any]:
    if device is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, enabled=False)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _LayerSelector(ChannelSelector):
    """The layer's channel selector, with the optional one-off timing calibration.

    With ``calibrate=True`` the first sparse backward at a given ``k`` times the dense
    and the sparse backward on the real gradient (one warm-up, then the best of
    ``_CALIBRATION_REPEATS``) and remembers, per ``k``, whether sparse was faster. The
    layer then runs dense at that ``k`` when it was not. Backwards under a dispatch
    mode (FlopCounterMode measuring a small batch) run sparse and do not calibrate,
    so neither the timings nor the counted FLOPs are distorted.
    """

    def __init__(self, selection: str, seed: int, calibrate: bool) -> None:
        super().__init__(selection, torch.Generator().manual_seed(seed))
        self.calibrate = calibrate
        #: k -> True when sparse was measured faster than dense at that k.
        self.decisions: dict[int, bool] = {}
        #: k -> (dense seconds, sparse seconds) as measured.
        self.timings: dict[int, tuple[float, float]] = {}

    def __call__(
        self,
        grad_output: Tensor,
        k: int,
        groups: int,
        channel_dim: int,
        run: Callable[[Tensor | None], Grads],
    ) -> Grads:
        if not self.calibrate:
            return run(self.indices(grad_output, k, groups, channel_dim))
        decision = self.decisions.get(k)
        if decision is None:
            if _in_dispatch_mode():  # e.g. FlopCounterMode: timings would be meaningless
                return run(self.indices(grad_output, k, groups, channel_dim))
            return self._calibrate(grad_output, k, groups, channel_dim, run)
        if not decision:
            return run(None)
        return run(self.indices(grad_output, k, groups, channel_dim))

    def _calibrate(
        self,
        grad_output: Tensor,
        k: int,
        groups: int,
        channel_dim: int,
        run: Callable[[Tensor | None], Grads],
    ) -> Grads:
        def sparse() -> Grads:
            return run(self.indices(grad_output, k, groups, channel_dim))

        def dense() -> Grads:
            return run(None)

        best: dict[str, float] = {}
        result: dict[str, Grads] = {}
        for name, fn in (("dense", dense), ("sparse", sparse)):
            result[name] = fn()  # warm-up (oneDNN primitive creation, allocator)
            best[name] = float("inf")
            for _ in range(_CALIBRATION_REPEATS):
                _sync(grad_output.device)
                start = time.perf_counter()
                result[name] = fn()
                _sync(grad_output.device)
                best[name] = min(best[name], time.perf_counter() - start)
        faster = best["sparse"] < best["dense"]
        self.decisions[k] = faster
        self.timings[k] = (best["dense"], best["sparse"])
        return result["sparse" if faster else "dense"]


class SparseLayer:
    """Mixin with the ssProp state shared by :class:`SparseConv2d` and :class:`SparseLinear`.

    Attributes:
        keep: fraction of output channels whose gradient is computed (1.0 = dense).
            Settable at any time; the value at forward time applies to that backward.
        round_to: ``k`` is rounded up to a multiple of this (capped at the channels).
        selection: ``"topk"`` (by mean |dy|, the paper) or ``"random"`` (its ablation).
    """

    _keep: float
    round_to: int
    _selector: _LayerSelector
    #: Backward cost of one output channel in the last forward (multiply-adds of one
    #: weight row over all output positions); used to weight the effective keep.
    ssprop_channel_cost: int

    def _init_ssprop(
        self,
        *,
        keep: float = 1.0,
        selection: str = "topk",
        round_to: int = 1,
        calibrate: bool = False,
        seed: int = 0,
    ) -> None:
        if selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}")
        if isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1:
            raise ValueError(f"round_to must be an integer >= 1, got {round_to!r}")
        self.keep = keep
        self.round_to = round_to
        self._selector = _LayerSelector(selection, seed, calibrate)
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
        if k >= per_group or self._selector.decisions.get(k) is False:
            return 1.0
        return k / per_group

    def _sparse_k(self) -> int | None:
        """``k`` for this forward, or None when the backward should be plain autograd."""
        if not torch.is_grad_enabled() or self._keep >= 1.0:
            return None
        k = self.k_for()
        if k >= self._channels_per_group() or self._selector.decisions.get(k) is False:
            return None
        return k

    def _apply_autocast(
        self, *tensors: Tensor | None
    ) -> tuple[tuple[Tensor | None, ...], torch.device | None]:
        """Cast like autocast would, *outside* the Function, so its saved tensors match.

        Conv and linear run in autocast's lower precision; inside a custom Function
        autocast would cast only the forward's operands, leaving the saved fp32 tensors
        to clash with a low-precision ``dy``. Casting here lets autograd record the
        casts (gradients flow back to fp32 parameters) and the Function then runs
        with autocast off. Returns the tensors and the device type to disable (None
        when autocast is off).
        """
        first = tensors[0]
        assert first is not None
        device_type = first.device.type
        if not torch.is_autocast_enabled(device_type):
            return tensors, None
        dtype = torch.get_autocast_dtype(device_type)
        cast = tuple(t.to(dtype) if t is not None and t.is_floating_point() else t for t in tensors)
        return cast, first.device

    def _ssprop_repr(self) -> str:
        s = f"keep={self._keep:g}, selection={self.selection}"
        if self.round_to > 1:
            s += f", round_to={self.round_to}"
        if self.calibrate:
            s += ", calibrate=True"
        return s


class SparseConv2d(SparseLayer, nn.Conv2d):
    """:class:`torch.nn.Conv2d` with the ssProp channel-sparse backward.

    Accepts every ``nn.Conv2d`` argument plus the keyword-only ssProp settings of
    :class:`SparseLayer`. With ``groups > 1`` ``k`` is counted per group (each group
    keeps its own top-k), so depthwise convolutions (one channel per group) stay dense.
    """

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

    def _channels_per_group(self) -> int:
        return self.out_channels // self.groups

    def _explicit_padding(self, input: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """Numeric padding for the backward kernels, padding the input where needed.

        Mirrors ``nn.Conv2d._conv_forward``: non-zero padding modes and asymmetric
        ``padding="same"`` pad the input explicitly (a differentiable ``F.pad``).
        """
        r = self._reversed_padding_repeated_twice  # (left, right, top, bottom)
        if self.padding_mode != "zeros":
            return F.pad(input, r, mode=self.padding_mode), (0, 0)
        if isinstance(self.padding, str):
            if r[0] == r[1] and r[2] == r[3]:
                return input, (r[2], r[0])
            return F.pad(input, r), (0, 0)
        return input, self.padding  # type: ignore[return-value]

    def forward(self, input: Tensor) -> Tensor:
        k = self._sparse_k()
        if k is None:
            out = super().forward(input)
        else:
            x, padding = self._explicit_padding(input)
            (x, weight, bias), autocast_device = self._apply_autocast(x, self.weight, self.bias)
            with _autocast_off(autocast_device):
                out = _SparseConv2dFunction.apply(
                    x,
                    weight,
                    bias,
                    self.stride,
                    padding,
                    self.dilation,
                    self.groups,
                    k,
                    self._selector,
                )
        self.ssprop_channel_cost = (self.weight.numel() // self.out_channels) * (
            out.numel() // self.out_channels
        )
        return out

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self._ssprop_repr()}"


class SparseLinear(SparseLayer, nn.Linear):
    """:class:`torch.nn.Linear` with the ssProp sparse backward over output features.

    Any leading dims are treated as rows; a "channel" is an output feature.
    """

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

    def _channels_per_group(self) -> int:
        return self.out_features

    def forward(self, input: Tensor) -> Tensor:
        k = self._sparse_k()
        if k is None:
            out = super().forward(input)
        else:
            (x, weight, bias), autocast_device = self._apply_autocast(input, self.weight, self.bias)
            with _autocast_off(autocast_device):
                out = _SparseLinearFunction.apply(x, weight, bias, k, self._selector)
        self.ssprop_channel_cost = self.in_features * (out.numel() // self.out_features)
        return out

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self._ssprop_repr()}"


def is_sparse_layer(module: nn.Module) -> bool:
    """True for modules converted by (or built as) an ssProp layer."""
    return isinstance(module, SparseLayer)
