"""The direct rule of the zoo's transformer block (ViT, causal GPT): no re-run in the compacted backward.

Bit for bit against dense autograd at ratio 1 (float32 and float64, input gradients
included, the causal GPT too) when every block runs on every token, to rounding when
the last block runs on its live (cls) token only; the same sampled gradients as the re-run path from the
same seeds (so that path's unbiasedness tests carry over), no more kept than it says, and
the calls it cannot reproduce sent to the re-run path.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from fixtures import tiny_vit
from greenprop.metering.flops import attention_backward_flops, flop_counter
from greenprop.models import create
from greenprop.models.vit import Block
from greenprop.vcas import direct, direct_vit
from greenprop.vcas.direct_vit import RULE, ViTBlockRule
from greenprop.vcas.surgery import vcas_handle
from vcas_helpers import fixed_ratios, grad_dict, graph_nodes, same_steps_direct_and_rerun

pytestmark = pytest.mark.usefixtures("one_thread")

BLOCK = "greenprop.models.vit.Block"
_FLASH = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


@pytest.fixture(params=[True, False], ids=["recompute", "keep-all"])
def rule(request, monkeypatch) -> ViTBlockRule:
    """The shipped rule (recomputing the norms and GELU) and the variant that keeps them."""
    chosen = RULE if request.param else ViTBlockRule(recompute=False)
    monkeypatch.setattr(direct, "_RULES", {BLOCK: chosen})
    return chosen


@pytest.fixture
def every_token(monkeypatch) -> None:
    """No live-token backward: every block's per-token ops run on every token (bit for bit)."""
    monkeypatch.setattr(direct_vit._Columns, "of", classmethod(lambda cls, block, grad: None))


def _live_fractions(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Records, for each direct backward, the fraction of token positions its per-token ops ran on."""
    seen: list[float] = []
    of = direct_vit._Columns.of.__func__

    def spy(cls, block, grad):
        live = of(cls, block, grad)
        seen.append(1.0 if live is None else live.columns.numel() / grad.shape[1])
        return live

    monkeypatch.setattr(direct_vit._Columns, "of", classmethod(spy))
    return seen


def _assert_same_grads(model: nn.Module, reference: nn.Module) -> None:
    got, expected = grad_dict(model), grad_dict(reference)
    assert got.keys() == expected.keys() == dict(model.named_parameters()).keys()
    for name in expected:
        assert torch.equal(got[name], expected[name]), name


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_ratio_one_vit_equals_dense_autograd_bit_for_bit(rule, every_token, digits, dtype) -> None:
    reference = tiny_vit().to(dtype)
    model = fixed_ratios(copy.deepcopy(reference))
    x, y = digits.train[:24]
    x = x.to(dtype)
    model(x)  # the first forward checks the blocks
    assert "_DirectBlockBackward" in graph_nodes(model(x)) and "_CompactedBlockBackward" not in graph_nodes(
        model(x)
    )
    inputs = []
    for net in (model, reference):
        xi = x.clone().requires_grad_(True)
        F.cross_entropy(net(xi), y).backward()
        inputs.append(xi.grad)
    _assert_same_grads(model, reference)
    assert torch.equal(inputs[0], inputs[1])


def test_ratio_one_causal_gpt_equals_dense_autograd_bit_for_bit(rule) -> None:
    torch.manual_seed(0)
    reference = create("gpt2-tiny", num_classes=61, image_size=11, width=16, depth=2, heads=2).double()
    model = copy.deepcopy(reference)
    fixed_ratios(model, block_types=(Block,))
    ids = torch.randint(0, 61, (6, 11), generator=torch.Generator().manual_seed(1))
    model(ids)
    assert "_DirectBlockBackward" in graph_nodes(model(ids))
    for net in (model, reference):
        logits = net(ids)
        F.cross_entropy(logits[:, :-1].reshape(-1, 61), ids[:, 1:].reshape(-1)).backward()
    _assert_same_grads(model, reference)


def test_frozen_parameters_and_an_input_without_gradient(rule, every_token, digits) -> None:
    """The first block's input needs no gradient (embedding frozen), nor its first norm (frozen)."""
    reference = tiny_vit().double()
    frozen = ("patch_embed", "cls_token", "pos_embed", "blocks.0.norm1", "blocks.1.attn.qkv.bias")
    for name, p in reference.named_parameters():
        p.requires_grad_(not name.startswith(frozen))
    model = fixed_ratios(copy.deepcopy(reference))
    x, y = digits.train[:12]
    model(x.double())
    assert "_DirectBlockBackward" in graph_nodes(model(x.double()))
    for net in (model, reference):
        F.cross_entropy(net(x.double()), y).backward()
    got, expected = grad_dict(model), grad_dict(reference)
    assert got.keys() == expected.keys() and len(got) == 25  # 32 parameters, 7 frozen
    for name in expected:
        assert torch.equal(got[name], expected[name]), name


def test_sampled_gradients_equal_the_rerun_paths_from_the_same_seeds(rule, digits, monkeypatch) -> None:
    """Same seeds, same draws, same gradients: block ratio 0.5 and token ratio 0.5, three steps.
    Same tallies too, but for the attention forward the re-run path runs again on the kept rows.
    The last block's backward runs on the cls token only (the re-run path on every token)."""
    seen = _live_fractions(monkeypatch)
    x, y = digits.train[:16]
    base = tiny_vit(seed=2).double()
    with flop_counter() as counter:
        base(x[:1].double())
    per_row = counter.get_flop_counts()["Global"][_FLASH] / len(base.blocks)
    tally = same_steps_direct_and_rerun(
        base,
        x.double(),
        lambda out: F.cross_entropy(out, y),
        rtol=1e-12,
        atol=1e-15,
        rerun_forward_per_row=per_row,
        direct_saves_per_row={1: _skipped_per_row(base.blocks[1], weight_exact=False)},
    )
    assert all(kept < seen for kept, seen in tally.rows.values())
    assert seen == [1 / 17, 1.0] * 3  # backward order: the last block first


def _skipped_per_row(block: Block, weight_exact: bool) -> float:
    """FLOPs a sample's backward through ``block`` skips on the cls-only path: the input (and at
    token ratio 1 the weight) gradients of fc2, fc1 and proj, and 16 of the 17 attention queries."""
    dim, hidden = block.mlp.fc1.in_features, block.mlp.fc1.out_features
    linears = 2 * (2 * dim * hidden + dim * dim) * (2 if weight_exact else 1)
    every, cls_only = torch.empty(1, 2, 17, dim // 2), torch.empty(1, 2, 1, dim // 2)
    return 16 * linears + attention_backward_flops(every, every, every, every) - attention_backward_flops(
        cls_only, cls_only, every, every
    )


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_ratio_one_on_the_live_token_equals_dense_autograd(rule, digits, monkeypatch, dtype) -> None:
    """The last block's backward on the cls token only (its other 16 tokens' gradient is zero):
    dense autograd's gradients to rounding, input gradients included, and a FLOP tally whose
    saving is what FlopCounterMode counts the backward did not run."""
    seen = _live_fractions(monkeypatch)
    reference = tiny_vit(depth=3).to(dtype)
    model = fixed_ratios(copy.deepcopy(reference))
    x, y = digits.train[:24]
    model(x.to(dtype))  # the first forward checks the blocks
    vcas_handle(model).runtime.take_tally()
    seen.clear()
    inputs, counted = [], []
    for net in (model, reference):
        xi = x.to(dtype).clone().requires_grad_(True)
        loss = F.cross_entropy(net(xi), y)
        with flop_counter() as counter:
            loss.backward()
        inputs.append(xi.grad)
        counted.append(counter.get_total_flops())
    assert seen == [1 / 17, 1.0, 1.0]
    tol = {"rtol": 1e-12, "atol": 1e-14} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-6}
    got, expected = grad_dict(model), grad_dict(reference)
    assert got.keys() == expected.keys() == dict(model.named_parameters()).keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], **tol, msg=name)
    torch.testing.assert_close(inputs[0], inputs[1], **tol)
    tally = vcas_handle(model).runtime.take_tally()
    assert tally.rows == {i: [24, 24] for i in range(3)}
    assert tally.saved == counted[1] - counted[0] == 24 * _skipped_per_row(model.blocks[2], weight_exact=True)


def test_live_tokens_only_in_a_training_backward(monkeypatch) -> None:
    """The controller's estimation draws on every token, a causal block's positions are all
    read: neither takes the live tokens; a cls-only gradient in training does."""
    model = fixed_ratios(tiny_vit())
    block = model.blocks[1]
    grad = torch.zeros(3, 17, 32)
    grad[:, 0] = 1.0
    live = direct_vit._Columns.of(block, grad)
    assert live is not None and live.columns.tolist() == [0] and live.among[0].tolist() == [0, 17, 34]
    assert direct_vit._Columns.of(block, torch.ones(3, 17, 32)) is None
    # The union over the kept samples, whichever sample is live where (the first alone is not enough).
    grad[1, 5, 3], grad[2, 9, 0] = 2.0, float("nan")
    assert direct_vit._Columns.of(block, grad).columns.tolist() == [0, 5, 9]
    first_dense = torch.zeros(3, 17, 32)
    first_dense[0] = 1.0
    assert direct_vit._Columns.of(block, first_dense) is None
    grad[1, 1:13] = 1.0  # 13 of 17 positions live together (above 3/4), at most 3 in the first sample
    assert direct_vit._Columns.of(block, grad) is None
    grad[1, 1:13] = 0.0
    runtime = vcas_handle(model).runtime
    monkeypatch.setattr(runtime, "token_probe", lambda *args: None)
    assert direct_vit._Columns.of(block, grad) is None
    monkeypatch.setattr(runtime, "token_probe", None)
    monkeypatch.setattr(block.attn, "causal", True)
    assert direct_vit._Columns.of(block, grad) is None


def test_it_keeps_only_batch_first_tensors_and_less_than_dense_autograd(digits) -> None:
    """Recomputing: x, qkv, the attention output, its logsumexp, x1 and the fc1 output; nothing else."""
    model = fixed_ratios(tiny_vit())
    block = model.blocks[0]
    x = torch.randn(5, 17, 32)
    with torch.no_grad():
        out, saved = RULE.forward(block, (x,), {})
        assert torch.equal(out, Block.forward(block, x))
        _, kept_all = ViTBlockRule(recompute=False).forward(block, (x,), {})
    assert all(t.shape[0] == 5 for t in saved + kept_all)
    wide = x.numel()  # one dim-wide tensor: (B, T, dim); the MLP is 2 dim wide
    assert sum(t.numel() for t in saved) == 8 * wide + 5 * 2 * 17  # + logsumexp (B, heads, T)
    assert sum(t.numel() for t in kept_all) == 12 * wide + 5 * 2 * 17 + 4 * 5 * 17  # + means, rstds


@pytest.mark.parametrize("recompute", [True, False])
def test_backward_lets_go_of_every_kept_tensor(recompute: bool) -> None:
    """The backward empties the list of kept rows it owns, so each goes once used."""
    model = fixed_ratios(tiny_vit())
    block = model.blocks[0]
    x = torch.randn(3, 17, 32)
    chosen = ViTBlockRule(recompute=recompute)
    with torch.no_grad():
        _, saved = chosen.forward(block, (x,), {})
    grad = torch.randn(3, 17, 32)
    dx, found = chosen.backward(block, saved, grad, True)
    assert saved == []
    xi = x.clone().requires_grad_(True)
    Block.forward(block, xi).backward(grad)
    torch.testing.assert_close(dx, xi.grad)
    assert found.keys() == {p for p in block.parameters() if p.requires_grad}


class _Extra(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x


def _dropout(block: nn.Module) -> None:
    block.attn.drop = nn.Dropout(0.1)


def _extra(block: nn.Module) -> None:
    block.mlp.extra = _Extra()


def _hook(block: nn.Module) -> None:
    block.norm2.register_forward_hook(lambda module, args, out: None)


def _activation(block: nn.Module) -> None:
    block.mlp.act = nn.ReLU()


REFUSED = {
    "dropout": (_dropout, "dropout attn.drop"),
    "unknown module": (_extra, "module mlp.extra"),
    "hook": (_hook, "hooks"),
    "activation": (_activation, "ReLU, not GELU"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_blocks_it_cannot_reproduce_re_run(case: str) -> None:
    change, reason = REFUSED[case]
    model = fixed_ratios(tiny_vit())
    block = model.blocks[1]
    change(block)
    x = torch.randn(3, 17, 32)
    assert reason in RULE.refuse(block, (x,), {})
    assert RULE.refuse(model.blocks[0], (x,), {}) is None
    images = torch.randn(3, 1, 8, 8)
    model(images)
    nodes = graph_nodes(model(images))
    assert "_DirectBlockBackward" in nodes and "_CompactedBlockBackward" in nodes  # block 0 / block 1


def test_calls_it_cannot_reproduce_re_run(every_token, digits) -> None:
    reference = tiny_vit().double()
    model = fixed_ratios(copy.deepcopy(reference))
    block = model.blocks[0]
    x = torch.randn(3, 17, 32, dtype=torch.float64)
    assert "meta" in RULE.refuse(block, (x.to("meta"),), {})
    assert "bfloat16" in RULE.refuse(block, (x.bfloat16(),), {})
    assert "(batch, tokens, dim)" in RULE.refuse(block, (x[0],), {})
    assert "one tensor" in RULE.refuse(block, (x,), {"mask": None})
    with sdpa_kernel(SDPBackend.MATH):  # the block's SDPA would take the math kernel: the re-run runs it
        assert "flash" in RULE.refuse(block, (x,), {})
        images, y = digits.train[:12]
        model(images.double())
        nodes = graph_nodes(model(images.double()))
        assert "_CompactedBlockBackward" in nodes and "_DirectBlockBackward" not in nodes
        for net in (model, reference):
            F.cross_entropy(net(images.double()), y).backward()
    _assert_same_grads(model, reference)
