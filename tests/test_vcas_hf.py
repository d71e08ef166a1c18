"""VCAS on a Hugging Face encoder: all-MiniLM-L6-v2 (BERT), its BertLayer as the block type."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from greenprop import data as gp_data
from greenprop import models
from greenprop.vcas import VCAS, VCASConfig, apply_vcas, find_blocks, remove_vcas
from greenprop.vcas.surgery import vcas_handle
from vcas_helpers import graph_nodes

pytestmark = pytest.mark.text
BertLayer = pytest.importorskip("transformers.models.bert.modeling_bert").BertLayer


@pytest.fixture(scope="module")
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    pair = gp_data.load("rotten-tomatoes", subset=64)
    x, y = pair.train[torch.arange(8)]
    return x[:, :, :24].contiguous(), y  # 24 tokens keep the test fast; the masks stay valid


@pytest.fixture()
def minilm() -> nn.Module:
    torch.manual_seed(0)
    model = models.create("minilm", num_classes=2)
    for module in model.modules():  # same work in both copies: no dropout masks to match
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    return model


def _grads(model: nn.Module, batch) -> list[torch.Tensor]:
    x, y = batch
    loss = F.cross_entropy(model(x), y)
    return list(torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad]))


def test_blocks_are_the_bert_layers_found_either_way(minilm):
    by_type = find_blocks(minilm, (BertLayer,))
    assert by_type == [f"hf.bert.encoder.layer.{i}" for i in range(6)]
    assert find_blocks(minilm) == by_type  # the repeated-layer search finds the same blocks
    handle = vcas_handle(apply_vcas(minilm, block_types=(BertLayer,)))
    # q, k, v, attention output, intermediate, output: 6 Linears in each of the 6 layers
    assert len(handle.linears) == 36
    assert all(name.startswith("hf.bert.encoder.layer.") for name in handle.linears)


def test_exact_at_ratio_one_and_state_dict_unchanged(minilm, batch):
    reference = copy.deepcopy(minilm)
    keys = list(minilm.state_dict())
    apply_vcas(minilm, block_types=(BertLayer,))
    assert list(minilm.state_dict()) == keys
    for got, want in zip(_grads(minilm, batch), _grads(reference, batch), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    remove_vcas(minilm)
    assert not any(type(m).__name__ == "VCASLinear" for m in minilm.modules())


def test_sampled_step_keeps_fewer_rows_and_the_controller_adapts(minilm, batch):
    config = VCASConfig(update_every=1, s_step=0.2, weight_ratio_multiplier=0.5)
    vcas = VCAS(apply_vcas(minilm, config, block_types=(BertLayer,)))

    def loss_fn(model, b):
        return F.cross_entropy(model(b[0]), b[1])

    vcas.step(iter([batch, batch]), loss_fn)  # first update: exact variance 0 -> ratios fall
    ratios = vcas.ratios()
    assert ratios["s"] == pytest.approx(0.8)
    assert all(r == pytest.approx(0.5) for r in ratios["weight"].values())
    for sampler in vcas_handle(minilm).samplers:
        sampler.ratio = 0.5
    loss_fn(minilm, batch).backward()
    tally = vcas.runtime.take_tally()
    assert tally.samples == len(batch[1])
    assert 0 < tally.done < tally.dense  # fewer Linear-backward FLOPs actually ran
    kept, seen = tally.rows[0]
    assert kept < seen == len(batch[1])
    assert all(torch.isfinite(p.grad).all() for p in minilm.parameters() if p.grad is not None)


@pytest.mark.parametrize("direct", [True, False])
def test_compacted_layers_with_dropout_and_padding_masks(batch, direct):
    """Encoder dropout 0.1 on: exact at ratio 1 (the direct rule draws the masks as the layer
    does and keeps them; the re-run replays them), and a sampled backward on the kept samples
    (re-runs checked against the forward's rows)."""
    torch.manual_seed(0)
    model = models.create("minilm", num_classes=2)  # the checkpoint's dropout 0.1
    reference = copy.deepcopy(model)
    # compacted at ratio 1 too, on either path
    config = VCASConfig(check_rows=True, compact_max_ratio=1.0, direct_max_ratio=1.0, direct=direct)
    handle = vcas_handle(apply_vcas(model, config, block_types=(BertLayer,)))
    assert len(handle.compacted) == 6
    assert bool((batch[0][:, 1] == 0).any())  # some padding: the attention mask matters
    for seed in (0, 1):  # the first forward checks the blocks, the second runs compacted only
        torch.manual_seed(seed)
        got = _grads(model, batch)
        torch.manual_seed(seed)
        want = _grads(reference, batch)
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7)
    # the direct path draws inside BertLayer's rule; the re-run path learns that the layers draw
    assert all(block.forward.draws_random is not direct for block in handle.compacted)
    x, _ = batch
    nodes = graph_nodes(model(x))
    assert ("_DirectBlockBackward" in nodes) is direct and ("_CompactedBlockBackward" in nodes) is not direct
    for sampler in handle.samplers:
        sampler.ratio = 0.5
    got = _grads(model, batch)  # check_rows: every re-run is compared with the forward's rows
    assert all(torch.isfinite(g).all() for g in got)
    kept, seen = handle.runtime.take_tally().rows[0]
    assert kept < seen
