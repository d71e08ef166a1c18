"""The direct rule of transformers' BertLayer: the layer's forward bit for bit, its backward by hand.

On a tiny float64 BERT built from a config (16 hidden, 4 heads, 2 layers, dropout 0.1, eager
attention, a padding mask): the rule's forward equals the layer's own output and leaves the
random generator where the layer's forward does; at ratio 1 the gradients equal dense
autograd's; sampled, they equal the re-run path's from the same seeds; the calls the rule
cannot reproduce go to the re-run path. MiniLM itself: tests/test_vcas_hf.py.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from greenprop.metering.flops import count_step_flops
from greenprop.vcas import VCASConfig, apply_vcas, direct
from greenprop.vcas.accounting import VCASFlops
from greenprop.vcas.surgery import vcas_handle
from vcas_helpers import fixed_ratios, grad_dict, graph_nodes, same_steps_direct_and_rerun, skewed

pytestmark = [pytest.mark.text, pytest.mark.usefixtures("one_thread")]
transformers = pytest.importorskip("transformers")
bert = pytest.importorskip("transformers.models.bert.modeling_bert")
direct_bert = pytest.importorskip("greenprop.vcas.direct_bert")

BATCH, TOKENS, HIDDEN, HEADS, INTERMEDIATE = 6, 5, 16, 4, 24


class TinyBert(nn.Module):
    """A 2-layer BERT encoder from a config (random weights), ``(ids, mask) -> last hidden state``."""

    def __init__(self, dropout: float = 0.1, attention: str = "eager", **config: Any) -> None:
        super().__init__()
        settings = dict(
            vocab_size=40,
            hidden_size=HIDDEN,
            num_hidden_layers=2,
            num_attention_heads=HEADS,
            intermediate_size=INTERMEDIATE,
            max_position_embeddings=TOKENS,
            hidden_dropout_prob=dropout,
            attention_probs_dropout_prob=dropout,
        )
        torch.manual_seed(0)
        cfg = transformers.BertConfig(**{**settings, **config})
        cfg._attn_implementation = attention
        self.bert = transformers.BertModel(cfg, add_pooling_layer=False).double()

    def forward(self, batch: tuple[Tensor, Tensor], **kwargs: Any) -> Tensor:
        ids, mask = batch
        return self.bert(input_ids=ids, attention_mask=mask, **kwargs).last_hidden_state


def _batch(padded_from: int | None = None) -> tuple[Tensor, Tensor]:
    """Two samples padded; ``padded_from``: every sample padded from this token on instead."""
    ids = torch.randint(1, 40, (BATCH, TOKENS), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(BATCH, TOKENS, dtype=torch.long)
    if padded_from is not None:
        mask[:, padded_from:] = 0
        return ids, mask
    mask[1, 3:] = 0  # padding: the additive attention mask matters
    mask[4, 2:] = 0
    return ids, mask


def _target() -> Tensor:
    return skewed((BATCH, TOKENS, HIDDEN), seed=2)


def _vcas(model: nn.Module, ratio: float = 1.0, token_ratio: float = 1.0, **config: Any) -> nn.Module:
    return fixed_ratios(model, ratio, token_ratio, block_types=(bert.BertLayer,), **config)


def _layer_call(model: TinyBert, batch) -> tuple[nn.Module, tuple, dict]:
    """The first BertLayer and the arguments the encoder calls it with."""
    layer = model.bert.encoder.layer[0]
    seen = []
    handle = layer.register_forward_pre_hook(lambda m, a, k: seen.append((a, k)), with_kwargs=True)
    with torch.no_grad():
        model(batch)
    handle.remove()
    args, kwargs = seen[0]
    return layer, args, kwargs


def test_the_rule_is_registered_for_bert_layers() -> None:
    layer = TinyBert().bert.encoder.layer[0]
    assert direct.rule_for(layer) is direct_bert.RULE


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("padded", [True, False])
def test_forward_is_the_layers_own_bit_for_bit_with_the_same_draws(dtype: torch.dtype, padded: bool) -> None:
    model = _vcas(TinyBert().to(dtype))
    ids, mask = _batch()
    layer, args, kwargs = _layer_call(model, (ids, mask if padded else torch.ones_like(mask)))
    assert (args[1] is not None) is padded  # transformers passes no mask when nothing is padded
    assert direct_bert.RULE.refuse(layer, args, kwargs) is None
    torch.manual_seed(7)
    with torch.no_grad():
        want = type(layer).forward(layer, *args, **kwargs)
    after = torch.rand(4)
    torch.manual_seed(7)
    with torch.no_grad():
        got, saved = direct_bert.RULE.forward(layer, args, kwargs)
    assert isinstance(want, Tensor) and torch.equal(got, want)
    assert torch.equal(torch.rand(4), after)  # the generator advanced exactly as the layer's forward
    assert all(t.shape[0] == BATCH for t in saved)  # batch first: the caller keeps the kept rows
    masks = [t for t in saved if t.dtype == torch.bool]
    assert len(masks) == 3 and all(m.dim() > 2 for m in masks)  # three dropouts drawn, kept as bool


def test_no_dropout_keeps_no_masks() -> None:
    model = _vcas(TinyBert(dropout=0.0))
    layer, args, kwargs = _layer_call(model, _batch())
    state = torch.get_rng_state()
    with torch.no_grad():
        _, saved = direct_bert.RULE.forward(layer, args, kwargs)
    assert torch.equal(torch.get_rng_state(), state)
    assert [tuple(t.shape) for t in saved if t.dtype == torch.bool] == [(BATCH, 0)] * 3


@pytest.mark.parametrize("frozen_embeddings", [False, True])
def test_ratio_one_equals_dense_autograd_with_dropout_and_padding(frozen_embeddings: bool) -> None:
    reference = TinyBert()
    reference.bert.embeddings.requires_grad_(not frozen_embeddings)  # layer 0 then needs no input grad
    model = _vcas(copy.deepcopy(reference))
    batch, target = _batch(), _target()
    model(batch)  # the first forward checks the blocks
    for seed in (0, 1):
        for net in (model, reference):
            net.zero_grad()
            torch.manual_seed(seed)
            out = net(batch)
            (out.tanh() * target).sum().backward()
            if net is model:
                assert "_DirectBlockBackward" in graph_nodes(out)
                assert "_CompactedBlockBackward" not in graph_nodes(out)
        got, expected = grad_dict(model), grad_dict(reference)
        assert got.keys() == expected.keys() and len(got) == 32 + 5 * (not frozen_embeddings)
        for name in expected:
            torch.testing.assert_close(got[name], expected[name], rtol=1e-12, atol=1e-14, msg=name)
    tally = vcas_handle(model).runtime.take_tally()
    assert tally.done == tally.dense > 0


def test_sampled_gradients_equal_the_rerun_paths_from_the_same_seeds() -> None:
    """Block ratio 0.5, token ratio 0.5, dropout 0.1: same draws, same gradients, same FLOP tally
    but for the attention's bmms, which the direct path tallies (on the kept rows) and the re-run
    path does not."""
    target = _target()
    tally = same_steps_direct_and_rerun(
        TinyBert(),
        _batch(),
        lambda out: (out.tanh() * target).sum(),
        rtol=1e-10,
        atol=1e-12,
        reseed=True,
        direct_tallies_per_row=dict.fromkeys((0, 1), _ATTENTION_BACKWARD_PER_ROW),
        block_types=(bert.BertLayer,),
    )
    kept, seen = tally.rows[0]
    assert 0 < kept < seen


def _first_token_loss(out: Tensor) -> Tensor:
    """A classifier's loss: only the first token of the last layer gets gradient, so every other
    token of that layer, and the padded tokens of the one before, have a zero gradient."""
    return (out[:, 0].tanh() * _target()[:, 0]).sum()


def _live_fractions(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Records, for each direct backward, the fraction of kept tokens its per-token ops ran on
    (the live path taken wherever a token is dead, whatever the fraction)."""
    monkeypatch.setattr(direct, "LIVE_MAX_FRACTION", 1.0)
    seen: list[float] = []
    of = direct_bert._Tokens.of.__func__

    def spy(cls, block, saved, grad):
        tokens = of(cls, block, saved, grad)
        total = grad.shape[0] * grad.shape[1]
        seen.append(1.0 if tokens.live is None else tokens.live.numel() / total)
        return tokens

    monkeypatch.setattr(direct_bert._Tokens, "of", classmethod(spy))
    return seen


def test_ratio_one_on_the_live_tokens_equals_dense_autograd(monkeypatch: pytest.MonkeyPatch) -> None:
    """A first-token loss with padding: both layers run their per-token ops on the live tokens
    only (last layer: the first token; first layer: the unpadded ones) and the gradients are
    still dense autograd's."""
    seen = _live_fractions(monkeypatch)
    reference = TinyBert()
    model = _vcas(copy.deepcopy(reference))
    batch = _batch()
    model(batch)  # the first forward checks the blocks
    for seed in (0, 1):
        for net in (model, reference):
            net.zero_grad()
            torch.manual_seed(seed)
            _first_token_loss(net(batch)).backward()
        got, expected = grad_dict(model), grad_dict(reference)
        assert got.keys() == expected.keys() and len(got) == 37
        for name in expected:
            torch.testing.assert_close(got[name], expected[name], rtol=1e-12, atol=1e-14, msg=name)
    unpadded = float(batch[1].sum()) / batch[1].numel()
    assert seen == [1 / TOKENS, unpadded] * 2  # backward order: the last layer first
    tally = vcas_handle(model).runtime.take_tally()
    assert 0 < tally.done < tally.dense  # the zero tokens' work is saved (its amount: the tests below)


def test_sampled_on_the_live_tokens_equals_the_rerun_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Block and token ratio 0.5, dropout 0.1, a first-token loss, every sample padded after 3
    tokens: the live tokens' backward draws what the re-run path (every token) draws, and gives
    its gradients; its tally is the re-run path's less the zero tokens' input gradients (the
    weight gradients are sampled), plus the attention's bmms."""
    seen = _live_fractions(monkeypatch)
    unpadded = 3
    model, batch = TinyBert(), _batch(padded_from=unpadded)
    same_steps_direct_and_rerun(
        model,
        batch,
        _first_token_loss,
        rtol=1e-10,
        atol=1e-12,
        reseed=True,
        direct_saves_per_row={
            0: _zero_tokens_per_row(TOKENS - unpadded, TOKENS - unpadded),
            1: _zero_tokens_per_row(TOKENS - 1, TOKENS - unpadded),
        },
        direct_tallies_per_row=dict.fromkeys((0, 1), _ATTENTION_BACKWARD_PER_ROW),
        block_types=(bert.BertLayer,),
    )
    assert seen.count(1 / TOKENS) == 3  # the last layer of each of the three steps


#: A sample's attention backward: four bmms of (tokens x tokens) x (tokens x head size) per head.
_ATTENTION_BACKWARD_PER_ROW = 4 * 2 * HEADS * TOKENS * TOKENS * (HIDDEN // HEADS)


def _zero_tokens_per_row(dead: int, dead_qkv: int) -> float:
    """Input-gradient FLOPs a sample's layer backward skips with ``dead`` zero tokens at the output
    (LayerNorms to the attention) and ``dead_qkv`` tokens the query, key and value gradients miss."""
    after_attention = HIDDEN * HIDDEN + 2 * HIDDEN * INTERMEDIATE  # attention output, intermediate, output
    return 2.0 * (dead * after_attention + dead_qkv * 3 * HIDDEN * HIDDEN)


@pytest.mark.parametrize(("ratio", "token_ratio"), [(1.0, 1.0), (0.5, 0.5)])
def test_the_account_of_a_step_is_the_count_of_what_it_ran(monkeypatch, ratio, token_ratio) -> None:
    """A first-token loss with padding on the direct path: the account (the dense count less the
    tally's saving) equals FlopCounterMode's count of the step, zero tokens left out and the
    attention's bmms run on the kept rows included."""
    seen = _live_fractions(monkeypatch)
    model, batch = _vcas(TinyBert(), ratio, token_ratio), _batch()

    def loss(net: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
        return _first_token_loss(net(batch))

    account = VCASFlops(model, vcas_handle(model).runtime)
    account.remember_batch(batch, loss)
    dense = account.dense_per_sample
    torch.manual_seed(0)
    for _ in range(2):  # the first training forward checks the blocks
        loss(model, batch).backward()
    assert "_DirectBlockBackward" in graph_nodes(model(batch))
    account.runtime.take_tally()
    seen.clear()

    counted = count_step_flops(model, lambda: loss(model, batch).backward())
    account.collect_train()
    tally = account.train
    assert tally.samples == BATCH and tally.rows.keys() == {0, 1}
    assert seen[0] == 1 / TOKENS and 0 < seen[1] < 1  # both layers on their live tokens only
    assert counted.forward == pytest.approx(BATCH * dense.forward, rel=1e-12)
    assert counted.backward == pytest.approx(BATCH * dense.backward - tally.saved, rel=1e-12)
    assert counted.backward < BATCH * dense.backward
    if ratio < 1:
        assert all(kept < seen for kept, seen in tally.rows.values())


def test_the_live_path_is_left_where_nearly_every_token_is_live(monkeypatch: pytest.MonkeyPatch) -> None:
    """A loss on every token: all tokens live (1.0 recorded), and with a first-token loss the
    first layer's 25 of 30 live tokens are above the default limit of 0.75, the last layer's not."""
    seen = _live_fractions(monkeypatch)
    monkeypatch.setattr(direct, "LIVE_MAX_FRACTION", 0.75)
    model, batch, target = _vcas(TinyBert()), _batch(), _target()
    model(batch)
    (model(batch).tanh() * target).sum().backward()
    _first_token_loss(model(batch)).backward()
    assert seen == [1.0, 1.0, 1 / TOKENS, 1.0]


def _unconverted_key(model: TinyBert) -> TinyBert:
    """VCAS on every Linear of the layers but their attention keys."""
    config = VCASConfig(compact_max_ratio=1.0, direct_max_ratio=1.0)
    apply_vcas(
        model, config, block_types=(bert.BertLayer,), module_filter_fn=lambda m, name: "key" not in name
    )
    return model


def _refused(model: TinyBert, call=None) -> tuple[str | None, bool]:
    """The rule's reason for the first layer's call, and whether the graph took the re-run path."""
    batch = _batch()
    layer, args, kwargs = _layer_call(model, batch) if call is None else call
    reason = direct_bert.RULE.refuse(layer, args, kwargs)
    model(batch)  # the first forward checks the blocks
    nodes = graph_nodes(model(batch))
    return reason, "_CompactedBlockBackward" in nodes and "_DirectBlockBackward" not in nodes


@pytest.mark.parametrize(
    ("build", "words"),
    [
        (lambda: _vcas(TinyBert(attention="sdpa")), "attention implementation 'sdpa'"),
        (lambda: _vcas(TinyBert(hidden_act="relu")), "activation"),
        (lambda: _vcas(TinyBert(chunk_size_feed_forward=TOKENS)), "chunking"),
        (lambda: _unconverted_key(TinyBert()), "attention.self.key is a Linear"),
    ],
    ids=["sdpa", "relu", "chunked", "unconverted-linear"],
)
def test_layers_the_rule_does_not_know_re_run(build, words: str) -> None:
    reason, reran = _refused(build())
    assert reason is not None and words in reason and reran


def test_output_attentions_re_runs_and_still_captures_them() -> None:
    # No dropout: the re-run path runs a block twice on its first forward that draws (to learn
    # that it draws), and the capture hooks would then record that layer's attentions twice.
    model = _vcas(TinyBert(dropout=0.0))
    batch = _batch()
    model(batch)
    out = model.bert(input_ids=batch[0], attention_mask=batch[1], output_attentions=True)
    assert len(out.attentions) == 2 and out.attentions[0].shape == (BATCH, 4, TOKENS, TOKENS)
    layer, args, kwargs = _layer_call(model, batch)
    assert "has hooks" in direct_bert.RULE.refuse(layer, args, kwargs)  # transformers' capture hooks
    assert "_DirectBlockBackward" not in graph_nodes(model(batch))


def test_calls_the_rule_cannot_reproduce_are_refused() -> None:
    model = _vcas(TinyBert())
    layer, args, kwargs = _layer_call(model, _batch())
    x = args[0]
    refuse = direct_bert.RULE.refuse
    assert refuse(layer, args, kwargs) is None
    assert "encoder_hidden_states" in refuse(layer, (x, args[1], x), kwargs)
    assert "cache" in refuse(layer, args, {**kwargs, "cache": object()})
    assert "past_key_values" in refuse(layer, args, {**kwargs, "past_key_values": object()})
    assert "output_attentions" in refuse(layer, args, {**kwargs, "output_attentions": True})
    assert refuse(layer, args, {**kwargs, "output_attentions": False}) is None
    assert "'head_mask'" in refuse(layer, args, {**kwargs, "head_mask": x})
    assert "positional" in refuse(layer, (*args, None, None, None), kwargs)
    assert "attention_mask" in refuse(layer, (x, "mask"), kwargs)
    assert "hidden_states" in refuse(layer, (x[0], args[1]), kwargs)
    assert "on meta" in refuse(layer, (x.to("meta"), args[1]), kwargs)  # checked on the CPU only
    layer.output.dropout.p = 1.0
    assert "probability 1" in refuse(layer, args, kwargs)


def test_a_refused_call_re_runs_end_to_end(monkeypatch) -> None:
    """A refusal at training time sends that call down the re-run path, with the right gradients."""
    reference = TinyBert()
    model = _vcas(copy.deepcopy(reference))
    monkeypatch.setattr(direct_bert.BertLayerRule, "_refuse_dropout", lambda self, block: "no")
    batch, target = _batch(), _target()
    model(batch)
    outs = {}
    for net in (model, reference):
        torch.manual_seed(5)
        outs[net] = net(batch)
        (outs[net].tanh() * target).sum().backward()
    assert "_CompactedBlockBackward" in graph_nodes(outs[model])
    assert "_DirectBlockBackward" not in graph_nodes(outs[model])
    got, expected = grad_dict(model), grad_dict(reference)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("ratio", [1.0, 0.8, 0.5])
def test_a_compacted_step_holds_no_more_tensor_bytes_than_dense(ratio: float) -> None:
    """The peak of tensor bytes (the allocator's count) of each of the first steps is at most
    dense autograd's, with the default limits. The rule lets each saved tensor go once gathered
    (``frees_saved``), so near ratio 1 no full-size tensor stays beside its kept rows, and nothing
    is held after. The steps where a layer is first compacted include its probe, a run with the
    autograd graph, whose graph must go before the compacted forward runs: the last layer at
    ratio 1 goes compacted (its live tokens) on the second step, once the first saw its gradient."""
    from greenprop.metering.memory import tensor_bytes

    size = dict(hidden_size=64, intermediate_size=128, max_position_embeddings=32)
    base = TinyBert(dropout=0.0, **size)
    generator = torch.Generator().manual_seed(5)
    batch = (torch.randint(1, 40, (16, 32), generator=generator), torch.ones(16, 32, dtype=torch.int64))
    dense = copy.deepcopy(base)
    model = apply_vcas(copy.deepcopy(base), VCASConfig(seed=3), block_types=(bert.BertLayer,))
    for sampler in vcas_handle(model).samplers:
        sampler.ratio = ratio

    def step(net: nn.Module) -> int:
        net.zero_grad(set_to_none=True)
        counted = tensor_bytes(lambda: net(batch)[:, 0].square().sum().backward())
        assert counted is not None
        return counted.peak

    step(dense)
    dense_peak = step(dense)
    assert [step(model) <= dense_peak for _ in range(3)] == [True] * 3
    assert vcas_handle(model).runtime.handoff is None
    forwards = [layer.forward for layer in model.bert.encoder.layer]
    assert [f.compactable for f in forwards] == ([None, True] if ratio == 1 else [True, True])
