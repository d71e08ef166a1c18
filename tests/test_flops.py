"""FLOP counting: analytic counts, custom backwards, no side effects, per-sample scaling."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from greenprop.metering import FlopCount, Quantity, count_flops, count_flops_per_sample


def sum_loss(output: torch.Tensor, _targets: object) -> torch.Tensor:
    return output.sum()


@pytest.mark.parametrize("bias", [True, False])
def test_linear_matches_analytic_count(bias: bool) -> None:
    batch, n_in, n_out = 5, 7, 3
    layer = nn.Linear(n_in, n_out, bias=bias)
    forward = 2 * batch * n_in * n_out  # the bias add is not counted
    x = torch.randn(batch, n_in)
    # input without grad: backward computes grad_weight only
    assert count_flops(layer, x, None, sum_loss) == FlopCount(forward, forward)
    # input requiring grad: grad_input + grad_weight
    x_grad = x.clone().requires_grad_(True)
    assert count_flops(layer, x_grad, None, sum_loss) == FlopCount(forward, 2 * forward)
    assert x_grad.grad is None  # the counting pass must not leave a grad on the inputs either


@pytest.mark.parametrize("bias", [True, False])
def test_conv2d_matches_analytic_count(bias: bool) -> None:
    n, c_in, c_out, k, size = 2, 3, 4, 3, 8
    conv = nn.Conv2d(c_in, c_out, k, stride=2, padding=1, bias=bias)
    out_size = (size + 2 - k) // 2 + 1
    forward = 2 * n * c_out * out_size * out_size * c_in * k * k
    x = torch.randn(n, c_in, size, size)
    assert count_flops(conv, x, None, sum_loss) == FlopCount(forward, forward)
    x.requires_grad_(True)
    assert count_flops(conv, x, None, sum_loss) == FlopCount(forward, 2 * forward)


class MatmulTwiceBackward(torch.autograd.Function):
    """y = x @ w whose backward does the grad_input matmul and one extra matmul."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, w)
        return x @ w

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, w = ctx.saved_tensors
        grad_w = x.t() @ grad
        extra = (x.t() @ grad) * 0  # work a custom backward does; the counter must see it
        return grad @ w.t(), grad_w + extra


class CustomLinear(nn.Module):
    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_in, n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return MatmulTwiceBackward.apply(x, self.weight)


def test_counts_aten_ops_inside_custom_backward() -> None:
    batch, n_in, n_out = 4, 6, 5
    mm = 2 * batch * n_in * n_out
    count = count_flops(CustomLinear(n_in, n_out), torch.randn(batch, n_in), None, sum_loss)
    assert count == FlopCount(mm, 3 * mm)


class SmallNet(nn.Module):
    """Conv-BN-ReLU twice, dropout, linear head: has buffers and uses the RNG."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(16)
        self.drop = nn.Dropout(0.5)
        self.head = nn.Linear(16 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
        return self.head(self.drop(x.flatten(1)))


def test_dense_cnn_backward_is_about_twice_forward() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16 * 8 * 8, 10),
    )
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 10, (4,))
    count = count_flops(model, x, y, F.cross_entropy)
    # The first conv's input needs no grad, so its backward is 1x instead of 2x.
    conv1 = 2 * 4 * 8 * 64 * 3 * 9
    assert count.backward == 2 * count.forward - conv1
    assert 1.8 < count.backward_ratio < 2.0


def test_counting_leaves_no_trace() -> None:
    torch.manual_seed(1)
    model = SmallNet()
    x, y = torch.randn(6, 3, 16, 16), torch.randint(0, 10, (6,))
    # a real step first, so there are grads and running stats to preserve
    F.cross_entropy(model(x), y).backward()
    model.head.bias.grad = None  # a None grad must stay None
    model.eval()
    model.bn2.train()  # mixed per-module modes must come back as they were

    buffers = {name: b.clone() for name, b in model.named_buffers()}
    grad_objects = {name: p.grad for name, p in model.named_parameters()}
    grad_values = {name: None if g is None else g.clone() for name, g in grad_objects.items()}
    params = {name: p.detach().clone() for name, p in model.named_parameters()}
    modes = {name: m.training for name, m in model.named_modules()}
    torch_state = torch.random.get_rng_state()
    py_state, np_state = random.getstate(), np.random.get_state()

    count = count_flops(model, x, y, F.cross_entropy)  # train=True: dropout and BN active
    assert count.forward > 0 and count.backward > 0

    for name, b in model.named_buffers():
        assert torch.equal(b, buffers[name]), name
    assert int(model.bn1.num_batches_tracked) == 1
    for name, p in model.named_parameters():
        assert p.grad is grad_objects[name], name
        if grad_values[name] is None:
            assert p.grad is None
        else:
            assert torch.equal(p.grad, grad_values[name]), name
        assert torch.equal(p.detach(), params[name]), name
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert torch.equal(torch.random.get_rng_state(), torch_state)
    assert random.getstate() == py_state
    assert np.array_equal(np.random.get_state()[1], np_state[1])


def test_counting_does_not_shift_the_dropout_stream() -> None:
    model = SmallNet().train()
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
    torch.manual_seed(7)
    expected = model(x)
    torch.manual_seed(7)
    count_flops(model, x, y, F.cross_entropy)
    assert torch.equal(model(x), expected)


def test_state_restored_when_the_pass_raises() -> None:
    model = SmallNet().eval()
    buffers = [b.clone() for b in model.buffers()]

    def bad_loss(output: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        count_flops(model, torch.randn(2, 3, 16, 16), None, bad_loss)
    assert not model.training
    assert all(torch.equal(a, b) for a, b in zip(model.buffers(), buffers, strict=True))


def test_non_scalar_loss_is_rejected() -> None:
    with pytest.raises(ValueError, match="scalar"):
        count_flops(nn.Linear(3, 2), torch.randn(4, 3), None, lambda out, _: out)


def test_per_sample_equals_full_batch() -> None:
    torch.manual_seed(2)
    model = SmallNet()
    x, y = torch.randn(12, 3, 16, 16), torch.randint(0, 10, (12,))
    full = count_flops(model, x, y, F.cross_entropy)
    per_sample = count_flops_per_sample(model, x, y, F.cross_entropy, max_samples=4)
    assert per_sample == full.per_sample(12)
    assert per_sample.scale(12) == full


def test_per_sample_slices_tuples_and_mappings() -> None:
    class TwoInputs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(3, 2), nn.Linear(5, 2)

        def forward(self, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
            return self.a(left) + self.b(right)

    model, left, right = TwoInputs(), torch.randn(8, 3), torch.randn(8, 5)
    expected = FlopCount(2 * 3 * 2 + 2 * 5 * 2, 2 * 3 * 2 + 2 * 5 * 2)
    assert count_flops_per_sample(model, (left, right), None, sum_loss, max_samples=2) == expected
    as_dict = {"left": left, "right": right}
    assert count_flops_per_sample(model, as_dict, None, sum_loss, max_samples=3) == expected
    with pytest.raises(ValueError, match="max_samples"):
        count_flops_per_sample(model, (left, right), None, sum_loss, max_samples=0)


def test_flop_count_helpers() -> None:
    count = FlopCount(10, 20)
    assert count.total == 30
    assert count.backward_ratio == 2
    assert count + FlopCount(1, 2) == FlopCount(11, 22)
    assert count.per_sample(4) == FlopCount(2.5, 5.0)
    with pytest.raises(ValueError):
        count.per_sample(0)
    quantities = count.to_quantities()
    assert quantities["total"] == Quantity(30.0, "FLOP", "counted", quantities["total"].source)
    assert all(q.kind == "counted" and q.unit == "FLOP" for q in quantities.values())
    assert "FlopCounterMode" in quantities["forward"].source
    assert "fused CPU attention" in quantities["forward"].source  # tells counts since session 28 apart
