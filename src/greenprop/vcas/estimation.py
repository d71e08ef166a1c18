"""VCAS's Monte-Carlo variance estimation: one forward and two backward passes per batch.

On each of ``M`` batches (or the first ``estimation_fraction`` of each), one forward and
two ``autograd.grad`` passes on the same graph:

1. exact: the batch's true gradient ``E_m`` and each block's per-sample gradient norms;
2. activation sampling only: ``A_m``; inside it each token-sampled Linear also draws its
   token sampler on the side (:func:`token_draw`), on the very ``dy`` and ``x`` its
   weight gradient uses: ``W_m``.

Token sampling changes only a Linear's weight gradient, never the gradient it passes
down, so a third backward with both samplers on and the activation draws replayed (what
this module did before) computes the same ``dy`` and ``x`` for every Linear and draws
the same tokens: ``W_m`` here is that pass's weight gradient, at the cost of one sampled
weight gradient per layer (the training step's matmul on the drawn tokens).

The SGD variance is the variance of ``E_m`` across the batches; the activation
sampler's extra variance is the mean of ``(A_m - E_m)^2``; each Linear's token
sampler's is the mean of ``(W_m - A_m)^2`` on its own weight (the same activation
sample, so only the token draw differs). All are measured on a fixed random subset of
each layer's weight entries, to keep the estimation cheap.

Where no block samples (every ``BlockSampler.drawn_ratio`` is 1: the first update, at
ratio 1, is such a case) the activation pass would compute the exact pass again: at ratio
1 a sampler draws nothing and keeps every non-zero row, and with every row non-zero each
Linear sees the very ``dy`` and ``x`` of the exact pass. So the token probe draws on the
exact pass and the second backward is left out (``A_m = E_m``, the same draws in the
same order from the same generator); if a block's gradient has a zero row (the second
pass would have left it out of its Linears' token draws) the draws are undone and the
second pass runs as before.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from greenprop.errors import GreenpropError
from greenprop.vcas import control
from greenprop.vcas.layers import Mode
from greenprop.vcas.samplers import sampled_weight_grad
from greenprop.vcas.surgery import VCASHandle

__all__ = [
    "GradientDraws",
    "VarianceRatios",
    "pick_entries",
    "token_draw",
    "two_backwards",
    "variance_ratios",
]


@dataclasses.dataclass(frozen=True)
class GradientDraws:
    """One batch's exact, activation-sampled and fully sampled gradients on the chosen entries.

    ``full`` holds the token-sampled Linears only (activation and token sampling);
    ``norms[i]`` are block ``i``'s per-sample gradient norms (None: no gradient reached it).
    """

    exact: dict[str, Tensor]
    activation: dict[str, Tensor]
    full: dict[str, Tensor]
    norms: list[Tensor | None]
    samples: int
    #: Whether the activation pass ran (False: no block sampled, ``activation`` is ``exact``).
    sampled_pass: bool = True

    def on_cpu(self) -> GradientDraws:
        """These draws with the norms on the CPU (the entries already are): sendable to other ranks."""
        norms = [None if n is None else n.detach().cpu() for n in self.norms]
        return dataclasses.replace(self, norms=norms)


@dataclasses.dataclass(frozen=True)
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


def token_draw(dy: Tensor, x: Tensor, ratio: float, entries: Tensor, generator: torch.Generator) -> Tensor:
    """The chosen ``entries`` (flat, sorted) of one token-sampled weight gradient ``dy^T x`` (float64).

    The training step's own :func:`~greenprop.vcas.samplers.sampled_weight_grad` (same
    generator calls, same ``1/p`` scales, same matmul), picked at the entries: on the CPU
    its ``(out x k) @ (k x in)`` matmul costs less than summing the ``k`` tokens' terms on
    1% of the entries in float64 (what this function did before, about 3x slower at MiniLM's
    shapes, ``benchmarks/vcas_estimation.py``).
    """
    grad, _ = sampled_weight_grad(dy, x, ratio, generator)
    return grad.reshape(-1)[entries.to(grad.device)].double()


class _TokenProbe:
    """The runtime's ``token_probe`` during one estimation: each Linear's token draw, summed per layer."""

    def __init__(self, handle: VCASHandle, entries: Mapping[str, Tensor]) -> None:
        self.generator = handle.runtime.weight_generator
        self.names = {id(layer): name for name, layer in handle.linears.items() if name in entries}
        self.entries = entries
        self.draws: dict[str, Tensor] = {}

    def __call__(self, layer: nn.Module, dy: Tensor, x: Tensor) -> None:
        name = self.names.get(id(layer))
        ratio = getattr(layer, "vcas_weight_ratio", 1.0)
        if name is None or ratio >= 1.0 or dy.shape[0] == 0:  # exact: the activation pass's value
            return
        draw = token_draw(dy, x, ratio, self.entries[name], self.generator).cpu()
        previous = self.draws.get(name)  # a layer used twice in the forward: its terms add up
        self.draws[name] = draw if previous is None else previous + draw


def two_backwards(
    model: nn.Module,
    handle: VCASHandle,
    batch: Any,
    loss_fn: Callable[[nn.Module, Any], Tensor],
    layers: Mapping[str, nn.Module],
    entries: Mapping[str, Tensor],
    *,
    fold: bool = True,
) -> GradientDraws:
    """One forward, then the exact and activation-sampled gradients of ``layers``, token draws aside.

    ``fold``: where no block samples, take the token draws on the exact pass and leave the
    activation pass out (its gradients are the exact ones); False always runs both passes
    (the same results, one backward more: for tests and benchmarks).
    """
    runtime = handle.runtime
    names = list(layers)
    weights = [layers[name].weight for name in names]
    # Every Linear on its own Function: the sampled backward below hands each one's tokens to the
    # token probe, which autograd's plain ops (an exact tail block's, VCASRuntime.exact_tail) skip.
    plain_exact, runtime.plain_exact = runtime.plain_exact, False
    try:
        with torch.enable_grad():
            loss = loss_fn(model, batch)
    finally:
        runtime.plain_exact = plain_exact
    if not isinstance(loss, Tensor) or loss.numel() != 1 or not loss.requires_grad:
        raise GreenpropError("loss_fn(model, batch) must return a scalar loss that requires grad")
    previous = runtime.mode
    probe = _TokenProbe(handle, {name: entries[name] for name in names})
    # The samplers' sole_path is set by this forward: without it a layer finds zero rows itself.
    fold = fold and all(s.drawn_ratio >= 1.0 and s.sole_path for s in handle.samplers)
    before_draws = probe.generator.get_state() if fold else None
    try:
        runtime.mode, runtime.record_norms = Mode.EXACT, True
        runtime.token_probe = probe if fold else None
        runtime.norms.clear()
        grads_exact = torch.autograd.grad(loss, weights, retain_graph=True)
        runtime.record_norms, runtime.token_probe = False, None
        missing = [s.name for s in handle.samplers if s.index not in runtime.norms]
        if len(missing) == len(handle.samplers):
            raise GreenpropError(
                f"VCAS saw no gradient at block(s) {', '.join(missing)}: estimate with the model "
                "in training mode (model.train()) and a loss that uses every block"
            )
        # Blocks below the lowest trainable layer get no backward at all: nothing to sample.
        block_norms = [runtime.norms.get(s.index) for s in handle.samplers]
        if fold and not all(bool((n > 0).all()) for n in block_norms if n is not None):
            fold = False  # a zero row: the activation pass's Linears would draw without it
            probe.generator.set_state(before_draws)
            probe.draws.clear()
        if fold:
            grads_act = grads_exact
        else:
            runtime.mode, runtime.token_probe = Mode.ACTIVATION, probe
            grads_act = torch.autograd.grad(loss, weights)
    finally:
        runtime.mode, runtime.record_norms, runtime.token_probe = previous, False, None

    def pick(grads: Sequence[Tensor]) -> dict[str, Tensor]:
        return {
            name: g.detach().reshape(-1)[entries[name].to(g.device)].double().cpu()
            for name, g in zip(names, grads, strict=True)
        }

    exact = pick(grads_exact)
    activation = exact if fold else pick(grads_act)
    full = {name: probe.draws.get(name, activation[name]) for name in names if name in handle.linears}
    samples = len(next(norm for norm in block_norms if norm is not None))
    return GradientDraws(exact, activation, full, block_norms, samples, sampled_pass=not fold)


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
