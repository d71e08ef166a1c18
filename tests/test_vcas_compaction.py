"""Compacted VCAS blocks: the backward re-runs each block on its kept samples only.

Exact against dense autograd at ratio 1 (dropout included: the re-run replays the
forward's masks), unbiased below it (dropout masks replayed on the kept rows, extra
per-sample and shared block arguments sliced or not), the same variance estimates as the
uncompacted path, fewer activations kept, and the refusals: samples that interact
inside a block, gradient that bypasses the first output.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fixtures import AuxLossBlock, norm_linear_stack, stack, token_batches, weighted_sum_loss
from greenprop.errors import GreenpropError
from greenprop.vcas import VCASConfig, apply_vcas, compaction, remove_vcas
from greenprop.vcas.compaction import CompactedForward, CompactionWarning
from greenprop.vcas.estimation import pick_entries, two_backwards
from greenprop.vcas.surgery import vcas_handle
from vcas_helpers import draw, grads, held_by_forward, skewed, unbiased, z_scores

DRAWS = 1500  # sampled backward passes per unbiasedness check

pytestmark = pytest.mark.usefixtures("one_thread")
# Compact at every ratio (by default re-runs only at <= 0.7, direct blocks at <= 0.9).
ALWAYS = VCASConfig(compact_max_ratio=1.0, direct_max_ratio=1.0)


class DropoutBlock(nn.Module):
    """A pre-norm block with module dropout and functional dropout inside, and an extra argument.

    ``cond`` is per sample ``(B, dim)`` (like a diffusion model's time embedding) and
    ``bias`` is shared ``(1, 1, dim)`` (like a broadcast mask): compaction slices the first
    and passes the second whole.
    """

    def __init__(self, dim: int = 6, hidden: int = 8, p: float = 0.3) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.drop = nn.Dropout(p)
        self.fc2 = nn.Linear(hidden, dim)
        self.p = p

    def forward(self, x: Tensor, cond: Tensor, bias: Tensor) -> Tensor:
        h = self.drop(F.gelu(self.fc1(self.norm(x) + cond[:, None, :])))
        h = F.dropout(self.fc2(h), self.p, self.training)
        return x + h + bias


class DropoutNet(nn.Module):
    def __init__(self, depth: int = 2, dim: int = 6) -> None:
        super().__init__()
        self.cond = nn.Linear(3, dim)  # outside the blocks: its gradient comes back through ``cond``
        self.bias = nn.Parameter(torch.zeros(1, 1, dim))
        self.blocks = nn.ModuleList(DropoutBlock(dim) for _ in range(depth))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        cond = self.cond(c)
        for block in self.blocks:
            x = block(x, cond, self.bias)
        return x


def _dropout_pair(ratio: float) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    reference = DropoutNet().double()
    model = copy.deepcopy(reference)
    handle = vcas_handle(apply_vcas(model, VCASConfig(seed=4, compact_max_ratio=1.0, direct_max_ratio=1.0)))
    assert len(handle.compacted) == 2 and all(isinstance(b.forward, CompactedForward) for b in model.blocks)
    for sampler in handle.samplers:
        sampler.ratio = ratio
    return model, reference


def _dropout_inputs() -> tuple[Tensor, Tensor, Tensor]:
    return skewed((10, 3, 6), seed=1), skewed((10, 3), seed=2), skewed((10, 3, 6), seed=3)


def _loss(net: nn.Module, x: Tensor, c: Tensor, w: Tensor, seed: int) -> Tensor:
    torch.manual_seed(seed)  # the same dropout masks in both models
    return (net(x, c).tanh() * w).sum()


def test_ratio_one_with_dropout_equals_dense_autograd_bit_for_bit() -> None:
    model, reference = _dropout_pair(1.0)
    x, c, w = _dropout_inputs()
    for step in range(3):  # the first forward checks the blocks, the later ones run compacted only
        got = grads(_loss(model, x, c, w, seed=step), list(model.parameters()))
        state = torch.get_rng_state()
        expected = grads(_loss(reference, x, c, w, seed=step), list(reference.parameters()))
        assert torch.equal(got, expected), step
        assert torch.equal(state, torch.get_rng_state())  # the same draws: training continues alike
    assert all(b.forward.draws_random and b.forward.compactable for b in model.blocks)


def test_sampled_gradients_with_dropout_and_extra_arguments_are_unbiased() -> None:
    """One forward (fixed dropout masks), many sampled backwards: their mean is the exact gradient."""
    model, reference = _dropout_pair(0.4)
    x, c, w = _dropout_inputs()
    _loss(model, x, c, w, seed=0)  # first forward: the blocks are checked (plain path)
    loss = _loss(model, x, c, w, seed=1)
    exact = grads(_loss(reference, x, c, w, seed=1), list(reference.parameters()))
    draws = draw(loss, list(model.parameters()), DRAWS)
    z, fixed_err = z_scores(draws, exact)
    assert unbiased(z), f"max |z| {z.abs().max():.2f}, mean |z| {z.abs().mean():.2f}"
    assert fixed_err < 1e-12
    assert bool((draws.std(0) > 0).any())  # really sampled
    kept, seen = vcas_handle(model).runtime.take_tally().rows[1]
    assert abs(kept / seen - 0.4) < 0.03


def test_fresh_dropout_masks_in_the_rerun_would_be_caught(monkeypatch) -> None:
    """Negative control: a re-run that drew new masks instead of replaying them is biased."""
    model, reference = _dropout_pair(0.4)
    x, c, w = _dropout_inputs()
    _loss(model, x, c, w, seed=0)
    loss = _loss(model, x, c, w, seed=1)
    exact = grads(_loss(reference, x, c, w, seed=1), list(reference.parameters()))
    replay = compaction._RandomDraws.__torch_dispatch__

    def fresh(self, func, types, args=(), kwargs=None):
        if self.record:
            return replay(self, func, types, args, kwargs)
        return func(*args, **(kwargs or {}))  # draw again instead of replaying

    monkeypatch.setattr(compaction._RandomDraws, "__torch_dispatch__", fresh)
    with pytest.raises(GreenpropError, match="gives other outputs when run on"):  # the re-run check sees it
        grads(loss, list(model.parameters()), retain_graph=True)
    monkeypatch.setattr(CompactedForward, "verify", lambda *args: None)
    z, _ = z_scores(draw(loss, list(model.parameters()), 300), exact)  # and so do the statistics
    assert not unbiased(z)


def test_in_place_bernoulli_draws_are_kept_as_bool_and_replay_the_same_values() -> None:
    """Dropout's CPU mask (bernoulli_ into a float tensor) is recorded as bool, replayed as its 0s and 1s."""
    draws: list[Tensor] = []
    with compaction._RandomDraws(draws, block="b", rows=None, batch=6, record=True):
        mask = torch.empty(6, 5, dtype=torch.float64).bernoulli_(0.3)
        noise = torch.rand(6, 5)
    assert [d.dtype for d in draws] == [torch.bool, torch.float32]
    assert torch.equal(draws[0], mask.bool()) and torch.equal(draws[1], noise)
    rows = torch.tensor([1, 4])
    with compaction._RandomDraws(draws, block="b", rows=rows, batch=6, record=False):
        again = torch.full((2, 5), 7.0, dtype=torch.float64).bernoulli_(0.3)
        noise_again = torch.rand(2, 5)
    assert again.dtype == torch.float64 and torch.equal(again, mask[rows])
    assert torch.equal(noise_again, noise[rows])


class BatchMeanBlock(nn.Module):
    """Subtracts the batch mean: its samples interact, which no static check sees."""

    def __init__(self, dim: int = 6) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc(x)
        return x + torch.tanh(h - h.mean(dim=0, keepdim=True))


def test_samples_that_interact_inside_a_block_are_refused_naming_it() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(BatchMeanBlock(), BatchMeanBlock())
    handle = vcas_handle(apply_vcas(model, ALWAYS))
    batches = token_batches()
    weighted_sum_loss(model, next(batches)).backward()  # ratio 1: every row re-run, nothing to see
    for sampler in handle.samplers:
        sampler.ratio = 0.3
    with pytest.raises(GreenpropError, match=r"block '1' gives other outputs when run on \d+ of its 12 "):
        weighted_sum_loss(model, next(batches)).backward()


def test_gradient_that_bypasses_the_first_output_keeps_the_block_uncompacted() -> None:
    model = norm_linear_stack(depth=2, block=AuxLossBlock)
    reference = copy.deepcopy(model)
    handle = vcas_handle(apply_vcas(model, ALWAYS))
    x, w = next(token_batches())
    warning = r"block '0' runs uncompacted: its forward keeps a tensor .* in 0\.aux"
    with pytest.warns(CompactionWarning, match=warning):
        loss = weighted_sum_loss(model, (x, w)) + sum(b.aux for b in model)
    loss.backward()
    assert not any(b.forward.compactable for b in handle.compacted)
    ref_loss = weighted_sum_loss(reference, (x, w)) + sum(b.aux for b in reference)
    ref_loss.backward()
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad)


class SharedWeightBlock(nn.Module):
    """Uses a parameter it does not own (tied weights): compaction would lose its gradient."""

    def __init__(self, shared: nn.Parameter) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.shared = [shared]  # not registered: not this block's parameter

    def forward(self, x: Tensor) -> Tensor:
        return x + self.fc(x) * self.shared[0]


def test_a_parameter_the_block_does_not_own_keeps_it_uncompacted() -> None:
    shared = nn.Parameter(torch.ones(6))
    model = nn.Sequential(SharedWeightBlock(shared), SharedWeightBlock(shared))
    apply_vcas(model, ALWAYS)
    with pytest.warns(CompactionWarning, match="neither an argument nor its own|not an argument or its own"):
        weighted_sum_loss(model, next(token_batches())).backward()
    assert shared.grad is not None and bool((shared.grad != 0).any())


class Cache:
    """A stand-in for a key/value cache: state the block updates on every call."""

    def __init__(self) -> None:
        self.calls = 0


class CachingBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 6)

    def forward(self, x: Tensor, cache: Cache) -> Tensor:
        cache.calls += 1
        return x + self.fc(x)


class CachingNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([CachingBlock(), CachingBlock()])

    def forward(self, x: Tensor) -> Tensor:
        self.cache = Cache()
        for block in self.blocks:
            x = block(x, self.cache)
        return x


def test_a_stateful_argument_keeps_the_block_uncompacted_so_it_is_updated_once() -> None:
    model = CachingNet()
    reference = copy.deepcopy(model)
    handle = vcas_handle(apply_vcas(model, ALWAYS))
    x, w = next(token_batches())
    with pytest.warns(CompactionWarning, match="takes a Cache argument, which a re-run would update twice"):
        weighted_sum_loss(model, (x, w)).backward()
    assert model.cache.calls == 2  # one call per block: no re-run
    assert not any(b.forward.compactable for b in handle.compacted)
    weighted_sum_loss(reference, (x, w)).backward()
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad)


def test_variance_estimation_runs_through_the_compacted_blocks_alike() -> None:
    """two_backwards gives the same exact / activation / token-sampled draws compacted or not."""
    torch.manual_seed(0)
    base = stack(depth=2, dim=6, hidden=8)
    draws = {}
    for compact in (True, False):
        model = copy.deepcopy(base)
        handle = vcas_handle(apply_vcas(model, VCASConfig(seed=5, compact=compact)))
        for sampler in handle.samplers:
            sampler.ratio = 0.5
        for layer in handle.linears.values():
            layer.vcas_weight_ratio = 0.5
        batch = (skewed((10, 3, 6), seed=7), skewed((10, 3, 6), seed=8))
        weighted_sum_loss(model, batch).backward()  # the compacted blocks' first forward checks them
        entries = pick_entries(handle.layers, 0.5, torch.Generator().manual_seed(1))
        draws[compact] = two_backwards(model, handle, batch, weighted_sum_loss, handle.layers, entries)
        assert handle.runtime.mode.value == "full"
    on, off = draws[True], draws[False]
    assert on.full.keys() == on.exact.keys()  # every layer samples tokens here
    for kind in ("exact", "activation", "full"):
        for name, value in getattr(on, kind).items():
            torch.testing.assert_close(value, getattr(off, kind)[name], rtol=1e-10, atol=1e-12)
    for name in on.exact:  # the activation and token passes really sampled
        assert not torch.equal(on.exact[name], on.activation[name])
        assert not torch.equal(on.activation[name], on.full[name])
    for a, b in zip(on.norms, off.norms, strict=True):
        torch.testing.assert_close(a, b)


def test_sampled_training_steps_draw_the_same_samples_compacted_or_not() -> None:
    """Compaction changes where the backward runs, not what it draws: the same seeds give the
    same sampled gradients step after step (dropout, block and token sampling on), so runs
    and their accuracy tables do not change when compaction is switched on."""
    torch.manual_seed(0)
    base = DropoutNet()
    x, c, w = _dropout_inputs()
    steps = {}
    for compact in (True, False):
        model = copy.deepcopy(base).double()
        config = VCASConfig(seed=4, compact=compact, compact_max_ratio=1.0, direct_max_ratio=1.0)
        handle = vcas_handle(apply_vcas(model, config))
        assert bool(handle.compacted) == compact
        for sampler in handle.samplers:
            sampler.ratio = 0.5
        for layer in handle.linears.values():
            layer.vcas_weight_ratio = 0.5
        params = list(model.parameters())
        steps[compact] = [grads(_loss(model, x, c, w, seed=step), params) for step in range(4)]
    for step, (on, off) in enumerate(zip(steps[True], steps[False], strict=True)):
        torch.testing.assert_close(on, off, rtol=1e-10, atol=1e-12, msg=f"step {step}")
    assert not torch.equal(steps[True][1], steps[True][2])  # new draws every step


def test_compacted_blocks_keep_fewer_activations_than_dense() -> None:
    """Counted by the allocator (what is really held between forward and backward)."""
    depth, dim, hidden = 4, 16, 64
    torch.manual_seed(0)
    dense = stack(depth=depth, dim=dim, hidden=hidden)
    model = copy.deepcopy(dense)
    apply_vcas(model, ALWAYS)
    x = skewed((32, 10, dim), seed=1).requires_grad_(True)
    held_by_forward(model, x)  # the first forward checks the blocks
    compact, plain = held_by_forward(model, x), held_by_forward(dense, x)
    # Dense keeps each block's norm output (fc1's input), the norm's means and rstds, fc1's output
    # and GELU's output (fc2's input); the compacted block its two Linears' outputs. Both keep each
    # block's output (the next one's input) and the scalar loss.
    item = x.element_size()  # float64
    row = x.numel() * item  # one (32, 10, dim) tensor
    assert compact == depth * (row * hidden // dim + row + row) + item
    assert compact < 0.75 * plain


def test_remove_vcas_restores_the_blocks_forward() -> None:
    model = stack(depth=2)
    apply_vcas(model)
    assert all("forward" in vars(block) for block in model)
    remove_vcas(model)
    assert not any("forward" in vars(block) for block in model)
    x = skewed((4, 3, 6), seed=1)
    assert model(x).grad_fn.name() == "AddBackward0"
