"""Exact (ratio-1) blocks whose output gradient is zero at most tokens take the direct path's
live tokens: the last block of a ViT (cls) or of a BERT classifier (first token).

With the shipped limits a block at ratio 1 runs plain autograd; a block whose rule leaves
zero-gradient tokens out learns from the gradient it sees (a plain call looks at it) and
then takes the direct path, checking its gradient each backward. Against dense autograd
in float64 at every step: the learning step, the live steps, a step whose gradient is
not sparse (a second consumer of the block's output: the rule runs on every token, and
the block goes back to plain autograd), a full backward hook on the block.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fixtures import tiny_vit
from greenprop.vcas import VCASConfig, compaction
from vcas_helpers import fixed_ratios, grad_dict, graph_nodes

pytestmark = pytest.mark.usefixtures("one_thread")

#: The shipped limits: at ratio 1 every block runs exact (an exact tail), none compacted.
SHIPPED = {
    key: getattr(VCASConfig(), key) for key in ("compact_max_ratio", "direct_max_ratio", "sample_max_ratio")
}
TOL = {"rtol": 1e-12, "atol": 1e-14}


def _assert_close_grads(model: nn.Module, reference: nn.Module) -> None:
    got, expected = grad_dict(model), grad_dict(reference)
    assert got.keys() == expected.keys() == dict(model.named_parameters()).keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], **TOL, msg=name)


def _steps(
    model: nn.Module,
    reference: nn.Module,
    step: Callable[[nn.Module, bool], Tensor],
    live: Callable[[], list[bool | None]],
    blocks: int,
) -> None:
    """Four steps of ``model`` against ``reference`` (``step(net, second_consumer)`` returns the
    input's gradient), the blocks' learnt flags and paths checked after each."""
    last = [False] * (blocks - 1) + [True]
    for second, flags, direct_before in [
        (False, last, False),  # plain everywhere; the watch learns the last block's gradient is sparse
        (False, last, True),  # the last block on the direct path, its live tokens
        (True, [False] * blocks, True),  # a second consumer: a dense gradient, the rule on every token
        (False, [False] * blocks, False),  # back on plain autograd (looks again LIVE_RECHECK calls on)
    ]:
        paths: list[int] = []
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(compaction._DirectBlock, "apply", _spy(paths))
            inputs = [step(net, second) for net in (model, reference)]
        _assert_close_grads(model, reference)
        torch.testing.assert_close(inputs[0], inputs[1], **TOL)
        assert paths == ([blocks - 1] if direct_before else [])
        assert live() == flags
        model.zero_grad(set_to_none=True)
        reference.zero_grad(set_to_none=True)


def _spy(paths: list[int]) -> Callable[..., Tensor]:
    """``_DirectBlock.apply`` recording the index of each block that takes it into ``paths``."""
    apply = compaction._DirectBlock.apply

    def spy(owner: compaction.CompactedForward, *args: object) -> Tensor:
        paths.append(owner.sampler.index)
        return apply(owner, *args)

    return spy


def _flags(blocks: list[nn.Module]) -> Callable[[], list[bool | None]]:
    return lambda: [block.forward.live_gradient for block in blocks]


def test_an_exact_vit_last_block_runs_on_its_cls_token_as_dense_autograd(digits) -> None:
    reference = tiny_vit(depth=3).double()
    model = fixed_ratios(copy.deepcopy(reference), **SHIPPED)
    x, y = digits.train[:12]
    outputs: list[Tensor] = []
    hooked = []
    for net in (model, reference):  # a full backward hook on the last block sees the same gradients
        net.blocks[2].register_forward_hook(lambda m, args, out: outputs.append(out))
        net.blocks[2].register_full_backward_hook(lambda m, gi, go: hooked.append((gi[0], go[0])))
    weights = torch.randn(12, 17, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(5))

    def step(net: nn.Module, second: bool) -> Tensor:
        xi = x.double().clone().requires_grad_(True)
        outputs.clear()
        loss = F.cross_entropy(net(xi), y)
        if second:  # every token of the last block's output feeds a second loss
            loss = loss + (outputs[0] * weights).sum()
        loss.backward()
        return xi.grad

    _steps(model, reference, step, _flags(list(model.blocks)), blocks=3)
    assert len(hooked) == 8
    for (gi, go), (gi_ref, go_ref) in zip(hooked[::2], hooked[1::2], strict=True):
        torch.testing.assert_close(go, go_ref, **TOL)
        torch.testing.assert_close(gi, gi_ref, **TOL)


def test_an_exact_bert_last_layer_runs_on_its_first_token_as_dense_autograd() -> None:
    bert = pytest.importorskip("transformers.models.bert.modeling_bert")
    from test_vcas_direct_bert import TOKENS, TinyBert, _batch, _target

    reference = TinyBert()  # dropout 0.1: the rule draws the layer's masks
    model = fixed_ratios(copy.deepcopy(reference), block_types=(bert.BertLayer,), **SHIPPED)
    ids, mask = _batch()
    outputs: list[Tensor] = []
    for net in (model, reference):
        net.bert.encoder.layer[1].register_forward_hook(lambda m, args, out: outputs.append(out))
    target = _target()

    def step(net: nn.Module, second: bool) -> Tensor:
        embedded: list[Tensor] = []

        def keep(module: nn.Module, args: tuple, out: Tensor) -> None:
            out.retain_grad()  # the layers' input: its gradient is the input gradient checked
            embedded.append(out)

        handle = net.bert.embeddings.register_forward_hook(keep)
        torch.manual_seed(7)
        outputs.clear()
        out = net((ids, mask))
        handle.remove()
        loss = (out[:, 0].tanh() * target[:, 0]).sum()  # a classifier's: the first token only
        if second:
            first = outputs[0][0] if isinstance(outputs[0], tuple) else outputs[0]
            loss = loss + (first * target).sum()
        loss.backward()
        return embedded[0].grad

    assert TOKENS == 5
    _steps(model, reference, step, _flags(list(model.bert.encoder.layer)), blocks=2)


def test_the_watch_looks_again_every_live_recheck_calls(digits) -> None:
    """A block found dense looks at its gradient again after LIVE_RECHECK plain calls; one whose
    gradient no backward reaches learns nothing."""
    model = fixed_ratios(tiny_vit(depth=2), **SHIPPED)
    owner = model.blocks[1].forward
    x, y = digits.train[:4]
    with torch.no_grad():
        model(x)
    assert owner.live_gradient is None
    model(x)  # a training forward whose backward never runs: nothing learnt, looked at next call
    assert owner.live_gradient is None
    owner.live_gradient = False
    for _ in range(compaction.LIVE_RECHECK):
        F.cross_entropy(model(x), y).backward()
        assert owner.live_gradient is False
    F.cross_entropy(model(x), y).backward()
    assert owner.live_gradient is True
    assert "_DirectBlockBackward" in graph_nodes(model(x))
