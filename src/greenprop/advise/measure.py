"""What ``greenprop advise`` measures on this machine: the dense step, each ssProp layer, VCAS steps.

Every timing is side by side (:func:`greenprop.metering.interleave.interleaved_times`):
the variants of one measurement alternate, so drift from other processes hits them
alike. FLOPs are counted with FlopCounterMode (:func:`greenprop.metering.flops.flop_counter`),
as the trainer counts them.
"""

from __future__ import annotations

import copy
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from greenprop.errors import GreenpropError
from greenprop.metering.flops import count_flops, flop_counter
from greenprop.metering.interleave import interleaved_times
from greenprop.ssprop import SSPropConfig, apply_ssprop
from greenprop.ssprop.surgery import sparse_layers
from greenprop.surgery import SurgeryWarning
from greenprop.train.tasks import call_model
from greenprop.vcas import VCASConfig, apply_vcas
from greenprop.vcas.surgery import vcas_handle

__all__ = [
    "LayerTiming",
    "StepTiming",
    "VCASTiming",
    "time_ssprop_layers",
    "time_steps",
    "time_vcas",
]

LossFn = Callable[[Any, Any], Tensor]


@dataclass
class StepTiming:
    """The dense training step on one batch: median seconds and counted FLOPs per pass."""

    forward_s: float
    backward_s: float
    forward_flops: float
    backward_flops: float

    @property
    def step_s(self) -> float:
        """Forward + backward (the optimizer step is not timed: elementwise, small here)."""
        return self.forward_s + self.backward_s

    @property
    def step_flops(self) -> float:
        return self.forward_flops + self.backward_flops


@dataclass
class LayerTiming:
    """One ssProp-convertible layer: its backward alone, dense and at each keep.

    ``sparse_s[keep]`` / ``sparse_flops[keep]`` are the backward's median seconds and
    counted FLOPs at that keep; the dense ones were timed in the same rounds.
    """

    name: str
    kind: str  # "conv" or "linear"
    channels: int
    dense_s: float
    dense_flops: float
    sparse_s: dict[float, float]
    sparse_flops: dict[float, float]


@dataclass
class VCASTiming:
    """The whole forward + backward with VCAS at fixed ratios, side by side with dense.

    ``ratios`` says what was fixed (block ratios and token ratios, typically where a
    probe's controller ended); ``refused`` holds apply_vcas's reason when VCAS does not
    apply to the model (then the times are None).
    """

    ratios: dict[str, Any] = field(default_factory=dict)
    dense_backward_s: float | None = None
    backward_s: float | None = None
    backward_flops: float | None = None
    refused: str | None = None


def _median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def _split_step(
    model: nn.Module, inputs: Any, targets: Any, loss_fn: LossFn, out: dict[str, list[float]]
) -> None:
    """One forward and backward, their seconds appended to ``out``; grads reset untimed."""
    start = time.perf_counter()
    loss = loss_fn(call_model(model, inputs), targets)
    mid = time.perf_counter()
    loss.backward()
    end = time.perf_counter()
    model.zero_grad(set_to_none=True)
    out["forward"].append(mid - start)
    out["backward"].append(end - mid)


def time_steps(
    models: dict[str, nn.Module], inputs: Any, targets: Any, loss_fn: LossFn, *, repeats: int, warmup: int
) -> dict[str, tuple[float, float]]:
    """Median (forward, backward) seconds of each model's step on one batch, interleaved."""
    parts: dict[str, dict[str, list[float]]] = {n: {"forward": [], "backward": []} for n in models}
    fns = {
        n: (lambda m=m, p=parts[n]: _split_step(m, inputs, targets, loss_fn, p)) for n, m in models.items()
    }
    interleaved_times(fns, repeats, warmup)
    return {n: (_median(p["forward"][warmup:]), _median(p["backward"][warmup:])) for n, p in parts.items()}


def dense_step(
    model: nn.Module, inputs: Any, targets: Any, loss_fn: LossFn, *, repeats: int, warmup: int
) -> StepTiming:
    """The dense model's step: median forward/backward seconds and counted FLOPs."""
    forward_s, backward_s = time_steps(
        {"dense": model}, inputs, targets, loss_fn, repeats=repeats, warmup=warmup
    )["dense"]
    flops = count_flops(model, inputs, targets, loss_fn)
    return StepTiming(forward_s, backward_s, float(flops.forward), float(flops.backward))


def _captured_inputs(model: nn.Module, layers: dict[str, nn.Module], inputs: Any) -> dict[str, Tensor]:
    """Each layer's input in one forward of ``model`` (detached)."""
    captured: dict[str, Tensor] = {}

    def keep_input(
        name: str, args: tuple[Any, ...]
    ) -> None:  # a hook returning a value would replace the output
        captured.setdefault(name, args[0].detach())

    hooks = [
        layer.register_forward_hook(lambda _m, args, _out, name=name: keep_input(name, args))
        for name, layer in layers.items()
    ]
    try:
        with torch.no_grad():
            call_model(model, inputs)
    finally:
        for hook in hooks:
            hook.remove()
    return captured


def _backward_call(layer: nn.Module, x: Tensor, dy_seed: int) -> Callable[[], object]:
    """One backward through ``layer`` at its current keep (graph built now, reused by every call)."""
    out = layer(x)
    dy = torch.randn(out.shape, generator=torch.Generator().manual_seed(dy_seed)).to(out)
    wrt = [t for t in (x, *layer.parameters()) if t.requires_grad]
    return lambda: torch.autograd.grad(out, wrt, dy, retain_graph=True)


def _flops_of(call: Callable[[], object]) -> float:
    with flop_counter() as counter:
        call()
    return float(counter.get_total_flops())


def time_ssprop_layers(
    model: nn.Module,
    inputs: Any,
    keeps: Sequence[float],
    *,
    layer_types: tuple[str, ...] = ("conv", "linear"),
    repeats: int,
    warmup: int,
    progress: Callable[[str], None] | None = None,
) -> list[LayerTiming]:
    """Each layer ssProp would convert, its backward timed alone: dense and at every keep.

    The layers are converted on a copy of ``model`` (its output layer stays dense, as
    in ssProp's default); each gets its real input from one forward of the batch (which
    requires grad where the layer's input does in the model: not for the first layer)
    and a random output gradient. ``keep`` applies at forward time, so each variant has
    its own graph; all variants of a layer are timed in the same rounds.
    """
    converted = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SurgeryWarning)
        apply_ssprop(converted, SSPropConfig(layers=layer_types))
    layers = sparse_layers(converted)
    captured = _captured_inputs(converted, layers, inputs)
    needs_grad = _input_needs_grad(model, inputs, set(layers))
    results: list[LayerTiming] = []
    for index, (name, layer) in enumerate(layers.items()):
        if name not in captured:  # not used in this forward
            continue
        x = captured[name].clone().requires_grad_(needs_grad.get(name, True))
        calls: dict[str, Callable[[], object]] = {}
        for keep in (1.0, *keeps):
            layer.keep = keep
            calls[f"{keep:g}"] = _backward_call(layer, x, dy_seed=index)
        layer.keep = 1.0
        flops = {key: _flops_of(call) for key, call in calls.items()}
        times = interleaved_times(calls, repeats, warmup).seconds
        kind = "conv" if isinstance(layer, nn.Conv2d) else "linear"
        results.append(
            LayerTiming(
                name=name,
                kind=kind,
                channels=int(layer.weight.shape[0]),
                dense_s=_median(times["1"]),
                dense_flops=flops["1"],
                sparse_s={k: _median(times[f"{k:g}"]) for k in keeps},
                sparse_flops={k: flops[f"{k:g}"] for k in keeps},
            )
        )
        if progress is not None:
            progress(f"ssProp layer {index + 1}/{len(layers)} {name} timed")
    return results


def _input_needs_grad(model: nn.Module, inputs: Any, names: set[str]) -> dict[str, bool]:
    """Whether each named layer's input requires grad in a training forward of ``model``."""
    flags: dict[str, bool] = {}
    modules = dict(model.named_modules())

    def note(name: str, args: tuple[Any, ...]) -> None:
        flags.setdefault(name, bool(args[0].requires_grad))

    hooks = [
        modules[name].register_forward_hook(lambda _m, args, _out, name=name: note(name, args))
        for name in names
        if name in modules
    ]
    try:
        call_model(model, inputs)
    finally:
        for hook in hooks:
            hook.remove()
    model.zero_grad(set_to_none=True)
    return flags


def vcas_refusal(model: nn.Module) -> str | None:
    """Why VCAS cannot sample ``model`` (apply_vcas's error or warning), or None when it can."""
    trial = copy.deepcopy(model)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", SurgeryWarning)
            apply_vcas(trial, VCASConfig())
    except GreenpropError as err:
        return str(err)
    if vcas_handle(trial) is None:
        found = [str(w.message) for w in caught if issubclass(w.category, SurgeryWarning)]
        return found[0] if found else "apply_vcas converted no layer"
    return None


def time_vcas(
    model: nn.Module,
    inputs: Any,
    targets: Any,
    loss_fn: LossFn,
    *,
    block_ratios: Sequence[float],
    weight_ratios: dict[str, float],
    repeats: int,
    warmup: int,
) -> VCASTiming:
    """Forward + backward with VCAS's ratios fixed (no controller), side by side with dense.

    ``block_ratios`` (one per block, in order) and ``weight_ratios`` (per Linear name;
    missing ones stay 1) are typically where a probe's controller ended.
    """
    refused = vcas_refusal(model)
    if refused is not None:
        return VCASTiming(refused=refused)
    sampled = copy.deepcopy(model)
    apply_vcas(sampled, VCASConfig())
    handle = vcas_handle(sampled)
    assert handle is not None
    if len(block_ratios) != len(handle.samplers):
        raise GreenpropError(
            f"{len(block_ratios)} block ratios given for {len(handle.samplers)} VCAS blocks of the model"
        )
    for sampler, ratio in zip(handle.samplers, block_ratios, strict=True):
        sampler.ratio = float(ratio)
    for name, layer in handle.linears.items():
        layer.vcas_weight_ratio = float(weight_ratios.get(name, 1.0))
    medians = time_steps(
        {"dense": model, "vcas": sampled}, inputs, targets, loss_fn, repeats=repeats, warmup=warmup
    )
    backward_flops = float(count_flops(sampled, inputs, targets, loss_fn).backward)  # one random draw
    return VCASTiming(
        ratios={"blocks": [float(r) for r in block_ratios], "weights": dict(weight_ratios)},
        dense_backward_s=medians["dense"][1],
        backward_s=medians["vcas"][1],
        backward_flops=backward_flops,
    )
