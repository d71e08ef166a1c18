"""A compacted block's input gradient handed to the block before with its rows compact
(greenprop.vcas.compaction.GradientRows).

On ``resnet18-gn`` (width 8, digits, float64) at block ratio 0.5, from the same seeds, the
gradients equal those of the same steps with the hand-over switched off (every block reads
the full gradient and gathers its rows itself), bit for bit; the hand-over is used (the
norms, the kept gradient rows and the output rows of the block before), and it is not used
where the gradient that arrives is not the one handed over: another gradient added to a
block's output, or a hook that changes it in place.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fixtures import digits_batches, resnet
from greenprop.vcas import compaction
from vcas_helpers import fixed_ratios, grads, graph_nodes

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def uses(monkeypatch) -> Counter:
    """Counts what the hand-over served: kept gradient rows, and output rows of the block before."""
    calls: Counter = Counter()
    kept, input_rows = compaction.GradientRows.kept, compaction.GradientRows.input_rows

    def spy_kept(self: Any, *args: Any) -> Tensor:
        calls["gradient rows"] += 1
        return kept(self, *args)

    def spy_input(self: Any, *args: Any) -> Tensor | None:
        found = input_rows(self, *args)
        calls["output rows"] += found is not None
        return found

    monkeypatch.setattr(compaction.GradientRows, "kept", spy_kept)
    monkeypatch.setattr(compaction.GradientRows, "input_rows", spy_input)
    return calls


def _steps(
    digits: Any, handed_over: bool, monkeypatch, edit: Callable[[nn.Module], Any] | None = None
) -> list[Tensor]:
    """Three sampled steps (ratio 0.5, seed 3) of the float64 ResNet; ``edit`` may change it and
    return an extra loss term's source (a list the forward fills)."""
    model = fixed_ratios(resnet().double(), 0.5)
    extra = edit(model) if edit is not None else None
    x, y = digits_batches(digits, 1, size=16, seed=4)[0]
    x = x.double()
    params = list(model.parameters())
    model(x)  # the compacted blocks' first forward checks them
    assert "_DirectBlockBackward" in graph_nodes(model(x))
    if extra is not None:
        extra.clear()
    with monkeypatch.context() as patch:
        if not handed_over:
            patch.setattr(compaction.GradientRows, "holds", lambda self, grad: False)
        found = []
        for _ in range(3):
            loss = F.cross_entropy(model(x), y)
            if extra:
                loss = loss + 0.3 * extra.pop().square().mean()
            found.append(grads(loss, params))
    return found


def test_the_hand_over_gives_the_gradients_of_reading_the_full_tensor(
    digits, monkeypatch, uses: Counter
) -> None:
    without = _steps(digits, False, monkeypatch)
    assert not uses
    with_it = _steps(digits, True, monkeypatch)
    # Every block but the last receives its gradient from a compacted block: 7 per step.
    assert uses == {"gradient rows": 3 * 7, "output rows": 3 * 7}
    for step, (a, b) in enumerate(zip(with_it, without, strict=True)):
        assert torch.equal(a, b), f"step {step}"
    assert not torch.equal(with_it[0], with_it[1])  # new draws every step


def _second_consumer(model: nn.Module) -> list[Tensor]:
    """The first block's output also enters the loss: its gradient is a sum, not the one handed over."""
    outputs: list[Tensor] = []
    model.layer1[0].register_forward_hook(lambda module, args, out: outputs.append(out))
    return outputs


def _doubling_hook(model: nn.Module) -> None:
    """A hook doubles the gradient at the second block's output in place."""

    def double(out: Tensor) -> None:
        if out.requires_grad:
            out.register_hook(lambda grad: grad.mul_(2.0))

    model.layer1[1].register_forward_hook(lambda module, args, out: double(out))


@pytest.mark.parametrize("edit", [_second_consumer, _doubling_hook], ids=["second-consumer", "hook"])
def test_a_gradient_other_than_the_one_handed_over_is_read_in_full(
    digits, monkeypatch, uses: Counter, edit: Callable[[nn.Module], Any]
) -> None:
    without = _steps(digits, False, monkeypatch, edit)
    with_it = _steps(digits, True, monkeypatch, edit)
    assert uses["gradient rows"] == 3 * 6  # one block's gradient is not the handed one
    for step, (a, b) in enumerate(zip(with_it, without, strict=True)):
        assert torch.equal(a, b), f"step {step}"
