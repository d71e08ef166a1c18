"""VCAS surgery: which layers are converted, round trips, refused blocks, block detection."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from fixtures import Block, resnet, stack, tiny_vit
from greenprop.errors import GreenpropError
from greenprop.models.tokens import Mlp
from greenprop.models.vit import Attention
from greenprop.models.vit import Block as ViTBlock
from greenprop.surgery import SurgeryWarning
from greenprop.vcas import apply_vcas, find_blocks, remove_vcas
from greenprop.vcas.layers import VCASConv2d, VCASLinear
from greenprop.vcas.surgery import vcas_handle
from vcas_helpers import grad_dict


class BatchNormBlock(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, dim)
        self.bn = nn.BatchNorm1d(dim)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.bn(self.fc(x))


def test_apply_and_remove_keep_parameters_and_state_dict() -> None:
    model = tiny_vit()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = list(model.parameters())
    linear_count = sum(type(m) is nn.Linear for m in model.modules())
    handle = vcas_handle(apply_vcas(model))
    assert len(handle.linears) == 2 * 4  # qkv, proj, fc1, fc2 per block; the head is outside
    assert sum(type(m) is nn.Linear for m in model.modules()) == linear_count - 8
    state = model.state_dict()
    assert list(state) == list(before) and all(torch.equal(state[k], before[k]) for k in before)
    assert all(a is b for a, b in zip(model.parameters(), params, strict=True))
    with pytest.warns(SurgeryWarning, match="already applied"):
        apply_vcas(model)
    assert vcas_handle(model) is handle  # the second call changed nothing

    for s in handle.samplers:
        s.ratio = 0.2  # would sample, were it still in place
    remove_vcas(model)
    assert vcas_handle(model) is None
    assert sum(type(m) is nn.Linear for m in model.modules()) == linear_count
    assert not any(isinstance(m, VCASLinear) or hasattr(m, "vcas_runtime") for m in model.modules())
    assert all(not m._forward_hooks for m in model.modules())
    state = model.state_dict()
    assert list(state) == list(before) and all(torch.equal(state[k], before[k]) for k in before)
    assert all(a is b for a, b in zip(model.parameters(), params, strict=True))
    assert remove_vcas(model) is model  # a second remove is a no-op

    reference = tiny_vit(seed=4)
    reference.load_state_dict(before)
    x = torch.randn(6, 1, 8, 8)
    out, ref_out = model(x), reference(x)
    assert torch.equal(out, ref_out)
    out.square().sum().backward()
    ref_out.square().sum().backward()
    for name, grad in grad_dict(reference).items():
        assert torch.equal(dict(model.named_parameters())[name].grad, grad), name
    apply_vcas(model)  # and it can be applied again
    assert vcas_handle(model) is not None


def test_batchnorm_in_a_block_is_refused_naming_it() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Sequential(BatchNormBlock(4), BatchNormBlock(4)))
    with pytest.raises(GreenpropError, match=r"block '1\.0' contains BatchNorm \(1\.0\.bn\)"):
        apply_vcas(model)
    # Nothing was changed.
    assert vcas_handle(model) is None
    assert not any(isinstance(m, VCASLinear) for m in model.modules())
    assert all(not m._forward_hooks for m in model.modules())


def test_find_blocks_auto_detects_and_respects_block_types() -> None:
    model = tiny_vit(depth=3)
    assert find_blocks(model) == ["blocks.0", "blocks.1", "blocks.2"]
    assert find_blocks(model, [Mlp]) == [f"blocks.{i}.mlp" for i in range(3)]
    assert find_blocks(model, [Attention]) == [f"blocks.{i}.attn" for i in range(3)]
    assert find_blocks(model, [ViTBlock, Mlp]) == find_blocks(model)  # outermost only
    handle = vcas_handle(apply_vcas(model, block_types=[Mlp]))
    assert sorted(handle.linears) == sorted(f"blocks.{i}.mlp.fc{j}" for i in range(3) for j in (1, 2))
    assert type(model.blocks[0].attn.qkv) is nn.Linear
    assert find_blocks(stack(depth=3)) == ["0", "1", "2"]
    with pytest.raises(GreenpropError, match="block_types"):
        find_blocks(model, [int])


@pytest.mark.parametrize(
    ("model", "block_types", "needle"),
    [
        (nn.Sequential(nn.Linear(3, 3)), None, "repeated layers"),
        (nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 3)), None, "repeated layers"),
        (nn.Sequential(Block(3, 4), Block(3, 4)), [nn.GRU], "given block_types"),
    ],
)
def test_no_block_found_is_a_clear_warning(model: nn.Module, block_types, needle: str) -> None:
    with pytest.warns(SurgeryWarning, match=f"found no block.*{needle}.*block_types="):
        apply_vcas(model, block_types=block_types)
    assert vcas_handle(model) is None


def test_resnet18_gn_has_groupnorm_only_and_vcas_converts_its_block_convs() -> None:
    bn = resnet(name="resnet18")
    assert any(isinstance(m, nn.BatchNorm2d) for m in bn.modules())
    with pytest.raises(GreenpropError, match=r"block 'layer1\.0' contains BatchNorm \(layer1\.0\.bn1\)"):
        apply_vcas(bn)
    assert vcas_handle(bn) is None
    assert not any(isinstance(m, VCASConv2d) for m in bn.modules())
    assert all(not m._forward_hooks for m in bn.modules())

    model = resnet()
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    norms = [m for m in model.modules() if isinstance(m, nn.GroupNorm)]
    assert len(norms) == 1 + 8 * 2 + 3  # stem, two per block, three shortcuts
    assert {(m.num_channels, m.num_groups) for m in norms} == {(8, 8), (16, 16), (32, 32), (64, 32)}
    blocks = [f"layer{i}.{j}" for i in range(1, 5) for j in range(2)]
    assert find_blocks(model) == blocks
    convs = [f"{b}.conv{k}" for b in blocks for k in (1, 2)] + [f"layer{i}.0.shortcut.0" for i in (2, 3, 4)]
    handle = vcas_handle(apply_vcas(model))
    assert [s.name for s in handle.samplers] == blocks
    assert handle.linears == {}
    assert sorted(handle.convs) == sorted(convs) and len(convs) == 19
    assert handle.layers == handle.convs
    assert all(type(c) is VCASConv2d for c in handle.convs.values())
    assert type(model.conv1) is nn.Conv2d and type(model.head) is nn.Linear  # stem and head stay
    assert [handle.convs[f"layer{i // 2 + 1}.{i % 2}.conv1"].vcas_block for i in range(8)] == list(range(8))
    assert sum(type(m) is nn.Conv2d for m in model.modules()) == 1
    remove_vcas(model)
    assert sum(type(m) is nn.Conv2d for m in model.modules()) == 20
    assert not any(hasattr(m, "vcas_runtime") for m in model.modules())
