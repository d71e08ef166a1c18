"""VCAS on residual CNNs: VCASConv2d exact at ratio 1, unbiased when sampling, FLOPs, resnet18-gn."""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fixtures import convnet, cross_entropy_loss, digits_batches, digits_subset, resnet
from greenprop.metering.flops import count_flops_per_sample, flop_counter
from greenprop.train.config import TrainConfig
from greenprop.train.trainer import Trainer
from greenprop.vcas import VCAS, VCASConfig, apply_vcas
from greenprop.vcas import layers as vcas_layers
from greenprop.vcas.layers import Mode
from greenprop.vcas.surgery import vcas_handle
from vcas_helpers import draw, drop_rescale, grad_dict, grads, skewed, spy_draws, unbiased, z_scores

DRAWS = 1600  # sampled backward passes per unbiasedness check
NEGATIVE_DRAWS = 400  # enough to expose a biased estimator


pytestmark = pytest.mark.usefixtures("one_thread")


def _twin(model: nn.Module) -> nn.Module:
    """A plain copy with the same weights (taken before VCAS is applied)."""
    assert vcas_handle(model) is None
    return copy.deepcopy(model)


def _assert_same_grads(model: nn.Module, reference: nn.Module) -> None:
    got, expected = grad_dict(model), grad_dict(reference)
    assert got.keys() == expected.keys() == dict(reference.named_parameters()).keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-12, atol=1e-14, msg=name)


# ---------------------------------------------------------------------------------------------
# exact at ratio 1


@pytest.mark.parametrize("kind", ["resnet18-gn", "resnet18-gn-channels-last", "convnet"])
def test_ratio_one_equals_dense_autograd(kind: str) -> None:
    if kind == "convnet":
        model, x = convnet(), skewed((5, 4, 9, 11), seed=1)
    else:
        model, x = resnet().double(), skewed((4, 1, 16, 16), seed=1)
    if kind.endswith("channels-last"):  # the trainer's channels_last option
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    reference = _twin(model)
    handle = vcas_handle(apply_vcas(model, VCASConfig(seed=3, compact_max_ratio=1.0, direct_max_ratio=1.0)))
    assert handle.convs and all(s.ratio == 1.0 for s in handle.samplers)
    if kind == "convnet":
        conv1 = handle.convs["0.conv1"]
        assert (conv1.stride, conv1.groups, conv1.dilation, conv1.bias is not None) == (
            (2, 2),
            2,
            (2, 2),
            True,
        )
    model(x)  # the compacted blocks' first forward checks them; the next runs compacted
    inputs = []
    for net in (model, reference):
        xi = x.clone().requires_grad_(True)
        out = net(xi)
        (out.tanh() * skewed(tuple(out.shape), seed=2)).sum().backward()
        inputs.append(xi)
    _assert_same_grads(model, reference)
    torch.testing.assert_close(inputs[0].grad, inputs[1].grad, rtol=1e-12, atol=1e-14)
    tally = handle.runtime.take_tally()
    assert tally.done == tally.dense > 0  # every conv ran, on every sample
    assert tally.rows == {i: [len(x), len(x)] for i in range(len(handle.samplers))}


def test_unconvertible_convs_stay_plain_and_exact() -> None:
    model = convnet(extra=True)
    reference = _twin(model)
    handle = vcas_handle(apply_vcas(model, VCASConfig(seed=1, compact_max_ratio=1.0, direct_max_ratio=1.0)))
    same, reflect = model[1].extra
    assert type(same) is nn.Conv2d and type(reflect) is nn.Conv2d
    assert not hasattr(same, "vcas_runtime") and not hasattr(reflect, "vcas_runtime")
    assert sorted(handle.convs) == sorted(f"{b}.{c}" for b in "01" for c in ("conv1", "conv2", "shortcut"))
    x = skewed((6, 4, 9, 11), seed=3)
    model(x)  # the compacted blocks' first forward checks them
    for net in (model, reference):
        net(x).square().sum().backward()
    _assert_same_grads(model, reference)

    # Sampled, the plain convs pass the dropped samples' zero rows on: they stay dropped.
    handle.samplers[1].ratio = 0.5
    model.zero_grad(set_to_none=True)
    handle.runtime.take_tally()
    xg = x.clone().requires_grad_(True)
    model(xg).square().sum().backward()
    kept = handle.runtime.take_tally().rows[1][0]
    assert 0 < kept < 6 and int(xg.grad.reshape(6, -1).ne(0).any(dim=1).sum()) == kept


# ---------------------------------------------------------------------------------------------
# unbiased by statistics


def _setup_unbiasedness() -> tuple[nn.Module, Tensor, list[Tensor], Tensor]:
    """The two-block conv net at sampler ratios 0.5, ONE fixed forward graph and the exact gradient."""
    model = convnet()
    reference = _twin(model)
    handle = vcas_handle(apply_vcas(model, VCASConfig(seed=5)))
    for sampler in handle.samplers:
        sampler.ratio = 0.5
    x, target = skewed((8, 4, 7, 7), seed=4), skewed((8, 6, 4, 4), seed=5)
    model(x)  # the compacted blocks' first forward checks them: the draws below run compacted
    out = model(x)
    assert type(out.grad_fn).__name__ == "_CompactedBlockBackward"
    loss = (out.tanh() * target).sum()
    exact = grads((reference(x).tanh() * target).sum(), list(reference.parameters()))
    return model, loss, list(model.parameters()), exact


def test_sampled_conv_gradients_are_unbiased() -> None:
    model, loss, params, exact = _setup_unbiasedness()
    runtime = vcas_handle(model).runtime
    runtime.take_tally()
    draws = draw(loss, params, DRAWS)
    z, fixed_err = z_scores(draws, exact)
    assert unbiased(z), f"max |z| {z.abs().max():.2f}, mean |z| {z.abs().mean():.2f}"
    assert fixed_err < 1e-12
    assert z.numel() == exact.numel()  # every entry of every parameter was sampled
    tally = runtime.take_tally()
    assert tally.done < tally.dense
    kept, seen = tally.rows[1]
    assert seen == DRAWS * 8 and abs(kept / seen - 0.5) < 0.02


def test_unbiasedness_check_catches_a_missing_rescale(monkeypatch) -> None:
    """Without the 1/p factors the same statistics fail: the check above has teeth."""
    _, loss, params, exact = _setup_unbiasedness()
    drop_rescale(monkeypatch, vcas_layers, "activation_sample")  # what the block samplers call
    z, fixed_err = z_scores(draw(loss, params, NEGATIVE_DRAWS), exact)
    assert fixed_err < 1e-12
    assert not unbiased(z)
    assert z.abs().max() > 10


# ---------------------------------------------------------------------------------------------
# FLOPs: the counted backward is the gathered work


def test_conv_backward_flops_equal_the_tally_and_dropped_rows_stay_zero(monkeypatch) -> None:
    # groups=1: FlopCounterMode counts a grouped conv's grad_weight as if ungrouped.
    model = convnet(groups=1)
    reference = _twin(model)
    handle = vcas_handle(apply_vcas(model, VCASConfig(seed=2)))
    handle.samplers[1].ratio = 0.5
    shapes: dict[str, tuple[int, ...]] = {}
    for name, conv in handle.convs.items():
        conv.register_forward_hook(lambda m, a, out, name=name: shapes.__setitem__(name, out.shape))
    draws = spy_draws(monkeypatch, vcas_layers, "activation_sample")
    n = 12
    x = skewed((n, 4, 9, 11), seed=6).requires_grad_(True)
    w = skewed((n, 6, 5, 6), seed=7)
    loss = (model(x) * w).sum()
    handle.runtime.take_tally()
    with flop_counter() as counter:
        loss.backward()
    tally = handle.runtime.take_tally()

    assert len(draws) == 1  # only the last block (ratio 0.5) draws
    kept = sorted(draws[0].tolist())
    assert 0 < len(kept) < n
    assert tally.rows == {1: [len(kept), n], 0: [len(kept), n]}
    # grad_input and grad_weight each cost what the forward does: 2 * outputs * (C_in/groups) * kh * kw.
    per_sample = sum(
        2 * 2 * math.prod(shapes[name][1:]) * conv.weight[0].numel() for name, conv in handle.convs.items()
    )
    # Only the convs run FLOP-counted ops here (GroupNorm, tanh, products are not counted).
    assert counter.get_total_flops() == tally.done == len(kept) * per_sample

    xr = x.detach().clone().requires_grad_(True)
    dense_loss = (reference(xr) * w).sum()
    with flop_counter() as dense_counter:
        dense_loss.backward()
    assert dense_counter.get_total_flops() == tally.dense == n * per_sample
    assert tally.saved == (n - len(kept)) * per_sample

    # A dropped sample's gradient is exactly zero all the way down to the input.
    dropped = sorted(set(range(n)) - set(kept))
    assert bool((x.grad[dropped] == 0).all())
    assert bool((x.grad[kept].abs().sum(dim=(1, 2, 3)) > 0).all())


# ---------------------------------------------------------------------------------------------
# the controller on resnet18-gn


def test_controller_on_resnet18_gn(digits) -> None:
    model = resnet(seed=1)
    reference = _twin(model)
    config = VCASConfig(update_every=1)
    vcas = VCAS(apply_vcas(model, config))
    assert vcas.ratios()["weight"] == {}
    assert len(vcas._entries) == 19  # the variance is measured on every converted conv
    record = vcas.update(iter(digits_batches(digits, 2, size=16)), cross_entropy_loss)
    assert vcas.s == record["s"] == 1 - config.s_step
    assert vcas.ratios()["weight"] == {}
    assert record["weight_ratio_mean"] is None and record["weight_variance_ratio_mean"] is None
    assert record["activation_variance_ratio"] == 0.0 and record["sgd_variance"] > 0
    assert all(p.grad is None for p in model.parameters())
    x, y = digits_batches(digits, 1, size=16, seed=3)[0]
    dense = count_flops_per_sample(reference, x, y, F.cross_entropy)
    assert (vcas.dense_per_sample.forward, vcas.dense_per_sample.backward) == (dense.forward, dense.backward)

    for sampler in vcas.handle.samplers:
        sampler.ratio = 0.5
    state = vcas.state_dict()
    batch = digits_batches(digits, 1, size=32, seed=4)[0]
    cross_entropy_loss(model, batch).backward()
    grads = grad_dict(model)
    report = vcas.flops_report()
    assert report["train_samples"] == 32 and report["weight"] == {}
    saved = report["sampled_backward_saved"]
    assert saved > 0
    assert report["backward_ratio"] == pytest.approx(1 - saved / (32 * dense.backward), rel=1e-12)
    assert report["backward_ratio"] < 1

    # state_dict round trip: a fresh controller on a copy resumes the same draws.
    other = resnet(seed=9)
    other.load_state_dict(reference.state_dict())
    again = VCAS(apply_vcas(other, config))
    again.load_state_dict(state)
    assert again.ratios() == vcas.ratios() and again.s == vcas.s and again.history == vcas.history
    cross_entropy_loss(other, batch).backward()
    for name, grad in grad_dict(other).items():
        assert torch.equal(grad, grads[name]), name
    assert again.flops_report() == report
    again.load_state_dict(again.state_dict())  # its own state loads too
    assert again.ratios() == vcas.ratios()


# ---------------------------------------------------------------------------------------------
# the reference trainer


def _config(method: str) -> TrainConfig:
    return TrainConfig(
        model="resnet18-gn",
        dataset="digits",
        epochs=2,
        batch_size=32,
        lr=0.05,
        width=8,
        subset=64,
        test_subset=32,
        flops_samples=4,
        progress=False,
        method=method,
    )


def _flops(metrics: dict[str, Any], phase: str) -> float:
    return metrics["summary"]["flops"][phase]["value"]


def test_vcas_trains_resnet18_gn_through_the_trainer() -> None:
    data = digits_subset(64, 32)
    base = Trainer(_config("baseline"), data=data).fit()
    trainer = Trainer(_config("vcas:update_every=2"), data=data)
    metrics = trainer.fit()
    vcas = trainer.controllers[0]
    assert isinstance(vcas, VCAS) and len(vcas.handle.convs) == 19
    records = metrics["epochs"]
    assert [r["vcas"]["updates"] for r in records] == [1, 2]  # steps 0, 1 | 2, 3: updates at 0 | 2
    for r in records:
        assert r["vcas"]["weight_ratio_mean"] is None
        assert all(h["weight_ratio_mean"] is None for h in r["vcas"]["history"])
        assert set(r["vcas"]["realised_activation_ratio"]) == {
            f"layer{i}.{j}" for i in range(1, 5) for j in (0, 1)
        }
        assert all(math.isfinite(v) for v in r["step_losses"])
    report = vcas.flops_report()
    saved = report["sampled_backward_saved"]
    assert saved > 0 and report["backward_ratio"] < 1
    # The counted backward: dense, minus what the sampled convs saved, plus the estimation passes.
    overhead_forward = report["overhead_samples"]["forward"] * report["dense_forward_per_sample"]
    overhead_backward = report["overhead_flops"] - overhead_forward
    assert _flops(metrics, "forward") == pytest.approx(_flops(base, "forward") + overhead_forward, rel=1e-9)
    training_backward = _flops(metrics, "backward") - overhead_backward
    assert training_backward == pytest.approx(_flops(base, "backward") - saved, rel=1e-9)
    assert training_backward < _flops(base, "backward")
    assert _flops(metrics, "backward") != _flops(base, "backward")
    assert vcas.runtime.mode is Mode.FULL
