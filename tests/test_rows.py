"""The row scatter ssProp and VCAS share, on the C++ op and on the PyTorch fallback."""

from __future__ import annotations

from unittest import mock

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from greenprop import kernels
from greenprop.rows import scatter_rows

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
CL = torch.channels_last

needs_kernels = pytest.mark.skipif(not kernels.load(), reason="the C++ op could not be built here")


@st.composite
def scatters(draw: st.DrawFn) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(kept rows, their indices, a NaN template): 1-4-D, any kept subset, either layout."""
    dims = draw(st.integers(1, 4))
    shape = [draw(st.integers(1, 7)) for _ in range(dims)]
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    n = shape[0]
    idx = torch.randperm(n, generator=gen)[: draw(st.integers(0, n))]
    if draw(st.booleans()):
        idx = idx.sort().values
    like = torch.full(shape, float("nan"))  # the scatter must never read it
    kept = torch.randn(idx.numel(), *shape[1:], generator=gen)
    if dims == 4 and draw(st.booleans()):
        like = like.contiguous(memory_format=CL)
    if dims == 4 and draw(st.booleans()):
        kept = kept.contiguous(memory_format=CL)
    return kept, idx, like


def _check(kept: torch.Tensor, idx: torch.Tensor, like: torch.Tensor, kernel: bool) -> None:
    calls = []
    op = kernels.scatter_rows_
    spy = mock.patch.object(kernels, "scatter_rows_", lambda *a: calls.append(1) or op(*a))
    small = mock.patch.object(kernels, "MIN_NUMEL", 1)  # the op serves every size
    with spy, small, kernels.use_kernels(kernel):
        want = torch.zeros(like.shape).index_copy_(0, idx, kept)
        got = scatter_rows(kept, idx, like)
        assert torch.equal(got, want)
        fmt = CL if like.dim() == 4 and not like.is_contiguous() else torch.contiguous_format
        assert got.is_contiguous(memory_format=fmt)  # the template's layout
        by_shape = scatter_rows(kept, idx, like.shape)
        assert torch.equal(by_shape, want)
        if kept.dim() == 4 and not kept.is_contiguous():
            assert by_shape.is_contiguous(memory_format=CL)  # a bare shape: kept's layout
    assert len(calls) == (2 if kernel else 0)


@needs_kernels
@SETTINGS
@given(case=scatters())
def test_the_kernel_path_equals_zeros_plus_index_copy(case):
    _check(*case, kernel=True)


@SETTINGS
@given(case=scatters())
def test_the_fallback_equals_zeros_plus_index_copy(case):
    _check(*case, kernel=False)


def test_the_result_takes_the_templates_dtype_or_keeps_its_own():
    kept, idx = torch.randn(2, 3, dtype=torch.bfloat16), torch.tensor([3, 0])
    got = scatter_rows(kept, idx, torch.empty(5, 3))
    assert got.dtype == torch.float32 and torch.equal(got[[3, 0]], kept.float())
    assert scatter_rows(kept, idx, torch.Size([5, 3])).dtype == torch.bfloat16


def test_small_and_integer_tensors_skip_the_op(monkeypatch):
    monkeypatch.setattr(kernels, "scatter_rows_", lambda *a: pytest.fail("the op took a small tensor"))
    for kept in (torch.randn(1, 4), torch.ones(1, kernels.MIN_NUMEL, dtype=torch.int64)):
        got = scatter_rows(kept, torch.tensor([1]), torch.Size([2, *kept.shape[1:]]))
        assert torch.equal(got[1], kept[0]) and torch.count_nonzero(got[0]) == 0
