"""Pure samplers of VCAS (variance-controlled adaptive sampling), no state.

VCAS replaces two exact sums in the backward pass by unbiased estimates that touch
fewer rows:

* **data dimension** (:func:`activation_sample`): a block's input gradient is a stack of
  per-sample gradients; keep sample ``i`` with probability ``p_i`` and scale it by
  ``1/p_i``. The weight gradient of every earlier layer is a sum over samples, so its
  expectation is unchanged while the dropped rows cost nothing further back.
* **token dimension** (:func:`sampled_weight_grad`): a Linear layer's
  ``grad_W = dy^T x = sum_t dy_t^T x_t`` is a sum over tokens; keep token ``t`` with
  probability ``p_t`` from its leverage score ``||dy_t|| * ||x_t||`` and rescale. On CPU
  this draw runs as one C++ op of :mod:`greenprop.kernels` where that serves, on the
  same uniform numbers: the same draw up to the float rounding of the scores.

Both are Horvitz-Thompson estimators: ``E[sum_{kept} a_i / p_i] = sum_i a_i`` for any
``p_i > 0`` (and ``p_i = 0`` is harmless where ``a_i = 0``). For an expected count
``sum p_i = k`` the variance ``sum_i ||a_i||^2 (1/p_i - 1)`` is smallest when ``p_i`` is
proportional to ``||a_i||`` (Lagrange multiplier), subject to ``p_i <= 1``: that is the
"soft top-k" of :func:`soft_topk_probabilities`. Large items are kept surely, small
ones occasionally with a large weight.

The autograd layers in :mod:`greenprop.vcas.layers` draw through these functions. All
randomness comes from an optional ``torch.Generator``, so a seeded generator reproduces a
draw exactly.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

from greenprop import kernels
from greenprop.errors import GreenpropError

__all__ = [
    "activation_sample",
    "leverage_sample",
    "leverage_scores",
    "row_norms",
    "sample_mask",
    "sample_rows",
    "sampled_weight_grad",
    "soft_topk_probabilities",
]


def _prob_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 at least (bf16/fp16 probabilities would make 1/p too coarse), float64 kept."""
    return torch.promote_types(dtype, torch.float32)


def _check_ratio(ratio: float) -> float:
    if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real) or not 0.0 < ratio <= 1.0:
        raise GreenpropError(f"ratio must be a number in (0, 1], got {ratio!r}")
    return float(ratio)


def soft_topk_probabilities(scores: Tensor, k: float) -> Tensor:
    """Inclusion probabilities ``p_i = min(1, c * s_i)`` with ``c`` such that ``sum p = k``.

    This "water-filling" solution minimises the Horvitz-Thompson variance
    ``sum s_i^2 (1/p_i - 1)`` among all ``p`` with expected count ``k`` (see the module
    docstring); the items capped at 1 are the largest scores, kept surely.

    Zero scores get ``p = 0`` (dropping a zero row adds no variance) unless fewer than
    ``k`` scores are positive: then every positive item gets 1 and the remaining
    ``k - n_positive`` is spread uniformly over the zero-score items, so the expected
    count is still exactly ``k``. At ``k = N`` the result is exactly all ones.

    Args:
        scores: 1-D, finite, non-negative importance scores (any real dtype).
        k: expected number of kept items, in ``(0, N]``; need not be an integer.

    Returns:
        Probabilities in ``[0, 1]`` (float32, or float64 for float64 scores), summing
        to ``k`` up to float rounding, on the scores' device.
    """
    probs = _soft_topk(scores, k)
    assert probs is not None  # sure_probs (the default) always gives them
    return probs


def _soft_topk(scores: Tensor, k: float, sure_probs: bool = True) -> Tensor | None:
    """:func:`soft_topk_probabilities`. ``sure_probs=False``: None where every positive score gets
    ``p = 1`` (the only case where a zero score may get ``p > 0``), since a draw then knows its
    result without the probabilities."""
    if not isinstance(scores, Tensor) or scores.dim() != 1:
        shape = tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__
        raise GreenpropError(f"scores must be a 1-D tensor, got {shape}")
    n = scores.numel()
    if n == 0:
        raise GreenpropError("scores must not be empty")
    if scores.dtype.is_complex or scores.dtype == torch.bool:
        raise GreenpropError(f"scores must be real numbers, got dtype {scores.dtype}")
    if isinstance(k, bool) or not isinstance(k, numbers.Real) or not 0.0 < k <= n:
        raise GreenpropError(f"k must be a number in (0, {n}], got {k!r}")
    out_dtype = _prob_dtype(scores.dtype)
    s = scores.to(torch.float64)
    lowest, highest = (float(v) for v in torch.aminmax(s))  # one pass; NaN propagates into both
    if not (math.isfinite(highest) and lowest >= 0):
        if not bool(torch.isfinite(s).all()):
            raise GreenpropError(f"scores must be finite, got {scores[~torch.isfinite(s)][0].item()!r}")
        raise GreenpropError(f"scores must be >= 0, got {scores[s < 0][0].item()!r}")
    k = float(k)
    if k >= n:
        return torch.ones(n, dtype=out_dtype, device=scores.device) if sure_probs else None

    # The usual case (no zero score) needs no count: the minimum says it.
    n_pos = n if lowest > 0 else int(torch.count_nonzero(s))
    if k >= n_pos:
        if not sure_probs:
            return None
        # Fewer positive scores than k: keep them all, spread the rest over the zeros.
        fill = (k - n_pos) / (n - n_pos)  # n_pos <= k < n, so there is at least one zero
        return torch.where(s > 0, 1.0, fill).to(out_dtype)
    # From here p = min(1, c * s) with c > 0 (or the sort's equivalent): zero exactly where s is.
    level = _water_level(s, k, highest)
    p = _water_level_sorted(s, k) if level is None else (level * s).clamp_(max=1.0)
    return p.to(out_dtype)


#: Rounds of :func:`_water_level` before it gives way to the sort.
_WATER_ROUNDS = 8


def _water_level(s: Tensor, k: float, highest: float | None = None) -> float | None:
    """The ``c`` of ``p = min(1, c * s)``, ``sum p = k`` (``k`` < positive scores), without sorting.

    Fixed point on the capped set: with the items of ``c * s >= 1`` capped,
    ``c = (k - m) / (sum of the others)``. From ``c = k / sum(s)`` (nothing capped) ``c``
    only grows, so the capped set only grows, and the first set that repeats is the
    solution: the same ``c`` the sort finds (the largest scores capped, the rest
    proportional). Usually two or three rounds of a few elementwise passes, where the
    sort of thousands of scores costs several times more. None (use the sort) when
    ``_WATER_ROUNDS`` rounds did not settle or rounding broke the monotony.

    ``highest``, the largest score if known, settles the first round without a pass when
    nothing is capped (``highest * c < 1``: the same product and comparison the pass makes
    for the largest item, and rounding keeps ``s * c`` monotone in ``s``).
    """
    m, tail = 0, float(s.sum())
    for _ in range(_WATER_ROUNDS):
        c = (k - m) / tail
        if m == 0 and highest is not None and highest * c < 1.0:
            return c
        capped = s * c >= 1.0
        count = int(capped.sum())
        if count == m:
            return c
        if count < m or count >= k:
            return None
        m, tail = count, float(torch.where(capped, 0.0, s).sum())
        if tail <= 0.0:
            return None
    return None


def _water_level_sorted(s: Tensor, k: float) -> Tensor:
    """:func:`soft_topk_probabilities`'s result for ``k`` < positive scores, through one sort."""
    n = s.numel()
    # Sort descending; with the m largest capped at 1 the others get
    # c_m * s_i with c_m = (k - m) / tail_m, tail_m = sum of sorted[m:]. The answer is
    # the smallest m whose first uncapped item fits: (k - m) * sorted[m] <= tail_m.
    # m = ceil(k) - 1 always fits (k - m <= 1 and tail_m >= sorted[m]), so one exists.
    sorted_s, order = torch.sort(s, descending=True)
    tail = sorted_s.flip(0).cumsum(0).flip(0)
    m_all = torch.arange(n, device=s.device, dtype=torch.float64)
    fits = ((k - m_all) * sorted_s <= tail) & (m_all < k)
    fits[math.ceil(k) - 1] = True  # guard against rounding in the inequality above
    m = int(fits.to(torch.uint8).argmax())  # first True
    c = (k - m) / tail[m]
    p = (c * s).clamp_(max=1.0)
    p[order[:m]] = 1.0
    return p


def _check_probs(probs: Tensor) -> None:
    if not isinstance(probs, Tensor) or not probs.dtype.is_floating_point:
        what = probs.dtype if isinstance(probs, Tensor) else type(probs).__name__
        raise GreenpropError(f"probs must be a floating-point tensor, got {what}")
    bad = ~((probs >= 0) & (probs <= 1))  # also catches NaN
    if bool(bad.any()):
        raise GreenpropError(f"probs must lie in [0, 1], got {probs[bad][0].item()!r}")


def sample_mask(probs: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Independent Bernoulli draws: ``True`` with probability ``probs`` (any shape).

    ``p = 1`` is always kept and ``p = 0`` never (uniform draws lie in ``[0, 1)``).
    """
    _check_probs(probs)
    return _bernoulli(probs, generator)


def _bernoulli(probs: Tensor, generator: torch.Generator | None) -> Tensor:
    """:func:`sample_mask` without checking ``probs`` (for probabilities this module made)."""
    # Draw where the generator lives (greenprop's are CPU generators), then move: a CUDA
    # gradient with a CPU generator would otherwise fail, and CPU and GPU draw alike.
    return _uniform(probs, generator).to(probs.device) < probs


def _uniform(like: Tensor, generator: torch.Generator | None, dtype: torch.dtype | None = None) -> Tensor:
    """The uniform numbers :func:`_bernoulli` compares probabilities shaped ``like`` with (in ``dtype``,
    default ``like``'s), on the generator's device."""
    device = generator.device if generator is not None else like.device
    return torch.rand(like.shape, generator=generator, device=device, dtype=dtype or like.dtype)


def sample_rows(probs: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Kept row indices (int64, ascending) and their Horvitz-Thompson scales ``1/p``.

    Multiplying each kept row by its scale and dropping the others gives an unbiased
    estimate of any sum over rows. The result may be empty when ``sum p`` is small.
    """
    if isinstance(probs, Tensor) and probs.dim() != 1:
        raise GreenpropError(f"probs must be a 1-D tensor, got shape {tuple(probs.shape)}")
    _check_probs(probs)
    return _draw_rows(probs, generator)


def _draw_rows(probs: Tensor, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """:func:`sample_rows` without checking ``probs`` (for probabilities this module made)."""
    idx = _bernoulli(probs, generator).nonzero().squeeze(1)
    return idx, probs.index_select(0, idx).reciprocal()


def _norms(rows: Tensor) -> Tensor:
    """``||rows[i]||`` of a 2-D tensor in float32 at least: one pass over ``rows``.

    The ``dtype`` argument is only passed where it upcasts (bf16/fp16): for float32 and
    float64 it sends ``vector_norm`` down a slower path, for no change in the result.
    """
    dtype = _prob_dtype(rows.dtype)
    if rows.dtype == dtype:
        return torch.linalg.vector_norm(rows, dim=1)
    return torch.linalg.vector_norm(rows, dim=1, dtype=dtype)


def row_norms(grad: Tensor) -> Tensor:
    """Per-sample norms ``||grad[i]||`` over all dims but the first (float32 at least)."""
    return _norms(grad.reshape(grad.shape[0], -1))


def _draw_positive(scores: Tensor, k: float, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """Soft top-k draw on ``scores`` (expected count ``k``) without the items of score zero.

    Leaving out a drawn zero-score item changes no estimate (its term is zero) and saves
    its work. Only the all-ones and spread-over-zeros cases of
    :func:`soft_topk_probabilities` give a zero score a positive probability; on the
    water-level path ``p = min(1, c * s)`` is zero exactly where ``s`` is, so nothing is
    filtered there (no gather of the drawn scores).

    In those two cases every positive item has ``p = 1``: the draw's result is known without
    the probabilities (every positive item, scale 1), so only the uniform numbers are drawn,
    to advance the generator as the full draw does (later draws stay the same).
    """
    probs = _soft_topk(scores, k, sure_probs=False)
    if probs is None:
        dtype = _prob_dtype(scores.dtype)
        _uniform(scores, generator, dtype)
        idx = (scores > 0).nonzero().squeeze(1)
        return idx, torch.ones(idx.numel(), dtype=dtype, device=scores.device)
    return _draw_rows(probs, generator)


def activation_sample(
    grad: Tensor, ratio: float, generator: torch.Generator | None = None, *, norms: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Sample rows (dim 0, the data dimension) of a gradient by their norms.

    The score of sample ``i`` is ``||grad[i]||`` over all other dims (``norms``, when
    given, must be :func:`row_norms` of ``grad``), the expected count is ``ratio * N``
    (soft top-k), and the returned ``(idx, scale)`` give the kept rows and their ``1/p``
    factors, so ``grad[idx] * scale`` scattered back is an unbiased estimate of ``grad``.
    Rows of norm zero are never returned: their term is zero, so leaving them out changes
    no estimate and spares their work. At ``ratio = 1`` every non-zero row is returned with
    scale 1, without drawing from ``generator``.
    """
    ratio = _check_ratio(ratio)
    if not isinstance(grad, Tensor) or grad.dim() < 1 or grad.shape[0] == 0:
        shape = tuple(grad.shape) if isinstance(grad, Tensor) else type(grad).__name__
        raise GreenpropError(f"grad must be a tensor with at least one row, got {shape}")
    n = grad.shape[0]
    if norms is None:
        norms = row_norms(grad)
    if ratio >= 1.0:
        idx = (norms > 0).nonzero().squeeze(1)
        return idx, torch.ones(idx.numel(), dtype=norms.dtype, device=norms.device)
    return _draw_positive(norms, ratio * n, generator)


def _token_matrices(grad_out: Tensor, inp: Tensor) -> tuple[Tensor, Tensor]:
    """``(T, out)`` and ``(T, in)`` views of a Linear's output gradient and input."""
    if grad_out.dim() < 1 or inp.dim() < 1 or grad_out.shape[:-1] != inp.shape[:-1]:
        raise GreenpropError(
            "grad_out (..., out) and inp (..., in) must share their leading dims, got "
            f"{tuple(grad_out.shape)} and {tuple(inp.shape)}"
        )
    return grad_out.reshape(-1, grad_out.shape[-1]), inp.reshape(-1, inp.shape[-1])


def leverage_scores(grad_out: Tensor, inp: Tensor) -> Tensor:
    """Per-token leverage ``||dy_t|| * ||x_t||`` of a Linear layer (leading dims flattened).

    ``||dy_t^T x_t||_F = ||dy_t|| * ||x_t||``: the norm of token ``t``'s term in
    ``grad_W``, hence the variance-optimal sampling score for that sum.
    """
    return _token_leverage(*_token_matrices(grad_out, inp))


def _token_leverage(dy: Tensor, x: Tensor) -> Tensor:
    """:func:`leverage_scores` of ``(T, out)`` and ``(T, in)`` token matrices."""
    return _norms(dy) * _norms(x)


def leverage_sample(
    grad_out: Tensor, inp: Tensor, ratio: float, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """Kept token indices and ``1/p`` scales for ``grad_W``, expected count ``ratio * T``.

    Drawn tokens whose score is zero (their ``dy_t`` or ``x_t`` is zero, e.g. every
    token but the class token under a ViT's head) are left out of the result: their
    term is zero, so this changes no estimate and saves their work. At ``ratio = 1``
    all tokens with scale 1, without drawing from ``generator``.
    """
    ratio = _check_ratio(ratio)
    dy, x = _token_matrices(grad_out, inp)
    t = dy.shape[0]
    if t == 0:
        raise GreenpropError("grad_out and inp must hold at least one token")
    if ratio >= 1.0:
        dtype = _prob_dtype(torch.promote_types(dy.dtype, x.dtype))
        return torch.arange(t, device=dy.device), torch.ones(t, dtype=dtype, device=dy.device)
    return _leverage_draw(dy, x, ratio, generator)


def _leverage_draw(
    dy: Tensor, x: Tensor, ratio: float, generator: torch.Generator | None
) -> tuple[Tensor, Tensor]:
    """:func:`leverage_sample`'s draw on ``(T, out)`` and ``(T, in)`` token matrices, ``ratio < 1``."""
    return _draw_positive(_token_leverage(dy, x), ratio * dy.shape[0], generator)


def _leverage_draw_among(
    dy: Tensor, x: Tensor, ratio: float, generator: torch.Generator | None, positions: Tensor, total: int
) -> tuple[Tensor, Tensor]:
    """:func:`_leverage_draw` over ``total`` tokens of which only those at ``positions`` (the rows
    of ``dy`` and ``x``) may score above zero; returns indices into those rows."""
    scores = _token_leverage(dy, x)
    every = scores.new_zeros(total).index_copy_(0, positions, scores)
    idx, scale = _draw_positive(every, ratio * total, generator)
    return torch.searchsorted(positions, idx), scale


def sampled_weight_grad(
    grad_out: Tensor,
    inp: Tensor,
    ratio: float,
    generator: torch.Generator | None = None,
    *,
    among: tuple[Tensor, int] | None = None,
) -> tuple[Tensor, int]:
    """Unbiased ``grad_W ~= dy^T x`` from a ``ratio`` fraction of tokens (leverage sampling).

    The kept rows of ``dy`` and ``x`` are gathered and the rows of the narrower of the two
    scaled by ``1/p`` in place (computed in float32 at least, stored in its dtype), then ONE
    dense ``(out x k) @ (k x in)`` matmul runs: the saving is real, nothing is masked. At
    ``ratio = 1``, or with no token at all, this is exactly ``dy^T x`` (no sampling).
    Returns the ``(out, in)`` estimate in ``grad_out``'s dtype and ``k``, the number of
    tokens its matmul used.

    ``among = (positions, total)``: the tokens given are those at ``positions`` (ascending)
    of ``total`` tokens, and every other token's ``dy`` is zero (left out by the caller, who
    skips their work). The draw is the one over all ``total`` tokens: the same scores with
    zeros in between, so the same probabilities and random numbers; a zero token drawn adds
    nothing and is left out, as :func:`leverage_sample` does.
    """
    ratio = _check_ratio(ratio)
    dy, x = _token_matrices(grad_out, inp)
    if ratio >= 1.0 or dy.shape[0] == 0:
        return dy.t() @ x, dy.shape[0]
    dy_k, x_k = _kept_rows(dy, x, ratio, generator, among)
    return dy_k.t() @ x_k, dy_k.shape[0]


def _kept_rows(
    dy: Tensor, x: Tensor, ratio: float, generator: torch.Generator | None, among: tuple[Tensor, int] | None
) -> tuple[Tensor, Tensor]:
    """:func:`sampled_weight_grad`'s drawn rows of ``dy`` and ``x`` (``x``'s in ``dy``'s dtype), the
    narrower side scaled by ``1/p``.

    Where :mod:`greenprop.kernels` serves, one C++ op scores, draws, gathers and scales (the
    PyTorch ops below spend most of their time on per-op overhead); it compares the same uniform
    numbers, drawn here from ``generator``, so the draw and the generator's state are the same.
    """
    if x.dtype == dy.dtype and kernels.available(dy, kernels.DRAW_MIN_NUMEL):
        positions, total = among if among is not None else (None, dy.shape[0])
        uniform = _uniform(dy.new_empty(total), generator, _prob_dtype(dy.dtype)).to(dy.device)
        kept = kernels.leverage_rows(dy, x, uniform, ratio * total, positions)
        if kept is not None:  # None: a score is not finite, which the draw below reports
            return kept
    if among is None:
        idx, scale = leverage_sample(dy, x, ratio, generator)
    else:
        idx, scale = _leverage_draw_among(dy, x, ratio, generator, *among)
    dy_k, x_k = dy.index_select(0, idx), x.index_select(0, idx).to(dy.dtype)
    # Scaling either side gives the same estimate; the narrower is fewer multiplications.
    (dy_k if dy_k.shape[1] <= x_k.shape[1] else x_k).mul_(scale.unsqueeze(1))
    return dy_k, x_k
