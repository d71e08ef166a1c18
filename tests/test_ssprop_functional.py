"""ssProp pure functions: channel selection and the sparse backward vs dense autograd."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from greenprop.metering.flops import flop_counter
from greenprop.ssprop.functional import (
    _LINEAR_OP,
    ChannelSelector,
    _conv2d_op,
    _SparseFunction,
    _take_rows,
    channel_scores,
    conv2d_sparse_backward,
    gather_channels,
    keep_count,
    linear_sparse_backward,
    select_channels,
    sparse_conv2d,
    sparse_linear,
)

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
CL = torch.channels_last


# ---------------------------------------------------------------- keep_count


@pytest.mark.parametrize(
    ("keep", "c", "round_to", "k"),
    [
        (0.6, 128, 1, 76),
        (0.6, 128, 16, 80),
        (0.4, 64, 16, 32),
        (0.29, 100, 1, 29),  # 0.29 * 100 = 28.999... in binary
        (0.01, 10, 1, 1),  # at least one channel
        (1.0, 7, 1, 7),
        (0.9, 20, 16, 20),  # rounding is capped at C
    ],
)
def test_keep_count(keep, c, round_to, k):
    assert keep_count(keep, c, round_to) == k


@pytest.mark.parametrize("keep", [0.0, -0.1, 1.5])
def test_keep_count_rejects_bad_keep(keep):
    with pytest.raises(ValueError, match="keep"):
        keep_count(keep, 10)


# ---------------------------------------------------------------- selection


def _dy_with_channel_scale(scale, n=2, h=3, w=4, memory_format=torch.contiguous_format):
    dy = torch.randn(n, len(scale), h, w).sign() * torch.tensor(scale).view(1, -1, 1, 1)
    return dy.contiguous(memory_format=memory_format)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, CL])
def test_topk_picks_largest_mean_abs_channels(memory_format):
    scale = [0.1, 5.0, 0.2, 3.0, 0.3, 4.0]
    dy = _dy_with_channel_scale(scale, memory_format=memory_format)
    assert select_channels(dy, 3).tolist() == [1, 3, 5]  # ascending
    torch.testing.assert_close(channel_scores(dy), dy.abs().sum((0, 2, 3)))


def test_scores_agree_across_memory_formats_and_linear_layout():
    dy = torch.randn(3, 8, 5, 6)
    ref = dy.abs().double().sum((0, 2, 3)).float()
    torch.testing.assert_close(channel_scores(dy), ref)
    torch.testing.assert_close(channel_scores(dy.contiguous(memory_format=CL)), ref)
    torch.testing.assert_close(channel_scores(dy.permute(0, 2, 3, 1), channel_dim=-1), ref)
    assert channel_scores(dy.bfloat16()).dtype == torch.float32


def test_grouped_selection_keeps_k_per_group():
    scale = [1.0, 9.0, 2.0, 3.0, 8.0, 7.0]  # two groups of three
    dy = _dy_with_channel_scale(scale)
    assert select_channels(dy, 1, groups=2).tolist() == [1, 4]
    assert select_channels(dy, 2, groups=2).tolist() == [1, 2, 4, 5]


def test_random_selection_is_reproducible_and_valid():
    dy = torch.randn(2, 20, 3, 3)

    def draw(seed):
        return select_channels(dy, 7, selection="random", generator=torch.Generator().manual_seed(seed))

    a, b, c = draw(1), draw(1), draw(2)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.unique().numel() == 7 and torch.equal(a, a.sort().values)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"selection": "best"}, "selection"), ({"groups": 3}, "groups"), ({"k": 0}, "k must")],
)
def test_selection_rejects_bad_arguments(kwargs, match):
    args = {"k": 2, **kwargs}
    k = args.pop("k")
    with pytest.raises(ValueError, match=match):
        select_channels(torch.randn(2, 8, 3, 3), k, **args)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, CL])
def test_gather_keeps_memory_format(memory_format):
    t = torch.randn(2, 8, 3, 5).contiguous(memory_format=memory_format)
    idx = torch.tensor([0, 3, 7])
    g = gather_channels(t, idx)
    assert torch.equal(g, t[:, idx])
    assert g.is_contiguous(memory_format=memory_format)


def test_weight_rows_keep_the_channels_last_layout():
    w = torch.randn(8, 5, 3, 3).contiguous(memory_format=CL)
    idx = torch.tensor([1, 4, 6])
    rows = _take_rows(w, idx)
    assert torch.equal(rows, w[idx]) and rows.is_contiguous(memory_format=CL)
    assert _take_rows(w.contiguous(), idx).is_contiguous()


# ---------------------------------------------------------------- conv backward


@st.composite
def conv_cases(draw, dtypes=(torch.float32, torch.bfloat16)):
    groups = draw(st.sampled_from([1, 1, 1, 2]))
    c_in = groups * draw(st.integers(1, 4))
    c_out = groups * draw(st.integers(1, 6))
    k = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 2)))
    padding = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
    dtype = draw(st.sampled_from(dtypes))
    extent = [dilation[i] * (k[i] - 1) + 1 - 2 * padding[i] for i in range(2)]
    if dtype == torch.bfloat16:
        # torch 2.13's CPU bf16 conv backward (oneDNN) returns uninitialised memory for
        # kernel taps that only ever see padding (e.g. width 1, kernel 3, padding 1): dense
        # autograd itself is wrong there, nondeterministically. Keep every tap on real
        # input: the input is at least the dilated kernel and the stride.
        extent = [max(dilation[i] * (k[i] - 1) + 1, stride[i]) for i in range(2)]
    h = draw(st.integers(max(1, extent[0]), max(1, extent[0]) + 6))
    w = draw(st.integers(max(1, extent[1]), max(1, extent[1]) + 6))
    return {
        "n": draw(st.integers(1, 3)),
        "c_in": c_in,
        "c_out": c_out,
        "hw": (h, w),
        "kernel": k,
        "stride": stride,
        "padding": padding,
        "dilation": dilation,
        "groups": groups,
        "bias": draw(st.booleans()),
        "channels_last": draw(st.booleans()),
        "dtype": dtype,
        "seed": draw(st.integers(0, 2**16)),
    }


def _conv_tensors(case):
    g = torch.Generator().manual_seed(case["seed"])
    fmt = CL if case["channels_last"] else torch.contiguous_format
    dtype = case["dtype"]
    x = torch.randn(case["n"], case["c_in"], *case["hw"], generator=g)
    w = torch.randn(case["c_out"], case["c_in"] // case["groups"], *case["kernel"], generator=g)
    b = torch.randn(case["c_out"], generator=g) if case["bias"] else None
    x = x.to(dtype).contiguous(memory_format=fmt)
    w = w.to(dtype).contiguous(memory_format=fmt)
    b = b.to(dtype) if b is not None else None
    return x, w, b


def _conv_args(case):
    return case["stride"], case["padding"], case["dilation"], case["groups"]


def _dense_grads(x, w, b, dy, case, mask=None):
    """Dense autograd gradients, optionally of the channels in ``mask`` alone."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, w)]
    bias = b.detach().clone().requires_grad_() if b is not None else None
    y = F.conv2d(leaves[0], leaves[1], bias, *_conv_args(case))
    if mask is not None:
        dy = dy * mask.view(1, -1, 1, 1).to(dy.dtype)
    y.backward(dy)
    return leaves[0].grad, leaves[1].grad, bias.grad if bias is not None else None


def _tol(dtype):
    return {"atol": 1e-4, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 0.1, "rtol": 0.05}


def _close(actual, expected, dtype, scale=1.0):
    tol = _tol(dtype)
    torch.testing.assert_close(actual.float(), expected.float(), atol=tol["atol"] * scale, rtol=tol["rtol"])


def _output(x, w, b, case):
    with torch.no_grad():
        return F.conv2d(x, w, b, *_conv_args(case))


@SETTINGS
@given(conv_cases())
def test_conv_full_k_equals_dense_autograd(case):
    """Every channel kept (the gather/scatter path and the Function) == dense autograd."""
    x, w, b = _conv_tensors(case)
    dy = torch.randn_like(_output(x, w, b, case))
    ref = _dense_grads(x, w, b, dy, case)
    scale = max(1.0, float(dy.abs().sum()) ** 0.5)
    every = torch.arange(case["c_out"])
    got = conv2d_sparse_backward(
        dy,
        x,
        w,
        every,
        stride=case["stride"],
        padding=case["padding"],
        dilation=case["dilation"],
        groups=case["groups"],
        has_bias=b is not None,
    )
    for a, e in zip(got, ref, strict=True):
        if e is None:
            assert a is None
        else:
            _close(a, e, case["dtype"], scale)
    # The autograd Function with k = all channels (selection still runs).
    leaves = [t.detach().clone().requires_grad_() for t in (x, w)]
    bias = b.detach().clone().requires_grad_() if b is not None else None
    op = _conv2d_op(*_conv_args(case))
    y = _SparseFunction.apply(*leaves, bias, op, case["c_out"] // case["groups"], ChannelSelector())
    y.backward(dy)
    _close(leaves[0].grad, ref[0], case["dtype"], scale)
    _close(leaves[1].grad, ref[1], case["dtype"], scale)
    if b is not None:
        _close(bias.grad, ref[2], case["dtype"], scale)


@SETTINGS
@given(conv_cases())
def test_conv_keep_one_is_plain_autograd(case):
    x, w, b = _conv_tensors(case)
    y = sparse_conv2d(x.requires_grad_(), w.requires_grad_(), b, *_conv_args(case), keep=1.0)
    assert type(y.grad_fn).__name__ == "ConvolutionBackward0"  # no custom Function, no ranking


@SETTINGS
@given(conv_cases(dtypes=(torch.float64, torch.float32)), st.floats(0.05, 0.95))
def test_conv_sparse_keeps_exact_rows_and_kept_input_gradient(case, keep):
    x, w, b = _conv_tensors(case)
    dy = torch.randn_like(_output(x, w, b, case))
    per_group = case["c_out"] // case["groups"]
    k = keep_count(keep, per_group)
    leaves = [t.detach().clone().requires_grad_() for t in (x, w)]
    bias = b.detach().clone().requires_grad_() if b is not None else None
    y = sparse_conv2d(*leaves, bias, *_conv_args(case), keep=keep)
    y.backward(dy)
    idx = select_channels(dy, k, groups=case["groups"])
    kept = torch.zeros(case["c_out"], dtype=torch.bool)
    kept[idx] = True
    assert int(kept.sum()) == k * case["groups"]
    full = _dense_grads(x, w, b, dy, case)
    alone = _dense_grads(x, w, b, dy, case, mask=kept)
    scale = max(1.0, float(dy.abs().sum()) ** 0.5)
    exact = {"atol": 1e-12, "rtol": 1e-10} if case["dtype"] == torch.float64 else _tol(torch.float32)
    torch.testing.assert_close(leaves[1].grad[kept], full[1][kept], **exact)
    assert torch.count_nonzero(leaves[1].grad[~kept]) == 0
    if b is not None:
        torch.testing.assert_close(bias.grad[kept], full[2][kept], **exact)
        assert torch.count_nonzero(bias.grad[~kept]) == 0
    if case["dtype"] == torch.float64:
        torch.testing.assert_close(leaves[0].grad, alone[0], **exact)
    else:
        _close(leaves[0].grad, alone[0], torch.float32, scale)


def test_conv_output_mask_is_respected():
    x, w = torch.randn(2, 3, 6, 6), torch.randn(4, 3, 3, 3)
    dy = torch.randn(2, 4, 4, 4)
    common = {"stride": (1, 1), "padding": (0, 0), "dilation": (1, 1)}
    gi, gw, gb = conv2d_sparse_backward(
        dy, x, w, torch.tensor([1, 2]), output_mask=(False, True, False), **common
    )
    assert gi is None and gb is None and gw.shape == w.shape
    x_only = x.clone().requires_grad_()
    y = sparse_conv2d(x_only, w, None, keep=0.5)  # weight frozen: only grad_input
    y.backward(dy)
    assert x_only.grad is not None and w.grad is None


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize(("kernel", "padding", "dilation"), [(3, "same", 1), (4, "same", 1), (3, "valid", 2)])
def test_string_padding_matches_dense_kept_channels(kernel, padding, dilation):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 7, 8, generator=g, dtype=torch.float64)
    w = torch.randn(6, 3, kernel, kernel, generator=g, dtype=torch.float64)
    xs, ws, xd, wd = (t.clone().requires_grad_() for t in (x, w, x, w))
    y = sparse_conv2d(xs, ws, None, 1, padding, dilation, keep=0.5)
    dy = torch.randn(y.shape, generator=g, dtype=torch.float64)
    y.backward(dy)
    kept = torch.zeros(6, dtype=torch.float64)
    kept[select_channels(dy, 3)] = 1
    yd = F.conv2d(xd, wd, None, 1, padding, dilation)
    torch.testing.assert_close(y, yd)
    yd.backward(dy * kept.view(1, -1, 1, 1))
    torch.testing.assert_close(xs.grad, xd.grad)
    torch.testing.assert_close(ws.grad, wd.grad)


def test_channels_last_gradients_stay_channels_last():
    x = torch.randn(2, 8, 6, 6).contiguous(memory_format=CL).requires_grad_()
    w = torch.randn(16, 8, 3, 3).contiguous(memory_format=CL).requires_grad_()
    sparse_conv2d(x, w, None, 1, 1, keep=0.5).sum().backward()
    assert x.grad.is_contiguous(memory_format=CL)
    assert w.grad.is_contiguous(memory_format=CL)


# ---------------------------------------------------------------- linear


@SETTINGS
@given(
    st.lists(st.integers(1, 4), min_size=0, max_size=2),
    st.integers(1, 6),
    st.integers(1, 9),
    st.booleans(),
    st.floats(0.05, 1.0),
    st.integers(0, 2**16),
)
def test_linear_sparse_backward_matches_dense(lead, in_f, out_f, has_bias, keep, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, in_f, generator=g, dtype=torch.float64)
    w = torch.randn(out_f, in_f, generator=g, dtype=torch.float64)
    b = torch.randn(out_f, generator=g, dtype=torch.float64) if has_bias else None
    dy = torch.randn(*lead, out_f, generator=g, dtype=torch.float64)
    k = keep_count(keep, out_f)
    idx = select_channels(dy, k, channel_dim=-1)
    kept = torch.zeros(out_f, dtype=torch.bool)
    kept[idx] = True

    leaves = [t.clone().requires_grad_() for t in (x, w)]
    bias = b.clone().requires_grad_() if b is not None else None
    sparse_linear(*leaves, bias, keep=keep).backward(dy)

    ref = [t.clone().requires_grad_() for t in (x, w)]
    ref_b = b.clone().requires_grad_() if b is not None else None
    F.linear(*ref, ref_b).backward(dy * kept)
    torch.testing.assert_close(leaves[0].grad, ref[0].grad)
    torch.testing.assert_close(leaves[1].grad, ref[1].grad)
    assert torch.count_nonzero(leaves[1].grad[~kept]) == 0
    if b is not None:
        torch.testing.assert_close(bias.grad, ref_b.grad)
    # Full k through the Function equals dense too.
    full = [t.clone().requires_grad_() for t in (x, w)]
    _SparseFunction.apply(*full, None, _LINEAR_OP, out_f, ChannelSelector()).backward(dy)
    dense = linear_sparse_backward(dy, x, w, None, has_bias=False)
    torch.testing.assert_close(full[0].grad, dense[0])
    torch.testing.assert_close(full[1].grad, dense[1])


# ---------------------------------------------------------------- FLOPs


def _backward_flops(keep):
    x = torch.randn(4, 32, 16, 16, requires_grad=True)
    w = torch.randn(64, 32, 3, 3, requires_grad=True)
    y = sparse_conv2d(x, w, None, 1, 1, keep=keep)
    dy = torch.randn_like(y)
    with flop_counter() as counter:
        y.backward(dy)
    return counter.get_total_flops()


def test_flop_counter_sees_the_saving():
    dense, half = _backward_flops(1.0), _backward_flops(0.5)
    assert dense > 0
    assert half == pytest.approx(dense / 2, rel=0.02)


def test_bfloat16_conv_backward_runs_and_is_close():
    torch.manual_seed(0)
    x = torch.randn(4, 16, 8, 8)
    w = torch.randn(32, 16, 3, 3) * 0.1
    dy = torch.randn(4, 32, 8, 8)
    case = {"stride": (1, 1), "padding": (1, 1), "dilation": (1, 1), "groups": 1}
    idx = torch.arange(32)
    got = conv2d_sparse_backward(
        dy.bfloat16(),
        x.bfloat16(),
        w.bfloat16(),
        idx,
        has_bias=False,
        **{k: v for k, v in case.items() if k != "groups"},
    )
    ref = _dense_grads(x, w, None, dy, case)
    assert got[0].dtype == torch.bfloat16
    torch.testing.assert_close(got[0].float(), ref[0], atol=0.05, rtol=0.05)
    torch.testing.assert_close(got[1].float(), ref[1], atol=0.5, rtol=0.05)
