"""The direct path of compacted blocks: a registered rule backpropagates the kept rows op by op.

Checked on a toy rule for the fixtures' ``x + fc2(gelu(fc1(norm(x))))`` block: exact against
dense autograd at ratio 1, the same sampled gradients as the re-run path from the same seeds
(so everything proven of that path, unbiasedness included, holds here), fewer rows computed,
and the calls a rule does not take (refused, autocast, a second argument with gradient) going
to the re-run path.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fixtures import Block, stack
from greenprop.vcas import VCASConfig, apply_vcas, direct
from greenprop.vcas.layers import linear_backward
from greenprop.vcas.surgery import vcas_handle
from vcas_helpers import fixed_ratios, grad_dict, graph_nodes, same_steps_direct_and_rerun, skewed

pytestmark = pytest.mark.usefixtures("one_thread")


class ToyRule:
    """The fixtures' Block by hand: LayerNorm, fc1, GELU, fc2, residual."""

    def __init__(self) -> None:
        self.refusal: str | None = None
        self.backwards = 0

    def refuse(self, block: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
        return self.refusal

    def forward(
        self, block: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[Any, list[Tensor]]:
        (x,) = args
        norm = block.norm
        n, mean, rstd = torch.native_layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)
        h = block.fc1(n)
        g = block.act(h)
        return x + block.fc2(g), [x, mean, rstd, n, h, g]

    def backward(
        self, block: nn.Module, saved: list[Tensor], grad: Tensor, need_input: bool
    ) -> tuple[Tensor | None, dict[nn.Parameter, Tensor]]:
        self.backwards += 1
        x, mean, rstd, n, h, g = saved
        norm = block.norm
        dg, w2, b2 = linear_backward(block.fc2, grad, g)
        dn, w1, b1 = linear_backward(block.fc1, torch.ops.aten.gelu_backward(dg, h), n)
        dx, wn, bn = torch.ops.aten.native_layer_norm_backward(
            dn, x, norm.normalized_shape, mean, rstd, norm.weight, norm.bias, [need_input, True, True]
        )
        params = (block.fc2.weight, block.fc2.bias, block.fc1.weight, block.fc1.bias, norm.weight, norm.bias)
        found = {p: d for p, d in zip(params, (w2, b2, w1, b1, wn, bn), strict=True) if d is not None}
        return (dx + grad if need_input else None), found


@pytest.fixture
def rule(monkeypatch) -> ToyRule:
    toy = ToyRule()
    monkeypatch.setattr(direct, "_RULES", {})
    direct.register(Block, toy)
    return toy


@pytest.mark.parametrize("input_grad", [True, False])
def test_ratio_one_equals_dense_autograd(rule: ToyRule, input_grad: bool) -> None:
    reference = stack(depth=3)
    model = fixed_ratios(copy.deepcopy(reference), 1.0, 1.0)
    x, target = skewed((7, 4, 6), seed=1), skewed((7, 4, 6), seed=2)
    model(x)  # the first forward checks the blocks
    inputs = []
    for net in (model, reference):
        xi = x.clone().requires_grad_(input_grad)
        out = net(xi)
        (out.tanh() * target).sum().backward()
        inputs.append(xi)
    assert "_DirectBlockBackward" in graph_nodes(out if net is model else model(x))
    assert rule.backwards == 3
    got, expected = grad_dict(model), grad_dict(reference)
    assert got.keys() == expected.keys() and len(got) == 18
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-12, atol=1e-14, msg=name)
    if input_grad:
        torch.testing.assert_close(inputs[0].grad, inputs[1].grad, rtol=1e-12, atol=1e-14)
    else:
        assert inputs[0].grad is None


def test_sampled_gradients_equal_the_rerun_paths_from_the_same_seeds(rule: ToyRule) -> None:
    """Same seeds, same draws, same gradients: the direct path computes what the re-run does."""
    x, target = skewed((12, 3, 6), seed=4), skewed((12, 3, 6), seed=5)
    base = stack(depth=3, dim=6, hidden=8)
    same_steps_direct_and_rerun(base, x, lambda out: (out.tanh() * target).sum(), rtol=1e-10, atol=1e-12)
    assert rule.backwards == 9


def test_every_sample_dropped_gives_zero_gradients(rule: ToyRule, monkeypatch) -> None:
    model = fixed_ratios(stack(depth=2), 0.5, 1.0)
    handle = vcas_handle(model)
    x = skewed((5, 3, 6), seed=1).requires_grad_(True)
    model(x)
    nothing = (torch.empty(0, dtype=torch.long), None)
    monkeypatch.setattr(handle.samplers[1], "draw", lambda grad, nonzero=None: nothing)
    model(x).sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in model.parameters())


def test_calls_the_rule_does_not_take_re_run(rule: ToyRule) -> None:
    model = fixed_ratios(stack(depth=2), 1.0, 1.0)
    x = skewed((5, 3, 6), seed=1)
    model(x)
    assert "_DirectBlockBackward" in graph_nodes(model(x))
    rule.refusal = "not today"
    assert "_DirectBlockBackward" not in graph_nodes(model(x))
    assert "_CompactedBlockBackward" in graph_nodes(model(x))
    rule.refusal = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert "_DirectBlockBackward" not in graph_nodes(model(x))
    off = fixed_ratios(stack(depth=2), 1.0, 1.0, direct=False)
    off(x)
    assert "_DirectBlockBackward" not in graph_nodes(off(x))


class TwoInputs(nn.Module):
    """A block taking a second tensor that carries gradient: the rule's one input is not enough."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = Block(6, 8)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return self.inner(x) + y


def test_a_second_argument_with_gradient_re_runs(rule: ToyRule, monkeypatch) -> None:
    direct.register(TwoInputs, rule)
    torch.manual_seed(0)
    model = fixed_ratios(
        nn.ModuleList([TwoInputs(), TwoInputs()]).double(), 1.0, 1.0, block_types=[TwoInputs]
    )
    x, y = skewed((4, 3, 6), seed=1), skewed((4, 3, 6), seed=2).requires_grad_(True)
    model[0](x, y)
    assert "_DirectBlockBackward" not in graph_nodes(model[0](x, y))
    F.mse_loss(model[0](x, y), x).backward()
    assert y.grad is not None



def test_each_path_compacts_up_to_its_own_ratio_limit(rule: ToyRule) -> None:
    """Direct blocks compact up to direct_max_ratio; a call the rule refuses re-runs only up to
    compact_max_ratio; above its path's limit a block runs the plain sampled path."""
    model = stack(depth=2)
    config = VCASConfig(seed=3, compact_max_ratio=0.6, direct_max_ratio=0.8)
    handle = vcas_handle(apply_vcas(model, config))
    x = skewed((5, 3, 6), seed=1)
    model(x)  # the first forward checks the blocks
    expected = {
        (None, 0.5): "_DirectBlockBackward",
        (None, 0.7): "_DirectBlockBackward",
        (None, 0.9): "_SampleGradientBackward",
        ("no", 0.5): "_CompactedBlockBackward",
        ("no", 0.7): "_SampleGradientBackward",
        ("no", 0.9): "_SampleGradientBackward",
    }
    for (refusal, ratio), node in expected.items():
        rule.refusal = refusal
        for sampler in handle.samplers:
            sampler.ratio = ratio
        assert model(x).grad_fn.name() == node, (refusal, ratio)


def test_kept_rows_gathers_each_tensor_when_taken_and_only_once() -> None:
    a, b = skewed((6, 3), seed=1), skewed((6, 2, 2), seed=2)
    rows = torch.tensor([1, 4])
    kept = direct.KeptRows([a, b], rows)
    (got_b,) = kept.take(1)
    assert torch.equal(got_b, b[rows])
    got_a, *rest = kept.take(0)
    assert torch.equal(got_a, a[rows]) and not rest
    with pytest.raises(RuntimeError, match="taken before"):
        kept.take(0)
    assert direct.KeptRows([a], None).take(0)[0] is a  # every row kept: no copy
