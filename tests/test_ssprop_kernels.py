"""ssProp's C++ channel ops (scoring, top-k, gather, scatter) against the PyTorch path, and their fallback."""

from __future__ import annotations

import logging
import sys
import types

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fixtures import digits_run, digits_subset
from greenprop import kernels
from greenprop.rows import scatter_rows
from greenprop.ssprop import SparseConv2d
from greenprop.ssprop.functional import (
    channel_scores,
    channel_scores_torch,
    gather_channels,
    select_channels,
    sparse_linear,
    top_k,
)
from greenprop.train.trainer import Trainer

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
CL = torch.channels_last

needs_kernels = pytest.mark.skipif(not kernels.load(), reason="the C++ op could not be built here")


@pytest.fixture
def any_size(monkeypatch):
    """The op serves tensors of every size (by default small ones take PyTorch ops)."""
    monkeypatch.setattr(kernels, "MIN_NUMEL", 1)


@pytest.fixture
def fresh_loader(monkeypatch):
    """A loader that has not tried to build yet (the process-wide outcome is restored after)."""
    monkeypatch.setattr(kernels, "_state", {})
    return kernels


@needs_kernels
@SETTINGS
@given(
    outer=st.integers(0, 300),
    channels=st.integers(1, 40),
    inner=st.integers(1, 70),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16]),
    seed=st.integers(0, 2**16),
)
def test_op_equals_the_pytorch_scores(outer, channels, inner, dtype, seed):
    view = (torch.randn(outer, channels, inner, generator=torch.Generator().manual_seed(seed)) * 3).to(dtype)
    got = kernels.channel_abs_sum(view)
    want = channel_scores_torch(view)
    assert got.dtype == torch.float32 and got.shape == (channels,)
    exact = view.double().abs().sum((0, 2))
    # both accumulate in float32 in different orders; neither is further than this from exact
    tol = 1e-5 * exact + 1e-6
    assert bool(((got.double() - exact).abs() <= tol).all())
    assert bool(((want.double() - exact).abs() <= tol).all())


@needs_kernels
@pytest.mark.parametrize(
    ("shape", "memory_format", "channel_dim"),
    [
        ((3, 8, 5, 6), torch.contiguous_format, 1),
        ((3, 8, 5, 6), CL, 1),
        ((3, 8, 1, 1), CL, 1),  # ambiguous strides: read as NCHW
        ((7, 12), torch.contiguous_format, -1),  # Linear rows
        ((2, 7, 12), torch.contiguous_format, -1),  # Linear with leading dims
    ],
)
def test_scores_use_the_op_and_agree_with_it_off(shape, memory_format, channel_dim, monkeypatch, any_size):
    dy = torch.randn(shape).contiguous(memory_format=memory_format)
    calls = []
    op = kernels.channel_abs_sum
    monkeypatch.setattr(kernels, "channel_abs_sum", lambda v: calls.append(v.shape) or op(v))
    with_op = channel_scores(dy, channel_dim)
    assert calls, "the C++ op was not used"
    with kernels.use_kernels(False):
        without = channel_scores(dy, channel_dim)
    assert len(calls) == 1
    torch.testing.assert_close(with_op, without, rtol=1e-5, atol=1e-6)
    exact = dy.movedim(channel_dim, -1).reshape(-1, shape[channel_dim]).abs().sum(0)
    torch.testing.assert_close(with_op, exact)


@st.composite
def scored_views(draw):
    """An ``(outer, C, inner)`` tensor whose channel scores often tie (small integers, NaN), k, groups."""
    groups, per_group = draw(st.integers(1, 4)), draw(st.integers(1, 40))
    outer, inner = draw(st.integers(1, 6)), draw(st.integers(1, 9))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    view = torch.randint(-2, 3, (outer, groups * per_group, inner), generator=gen).float()
    if draw(st.booleans()):
        view[:, torch.randperm(groups * per_group, generator=gen)[: draw(st.integers(0, 3))]] = float("nan")
    return view, draw(st.integers(1, per_group)), groups


@needs_kernels
@SETTINGS
@given(case=scored_views())
def test_the_topk_op_equals_a_stable_sort_of_its_scores(case):
    view, k, groups = case
    got = kernels.topk_channels(view, k, groups)
    scores = kernels.channel_abs_sum(view).view(groups, -1)
    offsets = torch.arange(0, view.shape[1], scores.shape[1]).unsqueeze(1)
    want = (top_k(scores, k).sort(dim=1).values + offsets).reshape(-1)
    assert got.dtype == torch.int64 and torch.equal(got, want)


def test_top_k_breaks_ties_to_the_lower_index_and_ranks_nan_highest():
    scores = torch.tensor([[1.0, 3.0, 3.0, float("nan"), 0.0, 3.0]])
    assert top_k(scores, 3).tolist() == [[3, 1, 2]]


@needs_kernels
def test_the_topk_op_rejects_bad_arguments():
    view = torch.randn(2, 6, 3)
    with pytest.raises(RuntimeError, match="does not divide"):
        kernels.topk_channels(view, 1, 4)
    with pytest.raises(RuntimeError, match="k must be in"):
        kernels.topk_channels(view, 4, 2)


@needs_kernels
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, CL])
def test_selection_uses_the_topk_op_and_agrees_with_it_off(memory_format, any_size, monkeypatch):
    calls = []
    op = kernels.topk_channels
    monkeypatch.setattr(kernels, "topk_channels", lambda *a: calls.append(a[1:]) or op(*a))
    dy = (torch.randn(3, 12, 4, 5) * torch.logspace(0, 2, 12).view(1, -1, 1, 1)).contiguous(
        memory_format=memory_format
    )
    with_op = select_channels(dy, 2, groups=3)
    with kernels.use_kernels(False):
        without = select_channels(dy, 2, groups=3)
    assert calls == [(2, 3)]
    assert with_op.tolist() == without.tolist() == [2, 3, 6, 7, 10, 11]


@st.composite
def views_and_indices(draw, inner_max=70):
    """A random ``(outer, C, inner)`` tensor and a random subset of its channels (any order)."""
    outer, channels = draw(st.integers(0, 40)), draw(st.integers(1, 40))
    inner = draw(st.integers(1, inner_max))
    dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16]))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    perm = torch.randperm(channels, generator=gen)[: draw(st.integers(1, channels))]
    idx = perm.sort().values if draw(st.booleans()) else perm  # top-k indices come sorted
    return torch.randn(outer, channels, inner, generator=gen).to(dtype), idx


@needs_kernels
@SETTINGS
@given(case=views_and_indices())
def test_the_gather_op_equals_index_select(case):
    view, idx = case
    got = kernels.gather_channels(view, idx)
    assert got.is_contiguous() and got.dtype == view.dtype
    assert torch.equal(got, view.index_select(1, idx))


@needs_kernels
@SETTINGS
@given(case=views_and_indices(inner_max=1))
def test_the_scatter_op_equals_zeros_plus_index_copy(case):
    view, idx = case
    rows_all = view.transpose(0, 1).reshape(view.shape[1], -1).contiguous()  # (n, m)
    rows = rows_all.index_select(0, idx)
    out = torch.full(rows_all.shape, float("nan"), dtype=rows.dtype)  # every byte must be written
    assert kernels.scatter_rows_(out, idx, rows) is out
    assert torch.equal(out, torch.zeros_like(rows_all).index_copy_(0, idx, rows))


@needs_kernels
def test_the_ops_reject_bad_indices():
    view = torch.randn(2, 5, 3)
    with pytest.raises(RuntimeError, match="out of range"):
        kernels.gather_channels(view, torch.tensor([0, 5]))
    with pytest.raises(RuntimeError, match="int64"):
        kernels.gather_channels(view, torch.tensor([0, 1], dtype=torch.int32))
    with pytest.raises(RuntimeError, match="out of range"):
        kernels.scatter_rows_(torch.empty(4, 3), torch.tensor([-1]), torch.randn(1, 3))
    with pytest.raises(RuntimeError, match="rows must be"):
        kernels.scatter_rows_(torch.empty(4, 3), torch.tensor([0, 1]), torch.randn(1, 3))


@needs_kernels
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, CL])
def test_gather_and_scatter_use_the_ops_and_keep_the_layout(memory_format, any_size, monkeypatch):
    used = []
    for name in ("gather_channels", "scatter_rows_"):
        op = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *a, _op=op, _name=name: used.append(_name) or _op(*a))
    t = torch.randn(3, 8, 4, 5).contiguous(memory_format=memory_format)
    idx = torch.tensor([0, 1, 2, 6])
    g = gather_channels(t, idx)
    assert torch.equal(g, t[:, idx]) and g.is_contiguous(memory_format=memory_format)
    full = torch.randn(8, 3, 3, 3).contiguous(memory_format=memory_format)
    rows = torch.randn(4, 3, 3, 3)  # NCHW rows into a channels_last gradient are converted
    out = scatter_rows(rows, idx, full)
    assert torch.equal(out[idx], rows) and torch.count_nonzero(out[[3, 4, 5, 7]]) == 0
    assert out.is_contiguous(memory_format=memory_format)
    assert used == ["gather_channels", "scatter_rows_"]


def test_a_strided_linear_gradient_is_scored_without_the_op(any_size, monkeypatch):
    monkeypatch.setattr(kernels, "channel_abs_sum", lambda v: pytest.fail("the op got a strided view"))
    dy = torch.randn(9, 5).t()  # (rows 5, features 9), features not contiguous
    torch.testing.assert_close(channel_scores(dy, -1), dy.abs().sum(0))


@needs_kernels
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, CL])
def test_sparse_backward_is_identical_with_and_without_the_op(memory_format, any_size):
    torch.manual_seed(0)
    layer = SparseConv2d(6, 16, 3, padding=1, keep=0.5).to(memory_format=memory_format)
    x = torch.randn(4, 6, 9, 9).contiguous(memory_format=memory_format)
    scale = torch.linspace(0.5, 2.0, 16).view(1, -1, 1, 1)  # channel scores well apart
    dy = (torch.randn(4, 16, 9, 9) * scale).contiguous(memory_format=memory_format)
    grads = []
    for enabled in (True, False):
        with kernels.use_kernels(enabled):
            xr = x.clone().requires_grad_()
            grads.append(torch.autograd.grad(layer(xr), (xr, layer.weight, layer.bias), dy))
        assert select_channels(dy, 8).tolist() == list(range(8, 16))
    for with_op, without in zip(*grads, strict=True):
        assert torch.equal(with_op, without)


@needs_kernels
def test_sparse_linear_backward_is_identical_with_and_without_the_ops(any_size):
    torch.manual_seed(0)
    x = torch.randn(3, 5, 7)
    w, b = torch.randn(12, 7, requires_grad=True), torch.randn(12, requires_grad=True)
    dy = torch.randn(3, 5, 12) * torch.logspace(0, 3, 12)  # the last 6 features score highest
    grads = []
    for enabled in (True, False):
        with kernels.use_kernels(enabled):
            xr = x.clone().requires_grad_()
            grads.append(torch.autograd.grad(sparse_linear(xr, w, b, keep=0.5), (xr, w, b), dy))
    for with_op, without in zip(*grads, strict=True):
        assert torch.equal(with_op, without)
    assert torch.count_nonzero(grads[0][1][:6]) == 0 and torch.count_nonzero(grads[0][2][:6]) == 0


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, CL])
def test_without_a_build_the_sparse_backward_uses_pytorch_ops(
    fresh_loader, any_size, monkeypatch, memory_format
):
    def no_compiler():
        raise RuntimeError("no compiler")

    monkeypatch.setattr(kernels, "_build", no_compiler)
    for name in kernels._OPS:
        monkeypatch.setattr(kernels, name, lambda *a, _n=name: pytest.fail(f"{_n} used without a build"))
    torch.manual_seed(0)
    layer = SparseConv2d(4, 8, 3, padding=1, keep=0.5).to(memory_format=memory_format)
    x = torch.randn(2, 4, 6, 6).contiguous(memory_format=memory_format).requires_grad_()
    dy = (torch.randn(2, 8, 6, 6) * torch.linspace(0.5, 2.0, 8).view(1, -1, 1, 1)).contiguous(
        memory_format=memory_format
    )
    got = torch.autograd.grad(layer(x), (x, layer.weight, layer.bias), dy)
    # the top 4 channels by |dy| are the last 4: dense autograd on dy with the rest zeroed
    masked = dy.clone()
    masked[:, :4] = 0
    x2 = x.detach().clone().requires_grad_()
    plain = torch.nn.functional.conv2d(x2, layer.weight, layer.bias, padding=1)
    want = torch.autograd.grad(plain, (x2, layer.weight, layer.bias), masked)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)
    assert got[1].is_contiguous(memory_format=memory_format)


def test_a_failed_build_falls_back_with_one_logged_line(fresh_loader, any_size, monkeypatch, caplog):
    builds = []

    def broken_build():
        builds.append(1)
        raise RuntimeError("Error building extension 'greenprop_channel_ops'\nmore compiler output")

    monkeypatch.setattr(kernels, "_build", broken_build)
    monkeypatch.delenv(kernels.DISABLE_ENV, raising=False)
    dy = torch.randn(2, 5, 3, 3)
    with caplog.at_level(logging.WARNING, logger="greenprop.kernels"):
        scores = channel_scores(dy)
        assert not kernels.available(dy) and not kernels.load()
    torch.testing.assert_close(scores, dy.abs().sum((0, 2, 3)))
    assert len(builds) == 1  # tried once per process
    (record,) = caplog.records
    assert "unavailable (Error building extension 'greenprop_channel_ops')" in record.getMessage()
    assert "\n" not in record.getMessage()


def test_the_environment_switch_skips_the_build(fresh_loader, monkeypatch, caplog):
    monkeypatch.setattr(kernels, "_build", lambda: pytest.fail("built although disabled"))
    monkeypatch.setenv(kernels.DISABLE_ENV, "1")
    with caplog.at_level(logging.WARNING, logger="greenprop.kernels"):
        assert not kernels.load()
    assert kernels.DISABLE_ENV in caplog.records[0].getMessage()


def test_the_op_is_not_used_off_cpu_for_integers_or_small_tensors(monkeypatch):
    monkeypatch.setattr(kernels, "load", lambda: True)
    big = kernels.MIN_NUMEL
    assert not kernels.available(torch.ones(big, dtype=torch.int64))
    assert not kernels.available(torch.ones(big, device="meta"))
    assert not kernels.available(torch.ones(big - 1))
    with kernels.use_kernels(False):
        assert not kernels.available(torch.ones(big))
    assert kernels.available(torch.ones(big))


def test_the_pypi_ninja_is_put_on_path_when_none_is_installed(monkeypatch, tmp_path):
    monkeypatch.setattr(kernels.shutil, "which", lambda name: None)
    monkeypatch.setitem(sys.modules, "ninja", types.SimpleNamespace(BIN_DIR=str(tmp_path)))
    monkeypatch.setenv("PATH", "/usr/bin")
    kernels._ninja_on_path()
    assert kernels.os.environ["PATH"].split(kernels.os.pathsep) == [str(tmp_path), "/usr/bin"]


def test_checkouts_with_the_same_source_build_from_one_path(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    sources = []
    for checkout in ("a", "b"):
        source = tmp_path / checkout / "_channel_ops.cpp"
        source.parent.mkdir()
        source.write_text("// the same source\n")
        sources.append(kernels._build_source(source))
    assert sources[0] == sources[1]
    name, path = sources[0]
    assert path.read_text() == "// the same source\n" and path.is_relative_to(tmp_path / "ext")
    changed = tmp_path / "c" / "_channel_ops.cpp"
    changed.parent.mkdir()
    changed.write_text("// another source\n")
    other_name, other_path = kernels._build_source(changed)
    assert other_name != name and other_path != path and other_path.read_text() == "// another source\n"
    # another torch installation (another virtualenv: other include paths) builds apart
    monkeypatch.setattr(kernels.torch, "__file__", str(tmp_path / "other-venv" / "torch" / "__init__.py"))
    venv_name, venv_path = kernels._build_source(tmp_path / "a" / "_channel_ops.cpp")
    assert venv_name != name and venv_path != path


@pytest.mark.parametrize(("method", "builds"), [("ssprop:keep=0.5", True), ("baseline", False)])
def test_the_trainer_builds_the_ops_before_timing_a_method_that_uses_them(method, builds, monkeypatch):
    calls = []
    monkeypatch.setattr(kernels, "load", lambda: calls.append("load") or True)
    config = digits_run(
        model="cnn", width=8, epochs=1, batch_size=64, subset=64, test_subset=32, method=method
    )
    trainer = Trainer(config, None, data=digits_subset(64, 32))
    trainer._run_epoch = lambda epoch: pytest.fail("stop before the first epoch")  # only the set-up runs
    with pytest.raises(pytest.fail.Exception, match="stop before the first epoch"):
        trainer.fit()
    assert calls == (["load"] if builds else [])
