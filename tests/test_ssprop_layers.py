"""ssProp layers and surgery: in-place conversion, round trips, layer selection rules."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from greenprop.ssprop import (
    SparseConv2d,
    SparseLinear,
    SSPropConfig,
    apply_ssprop,
    remove_ssprop,
    sparse_layers,
)
from greenprop.ssprop.functional import select_channels
from greenprop.ssprop.surgery import output_layer_names

CL = torch.channels_last


class Net(nn.Module):
    """conv -> conv (grouped) -> depthwise -> pool -> fc -> head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1, groups=2, bias=False)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.fc = nn.Linear(16, 32)
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.conv1(x)))
        x = self.dw(F.relu(self.conv2(x)))
        return self.head(F.relu(self.fc(x.mean((2, 3)))))


def _apply(model, config=None, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return apply_ssprop(model, config or SSPropConfig(keep=0.5), **kwargs)


def test_default_converts_convs_but_not_linear_depthwise_or_output():
    model = Net()
    with pytest.warns(UserWarning, match="one output channel per group"):
        apply_ssprop(model, SSPropConfig(keep=0.5))
    assert set(sparse_layers(model)) == {"conv1", "conv2"}
    assert type(model.conv1) is SparseConv2d and isinstance(model.conv1, nn.Conv2d)
    assert type(model.dw) is nn.Conv2d and type(model.head) is nn.Linear
    assert model.conv1.keep == 0.5


def test_linear_opt_in_still_leaves_the_output_layer_dense():
    model = _apply(Net(), SSPropConfig(keep=0.5, layers=("conv", "linear")))
    assert set(sparse_layers(model)) == {"conv1", "conv2", "fc"}
    assert type(model.fc) is SparseLinear
    model = _apply(Net(), SSPropConfig(keep=0.5, layers=("linear",), include_output=True))
    assert set(sparse_layers(model)) == {"fc", "head"}


def test_output_layer_is_last_layer_or_named_head():
    assert output_layer_names(Net()) == {"head"}
    plain = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1))
    assert output_layer_names(plain) == {"2"}
    model = _apply(plain, SSPropConfig(keep=0.5))
    assert set(sparse_layers(model)) == {"0"}


def test_module_filter_replaces_type_and_output_rules():
    model = _apply(Net(), module_filter_fn=lambda m, name: name in ("conv2", "head"))
    assert set(sparse_layers(model)) == {"conv2", "head"}


def test_min_channels_keeps_small_layers_dense():
    model = _apply(Net(), SSPropConfig(keep=0.5, min_channels=9))
    assert set(sparse_layers(model)) == {"conv1"}  # conv2 has 8 channels per group


def test_warns_when_nothing_converted():
    with pytest.warns(UserWarning, match="converted no layer"):
        apply_ssprop(nn.Sequential(nn.Linear(3, 3)), SSPropConfig())
    model = _apply(Net())
    with pytest.warns(UserWarning, match="already converted"):
        apply_ssprop(model, SSPropConfig(), module_filter_fn=lambda m, n: n.startswith("conv"))


def test_attention_out_proj_is_not_converted():
    model = nn.Sequential(nn.MultiheadAttention(8, 2), nn.Linear(8, 8), nn.Linear(8, 2))
    _apply(model, SSPropConfig(layers=("linear",)))
    assert set(sparse_layers(model)) == {"1"}


def test_round_trip_keeps_parameters_state_dict_and_optimizer():
    torch.manual_seed(0)
    model = Net()
    keys = list(model.state_dict())
    params = list(model.parameters())
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    _apply(model, SSPropConfig(keep=0.5, layers=("conv", "linear")))
    assert list(model.state_dict()) == keys
    assert all(a is b for a, b in zip(model.parameters(), params, strict=True))
    assert all(p is q for p, q in zip(opt.param_groups[0]["params"], params, strict=True))

    before = model.conv1.weight.detach().clone()
    model(torch.randn(4, 3, 8, 8)).sum().backward()
    opt.step()
    assert not torch.equal(before, model.conv1.weight)

    # A checkpoint of the converted model loads into a plain model and back.
    plain = Net()
    plain.load_state_dict(model.state_dict())
    model.load_state_dict(plain.state_dict())

    remove_ssprop(model)
    assert not sparse_layers(model)
    assert type(model.conv1) is nn.Conv2d and type(model.fc) is nn.Linear
    assert "keep" not in model.conv1.__dict__ and "_keep" not in model.conv1.__dict__
    assert list(model.state_dict()) == keys
    assert all(a is b for a, b in zip(model.parameters(), params, strict=True))
    assert "keep" not in repr(model)


def test_forward_is_unchanged_and_repr_shows_settings():
    torch.manual_seed(0)
    model = Net()
    x = torch.randn(2, 3, 8, 8)
    ref = model(x)
    _apply(model, SSPropConfig(keep=0.5, round_to=4))
    torch.testing.assert_close(model(x), ref, rtol=0, atol=0)
    assert "keep=0.5, selection=topk, round_to=4" in repr(model.conv1)


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, CL])
@pytest.mark.parametrize(
    "conv_kwargs",
    [
        {"padding": "same"},  # asymmetric for a 4x4 kernel
        {"padding": "same", "padding_mode": "reflect"},
        {"padding": 2, "padding_mode": "circular", "stride": 2},
        {"padding": "valid", "dilation": 2},
    ],
)
def test_layer_gradients_match_dense_kept_channels(memory_format, conv_kwargs):
    torch.manual_seed(0)
    dense = nn.Conv2d(4, 12, 4, **conv_kwargs).double().to(memory_format=memory_format)
    sparse = copy.deepcopy(dense)
    _apply(sparse, module_filter_fn=lambda m, n: True)
    sparse.keep = 0.5
    x = torch.randn(2, 4, 9, 9, dtype=torch.float64).contiguous(memory_format=memory_format)
    xd, xs = x.clone().requires_grad_(), x.clone().requires_grad_()
    y = sparse(xs)
    dy = torch.randn_like(y)
    y.backward(dy)
    idx = select_channels(dy, 6)
    mask = torch.zeros(12, dtype=torch.float64)
    mask[idx] = 1
    yd = dense(xd)
    torch.testing.assert_close(y, yd)
    yd.backward(dy * mask.view(1, -1, 1, 1))
    torch.testing.assert_close(xs.grad, xd.grad)
    torch.testing.assert_close(sparse.weight.grad, dense.weight.grad)
    torch.testing.assert_close(sparse.bias.grad, dense.bias.grad)


def test_keep_one_and_no_grad_use_the_plain_path():
    layer = SparseConv2d(3, 8, 3, keep=1.0)
    y = layer(torch.randn(1, 3, 5, 5))
    assert type(y.grad_fn).__name__ == "ConvolutionBackward0"
    layer.keep = 0.5
    assert type(layer(torch.randn(1, 3, 5, 5)).grad_fn).__name__ != "ConvolutionBackward0"
    with torch.no_grad():
        assert layer(torch.randn(1, 3, 5, 5)).grad_fn is None
    with pytest.raises(ValueError, match="keep"):
        layer.keep = 0.0
    with pytest.raises(ValueError, match="selection"):
        SparseLinear(3, 4, selection="largest")


def test_sparse_linear_with_leading_dims():
    torch.manual_seed(0)
    layer = SparseLinear(5, 10, keep=0.3)
    x = torch.randn(2, 3, 5, requires_grad=True)
    y = layer(x)
    y.backward(torch.randn_like(y))
    rows = layer.weight.grad.abs().sum(1) != 0
    assert int(rows.sum()) == 3 and x.grad.shape == x.shape
    assert layer.bias.grad[~rows].eq(0).all()


def test_random_selection_is_seeded_per_layer():
    def grads(seed):
        torch.manual_seed(0)
        model = _apply(Net(), SSPropConfig(keep=0.25, selection="random", seed=seed))
        model(torch.randn(2, 3, 6, 6)).sum().backward()
        return model.conv1.weight.grad.abs().sum((1, 2, 3)) != 0

    assert torch.equal(grads(1), grads(1))
    assert not all(torch.equal(grads(1), grads(s)) for s in (2, 3, 4))


def test_deepcopy_and_channels_last_model_training_step():
    model = _apply(Net(), SSPropConfig(keep=0.5)).to(memory_format=CL)
    clone = copy.deepcopy(model)
    assert type(clone.conv1) is SparseConv2d and clone.conv1.keep == 0.5
    x = torch.randn(4, 3, 8, 8).contiguous(memory_format=CL)
    model(x).logsumexp(1).mean().backward()
    assert model.conv1.weight.grad.is_contiguous(memory_format=CL)
    zero_rows = (model.conv1.weight.grad.flatten(1).abs().sum(1) == 0).sum()
    assert int(zero_rows) == 8


def test_calibration_times_once_per_k_and_records_a_decision():
    torch.manual_seed(0)
    layer = SparseConv2d(8, 32, 3, padding=1, keep=0.5, calibrate=True)
    x = torch.randn(2, 8, 8, 8)
    for _ in range(2):
        layer(x).sum().backward()
    assert set(layer.calibration) == {16}
    assert 16 in layer._selector.timings
    # Whatever was chosen, the layer's kept fraction reports it.
    expected = 0.5 if layer.calibration[16] else 1.0
    assert layer.kept_fraction() == expected
    layer._selector.decisions[16] = False  # force "dense was faster"
    assert type(layer(x).grad_fn).__name__ == "ConvolutionBackward0"


def test_calibration_waits_while_flops_are_counted():
    from greenprop.metering.flops import flop_counter

    layer = SparseConv2d(8, 32, 3, padding=1, keep=0.5, calibrate=True)
    y = layer(torch.randn(2, 8, 8, 8, requires_grad=True))
    with flop_counter() as counter:
        y.sum().backward()
    assert layer.calibration == {}
    dense = 2 * 2 * 2 * 8 * 8 * 32 * 8 * 9  # grad_input + grad_weight, 2 FLOPs per MAC
    assert counter.get_total_flops() == pytest.approx(0.5 * dense, rel=0.01)


@pytest.mark.parametrize(
    ("layer", "shape"),
    [(SparseConv2d(4, 8, 3, keep=0.5), (2, 4, 6, 6)), (SparseLinear(4, 8, keep=0.5), (3, 2, 4))],
)
def test_autocast_bfloat16(layer, shape):
    x = torch.randn(*shape, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert layer.weight.grad.dtype == torch.float32 and x.grad.dtype == torch.float32
    assert int((layer.weight.grad.flatten(1).abs().sum(1) != 0).sum()) == 4
