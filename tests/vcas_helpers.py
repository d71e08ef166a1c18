"""Shared helpers of the VCAS tests: toy models, skewed inputs, flat gradients, unbiasedness statistics."""

from __future__ import annotations

import copy
import inspect
import math
from collections.abc import Callable
from types import ModuleType
from typing import Any

import torch
from torch import Tensor, nn

from greenprop.metering.memory import tensor_bytes
from greenprop.vcas import VCASConfig, apply_vcas
from greenprop.vcas.surgery import vcas_handle


def skewed(shape: tuple[int, ...], seed: int) -> Tensor:
    """Random float64 tensor whose samples' norms span two orders of magnitude."""
    t = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return t * torch.logspace(-1, 1, shape[0], dtype=torch.float64).view(-1, *([1] * (len(shape) - 1)))


def grads(loss: Tensor, params: list[Tensor], **kwargs) -> Tensor:
    """The gradients of ``loss`` w.r.t. ``params``, flattened into one vector."""
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params, **kwargs)])


def grad_dict(model: nn.Module) -> dict[str, Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def step_grads(model: nn.Module, steps: int) -> list[dict[str, Tensor]]:
    """Each parameter's gradient after each of ``steps`` squared-error steps on fixed skewed
    (16, 4, 6) batches (a stack's input and target), ``.grad`` reset before each."""
    out = []
    for step in range(steps):
        model.zero_grad(set_to_none=True)
        x, target = skewed((16, 4, 6), seed=10 + step), skewed((16, 4, 6), seed=20 + step)
        ((model(x) - target) ** 2).sum().backward()
        out.append(grad_dict(model))
    return out


def draw(loss: Tensor, params: list[Tensor], n: int) -> Tensor:
    """``n`` sampled gradients of the same graph, one per row."""
    return torch.stack([grads(loss, params, retain_graph=True) for _ in range(n)])


def z_scores(draws: Tensor, exact: Tensor) -> tuple[Tensor, float]:
    """z-scores of the mean of the draws around ``exact`` for the entries that vary, and the
    largest relative error of the entries that never vary (those must be exact)."""
    mean, std = draws.mean(0), draws.std(0)
    scale = exact.abs().max()
    varies = std > 1e-12 * scale
    fixed_err = float(((mean - exact)[~varies]).abs().max() / scale) if bool((~varies).any()) else 0.0
    z = (mean - exact)[varies] / (std[varies] / math.sqrt(draws.shape[0]))
    return z, fixed_err


def unbiased(z: Tensor) -> bool:
    """Mean within a few standard errors everywhere, and the z-scores look like noise."""
    a = z.abs()
    return bool(a.max() < 5.5) and float((a > 3).double().mean()) < 0.05 and float(a.mean()) < 1.3


def spy_draws(monkeypatch, module: ModuleType, name: str) -> list[Tensor]:
    """Record the kept indices of every call of the sampler ``module.name`` that draws (ratio < 1)."""
    calls: list[Tensor] = []
    original = getattr(module, name)
    signature = inspect.signature(original)

    def spy(*args, **kwargs):
        idx, scale = original(*args, **kwargs)
        if signature.bind(*args, **kwargs).arguments["ratio"] < 1:
            calls.append(idx)
        return idx, scale

    monkeypatch.setattr(module, name, spy)
    return calls


def drop_rescale(monkeypatch, module: ModuleType, name: str) -> None:
    """Make the sampler ``module.name`` return scale 1 for every kept row (a biased estimator)."""
    original = getattr(module, name)

    def unscaled(*args, **kwargs):
        idx, scale = original(*args, **kwargs)
        return idx, torch.ones_like(scale)

    monkeypatch.setattr(module, name, unscaled)


def fixed_ratios(
    model: nn.Module, ratio: float = 1.0, token_ratio: float = 1.0, block_types: Any = None, **config: Any
) -> nn.Module:
    """``apply_vcas`` (seed 3, compacted and sampled at every ratio) with every sampler and Linear at
    fixed ratios."""
    every = {"compact_max_ratio": 1.0, "direct_max_ratio": 1.0, "sample_max_ratio": 1.0}
    config = VCASConfig(**{"seed": 3, **every, **config})
    handle = vcas_handle(apply_vcas(model, config, block_types=block_types))
    for sampler in handle.samplers:
        sampler.ratio = ratio
    for layer in handle.linears.values():
        layer.vcas_weight_ratio = token_ratio
    return model


def graph_nodes(out: Tensor) -> set[str]:
    """The names of the autograd nodes ``out``'s graph reaches."""
    seen, todo = set(), [out.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        todo.extend(fn for fn, _ in node.next_functions)
    return {node.name() for node in seen}


def same_steps_direct_and_rerun(
    base: nn.Module,
    x: Any,
    loss_of: Callable[[Tensor], Tensor],
    rtol: float,
    atol: float,
    steps: int = 3,
    reseed: bool = False,
    rerun_forward_per_row: float = 0.0,
    direct_saves_per_row: dict[int, float] | None = None,
    direct_tallies_per_row: dict[int, float] | None = None,
    **config: Any,
) -> Any:
    """Train-mode steps of copies of ``base`` at block and token ratio 0.5 on the direct path and on
    the re-run path, from the same seeds: asserts the same gradients every step (new draws each
    step) and the same tally, except that the re-run path's also holds the fused attention
    forward it re-runs: ``rerun_forward_per_row`` FLOPs per kept row of each block; returns
    the direct path's tally; ``direct_saves_per_row``: block -> FLOPs per kept row the direct path
    runs less (live tokens: it skips the zero tokens' work); ``direct_tallies_per_row``: block ->
    FLOPs per row of the ops only the direct path tallies (BERT's attention bmms: done per kept
    row, dense per seen row). ``reseed``: torch's global generator is seeded with the step's
    number before each step's forward on both paths (blocks with dropout: both then draw the
    same masks). ``config``: more arguments of :func:`fixed_ratios`."""
    found: dict[bool, list[Tensor]] = {}
    tallies = {}

    def step(model: nn.Module, params: list[Tensor], number: int) -> Tensor:
        if reseed:
            torch.manual_seed(number)
        return grads(loss_of(model(x)), params)

    for on in (True, False):
        model = fixed_ratios(copy.deepcopy(base), 0.5, 0.5, direct=on, **config)
        params = list(model.parameters())
        model(x)  # the first forward checks the blocks
        assert ("_DirectBlockBackward" in graph_nodes(model(x))) is on
        found[on] = [step(model, params, number) for number in range(steps)]
        tallies[on] = vcas_handle(model).runtime.take_tally()
    for step, (a, b) in enumerate(zip(found[True], found[False], strict=True)):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=f"step {step}")
    assert not torch.equal(found[True][0], found[True][1])  # new draws every step
    on, off = tallies[True], tallies[False]
    rerun_forward = rerun_forward_per_row * sum(kept for kept, _ in on.rows.values())
    skipped = sum(per_row * on.rows[block][0] for block, per_row in (direct_saves_per_row or {}).items())
    only = (direct_tallies_per_row or {}).items()
    only_done = sum(per_row * on.rows[block][0] for block, per_row in only)
    only_dense = sum(per_row * on.rows[block][1] for block, per_row in only)
    assert on.rows == off.rows and math.isclose(on.dense - only_dense, off.dense)
    assert math.isclose(on.done - only_done + rerun_forward + skipped, off.done)
    assert on.done < on.dense
    return on


def held_by_forward(model: nn.Module, x: Tensor) -> int:
    """Tensor bytes ``model(x)`` leaves held for its backward (the allocator's count, so the tensors
    a ``frees_saved`` direct rule holds outside autograd count too; parameters, which exist before,
    do not); the backward then runs, so they are freed again."""
    outs = []
    counted = tensor_bytes(lambda: outs.append(model(x).square().sum()))
    assert counted is not None
    outs.pop().backward()
    return counted.held
