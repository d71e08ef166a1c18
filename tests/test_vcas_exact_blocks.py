"""Exact blocks at the model's end run autograd's own ops (``VCASRuntime.exact_tail``).

A block whose ratio is above ``sample_max_ratio`` keeps every row. When every block after
it does too, no row of its gradient is dropped, so its Linear / Conv2d layers take plain
``F.linear`` / ``conv2d`` (autograd's fused backward, no custom Function) and its sampler
computes no norms. These tests check that such steps are dense autograd's, that the FLOP
tally is what the custom Functions would have tallied, and that the plain path is not taken
where it would change something: a later block that samples, token sampling, the
variance estimation's token probe.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import pytest
import torch
from torch import Tensor, nn

from fixtures import convnet, stack
from greenprop.vcas import VCASConfig, apply_vcas
from greenprop.vcas import layers as vcas_layers
from greenprop.vcas.estimation import pick_entries, two_backwards
from greenprop.vcas.surgery import VCASHandle, vcas_handle
from vcas_helpers import graph_nodes, skewed

pytestmark = pytest.mark.usefixtures("one_thread")

CUSTOM = {"_VCASLinearFunctionBackward", "_VCASConv2dFunctionBackward"}


def _vcas(
    reference: nn.Module, ratios: Sequence[float], nu: float = 1.0, **config
) -> tuple[nn.Module, VCASHandle]:
    """A converted copy (default limits: sample_max_ratio 0.8) with the samplers at ``ratios``."""
    model = apply_vcas(copy.deepcopy(reference), VCASConfig(seed=3, **config))
    handle = vcas_handle(model)
    for sampler, ratio in zip(handle.samplers, ratios, strict=True):
        sampler.ratio = ratio
    for layer in handle.linears.values():
        layer.vcas_weight_ratio = nu
    return model, handle


def _net(name: str) -> nn.Sequential:
    """Three float64 Linear blocks, or two residual conv blocks (Conv2d and GroupNorm)."""
    return stack(depth=3) if name == "linear" else convnet()


def _input(model: nn.Module, seed: int) -> Tensor:
    conv = any(isinstance(m, nn.Conv2d) for m in model.modules())
    return skewed((8, 4, 9, 8) if conv else (16, 4, 6), seed=seed)


def _step(model: nn.Module, seed: int) -> tuple[dict[str, Tensor], set[str]]:
    """One step's gradients and the names of its graph's autograd nodes."""
    model.zero_grad(set_to_none=True)
    out = model(_input(model, seed))
    nodes = graph_nodes(out)
    ((out - skewed(tuple(out.shape), seed=seed + 50)) ** 2).sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, nodes


def _custom_nodes(model: nn.Module, seed: int = 0) -> int:
    """How many custom VCAS layer Functions one step's graph holds."""
    model.zero_grad(set_to_none=True)
    out = model(_input(model, seed))
    seen, todo, count = set(), [out.grad_fn], 0
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        count += node.name() in CUSTOM
        todo.extend(fn for fn, _ in node.next_functions)
    out.sum().backward()
    return count


@pytest.mark.parametrize("compact", [True, False])
@pytest.mark.parametrize("net", ["linear", "conv"])
def test_all_exact_blocks_run_autograds_own_ops_and_equal_dense(net: str, compact: bool) -> None:
    reference = _net(net)
    model, handle = _vcas(reference, [0.9] * len(reference), compact=compact)
    for step in range(3):
        got, nodes = _step(model, seed=step)
        want, _ = _step(reference, seed=step)
        assert not nodes & CUSTOM, "an exact tail block's layers should run plain autograd ops"
        for name, value in want.items():
            torch.testing.assert_close(got[name], value, rtol=1e-12, atol=1e-12)
    tally = handle.runtime.tally
    assert tally.samples == 3 * _input(model, 0).shape[0]
    assert tally.rows and all(kept == seen for kept, seen in tally.rows.values())


@pytest.mark.parametrize("net", ["linear", "conv"])
def test_the_tally_of_plain_layers_is_the_custom_functions_tally(net: str) -> None:
    """Dense = done, and the same numbers the custom Functions tally when the plain path is off."""
    reference = _net(net)
    tallies = []
    for plain in (True, False):
        model, handle = _vcas(reference, [1.0] * len(reference), compact=False)
        handle.runtime.plain_exact = plain
        for step in range(2):
            _, nodes = _step(model, seed=step)
            assert bool(nodes & CUSTOM) is not plain
        tallies.append(handle.runtime.take_tally())
    fast, custom = tallies
    assert fast.dense > 0 and fast.done == fast.dense
    assert (fast.done, fast.dense, fast.samples) == (custom.done, custom.dense, custom.samples)
    assert fast.rows == custom.rows


def test_frozen_weights_are_left_out_of_the_plain_tally() -> None:
    reference = stack(depth=2)
    tallies = []
    for plain in (True, False):
        model, handle = _vcas(reference, [1.0, 1.0], compact=False)
        model[0].fc1.weight.requires_grad_(False)
        handle.runtime.plain_exact = plain
        _step(model, seed=0)
        tallies.append(handle.runtime.take_tally())
    assert tallies[0].dense == tallies[1].dense > 0


def test_exact_blocks_before_a_sampling_block_keep_their_functions(monkeypatch) -> None:
    """A later block (earlier in backward) drops rows: the exact blocks before it still skip them,
    finding them from their norms; only the exact blocks after the last sampling one go plain."""
    reference = _net("linear")
    per_block = _custom_nodes(_vcas(reference, [0.5, 0.5, 0.5], compact=False)[0]) // 3
    assert per_block > 0
    norms = []
    original = vcas_layers.row_norms
    monkeypatch.setattr(vcas_layers, "row_norms", lambda grad: norms.append(1) or original(grad))
    model, _ = _vcas(reference, [0.9, 0.9, 0.5], compact=False)
    assert _custom_nodes(model) == 3 * per_block
    assert len(norms) == 3
    norms.clear()
    model, _ = _vcas(reference, [0.5, 0.9, 0.9], compact=False)
    assert _custom_nodes(model) == per_block  # block 0 samples; blocks 1 and 2 are the exact tail
    assert len(norms) == 1  # only the sampling block draws on norms


def test_token_sampling_keeps_the_linear_function() -> None:
    """An exact block's Linear that samples tokens for its weight gradient is not plain; one whose
    token policy says sampling does not pay at its ratio is."""
    reference = stack(depth=2)
    model, handle = _vcas(reference, [0.9, 0.9], nu=0.5, compact=False)
    sampled = _custom_nodes(model)
    assert sampled == len(handle.linears) > 0
    for layer in handle.linears.values():
        layer.vcas_token_break_even = 0.3  # sampling at 0.5 would not pay: exact tokens
    assert _custom_nodes(model) == 0


def test_the_estimation_forward_keeps_every_function_for_the_token_probe() -> None:
    """The estimation's token-sampled draw covers an exact block's Linear whose policy keeps its
    training tokens exact: its forward runs the custom Functions, whatever the training does."""
    reference = stack(depth=2)
    model, handle = _vcas(reference, [0.9, 0.9], nu=0.5, compact=False)
    for layer in handle.linears.values():
        layer.vcas_token_break_even = 0.3
    batch = (skewed((16, 4, 6), seed=7), skewed((16, 4, 6), seed=8))

    def loss_fn(net: nn.Module, b: tuple[Tensor, Tensor]) -> Tensor:
        return ((net(b[0]) - b[1]) ** 2).sum()

    entries = pick_entries(handle.linears, 0.5, torch.Generator().manual_seed(1))
    draws = two_backwards(model, handle, batch, loss_fn, handle.linears, entries)
    assert handle.runtime.plain_exact
    assert any(not torch.equal(draws.full[n], draws.activation[n]) for n in handle.linears)
    for n in handle.linears:  # the exact blocks' activation pass is exact
        torch.testing.assert_close(draws.activation[n], draws.exact[n], rtol=1e-12, atol=1e-12)


def test_kept_ratio_is_the_lowest_drawn_ratio_from_the_block_on() -> None:
    """A block keeps at most the rows every later block kept: its bound is the lowest drawn ratio
    (a ratio above sample_max_ratio 0.8 draws at 1) of its sampler and the later ones."""
    _, handle = _vcas(_net("linear"), [0.9, 0.5, 0.85])
    runtime = handle.runtime
    assert [runtime.kept_ratio(i) for i in range(3)] == [0.5, 0.5, 1.0]
    assert runtime.exact_tail(2) and not runtime.exact_tail(1)
    handle.samplers[1].ratio = 0.7
    assert [runtime.kept_ratio(i) for i in range(3)] == [0.7, 0.7, 1.0]
    assert runtime.kept_ratio(3) == 1.0  # no sampler from there on
