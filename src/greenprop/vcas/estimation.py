"""VCAS's Monte-Carlo variance estimation: three backward passes on one batch, then ratios.

On each of ``M`` batches, one forward and three ``autograd.grad`` passes on the same graph:

1. exact: the batch's true gradient ``E_m`` and each block's per-sample gradient norms;
2. activation sampling only: ``A_m``;
3. activation and token sampling, with the activation draws replayed from (2): ``W_m``.

The SGD variance is the variance of ``E_m`` across the batches; the activation
sampler's extra variance is the mean of ``(A_m - E_m)^2``; each Linear's token
sampler's is the mean of ``(W_m - A_m)^2`` on its own weight (the same activation
sample, so only the token draw differs). All are measured on a fixed random subset of
each layer's weight entries, to keep the estimation cheap.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from greenprop.errors import GreenpropError
from greenprop.vcas import control
from greenprop.vcas.layers import Mode
from greenprop.vcas.surgery import VCASHandle

__all__ = ["GradientDraws", "VarianceRatios", "pick_entries", "three_backwards", "variance_ratios"]


@dataclass(frozen=True)
class GradientDraws:
    """One batch's exact, activation-sampled and fully sampled gradients on the chosen entries.

    ``norms[i]`` are block ``i``'s per-sample gradient norms (None: no gradient reached it).
    """

    exact: dict[str, Tensor]
    activation: dict[str, Tensor]
    full: dict[str, Tensor]
    norms: list[Tensor | None]
    samples: int

    def on_cpu(self) -> GradientDraws:
        """These draws with the norms on the CPU (the entries already are): sendable to other ranks."""
        norms = [None if n is None else n.detach().cpu() for n in self.norms]
        return GradientDraws(self.exact, self.activation, self.full, norms, self.samples)


@dataclass(frozen=True)
class VarianceRatios:
    """The samplers' extra variance relative to the SGD variance."""

    sgd: float
    activation: float
    weight: dict[str, float]  # per token-sampled Linear


def pick_entries(
    layers: Mapping[str, nn.Module], fraction: float, generator: torch.Generator
) -> dict[str, Tensor]:
    """A fixed random subset (sorted, at least one) of each layer's weight entries."""
    entries = {}
    for name, layer in layers.items():
        n = layer.weight.numel()
        k = max(1, round(fraction * n))
        entries[name] = torch.randperm(n, generator=generator)[:k].sort().values
    return entries


def three_backwards(
    model: nn.Module,
    handle: VCASHandle,
    batch: Any,
    loss_fn: Callable[[nn.Module, Any], Tensor],
    layers: Mapping[str, nn.Module],
    entries: Mapping[str, Tensor],
) -> GradientDraws:
    """One forward, then the exact, activation-sampled and fully sampled gradients of ``layers``."""
    runtime = handle.runtime
    names = list(layers)
    weights = [layers[name].weight for name in names]
    with torch.enable_grad():
        loss = loss_fn(model, batch)
    if not isinstance(loss, Tensor) or loss.numel() != 1 or not loss.requires_grad:
        raise GreenpropError("loss_fn(model, batch) must return a scalar loss that requires grad")
    previous = runtime.mode
    try:
        runtime.mode, runtime.record_norms = Mode.EXACT, True
        runtime.norms.clear()
        grads_exact = torch.autograd.grad(loss, weights, retain_graph=True)
        runtime.record_norms = False
        missing = [s.name for s in handle.samplers if s.index not in runtime.norms]
        if len(missing) == len(handle.samplers):
            raise GreenpropError(
                f"VCAS saw no gradient at block(s) {', '.join(missing)}: estimate with the model "
                "in training mode (model.train()) and a loss that uses every block"
            )
        # Blocks below the lowest trainable layer get no backward at all: nothing to sample.
        block_norms = [runtime.norms.get(s.index) for s in handle.samplers]
        replay = runtime.activation_generator.get_state()
        runtime.mode = Mode.ACTIVATION
        grads_act = torch.autograd.grad(loss, weights, retain_graph=True)
        runtime.activation_generator.set_state(replay)
        runtime.mode = Mode.FULL
        grads_full = torch.autograd.grad(loss, weights)
    finally:
        runtime.mode, runtime.record_norms = previous, False

    def pick(grads: Sequence[Tensor]) -> dict[str, Tensor]:
        return {
            name: g.detach().reshape(-1)[entries[name].to(g.device)].double().cpu()
            for name, g in zip(names, grads, strict=True)
        }

    samples = len(next(norm for norm in block_norms if norm is not None))
    return GradientDraws(pick(grads_exact), pick(grads_act), pick(grads_full), block_norms, samples)


def variance_ratios(draws: Sequence[GradientDraws], token_sampled: Sequence[str]) -> VarianceRatios:
    """SGD variance across the batches, and each sampler's extra variance relative to it.

    ``token_sampled``: the layers (Linear only) whose weight gradient samples tokens.
    """
    names = list(draws[0].exact)  # Linear and Conv2d: all see the activation sampler
    # SGD variance per entry: across the M batches' exact gradients (Bessel-corrected).
    per_entry = {name: torch.stack([d.exact[name] for d in draws]).var(dim=0, correction=1) for name in names}
    sgd = {name: float(v.mean()) for name, v in per_entry.items()}
    sgd_all = float(torch.cat(list(per_entry.values())).mean())
    all_exact = torch.cat([d.exact[name] for d in draws for name in names])
    all_act = torch.cat([d.activation[name] for d in draws for name in names])
    act_ratio = control.variance_ratio(all_act[None], all_exact, sgd_all)
    weight = {}
    for name in names:
        if name not in token_sampled:
            continue
        sampled = torch.cat([d.full[name] for d in draws])[None]
        reference = torch.cat([d.activation[name] for d in draws])
        weight[name] = control.variance_ratio(sampled, reference, sgd[name])
    return VarianceRatios(sgd_all, act_ratio, weight)
