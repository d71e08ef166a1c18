"""VCAS's fused token draw (the C++ ``greenprop.leverage_rows`` op) against the PyTorch draw, and
its fallback."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from greenprop import kernels
from greenprop.errors import GreenpropError
from greenprop.vcas import samplers
from greenprop.vcas.samplers import sampled_weight_grad, soft_topk_probabilities

SETTINGS = settings(
    max_examples=80,
    deadline=None,
    # op_calls only patches module attributes, the same for every example
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
#: How far the fused rows may lie from the PyTorch path's: float rounding of 1/p, or one unit
#: in the last place of a 16-bit side scaled by a 1/p that differs in its float rounding.
RTOL = {torch.float64: 1e-5, torch.float32: 1e-5, torch.bfloat16: 2**-7, torch.float16: 2**-10}

needs_kernels = pytest.mark.skipif(not kernels.load(), reason="the C++ op could not be built here")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def op_calls(monkeypatch) -> list[int]:
    """Every token matrix is drawn from by the op (by default small ones take PyTorch ops);
    the returned list grows by one per call of the op."""
    monkeypatch.setattr(kernels, "DRAW_MIN_NUMEL", 1)
    calls: list[int] = []
    op = kernels.leverage_rows
    monkeypatch.setattr(kernels, "leverage_rows", lambda *args: calls.append(1) or op(*args))
    return calls


def _kept(dy, x, ratio, seed, among, fused):
    """``_kept_rows`` on the fused or the PyTorch path, and the generator's state after it."""
    gen = _gen(seed)
    with kernels.use_kernels(fused):
        rows = samplers._kept_rows(dy, x, ratio, gen, among)
    return rows, gen.get_state()


def _near_a_tie(dy, x, ratio, seed, among) -> bool:
    """Whether a uniform number lies within float rounding of its probability (where the two
    paths' differently rounded scores may decide differently)."""
    scores = samplers.leverage_scores(dy, x)
    if among is not None:
        positions, total = among
        scores = scores.new_zeros(total).index_copy_(0, positions, scores)
    p = soft_topk_probabilities(scores, ratio * scores.numel())
    u = torch.rand(p.numel(), generator=_gen(seed), dtype=p.dtype)
    return bool(((u - p).abs() <= 1e-6 * p).any())


def _assert_same_rows(got, want, dtype) -> None:
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype == dtype and g.shape == w.shape
        torch.testing.assert_close(g, w, rtol=RTOL[dtype], atol=0)


magnitudes = st.one_of(st.just(0.0), st.floats(2**-6, 1e3))


@needs_kernels
@SETTINGS
@given(
    rows=st.lists(st.tuples(magnitudes, magnitudes), min_size=1, max_size=48),
    widths=st.tuples(st.integers(1, 12), st.integers(1, 12)),
    ratio=st.floats(0.01, 0.99),
    dtype=st.sampled_from(list(RTOL)),
    extra=st.one_of(st.none(), st.integers(0, 40)),
    seed=st.integers(0, 2**16),
)
def test_op_draws_as_the_pytorch_path(rows, widths, ratio, dtype, extra, seed, op_calls):
    """Same kept rows, same 1/p up to rounding, same generator state after; with zero scores,
    skewed scores (some kept surely), fewer positive scores than k, and ``among`` (the rows are
    some positions of more tokens, every other one of score zero)."""
    gen = _gen(seed)
    mags = torch.tensor(rows, dtype=torch.float64)
    dy = (torch.randn(len(rows), widths[0], generator=gen, dtype=torch.float64) * mags[:, :1]).to(dtype)
    x = (torch.randn(len(rows), widths[1], generator=gen, dtype=torch.float64) * mags[:, 1:]).to(dtype)
    among = None
    if extra is not None:
        total = len(rows) + extra
        among = (torch.randperm(total, generator=gen)[: len(rows)].sort().values, total)
    assume(not _near_a_tie(dy, x, ratio, seed, among))
    before = len(op_calls)
    want, want_state = _kept(dy, x, ratio, seed, among, fused=False)
    assert len(op_calls) == before
    got, got_state = _kept(dy, x, ratio, seed, among, fused=True)
    assert len(op_calls) == before + 1
    _assert_same_rows(got, want, dtype)
    assert torch.equal(got_state, want_state)


@needs_kernels
@pytest.mark.parametrize("among", [False, True])
def test_op_sorts_where_the_fixed_point_does_not_settle(among, op_calls):
    """Scores falling by 10x cap one or two more items each round: more rounds than the fixed
    point is given, so the level comes from the sort (on both paths). The many small scores
    after them make the sort's answer fewer capped items than its ``ceil(k) - 1`` guard."""
    falling = 10.0 ** -torch.arange(30, dtype=torch.float64)
    scores = torch.cat([falling, torch.full((100,), 3e-12, dtype=torch.float64)])
    n, k = scores.numel(), samplers._WATER_ROUNDS + 5.0
    assert samplers._water_level(scores, k) is None
    assert int((samplers._water_level_sorted(scores, k) == 1).sum()) < k - 2
    dy, x = scores.unsqueeze(1), torch.ones(n, 1, dtype=torch.float64)  # leverage = scores, exactly
    positions = torch.arange(n) * 2
    for seed in range(20):
        args = (dy, x, k / (2 * n), seed, (positions, 2 * n)) if among else (dy, x, k / n, seed, None)
        want, want_state = _kept(*args, fused=False)
        got, got_state = _kept(*args, fused=True)
        _assert_same_rows(got, want, torch.float64)
        assert torch.equal(got_state, want_state)
    assert op_calls


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fewer_positive_scores_than_k_keeps_them_all_and_still_draws(dtype, op_calls):
    dy = torch.randn(20, 3).to(dtype)
    x = torch.randn(20, 5).to(dtype)
    dy[[1, 4, 5, 9, 11, 12, 13, 17]] = 0
    x[[0, 2, 3, 6, 7, 8, 10, 14]] = 0  # positive scores: 15, 16, 18, 19 (4 < k = 0.3 * 20)
    gen = _gen(3)
    dy_k, x_k = samplers._kept_rows(dy, x, 0.3, gen, None)
    live = [15, 16, 18, 19]
    assert torch.equal(dy_k, dy[live]) and torch.equal(x_k, x[live])  # scale 1
    after = _gen(3)
    torch.rand(20, generator=after)  # the 20 uniform numbers of the PyTorch draw
    assert torch.equal(gen.get_state(), after.get_state())
    assert op_calls


@needs_kernels
def test_weight_grad_through_the_op_is_exact_where_every_token_is_kept(op_calls):
    dy, x = torch.randn(12, 4, dtype=torch.float64), torch.randn(12, 6, dtype=torch.float64)
    live = torch.tensor([2, 5, 7])
    grad, used = sampled_weight_grad(dy[live], x[live], 0.5, _gen(0), among=(live, 12))
    assert used == 3 and op_calls
    torch.testing.assert_close(grad, dy[live].t() @ x[live], rtol=0, atol=0)


@needs_kernels
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_score_that_is_not_finite_is_named(bad, op_calls):
    dy, x = torch.randn(10, 3), torch.randn(10, 4)
    x[6, 1] = bad
    with pytest.raises(GreenpropError, match="finite"):
        sampled_weight_grad(dy, x, 0.5, _gen(0))
    assert op_calls


def test_pytorch_path_where_the_op_does_not_serve(monkeypatch):
    """Disabled kernels, small matrices, x in another dtype than dy: the PyTorch ops draw."""
    calls: list[int] = []
    monkeypatch.setattr(kernels, "leverage_rows", lambda *args: calls.append(1))
    monkeypatch.setattr(kernels, "load", lambda: True)
    dy, x = torch.randn(40, 8), torch.randn(40, 8)
    with kernels.use_kernels(False):
        monkeypatch.setattr(kernels, "DRAW_MIN_NUMEL", 1)
        sampled_weight_grad(dy, x, 0.5, _gen(0))
    sampled_weight_grad(dy, x.double(), 0.5, _gen(0))
    monkeypatch.setattr(kernels, "DRAW_MIN_NUMEL", dy.numel() + 1)
    sampled_weight_grad(dy, x, 0.5, _gen(0))
    assert not calls
    monkeypatch.setattr(kernels, "DRAW_MIN_NUMEL", dy.numel())
    sampled_weight_grad(dy, x, 0.5, _gen(0))  # the stub's None sends it on to the PyTorch ops
    assert calls
