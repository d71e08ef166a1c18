"""VCAS autograd layers: exact at ratio 1, unbiased when sampling, real FLOP savings."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from fixtures import (
    AuxLossBlock,
    NormLinearBlock,
    convnet,
    norm_linear_stack,
    stack,
    tiny_vit,
    token_batches,
    weighted_sum_loss,
)
from greenprop.errors import GreenpropError
from greenprop.metering.flops import flop_counter
from greenprop.vcas import VCASConfig, apply_vcas, direct_vit
from greenprop.vcas import layers as vcas_layers
from greenprop.vcas import samplers as vcas_samplers
from greenprop.vcas.layers import Mode, VCASLinear
from greenprop.vcas.surgery import vcas_handle
from vcas_helpers import draw, drop_rescale, grad_dict, grads, skewed, spy_draws, unbiased, z_scores

DRAWS = 2000  # sampled backward passes per unbiasedness check
NEGATIVE_DRAWS = 400  # enough to expose a biased estimator


pytestmark = pytest.mark.usefixtures("one_thread")


class TupleBlock(nn.Module):
    """Returns ``(output, aux)`` like many transformer layers; ``aux`` may carry gradient."""

    def __init__(self, dim: int, aux_grad: bool) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, dim)
        self.aux_grad = aux_grad

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = self.fc(x)
        aux = h.square().sum(dim=-1)
        return x + torch.tanh(h), aux if self.aux_grad else aux.detach()


class TupleNet(nn.Module):
    def __init__(self, dim: int, depth: int, aux_grad: bool) -> None:
        super().__init__()
        self.layers = nn.ModuleList(TupleBlock(dim, aux_grad) for _ in range(depth))

    def forward(self, x: Tensor) -> Tensor:
        """A scalar loss: the output plus the blocks' aux terms."""
        total = 0.0
        for layer in self.layers:
            x, aux = layer(x)
            total = total + 0.1 * aux.sum()
        return x.tanh().sum() + total


def _pair(compact: bool = True, **kwargs) -> tuple[nn.Sequential, nn.Sequential]:
    """A VCAS model and a plain copy with the same weights (loaded through state_dict)."""
    model = stack(**kwargs)
    reference = stack(**{**kwargs, "seed": 99})
    reference.load_state_dict(model.state_dict())
    apply_vcas(model, VCASConfig(seed=3, compact=compact, compact_max_ratio=1.0, direct_max_ratio=1.0))
    return model, reference


# ---------------------------------------------------------------------------------------------
# exact at ratio 1


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("input_grad", [True, False])
@pytest.mark.parametrize("compact", [True, False])
def test_ratio_one_equals_dense_autograd(dims: int, bias: bool, input_grad: bool, compact: bool) -> None:
    model, reference = _pair(compact, depth=3, bias=bias)
    handle = vcas_handle(model)
    assert handle.runtime.mode is Mode.FULL
    assert all(s.ratio == 1.0 for s in handle.samplers)
    assert all(type(m) is VCASLinear and m.vcas_weight_ratio == 1.0 for m in handle.linears.values())
    shape = (7, 6) if dims == 2 else (7, 4, 6)
    x = skewed(shape, seed=1)
    target = skewed(shape, seed=2)
    model(x)  # a compacted block's first forward checks it (uncompacted); the next one is compacted
    inputs = []
    for net in (model, reference):
        xi = x.clone().requires_grad_(input_grad)
        (net(xi).tanh() * target).sum().backward()
        inputs.append(xi)
    got, expected = grad_dict(model), grad_dict(reference)
    assert got.keys() == expected.keys() and len(got) == 3 * (6 if bias else 4)
    for name in expected:
        assert torch.equal(got[name], expected[name]), name
    if input_grad:
        assert torch.equal(inputs[0].grad, inputs[1].grad)
    else:
        assert inputs[0].grad is None
    # Every row was kept and nothing was saved.
    tally = handle.runtime.take_tally()
    assert tally.done == tally.dense > 0
    assert tally.rows == {i: [7, 7] for i in range(3)} and tally.samples == 7


@pytest.mark.parametrize("direct", [True, False])
def test_ratio_one_vit_equals_dense_autograd_on_digits(digits, direct: bool) -> None:
    """Both compaction paths: the ViT block's direct rule (the default) and the re-run."""
    model = tiny_vit().double()
    reference = tiny_vit(seed=5).double()
    reference.load_state_dict(model.state_dict())
    config = VCASConfig(compact_max_ratio=1.0, direct_max_ratio=1.0, direct=direct)
    handle = vcas_handle(apply_vcas(model, config))
    assert [s.name for s in handle.samplers] == ["blocks.0", "blocks.1"]
    x, y = digits.train[:24]
    model(x.double())  # the compacted blocks' first forward checks them
    nodes = _graph_nodes(model(x.double()))
    assert "_DirectBlockBackward" in nodes if direct else "_CompactedBlockBackward" in nodes
    for net in (model, reference):
        F.cross_entropy(net(x.double()), y).backward()
    got, expected = grad_dict(model), grad_dict(reference)
    assert got.keys() == expected.keys() == dict(model.named_parameters()).keys()
    # Re-run: bit for bit; direct: the last block sums over the live (cls) token only.
    tol = {"rtol": 1e-12, "atol": 1e-14} if direct else {"rtol": 0, "atol": 0}
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], **tol, msg=name)


# ---------------------------------------------------------------------------------------------
# unbiased by statistics (both samplers, every parameter)


def _setup_unbiasedness(
    activation: tuple[float, float], weight: dict[str, float], compact: bool = True
) -> tuple[nn.Module, Tensor, list[Tensor], Tensor]:
    """A 2-block float64 model with the given ratios, ONE fixed forward graph and the exact gradient.

    A forward before that one lets compacted blocks check themselves (their first forward
    runs the uncompacted path), so the draws go through the compacted backward.
    """
    model, reference = _pair(compact, depth=2, dim=6, hidden=8)
    handle = vcas_handle(model)
    for sampler, ratio in zip(handle.samplers, activation, strict=True):
        sampler.ratio = ratio
    for name, ratio in weight.items():
        handle.linears[name].vcas_weight_ratio = ratio
    x, target = skewed((10, 3, 6), seed=4), skewed((10, 3, 6), seed=5)
    params = list(model.parameters())
    model(x)
    loss = (model(x).tanh() * target).sum()
    exact = grads((reference(x).tanh() * target).sum(), list(reference.parameters()))
    return model, loss, params, exact


CASES = {
    # activation sampling only: block 0 samples again among the rows block 1 kept
    "activation": ((0.3, 0.6), {}),
    # token (leverage) sampling only, on one Linear
    "token": ((1.0, 1.0), {"1.fc1": 0.3}),
    # both, every Linear
    "both": ((0.3, 0.6), dict.fromkeys(["0.fc1", "0.fc2", "1.fc1", "1.fc2"], 0.4)),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("compact", [True, False])
def test_sampled_gradients_are_unbiased(case: str, compact: bool) -> None:
    activation, weight = CASES[case]
    model, loss, params, exact = _setup_unbiasedness(activation, weight, compact)
    assert ("_CompactedBlockBackward" in _graph_nodes(loss)) is compact
    runtime = vcas_handle(model).runtime
    runtime.take_tally()
    draws = draw(loss, params, DRAWS)
    z, fixed_err = z_scores(draws, exact)
    assert unbiased(z), f"max |z| {z.abs().max():.2f}, mean |z| {z.abs().mean():.2f}"
    assert fixed_err < 1e-12
    # The draws really were random and really saved work.
    tally = runtime.take_tally()
    assert tally.done < tally.dense
    sizes = {name: p.numel() for name, p in model.named_parameters()}
    names = [name for name, n in sizes.items() for _ in range(n)]
    random_params = {names[i] for i in torch.nonzero(draws.std(0) > 0).squeeze(1).tolist()}
    if case == "token":
        # Token sampling changes only grad_W of its own layer: everything else is exact.
        assert random_params == {"1.fc1.weight"}
    else:
        assert random_params == set(sizes)  # every parameter sees the sampled rows
        kept, seen = tally.rows[1]
        assert seen == DRAWS * 10
        assert abs(kept / seen - 0.6) < 0.02  # soft top-k keeps ratio * N rows in expectation


@pytest.mark.parametrize("case", ["activation", "token"])
def test_unbiasedness_check_catches_a_missing_rescale(case: str, monkeypatch) -> None:
    """Without the 1/p factors the same statistics fail: the check above has teeth."""
    activation, weight = CASES[case]
    _, loss, params, exact = _setup_unbiasedness(activation, weight)
    if case == "activation":
        drop_rescale(monkeypatch, vcas_layers, "activation_sample")  # what the block samplers call
    else:
        drop_rescale(monkeypatch, vcas_samplers, "leverage_sample")  # what sampled_weight_grad calls
    z, fixed_err = z_scores(draw(loss, params, NEGATIVE_DRAWS), exact)
    assert fixed_err < 1e-12
    assert not unbiased(z)
    assert z.abs().max() > 10


def test_two_forwards_then_one_backward_stay_unbiased() -> None:
    """Each forward's Linears skip exactly the rows its own samplers dropped (e.g. two views)."""
    model, reference = _pair(depth=2)
    for sampler in vcas_handle(model).samplers:
        sampler.ratio = 0.5
    x1, x2 = skewed((10, 3, 6), seed=1), skewed((10, 3, 6), seed=2).flip(0)
    w1, w2 = skewed((10, 3, 6), seed=3), skewed((10, 3, 6), seed=4)

    def loss(net: nn.Module) -> Tensor:
        return (net(x1).tanh() * w1).sum() + (net(x2).tanh() * w2).sum()

    exact = grads(loss(reference), list(reference.parameters()))
    z, fixed_err = z_scores(draw(loss(model), list(model.parameters()), DRAWS // 2), exact)
    assert unbiased(z), f"max |z| {z.abs().max():.2f}"
    assert fixed_err < 1e-12


# ---------------------------------------------------------------------------------------------
# real savings: gathered rows, counted FLOPs, dropped rows stay dropped


def test_backward_flops_shrink_with_the_kept_rows_and_tokens(monkeypatch) -> None:
    n, t, dim, hidden = 16, 4, 8, 16
    model, reference = _pair(depth=2, dim=dim, hidden=hidden)
    handle = vcas_handle(model)
    handle.samplers[1].ratio = 0.5  # last block: drops samples
    handle.linears["0.fc2"].vcas_weight_ratio = 0.5  # one layer also samples tokens
    row_draws = spy_draws(monkeypatch, vcas_layers, "activation_sample")
    token_draws = spy_draws(monkeypatch, vcas_samplers, "leverage_sample")
    x = skewed((n, t, dim), seed=6).requires_grad_(True)
    w = skewed((n, t, dim), seed=7)
    loss = (model(x) * w).sum()
    handle.runtime.take_tally()
    with flop_counter() as counter:
        loss.backward()
    tally = handle.runtime.take_tally()

    assert len(row_draws) == 1 and len(token_draws) == 1  # block 0 (ratio 1) and the others draw nothing
    kept = row_draws[0].tolist()
    assert 0 < len(kept) < n
    assert tally.rows == {1: [len(kept), n], 0: [len(kept), n]}
    kept_tokens = token_draws[0].numel()
    assert 0 < kept_tokens < len(kept) * t
    expected = 0
    for name, layer in handle.linears.items():
        out_f, in_f = layer.weight.shape
        tokens = kept_tokens if name == "0.fc2" else len(kept) * t
        expected += 2 * len(kept) * t * out_f * in_f + 2 * tokens * out_f * in_f
    # Only the Linear layers run matmuls here: the counted backward is exactly their gathered work.
    assert counter.get_total_flops() == expected == tally.done

    dense_loss = (reference(x.detach()) * w).sum()
    with flop_counter() as dense_counter:
        dense_loss.backward()
    assert dense_counter.get_total_flops() == tally.dense == 4 * (4 * n * t * dim * hidden)  # 4 Linears

    # Once dropped, a sample's gradient stays exactly zero down to the input.
    dropped = sorted(set(range(n)) - set(kept))
    assert bool((x.grad[dropped] == 0).all())
    assert bool((x.grad[kept].abs().sum(dim=(1, 2)) > 0).all())


@pytest.mark.parametrize("layers", ["linear", "conv"])
def test_a_backward_that_drops_every_sample_costs_nothing(layers: str) -> None:
    if layers == "linear":
        model, x = stack(depth=2), skewed((4, 3, 6), seed=1)
        handle = vcas_handle(apply_vcas(model, VCASConfig(seed=3)))
    else:
        model, x = convnet(), skewed((4, 4, 9, 11), seed=1)
        handle = vcas_handle(apply_vcas(model))
    x.requires_grad_(True)
    # A compacted block learns its dense cost per sample from a backward that runs: block 0 is
    # compacted too once block 1 samples (it keeps at most block 1's rows), so learn it there.
    handle.samplers[1].ratio = 0.6
    model(x).sum().backward()
    handle.samplers[1].ratio = 0.05  # expected 0.2 of 4 samples kept
    for _ in range(50):
        model.zero_grad(set_to_none=True)
        x.grad = None
        loss = model(x).sum()
        handle.runtime.take_tally()
        with flop_counter() as counter:
            loss.backward()
        tally = handle.runtime.take_tally()
        if tally.rows[1][0] == 0:
            break
    else:
        pytest.fail("no draw dropped every sample")
    assert counter.get_total_flops() == tally.done == 0 < tally.dense
    assert bool((x.grad == 0).all())
    assert all(bool((p.grad == 0).all()) for p in model.parameters())


def test_vit_backward_flops_drop_in_proportion_to_kept_samples(digits, monkeypatch) -> None:
    # Every token: the last block's live-token saving is tested in test_vcas_direct_vit.py.
    monkeypatch.setattr(direct_vit._Columns, "of", classmethod(lambda cls, block, grad: None))
    model, reference = tiny_vit(), tiny_vit(seed=9)
    reference.load_state_dict(model.state_dict())
    handle = vcas_handle(apply_vcas(model, VCASConfig(seed=1)))
    handle.samplers[1].ratio = 0.5
    block_inputs: list[Tensor] = []
    model.blocks[0].register_forward_pre_hook(
        lambda m, args: block_inputs.append(args[0]) or args[0].retain_grad()
    )
    x, y = digits.train[:32]
    handle.runtime.take_tally()
    loss = F.cross_entropy(model(x), y)
    with flop_counter() as counter:
        loss.backward()
    tally = handle.runtime.take_tally()
    kept, seen = tally.rows[1]
    assert seen == 32 and 0 < kept < 32 and tally.rows[0] == [kept, 32]
    # With token ratios 1 every Linear's backward work scales exactly with the kept samples.
    assert tally.done / tally.dense == kept / 32
    dense_loss = F.cross_entropy(reference(x), y)
    with flop_counter() as dense_counter:
        dense_loss.backward()
    # Block 1 (its sampler at 0.5) is compacted: its Linears' and its attention's backward run
    # on the kept rows only, and the tally has both; block 0, at ratio 1, keeps block 1's
    # rows only, so it is compacted too (VCASRuntime.kept_ratio); the head and the patch
    # embedding run dense. The tally's saving is exactly what the backward did not run.
    ops, dense_ops = counter.get_flop_counts()["Global"], dense_counter.get_flop_counts()["Global"]
    attention = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
    per_block = dense_ops[attention] // 2
    assert per_block > 0 and ops[attention] == 2 * (per_block * kept // 32)
    attention_saved = dense_ops[attention] - ops[attention]
    assert ops[torch.ops.aten.mm] == dense_ops[torch.ops.aten.mm] - (tally.saved - attention_saved)
    assert counter.get_total_flops() == dense_counter.get_total_flops() - tally.saved
    rows_alive = block_inputs[0].grad.reshape(32, -1).ne(0).any(dim=1)
    assert int(rows_alive.sum()) == kept


@pytest.mark.parametrize("aux_grad", [False, True])
def test_tuple_outputs_are_sampled_on_their_first_item(aux_grad: bool) -> None:
    torch.manual_seed(0)
    model = TupleNet(5, 2, aux_grad).double()
    reference = TupleNet(5, 2, aux_grad).double()
    reference.load_state_dict(model.state_dict())
    handle = vcas_handle(apply_vcas(model, block_types=[TupleBlock]))
    assert [s.name for s in handle.samplers] == ["layers.0", "layers.1"]
    x = skewed((12, 5), seed=8)
    model(x).backward()
    reference(x).backward()
    for name, grad in grad_dict(reference).items():
        assert torch.equal(dict(model.named_parameters())[name].grad, grad), name

    handle.samplers[1].ratio = 0.25
    handle.runtime.take_tally()
    xg = x.clone().requires_grad_(True)
    model(xg).backward()
    kept = handle.runtime.take_tally().rows[1][0]
    alive = int(xg.grad.ne(0).any(dim=1).sum())
    assert 0 < kept < 12
    if not aux_grad:  # dropped samples stay dropped down to the input
        assert alive == kept
        return
    # The aux items reach each block's Linear around the sampler: every sample still gets a
    # gradient, and the sampled gradients must stay unbiased.
    assert alive == 12
    params = list(model.parameters())
    loss = model(x)
    exact = grads(reference(x), list(reference.parameters()))
    z, fixed_err = z_scores(draw(loss, params, DRAWS // 2), exact)
    assert unbiased(z), f"max |z| {z.abs().max():.2f}"
    assert fixed_err < 1e-12


def _graph_nodes(t: Tensor) -> set[str]:
    seen, stack, names = set(), [t.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        stack.extend(fn for fn, _ in node.next_functions)
    return names


@pytest.mark.parametrize("compact", [True, False])
def test_eval_and_no_grad_forwards_are_plain(compact: bool) -> None:
    model, reference = _pair(compact, depth=2)
    handle = vcas_handle(model)
    for s in handle.samplers:
        s.ratio = 0.2
    for layer in handle.linears.values():
        layer.vcas_weight_ratio = 0.2
    x = skewed((9, 3, 6), seed=10)
    train_nodes = _graph_nodes(model(x))
    if compact:  # the layers' Functions live in the graph of the backward's re-run
        assert "_CompactedBlockBackward" in train_nodes and "_VCASLinearFunctionBackward" not in train_nodes
    else:
        assert {"_SampleGradientBackward", "_VCASLinearFunctionBackward"} <= train_nodes

    model.eval()
    reference.eval()
    out = model(x)
    assert not any(word in n for n in _graph_nodes(out) for word in ("VCAS", "SampleGradient", "Compacted"))
    assert torch.equal(out, reference(x))
    out.sum().backward()
    reference(x).sum().backward()
    for name, grad in grad_dict(reference).items():
        assert torch.equal(dict(model.named_parameters())[name].grad, grad), name
    assert handle.runtime.tally.dense == 0  # the VCAS backward never ran

    model.train()
    with torch.no_grad():
        out = model(x)
    assert out.grad_fn is None and torch.equal(out, reference(x))


# ---------------------------------------------------------------------------------------------
# edge cases: shared layers, bf16 autocast, gradient that bypasses the sampler


def test_a_layer_shared_by_two_blocks_is_refused_naming_it():
    shared = nn.Linear(6, 6)
    model = nn.Sequential(NormLinearBlock(shared), NormLinearBlock(shared))
    with pytest.raises(GreenpropError, match=r"1\.fc is shared by blocks '0' and '1'"):
        apply_vcas(model)
    assert type(shared) is nn.Linear and vcas_handle(model) is None  # nothing converted


@pytest.mark.parametrize("ratio", [1.0, 0.5])
def test_bf16_autocast_backward_runs_and_matches_dtypes(ratio: float):
    model = norm_linear_stack()
    handle = vcas_handle(apply_vcas(model))
    for sampler in handle.samplers:
        sampler.ratio = ratio
    for layer in handle.linears.values():
        layer.vcas_weight_ratio = ratio
    x, w = next(token_batches())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = weighted_sum_loss(model, (x, w))
    loss.backward()
    for p in model.parameters():
        assert p.grad is not None and p.grad.dtype == p.dtype == torch.float32
        assert torch.isfinite(p.grad).all()
    if ratio == 1.0:  # exact path: close to the plain model's bf16 gradient
        plain = norm_linear_stack()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            weighted_sum_loss(plain, (x, w)).backward()
        for got, want in zip(model.parameters(), plain.parameters(), strict=True):
            torch.testing.assert_close(got.grad, want.grad, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("aux", [False, True])
def test_check_rows_catches_gradient_that_bypasses_the_sampler(aux: bool):
    model = norm_linear_stack(depth=2, block=AuxLossBlock if aux else NormLinearBlock)
    handle = vcas_handle(apply_vcas(model, VCASConfig(check_rows=True)))
    for sampler in handle.samplers:
        sampler.ratio = 0.3
    x, w = next(token_batches())
    loss = weighted_sum_loss(model, (x, w))
    if aux:
        loss = loss + sum(b.aux for b in model)
        with pytest.raises(GreenpropError, match=r"check_rows: VCASLinear in block 1 received gradient"):
            loss.backward()
    else:
        loss.backward()  # the assumptions hold: nothing to report
        assert all(p.grad is not None for p in model.parameters())


def _old_sample(grad: Tensor, alive: Tensor, scale: Tensor) -> Tensor:
    """BlockSampler.sample as written before: zeros, then the kept rows gathered, rescaled, scattered."""
    shape = (-1,) + (1,) * (grad.dim() - 1)
    out = torch.zeros_like(grad)
    out.index_copy_(0, alive, (grad.index_select(0, alive) * scale.view(shape)).to(grad.dtype))
    return out


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    rows=st.integers(1, 24),
    inner=st.lists(st.integers(1, 5), min_size=0, max_size=3),
    ratio=st.floats(0.05, 1.0),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
    seed=st.integers(0, 2**16),
)
def test_one_pass_rescaling_equals_the_gather_scale_scatter(
    rows: int, inner: list[int], ratio: float, dtype: torch.dtype, seed: int
) -> None:
    """BlockSampler.sample (rows times their weights) and scaled_rows give the old formulas' tensors."""
    gen = torch.Generator().manual_seed(seed)
    spread = torch.rand(rows, *([1] * len(inner)), generator=gen) ** 3  # skewed sample norms
    grad = (torch.randn(rows, *inner, generator=gen) * spread).to(dtype)
    grad[torch.rand(rows, generator=gen) < 0.2] = 0  # some all-zero samples
    runtime = vcas_layers.VCASRuntime(torch.Generator().manual_seed(seed), torch.Generator())
    sampler = vcas_layers.BlockSampler(0, "block", runtime, ratio=ratio)
    new = sampler.sample(grad)
    runtime.activation_generator.manual_seed(seed)
    alive, scale = sampler.draw(grad)
    if scale is None:  # ratio 1: the gradient itself
        assert new is grad
        return
    assert new.dtype == grad.dtype and torch.equal(new, _old_sample(grad, alive, scale))
    shape = (-1,) + (1,) * (grad.dim() - 1)
    old_kept = (grad.index_select(0, alive) * scale.view(shape)).to(grad.dtype)
    assert torch.equal(vcas_layers.scaled_rows(grad, alive, scale), old_kept)


