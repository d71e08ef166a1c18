"""VCAS edge cases found in review: shared layers, frozen weights, autocast, device-agnostic draws."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from greenprop.errors import GreenpropError
from greenprop.vcas import VCAS, VCASConfig, apply_vcas
from greenprop.vcas.samplers import sample_mask
from greenprop.vcas.surgery import vcas_handle


class _Block(nn.Module):
    def __init__(self, fc: nn.Linear) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(fc.in_features)
        self.fc = fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc(self.norm(x))


def _stack(depth: int = 3, dim: int = 6) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(*(_Block(nn.Linear(dim, dim)) for _ in range(depth)))


def _loss(model: nn.Module, batch) -> torch.Tensor:
    x, w = batch
    return (model(x) * w).sum()


def _batches(n: int = 12, tokens: int = 3, dim: int = 6):
    gen = torch.Generator().manual_seed(1)
    while True:
        yield torch.randn(n, tokens, dim, generator=gen), torch.randn(n, tokens, dim, generator=gen)


def test_a_layer_shared_by_two_blocks_is_refused_naming_it():
    shared = nn.Linear(6, 6)
    model = nn.Sequential(_Block(shared), _Block(shared))
    with pytest.raises(GreenpropError, match=r"1\.fc is shared by blocks '0' and '1'"):
        apply_vcas(model)
    assert type(shared) is nn.Linear and vcas_handle(model) is None  # nothing converted


def test_frozen_blocks_are_left_out_of_the_estimation():
    model = _stack()
    for p in model[0].parameters():  # fine-tuning: the lowest block frozen
        p.requires_grad_(False)
    vcas = VCAS(apply_vcas(model, VCASConfig(update_every=1, s_step=0.1)))
    record = vcas.step(_batches(), _loss)
    assert record is not None and record["s"] == pytest.approx(0.9)
    ratios = vcas.ratios()
    assert ratios["weight"]["0.fc"] == 1.0  # frozen: no gradient, no token ratio to adapt
    assert ratios["weight"]["1.fc"] == pytest.approx(0.95) == ratios["weight"]["2.fc"]
    # Block 0 sees no backward once its weights are frozen; blocks 1 and 2 were updated.
    assert ratios["activation"]["0"] == 1.0
    x, w = next(_batches())
    _loss(model, (x, w)).backward()
    assert model[0].fc.weight.grad is None and model[2].fc.weight.grad is not None


def test_everything_frozen_is_a_clear_error():
    model = _stack()
    for p in model.parameters():
        p.requires_grad_(False)
    model[0].norm.weight.requires_grad_(True)  # a loss that still requires grad
    vcas = VCAS(apply_vcas(model, VCASConfig(update_every=1)))
    with pytest.raises(GreenpropError, match=r"no converted layer .* trainable weight"):
        vcas.step(_batches(), _loss)


@pytest.mark.parametrize("ratio", [1.0, 0.5])
def test_bf16_autocast_backward_runs_and_matches_dtypes(ratio: float):
    model = _stack()
    handle = vcas_handle(apply_vcas(model))
    for sampler in handle.samplers:
        sampler.ratio = ratio
    for layer in handle.linears.values():
        layer.vcas_weight_ratio = ratio
    x, w = next(_batches())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = _loss(model, (x, w))
    loss.backward()
    for p in model.parameters():
        assert p.grad is not None and p.grad.dtype == p.dtype == torch.float32
        assert torch.isfinite(p.grad).all()
    if ratio == 1.0:  # exact path: close to the plain model's bf16 gradient
        plain = _stack()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _loss(plain, (x, w)).backward()
        for got, want in zip(model.parameters(), plain.parameters(), strict=True):
            torch.testing.assert_close(got.grad, want.grad, rtol=2e-2, atol=2e-2)


def test_draws_follow_the_generator_not_the_tensor_device():
    """Draws come from the (CPU) generator and land on the probabilities' device; same seed, same draw."""
    probs = torch.full((1000,), 0.3)
    a = sample_mask(probs, torch.Generator().manual_seed(5))
    b = sample_mask(probs, torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and a.device == probs.device
    assert 200 < int(a.sum()) < 400


class _AuxBlock(_Block):
    """Keeps an auxiliary loss on its internals: gradient that bypasses the block's output."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(self.norm(x))
        self.aux = h.square().mean()
        return x + h


@pytest.mark.parametrize("aux", [False, True])
def test_check_rows_catches_gradient_that_bypasses_the_sampler(aux: bool):
    torch.manual_seed(0)
    block = _AuxBlock if aux else _Block
    model = nn.Sequential(*(block(nn.Linear(6, 6)) for _ in range(2)))
    handle = vcas_handle(apply_vcas(model, VCASConfig(check_rows=True)))
    for sampler in handle.samplers:
        sampler.ratio = 0.3
    x, w = next(_batches())
    loss = _loss(model, (x, w))
    if aux:
        loss = loss + sum(b.aux for b in model)
        with pytest.raises(GreenpropError, match=r"check_rows: VCASLinear in block 1 received gradient"):
            loss.backward()
    else:
        loss.backward()  # the assumptions hold: nothing to report
        assert all(p.grad is not None for p in model.parameters())


def test_check_rows_option_parses_and_validates():
    assert VCASConfig.from_dict({"check_rows": "true"}).check_rows is True
    assert VCASConfig.from_dict({"check_rows": "0"}).check_rows is False
    with pytest.raises(GreenpropError, match="check_rows must be true or false"):
        VCASConfig.from_dict({"check_rows": "maybe"})
    with pytest.raises(GreenpropError, match="check_rows must be true or false"):
        VCASConfig(check_rows=1)
