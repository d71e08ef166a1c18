"""Forward and backward FLOPs of one training step, counted by aten dispatch.

We count with :class:`torch.utils.flop_counter.FlopCounterMode` rather than with
formulas per layer type, because the methods in this library replace the backward
pass with custom ``autograd.Function`` s: dispatch sees every aten op those run
(``mm``, ``convolution_backward``, ...), so a sparser backward shows up as fewer
FLOPs without any per-method bookkeeping.

What the counter counts: matrix products and convolutions (and attention kernels),
2 FLOPs per multiply-add. It ignores elementwise work (bias adds, activations,
normalisation, the optimizer step), which is small next to the matmuls in the
models we train but means a ``backward / forward`` ratio is not exactly 2.
Every count in the project goes through :func:`flop_counter`, which adds the
fused CPU attention kernel that torch's counter has no formula for.

Counting is slow (a Python hook on every op): never run it inside a timed step.
The reference trainer counts once per distinct step (a method's cost key and the
batch's sample shapes, :func:`sample_shapes`: text batches trimmed to their longest
sequence differ in length), on a small slice of a batch, outside timing.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode, flop_registry

from greenprop.metering.quantity import Quantity

#: Provenance of every count (flop_counter): before session 28 attention run by the fused CPU
#: kernel was left out, so a record without "fused CPU attention" in its source misses it.
SOURCE = "torch.utils.flop_counter.FlopCounterMode with fused CPU attention counted"

LossFn = Callable[[Any, Any], torch.Tensor]

_aten = torch.ops.aten


def _torch_formula(op: Any) -> Callable[..., int]:
    """Torch's registered FLOP formula for ``op``, marked to be passed the op's raw arguments.

    The registry's formulas already map tensors to shapes; ``_get_raw`` stops
    ``FlopCounterMode`` from wrapping them a second time.
    """
    formula = flop_registry[op]

    def count(*args: Any, **kwargs: Any) -> int:
        return formula(*args, **kwargs)

    count._get_raw = True  # type: ignore[attr-defined]
    return count


#: Fused attention kernels torch's counter leaves out, each counted with the formula torch
#: registers for the CUDA flash kernel: ``F.scaled_dot_product_attention`` runs
#: ``_scaled_dot_product_flash_attention_for_cpu`` on CPU, whose leading arguments (query,
#: key, value; the backward's grad_out first) are the CUDA kernel's. Like torch's, the
#: formula counts a causal attention in full and the backward's recomputed scores.
FUSED_ATTENTION_FORMULAS: dict[Any, Callable[..., int]] = {
    _aten._scaled_dot_product_flash_attention_for_cpu: _torch_formula(
        _aten._scaled_dot_product_flash_attention
    ),
    _aten._scaled_dot_product_flash_attention_for_cpu_backward: _torch_formula(
        _aten._scaled_dot_product_flash_attention_backward
    ),
}


def attention_backward_flops(grad_out: Tensor, query: Tensor, key: Tensor, value: Tensor) -> int:
    """FLOPs :func:`flop_counter` books for one fused attention backward on these ``(B, heads, T, d)``
    tensors (for code that tallies the attention it runs on fewer rows than the dense step)."""
    return _attention_backward_flops(grad_out.shape, query.shape, key.shape, value.shape)


@functools.lru_cache(maxsize=1024)
def _attention_backward_flops(*shapes: torch.Size) -> int:
    """The count by shapes, kept: torch's formula maps its arguments to shapes in Python
    (about 0.15 ms a call, once per block of each step of a direct-path ViT backward)."""
    backward = FUSED_ATTENTION_FORMULAS[_aten._scaled_dot_product_flash_attention_for_cpu_backward]
    return backward(*(torch.empty(shape, device="meta") for shape in shapes))


def flop_counter() -> FlopCounterMode:
    """A silent ``FlopCounterMode`` that also counts the fused CPU attention kernels.

    Use it wherever FLOPs are counted, so that no count misses attention.
    """
    return FlopCounterMode(display=False, custom_mapping=FUSED_ATTENTION_FORMULAS)


@dataclass(frozen=True)
class FlopCount:
    """FLOPs of one forward (including the loss) and one backward pass.

    Values are ints when counted on a batch and floats once scaled (e.g. per sample).
    """

    forward: float
    backward: float

    @property
    def total(self) -> float:
        return self.forward + self.backward

    @property
    def backward_ratio(self) -> float | None:
        """``backward / forward``; about 2 for a dense network, less when backprop is cut."""
        return self.backward / self.forward if self.forward else None

    def scale(self, factor: float) -> FlopCount:
        """Both passes multiplied by ``factor`` (e.g. a number of samples)."""
        return FlopCount(self.forward * factor, self.backward * factor)

    def per_sample(self, n: int) -> FlopCount:
        """This count, taken on ``n`` samples, divided down to one sample."""
        if n <= 0:
            raise ValueError(f"n must be a positive number of samples, got {n!r}")
        return FlopCount(self.forward / n, self.backward / n)

    def __add__(self, other: FlopCount) -> FlopCount:
        return FlopCount(self.forward + other.forward, self.backward + other.backward)

    def to_quantities(self) -> dict[str, Quantity]:
        """``forward``, ``backward`` and ``total`` as counted Quantities in FLOP."""
        return {
            name: Quantity(float(value), "FLOP", "counted", SOURCE)
            for name, value in (
                ("forward", self.forward),
                ("backward", self.backward),
                ("total", self.total),
            )
        }


def count_flops(
    model: nn.Module,
    inputs: Any,
    targets: Any,
    loss_fn: LossFn,
    *,
    train: bool | None = True,
) -> FlopCount:
    """Count the FLOPs of ``loss_fn(model(inputs), targets).backward()``.

    ``inputs`` is a tensor (``model(inputs)``), a tuple/list (``model(*inputs)``) or
    a mapping (``model(**inputs)``). ``train`` puts the model in that mode for the
    count (None leaves every module's mode as it is); the count reflects a training
    step, so the default is True.

    The pass runs on the live model but leaves no trace on the training run: RNG
    streams (torch CPU/CUDA, ``random``, numpy), buffers (e.g. BatchNorm running
    statistics), the ``.grad`` (including None) of every parameter and of every input
    tensor that requires grad, and every module's training flag are restored
    afterwards, also when the pass raises. Python
    attributes that a module changes on its own (step counters and the like) are
    not restored: such modules should not count steps during ``count_flops``, and a
    module's own generators are its method's to protect (``FlopAccount.counting``).
    """
    devices = _cuda_devices(model, inputs, targets)
    leaves = [t for t in _tensors((inputs, targets)) if t.requires_grad and t.is_leaf]
    with _preserved_state(model, train, devices, leaves), torch.enable_grad():
        with flop_counter() as fwd_mode:
            loss = loss_fn(_call(model, inputs), targets)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise ValueError("loss_fn must return a scalar tensor to count the backward pass")
        if not loss.requires_grad:
            raise ValueError("the loss does not require grad: no parameter takes part in it")
        with flop_counter() as bwd_mode:
            loss.backward()
    return FlopCount(fwd_mode.get_total_flops(), bwd_mode.get_total_flops())


def count_flops_per_sample(
    model: nn.Module,
    inputs: Any,
    targets: Any,
    loss_fn: LossFn,
    *,
    max_samples: int = 16,
    train: bool | None = True,
) -> FlopCount:
    """FLOPs of one training sample, counted on the first ``max_samples`` of a batch.

    Assumes FLOPs are linear in batch size (true for convolutions, linear layers and
    attention, whose cost is per sample), so counting a slice is exact and cheap.
    It is not exact for layers whose work depends on the batch as a whole, e.g. a
    sampler that keeps ``ceil(ratio * batch)`` rows rounds differently on a slice.
    Every tensor in ``inputs`` and ``targets`` (also inside tuples, lists and
    mappings) is sliced along dim 0; other values are passed through.
    """
    if max_samples < 1:
        raise ValueError(f"max_samples must be at least 1, got {max_samples!r}")
    n = min(_batch_size(inputs), max_samples)
    count = count_flops(model, _head(inputs, n), _head(targets, n), loss_fn, train=train)
    return count.per_sample(n)


class _PhaseFlopCounter(FlopCounterMode):
    """A :func:`flop_counter` that also tallies the FLOPs run inside autograd's backward engine."""

    def __init__(self) -> None:
        super().__init__(display=False, custom_mapping=FUSED_ATTENTION_FORMULAS)
        self.backward_flops = 0

    def _count_flops(self, func_packet: Any, out: Any, args: Any, kwargs: Any) -> Any:
        # torch's private hook (as ModuleTracker.is_bw): a graph task runs only during backward
        if func_packet in self.flop_registry and torch._C._current_graph_task_id() != -1:
            self.backward_flops += self.flop_registry[func_packet](*args, **kwargs, out_val=out)
        return super()._count_flops(func_packet, out, args, kwargs)


def count_step_flops(model: nn.Module, step: Callable[[], Any]) -> FlopCount:
    """Count the FLOPs of ``step()``, a whole training step a method runs its own way.

    For methods that replace the loop's forward-backward-update (MeZO's two forward
    passes): what ``step`` runs is counted as it runs, and FLOPs executed by autograd's
    backward engine are reported as ``backward``, the rest as ``forward``. The step
    leaves no trace on ``model``: its parameters are restored as well as everything
    :func:`count_flops` restores (buffers, ``.grad``, RNG streams, training flags).
    """
    saved = [p.detach().clone() for p in model.parameters()]
    with _preserved_state(model, None, _cuda_devices(model), []):
        try:
            with _PhaseFlopCounter() as mode:
                step()
        finally:
            with torch.no_grad():
                for p, value in zip(model.parameters(), saved, strict=True):
                    p.copy_(value)
    total = mode.get_total_flops()
    return FlopCount(total - mode.backward_flops, mode.backward_flops)


def _call(model: nn.Module, inputs: Any) -> Any:
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def _tensors(obj: Any) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, Mapping):
        for value in obj.values():
            yield from _tensors(value)
    elif isinstance(obj, (tuple, list)):
        for value in obj:
            yield from _tensors(value)


def _batch_size(inputs: Any) -> int:
    for tensor in _tensors(inputs):
        if tensor.dim() > 0:
            if tensor.shape[0] == 0:
                raise ValueError("cannot count FLOPs on an empty batch")
            return tensor.shape[0]
    raise ValueError("inputs hold no tensor with a batch dimension")


def _head(obj: Any, n: int) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj[:n] if obj.dim() > 0 else obj
    if isinstance(obj, Mapping):
        return {key: _head(value, n) for key, value in obj.items()}
    if isinstance(obj, tuple):
        return tuple(_head(value, n) for value in obj)
    if isinstance(obj, list):
        return [_head(value, n) for value in obj]
    return obj


def batch_size(obj: Any) -> int:
    """Samples in a batch: dim 0 of its first tensor with one (tensors, tuples, lists, mappings)."""
    return _batch_size(obj)


def sample_shapes(obj: Any) -> tuple[tuple[int, ...], ...]:
    """The shape of one sample of every tensor in a batch (dim 0 dropped).

    A per-sample FLOP count holds for batches of these sample shapes only: a batch
    padded to its longest sequence costs more per sample than a shorter one, so
    counts are cached per shape (and counted once per shape).
    """
    return tuple(tuple(t.shape[1:]) for t in _tensors(obj))


def batch_head(obj: Any, n: int) -> Any:
    """The first ``n`` samples of every tensor in a batch (tensors, tuples, lists, mappings)."""
    return _head(obj, n)


def _cuda_devices(*objs: Any) -> list[int]:
    """CUDA devices whose RNG the pass may use; empty on CPU so CUDA is never touched."""
    found: set[int] = set()
    for obj in objs:
        tensors = (
            list(obj.parameters()) + list(obj.buffers()) if isinstance(obj, nn.Module) else _tensors(obj)
        )
        for tensor in tensors:
            if tensor.device.type == "cuda":
                index = tensor.device.index
                found.add(torch.cuda.current_device() if index is None else index)
    return sorted(found)


@contextmanager
def _preserved_state(
    model: nn.Module, train: bool | None, devices: list[int], leaves: list[torch.Tensor]
) -> Iterator[None]:
    modes = [(module, module.training) for module in model.modules()]
    buffers = [
        (module._buffers, name, buf, buf.detach().clone())
        for module in model.modules()
        for name, buf in module._buffers.items()
        if buf is not None
    ]
    params = list({id(t): t for t in [*model.parameters(), *leaves]}.values())  # unique
    grads = [p.grad for p in params]
    py_state = random.getstate()
    np_state = np.random.get_state()
    with torch.random.fork_rng(devices=devices):
        try:
            for p in params:
                p.grad = None  # so backward allocates new grads and the old stay untouched
            if train is not None:
                model.train(train)
            yield
        finally:
            with torch.no_grad():
                for store, name, original, saved in buffers:
                    store[name] = original
                    original.copy_(saved)
            for p, grad in zip(params, grads, strict=True):
                p.grad = grad
            for module, mode in modes:
                module.training = mode
            random.setstate(py_state)
            np.random.set_state(np_state)
