"""FLOP counts include attention run by PyTorch's fused CPU kernel (``flop_counter``).

``F.scaled_dot_product_attention`` runs ``_scaled_dot_product_flash_attention_for_cpu``
on CPU, which torch's FlopCounterMode has no formula for. Each count here is checked
against the same attention forced onto the math backend (plain ``bmm`` ops, which the
counter knows): the forward must match exactly; the fused backward recomputes the
scores ``q @ k^T`` (torch's formula for the flash kernels counts that), so it must be
the math backward plus that one product.
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from greenprop.metering.flops import attention_backward_flops, count_flops, count_step_flops, flop_counter
from greenprop.models import create

FUSED = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
FUSED_BACKWARD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
ROOT = Path(__file__).resolve().parents[1]


def _backend(math: bool) -> contextlib.AbstractContextManager:
    return sdpa_kernel(SDPBackend.MATH) if math else contextlib.nullcontext()


def _attention_counts(math: bool, q, k, v, **kwargs) -> tuple[int, int, set]:
    """Forward and backward FLOPs of one attention, and the ops the counter counted."""
    q, k, v = (t.detach().requires_grad_(True) for t in (q, k, v))
    with _backend(math):
        with flop_counter() as forward:
            out = F.scaled_dot_product_attention(q, k, v, **kwargs)
        with flop_counter() as backward:
            out.square().sum().backward()
    ops = set(forward.get_flop_counts()["Global"]) | set(backward.get_flop_counts()["Global"])
    return forward.get_total_flops(), backward.get_total_flops(), ops


def _scores_flops(q: torch.Tensor, k: torch.Tensor) -> int:
    """2 FLOPs per multiply-add of ``q @ k^T`` over every query head."""
    batch, heads, queries, head_dim = q.shape
    return 2 * batch * heads * queries * k.shape[-2] * head_dim


def _qkv(batch=2, heads=4, queries=12, keys=12, head_dim=8, kv_heads=None):
    generator = torch.Generator().manual_seed(0)
    kv_heads = kv_heads or heads
    q = torch.randn(batch, heads, queries, head_dim, generator=generator)
    k = torch.randn(batch, kv_heads, keys, head_dim, generator=generator)
    v = torch.randn(batch, kv_heads, keys, head_dim, generator=generator)
    return q, k, v


CASES = {
    "plain": ({}, {}),
    "causal": ({}, {"is_causal": True}),
    "bool mask": ({}, {"attn_mask": torch.rand(12, 12, generator=torch.Generator().manual_seed(1)) > 0.3}),
    "float mask": ({}, {"attn_mask": torch.randn(2, 1, 12, 12, generator=torch.Generator().manual_seed(2))}),
    "scale": ({}, {"scale": 0.3}),
    "cross, fewer keys": ({"queries": 7, "keys": 12}, {}),
    "grouped-query": ({"kv_heads": 2}, {"enable_gqa": True}),
}


def test_attention_backward_flops_is_the_counters_count_at_every_shape() -> None:
    """The tally's count (kept by shapes) is what the counter books for the fused backward, at
    shapes that differ in one tensor only (the live path's queries, a kept-rows batch)."""
    shapes = [{}, {"queries": 1}, {"keys": 5}, {"batch": 3}, {"head_dim": 4}, {"queries": 1, "keys": 5}]
    for kwargs in shapes * 2:  # twice: the kept counts too
        q, k, v = _qkv(**kwargs)
        out = F.scaled_dot_product_attention(q.requires_grad_(), k.requires_grad_(), v.requires_grad_())
        with flop_counter() as counter:
            out.sum().backward()
        assert attention_backward_flops(q, q, k, v) == counter.get_flop_counts()["Global"][FUSED_BACKWARD]


@pytest.mark.parametrize("case", list(CASES))
def test_fused_attention_counts_as_the_math_backend(case: str) -> None:
    shape, kwargs = CASES[case]
    q, k, v = _qkv(**shape)
    fused_fwd, fused_bwd, fused_ops = _attention_counts(False, q, k, v, **kwargs)
    math_fwd, math_bwd, math_ops = _attention_counts(True, q, k, v, **kwargs)
    assert {FUSED, FUSED_BACKWARD} <= fused_ops  # the fused kernel ran (and was counted)
    assert FUSED not in math_ops
    assert math_fwd == 2 * _scores_flops(q, k)  # scores and scores @ v, both bmm
    assert fused_fwd == math_fwd
    assert fused_bwd == math_bwd + _scores_flops(q, k)


def test_dropout_falls_back_to_math_and_is_counted_once() -> None:
    q, k, v = _qkv()
    torch.manual_seed(0)
    fused = _attention_counts(False, q, k, v, dropout_p=0.25)
    torch.manual_seed(0)
    math = _attention_counts(True, q, k, v, dropout_p=0.25)
    assert FUSED not in fused[2]  # the CPU flash kernel takes no dropout
    assert fused[:2] == math[:2] == (2 * _scores_flops(q, k), 4 * _scores_flops(q, k))


def _vit_counts(math: bool, counter) -> tuple[float, float]:
    torch.manual_seed(0)
    model = create("vit", width=32, depth=2, heads=4, image_size=16, patch_size=4)
    x, y = torch.randn(3, 1, 16, 16), torch.tensor([1, 2, 3])
    with _backend(math):
        count = counter(model, x, y)
    return count.forward, count.backward


def _count_flops(model, x, y):
    return count_flops(model, x, y, F.cross_entropy)


def _count_step_flops(model, x, y):
    return count_step_flops(model, lambda: F.cross_entropy(model(x), y).backward())


@pytest.mark.parametrize(
    "counter", [_count_flops, _count_step_flops], ids=["count_flops", "count_step_flops"]
)
def test_zoo_vit_step_counts_attention_as_the_math_backend(counter) -> None:
    fused_fwd, fused_bwd = _vit_counts(False, counter)
    math_fwd, math_bwd = _vit_counts(True, counter)
    batch, heads, tokens, head_dim = 3, 4, 16 + 1, 32 // 4  # 4x4 patches and the cls token
    recomputed = 2 * 2 * batch * heads * tokens * tokens * head_dim  # depth 2, scores each
    assert fused_fwd == math_fwd
    assert fused_bwd == math_bwd + recomputed


def test_every_flop_count_in_the_project_goes_through_flop_counter() -> None:
    """A FlopCounterMode built anywhere else would miss the fused attention kernel."""
    made_here = ROOT / "src" / "greenprop" / "metering" / "flops.py"
    pattern = re.compile(r"\bFlopCounterMode\(")
    offenders = [
        str(path.relative_to(ROOT))
        for folder in ("src", "benchmarks", "tests")
        for path in sorted((ROOT / folder).rglob("*.py"))
        if path != made_here and pattern.search(path.read_text())
    ]
    assert offenders == []


def _tiny_hf(kind: str, attention: str):
    """A 2-layer, width-32 Hugging Face BERT classifier or (grouped-query) Llama, random weights."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    sizes = {"vocab_size": 100, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4}
    if kind == "bert":
        config = transformers.BertConfig(
            **sizes, intermediate_size=64, attention_probs_dropout_prob=0.0, num_labels=2
        )
        return transformers.BertForSequenceClassification._from_config(config, attn_implementation=attention)
    config = transformers.LlamaConfig(**sizes, intermediate_size=64, num_key_value_heads=2)
    return transformers.LlamaForCausalLM._from_config(config, attn_implementation=attention)


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_hugging_face_sdpa_attention_counts_as_eager(kind: str) -> None:
    """MiniLM (BERT) and SmolLM2 (Llama) run eager attention in the zoo; with "sdpa" the count holds."""
    ids = torch.randint(100, (3, 10), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, 7:] = 0  # padding: BERT's sdpa path passes an attn_mask
    inputs = {"input_ids": ids, "attention_mask": mask}
    counts = {}
    for attention in ("eager", "sdpa"):
        model = _tiny_hf(kind, attention)
        assert model.config._attn_implementation == attention
        counts[attention] = count_flops(model, inputs, None, lambda out, _: out.logits.square().sum())
    recomputed = 2 * 2 * 3 * 4 * 10 * 10 * (32 // 4)  # 2 layers: q @ k^T of 4 heads, 10 tokens
    assert counts["sdpa"].forward == counts["eager"].forward
    assert counts["sdpa"].backward == counts["eager"].backward + recomputed


def test_the_old_versus_new_table_script_takes_out_exactly_the_fused_attention() -> None:
    """benchmarks/attention_flops.py's "old" count is the new one less the attention kernels."""
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import attention_flops
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    tiny = attention_flops.Case(
        "tiny vit",
        lambda: create("vit", width=32, depth=2, heads=4, image_size=16, patch_size=4),
        lambda: torch.randn(3, 1, 16, 16),
        attention_flops._classify,
    )
    counts = attention_flops.phase_counts(tiny)
    scores = 2 * 3 * 4 * 17 * 17 * 8  # q @ k^T: batch 3, 4 heads, 17 tokens, head dim 8
    (forward, forward_old), (backward, backward_old) = counts["forward"], counts["backward"]
    assert forward - forward_old == 2 * 2 * scores  # 2 blocks: scores and scores @ v
    assert backward - backward_old == 2 * 5 * scores  # 2 blocks: torch's 5 products
    for new, old in attention_flops.phase_counts(attention_flops.CASES["cnn"]).values():
        assert new == old > 0  # no attention in a CNN
