"""Tests for greenprop.models: shapes, gradients, the ``head`` contract, options."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from greenprop.errors import GreenpropError
from greenprop.models import MODELS, Block, MixerBlock, create
from greenprop.models.vit import Attention

SHAPES = [(8, 1), (28, 1), (32, 3)]  # digits, Fashion-MNIST, pad_to_32


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.mark.parametrize(("image_size", "in_channels"), SHAPES)
@pytest.mark.parametrize("name", MODELS)
def test_forward_backward_shapes(name, image_size, in_channels):
    model = create(name, num_classes=7, in_channels=in_channels, image_size=image_size)
    x = torch.randn(3, in_channels, image_size, image_size)
    out = model(x)
    assert out.shape == (3, 7)
    F.cross_entropy(out, torch.tensor([0, 3, 6])).backward()
    for pname, param in model.named_parameters():
        assert param.grad is not None, pname
        assert torch.isfinite(param.grad).all(), pname
    assert any(param.grad.abs().sum() > 0 for param in model.parameters())


@pytest.mark.parametrize("name", MODELS)
def test_head_is_the_last_linear_and_produces_the_output(name):
    model = create(name, num_classes=5, image_size=8)
    assert isinstance(model.head, nn.Linear) and model.head.out_features == 5
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert linears[-1] is model.head
    calls: list[nn.Module] = []
    outputs: list[torch.Tensor] = []

    def record(module: nn.Module, out: torch.Tensor) -> None:
        calls.append(module)
        outputs.append(out)

    for module in linears:
        module.register_forward_hook(lambda m, _inp, out: record(m, out))
    y = model(torch.randn(2, 1, 8, 8))
    assert calls[-1] is model.head and calls.count(model.head) == 1
    assert torch.equal(outputs[-1], y)


def test_resnet18_matches_the_cifar_reference():
    model = create("resnet18", in_channels=3, image_size=32)
    assert sum(p.numel() for p in model.parameters()) == 11_173_962
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())
    assert [len(stage) for stage in (model.layer1, model.layer2, model.layer3, model.layer4)] == [
        2,
        2,
        2,
        2,
    ]
    sizes = {}
    for stage in ("layer1", "layer2", "layer3", "layer4"):
        getattr(model, stage).register_forward_hook(
            lambda _m, _i, out, stage=stage: sizes.__setitem__(stage, tuple(out.shape[1:]))
        )
    model.eval()
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
    assert sizes == {
        "layer1": (64, 32, 32),
        "layer2": (128, 16, 16),
        "layer3": (256, 8, 8),
        "layer4": (512, 4, 4),
    }


def test_resnet18_width_and_narrow_variant():
    def count(model: nn.Module) -> int:
        return sum(p.numel() for p in model.parameters())

    narrow = create("resnet18-narrow", in_channels=3)
    assert narrow.conv1.out_channels == 16 and narrow.head.in_features == 128
    assert count(narrow) == count(create("resnet18", in_channels=3, width=16))
    # Conv weights dominate, so a quarter of the width is roughly 1/16 of the parameters.
    assert count(narrow) * 14 < 11_173_962 < count(narrow) * 18


def test_vit_uses_explicit_linears_that_a_swap_sees():
    model = create("vit", image_size=8, depth=2)
    assert not any(
        isinstance(m, (nn.MultiheadAttention, nn.TransformerEncoderLayer)) for m in model.modules()
    )
    blocks = [m for m in model.modules() if isinstance(m, Block)]
    assert len(blocks) == 2
    x = torch.randn(2, 1, 8, 8)
    model.eval()
    before = model(x)

    class CountingLinear(nn.Linear):
        calls = 0

        def forward(self, inp: torch.Tensor) -> torch.Tensor:
            CountingLinear.calls += 1
            return super().forward(inp)

    def swap(parent: nn.Module, attr: str) -> None:
        old = getattr(parent, attr)
        new = CountingLinear(old.in_features, old.out_features)
        new.weight, new.bias = old.weight, old.bias  # same Parameter objects
        setattr(parent, attr, new)

    for block in blocks:
        for parent, attr in [
            (block.attn, "qkv"),
            (block.attn, "proj"),
            (block.mlp, "fc1"),
            (block.mlp, "fc2"),
        ]:
            assert isinstance(getattr(parent, attr), nn.Linear)
            swap(parent, attr)
    after = model(x)
    assert CountingLinear.calls == 2 * 4
    assert torch.allclose(before, after)


def test_vit_attention_matches_the_textbook_formula():
    attn = Attention(dim=12, heads=3)
    x = torch.randn(2, 5, 12)
    q, k, v = attn.qkv(x).chunk(3, dim=-1)

    def heads(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(2, 5, 3, 4).transpose(1, 2)

    weights = torch.softmax(heads(q) @ heads(k).transpose(-1, -2) / math.sqrt(4), dim=-1)
    expected = attn.proj((weights @ heads(v)).transpose(1, 2).reshape(2, 5, 12))
    assert torch.allclose(attn(x), expected, atol=1e-5)


def test_mixer_blocks_mix_tokens_and_patch_sizes():
    model = create("mixer", image_size=28, depth=2)
    assert model.patch_embed.num_patches == 49
    assert sum(isinstance(m, MixerBlock) for m in model.modules()) == 2
    assert create("mixer", image_size=8).patch_embed.num_patches == 16
    assert create("mixer", image_size=32, patch_size=8).patch_embed.num_patches == 16
    # Token mixing: changing one patch changes every token's output of a block.
    block = model.blocks[0]
    tokens = torch.randn(1, 49, 128)
    changed = tokens.clone()
    changed[0, 0] += 1.0
    diff = (block(tokens) - block(changed)).abs().sum(-1)[0]
    assert (diff[1:] > 0).all()


def test_dropout_is_active_only_in_training():
    model = create("mlp", image_size=8, dropout=0.5)
    x = torch.randn(4, 1, 8, 8)
    model.train()
    assert not torch.equal(model(x), model(x))
    model.eval()
    assert torch.equal(model(x), model(x))


def test_same_seed_same_initial_weights():
    torch.manual_seed(7)
    a = create("cnn")
    torch.manual_seed(7)
    b = create("cnn")
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)


def test_name_is_case_and_underscore_insensitive():
    assert create("ResNet18_Narrow", in_channels=3).conv1.out_channels == 16


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"name": "resnet50"}, "resnet50"),
        ({"name": "mlp", "num_classes": 0}, "num_classes"),
        ({"name": "mlp", "in_channels": -1}, "in_channels"),
        ({"name": "cnn", "image_size": 2}, "image_size"),
        ({"name": "cnn", "width": 2.5}, "2.5"),
        ({"name": "vit", "width": 0}, "width"),
        ({"name": "mlp", "dropout": 1.0}, "dropout"),
        ({"name": "mlp", "dropout": -0.1}, "-0.1"),
        ({"name": "resnet18", "depth": 3}, "depth"),
        ({"name": "vit", "heads": 5}, "heads=5"),
        ({"name": "vit", "mlp_ratio": 0}, "mlp_ratio"),
        ({"name": "mixer", "patch_size": 3}, "patch_size=3"),
        ({"name": "vit", "patch_size": 5, "image_size": 32}, "patch_size=5"),
        ({"name": "mixer", "bogus": 1}, "bogus"),
    ],
)
def test_bad_names_and_options_raise(kwargs, needle):
    with pytest.raises(GreenpropError) as info:
        create(**kwargs)
    assert needle in str(info.value)


def test_unknown_model_lists_choices():
    with pytest.raises(GreenpropError) as info:
        create("nope")
    for name in MODELS:
        assert name in str(info.value)
