"""The direct rule of the zoo ResNet's GroupNorm BasicBlock (greenprop.vcas.direct_resnet).

On ``resnet18-gn`` at width 8 and real digits: its norm forward is GroupNorm's own output;
at ratio 1 the gradients (input included) are dense autograd's, in both layouts and for
both shortcut kinds; sampled, they are the re-run path's from the same seeds (so what is
proven of that path, unbiasedness included, holds here); it keeps no more than the re-run
path (and less than dense autograd); other block structures take the re-run path.
"""

from __future__ import annotations

import copy
from collections import Counter
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fixtures import digits_batches, resnet
from greenprop.metering.memory import tensor_bytes
from greenprop.models.resnet import BasicBlock
from greenprop.vcas import VCASConfig, apply_vcas, direct_resnet
from greenprop.vcas.direct_resnet import _norm_forward
from greenprop.vcas.surgery import vcas_handle
from vcas_helpers import fixed_ratios, grad_dict, graph_nodes, held_by_forward, same_steps_direct_and_rerun

pytestmark = pytest.mark.usefixtures("one_thread")

LAYOUTS = {"nchw": torch.contiguous_format, "channels-last": torch.channels_last}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_norm_forward_is_group_norms_own_output(dtype: torch.dtype, layout: str) -> None:
    torch.manual_seed(0)
    norm = nn.GroupNorm(4, 16).to(dtype)
    nn.init.normal_(norm.weight)
    nn.init.normal_(norm.bias)
    h = (torch.randn(5, 16, 6, 7, dtype=dtype) * 3 + 1).contiguous(memory_format=LAYOUTS[layout])
    y, seen, mean, rstd = _norm_forward(norm, h)
    expected = norm(h)
    assert torch.equal(y, expected)
    assert y.stride() == expected.stride() and torch.equal(seen, h)
    groups = h.reshape(5, 4, -1)
    torch.testing.assert_close(mean, groups.mean(-1))
    torch.testing.assert_close(rstd, (groups.var(-1, unbiased=False) + norm.eps).rsqrt())


def _batch(digits: Any, size: int = 16, seed: int = 0) -> tuple[Tensor, Tensor]:
    x, y = digits_batches(digits, 1, size=size, seed=seed)[0]
    return x.double(), y


@pytest.fixture
def shortcuts(monkeypatch) -> Counter:
    """Counts the rule's backward calls by the shortcut kind of the block."""
    calls: Counter = Counter()
    original = direct_resnet.RULE.backward

    def spy(block: nn.Module, *args: Any) -> Any:
        calls[type(block.shortcut).__name__] += 1
        return original(block, *args)

    monkeypatch.setattr(direct_resnet.RULE, "backward", spy)
    return calls


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_ratio_one_equals_dense_autograd_on_digits(digits, shortcuts: Counter, layout: str) -> None:
    model = resnet().double().to(memory_format=LAYOUTS[layout])  # the trainer's channels_last option
    reference = copy.deepcopy(model)
    fixed_ratios(model, 1.0)
    x, y = _batch(digits)
    x = x.contiguous(memory_format=LAYOUTS[layout])
    model(x)  # the compacted blocks' first forward checks them; the next runs them direct
    inputs, outs = [], []
    for net in (model, reference):
        xi = x.clone().requires_grad_(True)
        out = net(xi)
        F.cross_entropy(out, y).backward()
        inputs.append(xi)
        outs.append(out)
    nodes = graph_nodes(outs[0])
    assert "_DirectBlockBackward" in nodes and "_CompactedBlockBackward" not in nodes
    assert shortcuts == {"Identity": 5, "Sequential": 3}  # every block, both shortcut kinds
    assert torch.equal(outs[0], outs[1])
    got, expected = grad_dict(model), grad_dict(reference)
    assert got.keys() == expected.keys() == dict(reference.named_parameters()).keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-12, atol=1e-14, msg=name)
    torch.testing.assert_close(inputs[0].grad, inputs[1].grad, rtol=1e-12, atol=1e-14)
    tally = vcas_handle(model).runtime.take_tally()
    assert tally.done == tally.dense > 0  # every conv ran, on every sample


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_sampled_gradients_equal_the_rerun_paths_from_the_same_seeds(
    digits, shortcuts: Counter, dtype: torch.dtype, tolerance: float
) -> None:
    """Same seeds, same draws, same gradients: the direct path computes what the re-run does."""
    x, y = _batch(digits, size=12, seed=1)
    tally = same_steps_direct_and_rerun(
        resnet().to(dtype),
        x.to(dtype),
        lambda out: F.cross_entropy(out, y),
        rtol=tolerance,
        atol=tolerance / 10,
    )
    assert sum(shortcuts.values()) == 3 * 8
    assert 0 < tally.rows[0][0] < tally.rows[0][1]


def test_blocks_at_ratio_one_behind_a_sampling_block_run_direct(digits, shortcuts: Counter) -> None:
    """The last block samples at 0.5, the others run at ratio 1 (default limits: direct at 0.9 and
    below). They keep only the rows the last block kept, so they take the direct path too
    (``VCASRuntime.kept_ratio``), with the plain sampled path's gradients from the same seeds
    (only the last block draws)."""
    base = resnet().double()
    x, y = _batch(digits)
    models = {}
    for compact in (True, False):
        model = apply_vcas(copy.deepcopy(base), VCASConfig(seed=3, compact=compact))
        samplers = vcas_handle(model).samplers
        for sampler in samplers:
            sampler.ratio = 0.5 if sampler is samplers[-1] else 1.0
        model(x)  # the compacted blocks' first forward checks them
        models[compact] = model
    for _ in range(2):  # two steps, new draws
        shortcuts.clear()
        got = {}
        for compact, model in models.items():
            model.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            got[compact] = grad_dict(model)
        assert shortcuts == {"Identity": 5, "Sequential": 3}  # every block took the direct path
        for name, expected in got[False].items():
            torch.testing.assert_close(got[True][name], expected, rtol=1e-10, atol=1e-12, msg=name)
    rows = vcas_handle(models[True]).runtime.take_tally().rows
    assert 0 < rows[0][0] == rows[7][0] < rows[0][1]  # block 0 kept the last block's rows only


def test_it_keeps_no_more_than_the_rerun_path_and_less_than_dense(digits) -> None:
    base = resnet().double()
    x, _ = _batch(digits, size=16)
    saved = {}
    for name, model in {
        "dense": copy.deepcopy(base),
        "direct": fixed_ratios(copy.deepcopy(base), 0.5),
        "rerun": fixed_ratios(copy.deepcopy(base), 0.5, direct=False),
    }.items():
        model(x)  # the compacted blocks' first forward checks them
        saved[name] = held_by_forward(model, x)
    # The norms' means and rstds: per block two or three norms of (16 samples, groups) float64s.
    blocks = [m for m in base.modules() if isinstance(m, BasicBlock)]
    norms = [n for b in blocks for n in b.modules() if isinstance(n, nn.GroupNorm)]
    stats = sum(2 * 16 * n.num_groups * 8 for n in norms)
    assert saved["direct"] <= saved["rerun"] + stats
    assert saved["direct"] < saved["dense"]


def _instance_norm(model: nn.Module) -> None:
    model.layer1[0].bn1 = nn.InstanceNorm2d(8, affine=True).double()


def _plain_conv(model: nn.Module) -> None:  # reflect padding: VCAS leaves it a plain Conv2d
    model.layer1[0].conv2 = nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect", bias=False).double()


def _shortcut_without_norm(model: nn.Module) -> None:
    model.layer2[0].shortcut = nn.Sequential(model.layer2[0].shortcut[0])


def _hooked_norm(model: nn.Module) -> None:
    model.layer2[0].bn2.register_forward_hook(lambda module, args, out: None)


CHANGES = {
    "instance-norm": (_instance_norm, "layer1.0"),
    "plain-conv": (_plain_conv, "layer1.0"),
    "shortcut-without-norm": (_shortcut_without_norm, "layer2.0"),
    "hooked-norm": (_hooked_norm, "layer2.0"),
}


@pytest.mark.parametrize("change", list(CHANGES))
def test_other_block_structures_take_the_rerun_path(digits, change: str) -> None:
    model = resnet().double()
    edit, changed = CHANGES[change]
    edit(model)
    reference = copy.deepcopy(model)
    fixed_ratios(model, 1.0)
    paths = {}
    for name, block in model.named_modules():
        if isinstance(block, BasicBlock):
            block.register_forward_hook(
                lambda module, args, out, name=name: paths.__setitem__(name, type(out.grad_fn).__name__)
            )
    x, y = _batch(digits)
    model(x)
    for net in (model, reference):
        F.cross_entropy(net(x), y).backward()
    assert paths.pop(changed) == "_CompactedBlockBackward"
    assert set(paths.values()) == {"_DirectBlockBackward"} and len(paths) == 7
    got, expected = grad_dict(model), grad_dict(reference)
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-10, atol=1e-12, msg=name)


def test_channels_last_samples_what_nchw_does(digits) -> None:
    """The trainer's channels_last layout at block ratio 0.5: the kept rows come back NCHW, the
    statistics from the channels_last kernel; the gradients are NCHW's from the same seeds.

    In float64: on 8x8 digits the last stage's GroupNorm normalises 2 values per group, and in
    float32 the two layouts' kernels already differ by 1% there in dense autograd.
    """
    base = resnet().double()
    x, y = _batch(digits, size=12, seed=2)
    steps: dict[str, list[Tensor]] = {}
    for layout, memory_format in LAYOUTS.items():
        model = fixed_ratios(copy.deepcopy(base).to(memory_format=memory_format), 0.5)
        params = list(model.parameters())
        xl = x.contiguous(memory_format=memory_format)
        model(xl)
        assert "_DirectBlockBackward" in graph_nodes(model(xl))
        steps[layout] = [
            torch.cat([g.reshape(-1) for g in torch.autograd.grad(F.cross_entropy(model(xl), y), params)])
            for _ in range(3)
        ]
    for step, (a, b) in enumerate(zip(steps["channels-last"], steps["nchw"], strict=True)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11, msg=f"step {step}")
    assert not torch.equal(steps["nchw"][0], steps["nchw"][1])


def _step_peak(model: nn.Module, x: Tensor, y: Tensor) -> int:
    """Peak tensor bytes of one step (forward, loss, backward) above its start, gradients set to
    None first (so each step allocates its own)."""
    model.zero_grad(set_to_none=True)
    peak = tensor_bytes(lambda: F.cross_entropy(model(x), y).backward())
    assert peak is not None
    return peak.peak


@pytest.mark.parametrize("ratio", [1.0, 0.8, 0.5])
def test_a_compacted_step_holds_no_more_tensor_bytes_than_dense(digits, ratio: float) -> None:
    """The whole step's peak of tensor bytes (the allocator's count, not the RSS) is at most dense
    autograd's, with the default limits (direct path at drawn ratios up to 0.8, plain above): the
    forward keeps less (no first-norm activation), and the backward on the kept rows must not give
    that back by holding full-size tensors beside their kept rows (at 0.8 they are nearly
    full-size). Nothing is left held after the step (the first block's input gradient, handed to
    no block)."""
    base = resnet().double()
    x, y = _batch(digits, size=64, seed=4)
    dense = copy.deepcopy(base)
    model = apply_vcas(copy.deepcopy(base), VCASConfig(seed=3))
    for sampler in vcas_handle(model).samplers:
        sampler.ratio = ratio
    for net in (dense, model):  # the compacted blocks' first forward checks them
        F.cross_entropy(net(x), y).backward()
    assert ("_DirectBlockBackward" in graph_nodes(model(x))) == (ratio < 1)
    assert _step_peak(model, x, y) <= _step_peak(dense, x, y)
    assert vcas_handle(model).runtime.handoff is None


def test_its_freed_saved_tensors_still_serve_a_retained_graph_and_refuse_misuse(digits) -> None:
    """The rule lets its saved tensors go during the backward (not autograd's saved tensors):
    a retained graph still gets them a second time (the variance estimation's two backwards),
    a third backward without retaining is refused, as is a saved output changed in place."""
    x, y = _batch(digits, size=16)
    model = fixed_ratios(resnet().double(), 1.0)
    model(x)
    params = list(model.parameters())
    loss = F.cross_entropy(model(x), y)
    first = torch.autograd.grad(loss, params, retain_graph=True)
    second = torch.autograd.grad(loss, params)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)
    with pytest.raises(RuntimeError, match="second time"):
        torch.autograd.grad(loss, params)
    out = model.layer1(model.bn1(model.conv1(x)).relu())
    assert type(out.grad_fn).__name__ == "_DirectBlockBackward"
    out.mul_(2)  # the last block's output, which its rule saved for its ReLU
    with pytest.raises(RuntimeError, match="in-place"):
        out.sum().backward()
