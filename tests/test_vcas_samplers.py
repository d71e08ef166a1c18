"""VCAS samplers: soft top-k structure, unbiasedness by statistics, exactness, seeding."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from greenprop import kernels
from greenprop.errors import GreenpropError
from greenprop.metering.flops import flop_counter
from greenprop.vcas import samplers
from greenprop.vcas.samplers import (
    activation_sample,
    leverage_sample,
    leverage_scores,
    row_norms,
    sample_mask,
    sample_rows,
    sampled_weight_grad,
    soft_topk_probabilities,
)

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
DRAWS = 4000


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------
# soft_topk_probabilities


score_lists = st.lists(
    st.one_of(st.just(0.0), st.floats(2**-10, 1e4, width=32)),
    min_size=1,
    max_size=40,
)


@SETTINGS
@given(values=score_lists, frac=st.floats(0.01, 1.0))
def test_soft_topk_water_filling_properties(values: list[float], frac: float) -> None:
    s = torch.tensor(values, dtype=torch.float32)
    n = s.numel()
    k = frac * n
    p = soft_topk_probabilities(s, k)
    assert p.shape == s.shape and p.dtype == torch.float32
    assert bool(((p >= 0) & (p <= 1)).all())
    assert math.isclose(p.sum().item(), k, rel_tol=1e-5, abs_tol=1e-5)
    pos = s > 0
    n_pos = int(pos.sum())
    if k <= n_pos:
        # zero scores are never sampled; positive ones always can be
        assert bool((p[~pos] == 0).all())
        assert bool((p[pos] > 0).all())
        # uncapped items share one constant c = p / s; capped items have c * s >= 1
        free = pos & (p < 1)
        if bool(free.any()):
            c = p[free] / s[free]
            torch.testing.assert_close(c, c.expand_as(c).mean().expand_as(c), rtol=1e-4, atol=0)
            capped = p == 1
            if bool(capped.any()):
                assert (c.mean() * s[capped]).min().item() >= 1 - 1e-4
                # the capped items are the largest scores
                assert s[capped].min().item() >= s[free].max().item()
    else:
        # too few positive scores: all of them kept, the remainder spread evenly over zeros
        assert bool((p[pos] == 1).all())
        torch.testing.assert_close(p[~pos], torch.full_like(p[~pos], (k - n_pos) / (n - n_pos)))
    # monotone: a larger score never gets a smaller probability
    order = torch.argsort(s)
    assert bool((p[order].diff() >= -1e-6).all())


@SETTINGS
@given(values=score_lists)
def test_soft_topk_exact_ones_at_k_equal_n(values: list[float]) -> None:
    s = torch.tensor(values)
    p = soft_topk_probabilities(s, s.numel())
    assert torch.equal(p, torch.ones_like(p))


@SETTINGS
@given(values=score_lists, frac=st.floats(0.01, 1.0))
def test_soft_topk_fixed_point_equals_the_sort(values: list[float], frac: float) -> None:
    """The sort-free water level (the usual path) gives the sort's probabilities."""
    s = torch.tensor(values, dtype=torch.float64)
    k = frac * s.numel()
    assume(k < int((s > 0).sum()))  # the other cases never reach the water level
    level = samplers._water_level(s, k)
    if level is not None:
        torch.testing.assert_close((level * s).clamp(max=1.0), samplers._water_level_sorted(s, k))
    torch.testing.assert_close(soft_topk_probabilities(s, k), samplers._water_level_sorted(s, k))


@SETTINGS
@given(values=score_lists, frac=st.floats(0.01, 1.0), dtype=st.sampled_from([torch.float32, torch.float64]))
def test_water_level_shortcut_equals_the_pass(values: list[float], frac: float, dtype: torch.dtype) -> None:
    """Given the largest score, a first round that caps nothing ends without a pass, at the same level."""
    s = torch.tensor(values, dtype=dtype).to(torch.float64)
    k = frac * s.numel()
    assume(k < int((s > 0).sum()))
    highest = float(s.max())
    assert samplers._water_level(s, k, highest) == samplers._water_level(s, k)


def test_water_level_shortcut_skips_the_pass_only_when_nothing_is_capped(monkeypatch) -> None:
    s = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    passes = []
    original = torch.Tensor.__mul__
    monkeypatch.setattr(torch.Tensor, "__mul__", lambda t, c: passes.append(c) or original(t, c))
    assert samplers._water_level(s, 2.0, 4.0) == 0.2  # 4 * 2/10 < 1: nothing capped, no pass
    assert passes == []
    assert samplers._water_level(s, 3.0, 4.0) is not None  # 4 * 3/10 >= 1: the pass runs
    assert len(passes) >= 1


def test_soft_topk_falls_back_to_the_sort_when_the_fixed_point_is_slow() -> None:
    # Scores falling by 10x: every round caps one more item, more rounds than allowed.
    s = 10.0 ** -torch.arange(30, dtype=torch.float64)
    k = samplers._WATER_ROUNDS + 5.0
    assert samplers._water_level(s, k) is None
    p = soft_topk_probabilities(s, k)
    torch.testing.assert_close(p, samplers._water_level_sorted(s, k))
    assert math.isclose(float(p.sum()), k, rel_tol=1e-9)
    assert bool((p[: int(k) - 1] == 1).all())


def test_soft_topk_known_values() -> None:
    s = torch.tensor([10.0, 1.0, 1.0, 1.0])
    # k = 0.5: nothing capped, p proportional to s
    torch.testing.assert_close(soft_topk_probabilities(s, 0.5), s * 0.5 / 13)
    # k = 2: the big item is capped, the other three share the remaining 1
    torch.testing.assert_close(soft_topk_probabilities(s, 2), torch.tensor([1.0, 1 / 3, 1 / 3, 1 / 3]))
    # float64 stays float64; integer scores are promoted
    assert soft_topk_probabilities(s.double(), 2).dtype == torch.float64
    assert soft_topk_probabilities(torch.tensor([3, 1, 0]), 1).dtype == torch.float32


def test_soft_topk_zero_scores() -> None:
    s = torch.tensor([3.0, 0.0, 0.0, 1.0])
    torch.testing.assert_close(soft_topk_probabilities(s, 1.0), torch.tensor([0.75, 0.0, 0.0, 0.25]))
    torch.testing.assert_close(soft_topk_probabilities(s, 2.0), torch.tensor([1.0, 0.0, 0.0, 1.0]))
    torch.testing.assert_close(soft_topk_probabilities(s, 3.0), torch.tensor([1.0, 0.5, 0.5, 1.0]))
    torch.testing.assert_close(soft_topk_probabilities(torch.zeros(4), 1.0), torch.full((4,), 0.25))


@pytest.mark.parametrize(
    ("scores", "k", "needle"),
    [
        (torch.ones(2, 2), 1, "1-D"),
        (torch.ones(0), 1, "empty"),
        (torch.tensor([1.0, float("nan")]), 1, "nan"),
        (torch.tensor([1.0, float("inf")]), 1, "inf"),
        (torch.tensor([1.0, -2.5]), 1, "-2.5"),
        (torch.ones(3), 0, "got 0"),
        (torch.ones(3), 3.5, "3.5"),
        (torch.ones(3), -1, "-1"),
        (torch.ones(3), True, "True"),
        (torch.ones(3), float("nan"), "nan"),
    ],
)
def test_soft_topk_bad_inputs_name_the_value(scores: torch.Tensor, k: float, needle: str) -> None:
    with pytest.raises(GreenpropError, match=needle):
        soft_topk_probabilities(scores, k)


# ---------------------------------------------------------------------------------------------
# sample_mask / sample_rows


def test_sample_mask_extremes_and_rates() -> None:
    p = torch.tensor([0.0, 1.0, 0.3])
    masks = torch.stack([sample_mask(p, _gen(i)) for i in range(2000)]).float()
    assert masks[:, 0].sum() == 0 and masks[:, 1].sum() == 2000
    rate = masks[:, 2].mean().item()
    assert abs(rate - 0.3) <= 5 * math.sqrt(0.3 * 0.7 / 2000)


def test_sample_rows_indices_and_scales() -> None:
    p = torch.tensor([1.0, 0.5, 0.0, 0.25])
    idx, scale = sample_rows(p, _gen(3))
    assert idx.dtype == torch.int64 and bool((idx.diff() > 0).all())
    assert 0 in idx.tolist() and 2 not in idx.tolist()
    torch.testing.assert_close(scale, 1 / p[idx])


@pytest.mark.parametrize(
    "bad", [torch.tensor([0.5, 1.5]), torch.tensor([-0.1]), torch.tensor([float("nan")])]
)
def test_sample_mask_rejects_bad_probs(bad: torch.Tensor) -> None:
    with pytest.raises(GreenpropError, match="probs"):
        sample_mask(bad)


def test_sample_rows_rejects_2d() -> None:
    with pytest.raises(GreenpropError, match="1-D"):
        sample_rows(torch.full((2, 2), 0.5))


# ---------------------------------------------------------------------------------------------
# unbiasedness by statistics


def _skewed_grad() -> torch.Tensor:
    """(16, 3, 2) gradient with per-sample norms spread over two orders of magnitude."""
    g = torch.randn(16, 3, 2, generator=_gen(11), dtype=torch.float64)
    return g * torch.logspace(-1, 1, 16, dtype=torch.float64).view(16, 1, 1)


def _assert_within(mean: torch.Tensor, exact: torch.Tensor, var: torch.Tensor, n: int) -> None:
    bound = 5 * (var / n).sqrt() + 1e-9
    err = (mean - exact).abs()
    assert bool((err <= bound).all()), f"max err/bound {(err / bound).max().item():.2f}"


def test_activation_sample_is_unbiased() -> None:
    grad, ratio = _skewed_grad(), 0.3
    n = grad.shape[0]
    p = soft_topk_probabilities(grad.reshape(n, -1).norm(dim=1), ratio * n)
    assert bool((p == 1).any()) and bool((p < 1).any())  # both regimes exercised
    gen = _gen(1)
    total = torch.zeros(grad.shape[1:], dtype=grad.dtype)
    unscaled = torch.zeros_like(total)
    for _ in range(DRAWS):
        idx, scale = activation_sample(grad, ratio, gen)
        rows = grad.index_select(0, idx)
        total += (rows * scale.view(-1, 1, 1)).sum(0)
        unscaled += rows.sum(0)
    exact = grad.sum(0)
    # Horvitz-Thompson variance per entry: sum_i a_i^2 (1/p_i - 1)
    var = (grad.pow(2) * (1 / p - 1).view(-1, 1, 1)).sum(0)
    _assert_within(total / DRAWS, exact, var, DRAWS)
    # the bound is tight enough to catch the biased estimator without 1/p
    err = (unscaled / DRAWS - exact).abs()
    assert bool((err > 5 * (var / DRAWS).sqrt()).any())


@pytest.mark.parametrize("fused", [False, True], ids=["pytorch", "fused-op"])
def test_sampled_weight_grad_is_unbiased(fused: bool, monkeypatch) -> None:
    """On the PyTorch path and through the fused C++ draw (:func:`greenprop.kernels.leverage_rows`)."""
    if fused:
        if not kernels.load():
            pytest.skip("the C++ op could not be built here")
        monkeypatch.setattr(kernels, "DRAW_MIN_NUMEL", 1)
    calls: list[int] = []
    op = kernels.leverage_rows
    monkeypatch.setattr(kernels, "leverage_rows", lambda *args: calls.append(1) or op(*args))
    dy = torch.randn(4, 8, 3, generator=_gen(5), dtype=torch.float64)
    x = torch.randn(4, 8, 5, generator=_gen(6), dtype=torch.float64)
    dy = dy * torch.logspace(-2, 1, 32, dtype=torch.float64).view(4, 8, 1)
    ratio = 0.25
    p = soft_topk_probabilities(leverage_scores(dy, x), ratio * 32)
    assert bool((p == 1).any()) and bool((p < 1).any())
    gen = _gen(2)
    total = torch.zeros(3, 5, dtype=torch.float64)
    for _ in range(DRAWS):
        total += sampled_weight_grad(dy, x, ratio, gen)[0]
    d2, x2 = dy.reshape(32, 3), x.reshape(32, 5)
    exact = d2.t() @ x2
    terms = d2.unsqueeze(2) * x2.unsqueeze(1)  # (T, out, in): token t's term of grad_W
    var = (terms.pow(2) * (1 / p - 1).view(-1, 1, 1)).sum(0)
    _assert_within(total / DRAWS, exact, var, DRAWS)
    assert len(calls) == (DRAWS if fused else 0)


# ---------------------------------------------------------------------------------------------
# exactness at ratio 1, leverage scores, the dense gathered matmul, seeding


def test_ratio_one_is_exact_and_draws_nothing() -> None:
    grad = torch.randn(6, 4)
    gen = _gen(9)
    state = gen.get_state()
    idx, scale = activation_sample(grad, 1.0, gen)
    assert torch.equal(idx, torch.arange(6)) and torch.equal(scale, torch.ones(6))
    dy, x = torch.randn(2, 5, 3), torch.randn(2, 5, 4)
    assert torch.equal(sampled_weight_grad(dy, x, 1.0, gen)[0], dy.reshape(10, 3).t() @ x.reshape(10, 4))
    idx, scale = leverage_sample(dy, x, 1, gen)
    assert torch.equal(idx, torch.arange(10)) and torch.equal(scale, torch.ones(10))
    assert torch.equal(gen.get_state(), state)


@pytest.mark.parametrize("ratio", [1.0, 0.6])
def test_activation_sample_leaves_zero_rows_out(ratio: float) -> None:
    grad = _skewed_grad()
    grad[[2, 9]] = 0
    norms = row_norms(grad)
    assert norms.dtype == torch.float64 and bool((norms[[2, 9]] == 0).all())
    torch.testing.assert_close(norms, grad.reshape(16, -1).norm(dim=1))
    for seed in range(50):
        idx, scale = activation_sample(grad, ratio, _gen(seed), norms=norms)
        assert 2 not in idx.tolist() and 9 not in idx.tolist()
        # the given norms are the ones it would compute: the same draw
        again = activation_sample(grad, ratio, _gen(seed))
        assert torch.equal(idx, again[0]) and torch.equal(scale, again[1])
    if ratio == 1.0:
        assert idx.tolist() == [i for i in range(16) if i not in (2, 9)]


def test_leverage_scores_are_row_norm_products() -> None:
    dy, x = torch.randn(2, 5, 3), torch.randn(2, 5, 4)
    expected = dy.reshape(10, 3).norm(dim=1) * x.reshape(10, 4).norm(dim=1)
    torch.testing.assert_close(leverage_scores(dy, x), expected)
    with pytest.raises(GreenpropError, match="leading dims"):
        leverage_scores(torch.randn(2, 5, 3), torch.randn(2, 4, 4))


def test_sampled_weight_grad_runs_one_smaller_matmul() -> None:
    dy, x = torch.randn(64, 16), torch.randn(64, 32)
    idx, _ = leverage_sample(dy, x, 0.25, _gen(4))
    assert 0 < idx.numel() < 64
    with flop_counter() as counter:
        gw, used = sampled_weight_grad(dy, x, 0.25, _gen(4))
    assert gw.shape == (16, 32) and used == idx.numel()
    assert counter.get_total_flops() == 2 * 16 * 32 * idx.numel()
    # No token at all (every sample dropped): the exact, empty sum, nothing drawn.
    gen = _gen(4)
    state = gen.get_state()
    gw, used = sampled_weight_grad(dy[:0], x[:0], 0.25, gen)
    assert used == 0 and torch.equal(gw, torch.zeros(16, 32)) and torch.equal(gen.get_state(), state)


def test_seeded_generator_reproduces_draws() -> None:
    grad = _skewed_grad()
    a = activation_sample(grad, 0.4, _gen(7))
    b = activation_sample(grad, 0.4, _gen(7))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    draws = {tuple(activation_sample(grad, 0.4, _gen(s))[0].tolist()) for s in range(10)}
    assert len(draws) > 1
    dy, x = torch.randn(40, 3), torch.randn(40, 5)
    (a, a_used), (b, b_used) = (sampled_weight_grad(dy, x, 0.3, _gen(8)) for _ in range(2))
    assert torch.equal(a, b) and a_used == b_used


@pytest.mark.parametrize("ratio", [0, 1.5, -0.1, True, float("nan")])
def test_bad_ratio_is_named(ratio: float) -> None:
    with pytest.raises(GreenpropError, match="ratio"):
        activation_sample(torch.randn(4, 2), ratio)
    with pytest.raises(GreenpropError, match="ratio"):
        sampled_weight_grad(torch.randn(4, 2), torch.randn(4, 3), ratio)


# ---------------------------------------------------------------------------------------------
# devices


def test_draws_follow_the_generator_not_the_tensor_device():
    """Draws come from the (CPU) generator and land on the probabilities' device; same seed, same draw."""
    probs = torch.full((1000,), 0.3)
    a = sample_mask(probs, torch.Generator().manual_seed(5))
    b = sample_mask(probs, torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and a.device == probs.device
    assert 200 < int(a.sum()) < 400


def _old_positive_draw(
    scores: torch.Tensor, k: float, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """The draw as written before the zero-score filter was skipped: filter every draw."""
    idx, scale = samplers._draw_rows(soft_topk_probabilities(scores, k), gen)
    keep = scores.index_select(0, idx) > 0
    return idx[keep], scale[keep]


@SETTINGS
@given(values=score_lists, frac=st.floats(0.01, 1.0), seed=st.integers(0, 2**16))
def test_draw_skips_the_zero_filter_only_where_it_filters_nothing(
    values: list[float], frac: float, seed: int
) -> None:
    """The draw without the filter on the water-level path, and without the comparison where every
    positive score is kept surely, gives the filtered draw: same rows, same 1/p, and the generator
    left in the same state (the draws after it are the same too; bf16 scores draw float32)."""
    for dtype in (torch.bfloat16, torch.float32, torch.float64):
        s = torch.tensor(values, dtype=dtype)
        k = frac * s.numel()
        gen, old_gen = _gen(seed), _gen(seed)
        idx, scale = samplers._draw_positive(s, k, gen)
        old_idx, old_scale = _old_positive_draw(s, k, old_gen)
        assert torch.equal(idx, old_idx) and torch.equal(scale, old_scale)
        assert scale.dtype == old_scale.dtype
        assert torch.equal(gen.get_state(), old_gen.get_state())
        assert bool((s[idx] > 0).all())


@pytest.mark.parametrize("live", [3, 10, 24])
def test_sampled_weight_grad_among_live_tokens_draws_as_on_all_tokens(live: int) -> None:
    """Given only the tokens whose dy may be non-zero (``among``), the draw and the estimate are
    those of all tokens with zeros in between: same generator, same result, same token count.
    Few live tokens (3 of 30 at ratio 0.3) take the spread-over-zeros path, many the water level."""
    total, ratio = 30, 0.3
    positions = torch.randperm(total, generator=_gen(3))[:live].sort().values
    dy_live = torch.randn(live, 4, generator=_gen(4), dtype=torch.float64)
    x = torch.randn(total, 6, generator=_gen(5), dtype=torch.float64)
    dy = torch.zeros(total, 4, dtype=torch.float64).index_copy_(0, positions, dy_live)
    for seed in range(5):
        want, count = sampled_weight_grad(dy, x, ratio, _gen(seed))
        got, got_count = sampled_weight_grad(
            dy_live, x[positions], ratio, _gen(seed), among=(positions, total)
        )
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
        assert got_count == count > 0
    if live > ratio * total:  # a real draw: other seeds, other tokens
        draws = [
            sampled_weight_grad(dy_live, x[positions], ratio, _gen(s), among=(positions, total))
            for s in (0, 1)
        ]
        assert not torch.equal(draws[0][0], draws[1][0])
