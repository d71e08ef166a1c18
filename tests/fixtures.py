"""Shared test fixtures: toy blocks, tiny zoo models, batches, a recording controller.

Plain functions and classes (import them: ``from fixtures import tiny_vit``); the pytest
fixtures built on them live in ``conftest.py``. One copy here, so a test that needs "a
small ViT on digits" gets the same one everywhere.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import AbstractContextManager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from greenprop import Controller
from greenprop import data as gp_data
from greenprop import models as gp_models
from greenprop.controller import RunContext
from greenprop.methods import temporary_method
from greenprop.train.config import TrainConfig

# ---------------------------------------------------------------------------------------------
# data


@functools.cache
def digits_subset(subset: int | None = None, test_subset: int | None = None) -> gp_data.DatasetPair:
    """scikit-learn digits (8x8, 10 classes), optionally cut to the first draws; loaded once."""
    return gp_data.load("digits", subset=subset, test_subset=test_subset)


def digits_run(**fields: Any) -> TrainConfig:
    """A training run on digits without progress output; ``fields`` as in :class:`TrainConfig`."""
    return TrainConfig(**{"dataset": "digits", "progress": False, **fields})


def digits_batches(
    digits: gp_data.DatasetPair, count: int, size: int = 32, seed: int = 0
) -> list[tuple[Tensor, Tensor]]:
    """``count`` random training batches ``(x, y)`` of ``size`` digits, drawn with ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    return [digits.train[torch.randperm(len(digits.train), generator=gen)[:size]] for _ in range(count)]


def cross_entropy_loss(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    """The loss a controller's ``loss_fn(model, batch)`` computes for a classifier."""
    x, y = batch
    return F.cross_entropy(model(x), y)


def token_batches(n: int = 12, tokens: int = 3, dim: int = 6) -> Iterator[tuple[Tensor, Tensor]]:
    """Endless ``(x, w)`` pairs of shape ``(n, tokens, dim)``: inputs and loss weights."""
    gen = torch.Generator().manual_seed(1)
    while True:
        yield torch.randn(n, tokens, dim, generator=gen), torch.randn(n, tokens, dim, generator=gen)


def weighted_sum_loss(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    """``sum(model(x) * w)``: a loss whose output gradient is exactly ``w``."""
    x, w = batch
    return (model(x) * w).sum()


class PaddedTexts(torch.utils.data.Dataset):
    """Token id sequences of uneven lengths (ids 1..39) with a label each, as a tokenizer hands
    them out: mostly short, ``size // 16`` of them ``longest`` long. Batch with :func:`pad_to_longest`."""

    def __init__(self, size: int, longest: int) -> None:
        generator = torch.Generator().manual_seed(3)
        lengths = torch.randint(2, longest // 2, (size,), generator=generator)
        lengths[torch.randperm(size, generator=generator)[: size // 16]] = longest
        self.items = [
            {"input_ids": torch.randint(1, 40, (int(n),), generator=generator), "labels": int(n) % 2}
            for n in lengths
        ]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.items[index]


def pad_to_longest(items: list[dict[str, Any]]) -> dict[str, Tensor]:
    """Dynamic padding (DataCollatorWithPadding's, without a tokenizer): right, to the batch's longest."""
    longest = max(len(item["input_ids"]) for item in items)
    ids = torch.zeros(len(items), longest, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, item in enumerate(items):
        ids[row, : len(item["input_ids"])] = item["input_ids"]
        mask[row, : len(item["input_ids"])] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([i["labels"] for i in items])}


def estimation_parts(monkeypatch: Any) -> list[tuple[Any, Any]]:
    """Record every ``(drawn batch, estimation part)`` VCAS's controller estimates on."""
    from greenprop.vcas import VCAS

    parts: list[tuple[Any, Any]] = []
    estimation_part = VCAS._estimation_part

    def spy(self: VCAS, batch: Any) -> tuple[int, Any]:
        full, part = estimation_part(self, batch)
        parts.append((batch, part))
        return full, part

    monkeypatch.setattr(VCAS, "_estimation_part", spy)
    return parts


def check_parts_cut_to_longest(parts: list[tuple[Any, Any]], size: int) -> None:
    """Each part is the first ``size`` samples of its dict batch, cut to the part's own longest
    sequence (no column that is padding in every row), and some part was shorter than its batch."""
    for batch, part in parts:
        longest = int(batch["attention_mask"][:size].sum(dim=1).max())
        assert part["attention_mask"].shape == (size, longest)
        for key in ("input_ids", "attention_mask"):
            assert torch.equal(part[key], batch[key][:size, :longest])
        assert torch.equal(part["labels"], batch["labels"][:size])
    assert any(part["input_ids"].shape[1] < batch["input_ids"].shape[1] for batch, part in parts)


# ---------------------------------------------------------------------------------------------
# models


class NormLinearBlock(nn.Module):
    """``x + fc(norm(x))``: the smallest residual block VCAS converts (one Linear)."""

    def __init__(self, fc: nn.Linear) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(fc.in_features)
        self.fc = fc

    def forward(self, x: Tensor) -> Tensor:
        return x + self.fc(self.norm(x))


class AuxLossBlock(NormLinearBlock):
    """Keeps an auxiliary loss on its internals (``self.aux``): gradient that bypasses its output."""

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc(self.norm(x))
        self.aux = h.square().mean()
        return x + h


def norm_linear_stack(
    depth: int = 3, dim: int = 6, block: type[NormLinearBlock] = NormLinearBlock
) -> nn.Sequential:
    """``depth`` blocks of width ``dim``, seeded 0."""
    torch.manual_seed(0)
    return nn.Sequential(*(block(nn.Linear(dim, dim)) for _ in range(depth)))


def tiny_vit(seed: int = 0, depth: int = 2) -> nn.Module:
    """The zoo's ViT for 8x8 one-channel digits: width 32, 2 heads, ``depth`` blocks."""
    torch.manual_seed(seed)
    return gp_models.create(
        "vit", num_classes=10, in_channels=1, image_size=8, width=32, depth=depth, heads=2
    )


def tiny_bert(head: str = "Sequence", positions: int = 32, dropout: float = 0.1) -> nn.Module:
    """transformers' ``BertFor{head}Classification`` (2 layers, 16 wide, 4 heads, vocabulary 40,
    3 labels, eager attention), random weights seeded 0."""
    import transformers

    config = transformers.BertConfig(
        vocab_size=40,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=24,
        max_position_embeddings=positions,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
        num_labels=3,
    )
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    return getattr(transformers, f"BertFor{head}Classification")(config)


class Block(nn.Module):
    """``x + fc2(gelu(fc1(norm(x))))``: acts on each sample (dim 0) separately."""

    def __init__(self, dim: int, hidden: int, bias: bool = True) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden, bias=bias)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.fc2(self.act(self.fc1(self.norm(x))))


def stack(depth: int = 2, dim: int = 6, hidden: int = 8, bias: bool = True, seed: int = 0) -> nn.Sequential:
    """``depth`` float64 :class:`Block`s."""
    torch.manual_seed(seed)
    return nn.Sequential(*(Block(dim, hidden, bias) for _ in range(depth))).double()


class ConvBlock(nn.Module):
    """``tanh(conv2(tanh(norm(conv1(x)))) + shortcut(x))``: acts on each sample separately.

    ``conv1`` takes the stride, groups and dilation (and a non-square kernel); the shortcut
    is a strided 1x1 conv when the shape changes. ``extra`` convs (e.g. reflect padding)
    are applied after ``conv2``, shape-preserving.
    """

    def __init__(
        self,
        cin: int,
        cout: int,
        *,
        stride: int = 1,
        groups: int = 1,
        dilation: int = 1,
        bias: bool = True,
        extra: tuple[nn.Module, ...] = (),
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(
            cin, cout, (3, 2), stride, padding=(dilation, 1), dilation=dilation, groups=groups, bias=bias
        )
        self.norm = nn.GroupNorm(2, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, padding=1, groups=groups, bias=bias)
        self.extra = nn.Sequential(*extra)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        skip = self.shortcut(x)
        h = self.conv1(x)[..., : skip.shape[-1]]  # kernel width 2, padding 1: may be one wider
        h = self.extra(self.conv2(torch.tanh(self.norm(h))))
        return torch.tanh(h + skip)


def convnet(seed: int = 0, *, groups: int = 2, bias: bool = True, extra: bool = False) -> nn.Sequential:
    """Two float64 residual conv blocks: 4 -> 4 (stride 2, dilation 2) -> 6."""
    torch.manual_seed(seed)
    extras: tuple[nn.Module, ...] = ()
    if extra:
        extras = (
            nn.Conv2d(6, 6, 3, padding="same", bias=bias),
            nn.Conv2d(6, 6, 3, padding=1, padding_mode="reflect", bias=bias),
        )
    return nn.Sequential(
        ConvBlock(4, 4, stride=2, groups=groups, dilation=2, bias=bias),
        ConvBlock(4, 6, groups=groups, bias=bias, extra=extras),
    ).double()


def resnet(seed: int = 0, name: str = "resnet18-gn") -> nn.Module:
    """``name`` (a ResNet-18 variant) at width 8 on single-channel images."""
    torch.manual_seed(seed)
    return gp_models.create(name, in_channels=1, width=8)


# ---------------------------------------------------------------------------------------------
# spying on the samplers the layers call




def weights(model: nn.Module) -> dict[str, Tensor]:
    """A copy of the model's state (parameters and buffers)."""
    return {k: v.clone() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------------------------------------
# controllers


class Poison(Controller):
    """Replaces epoch ``at`` by setting every weight to NaN: a method that diverges there."""

    name = "poison"

    def __init__(self, model: nn.Module, at: int = 1) -> None:
        self.model, self.at = model, at

    def replace_epoch(self, epoch: int) -> dict[str, Any] | None:
        if epoch != self.at:
            return None
        with torch.no_grad():
            for p in self.model.parameters():
                p.fill_(float("nan"))
        return {}


def diverging_method(name: str = "poison-test", at: int = 1) -> AbstractContextManager[Any]:
    """A method ``name`` (for ``--methods``) whose run diverges in epoch ``at`` (0-based)."""
    return temporary_method(name, lambda model, options, **_: [Poison(model, at)], help="diverges")


class Recorder(Controller):
    """Records every hook call as ``(hook name, *arguments)``; can take over an epoch or stop the run.

    Args:
        replace: the epoch it takes over (``replace_epoch`` returns ``{"sampled": True}``
            there and None elsewhere).
        stop_at: raise KeyboardInterrupt at the start of this epoch, like Ctrl-C (to
            test resuming).
        extra: fields ``on_epoch_end`` returns for every epoch's record.
    """

    name = "recorder"

    def __init__(
        self, replace: int | None = None, stop_at: int | None = None, extra: dict[str, Any] | None = None
    ) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.replace, self.stop_at, self.extra = replace, stop_at, dict(extra or {})

    def hooks(self) -> list[str]:
        """The names of the hooks called, in order."""
        return [call[0] for call in self.calls]

    def calls_to(self, hook: str) -> list[tuple[Any, ...]]:
        """The arguments of every call of ``hook``, in order."""
        return [call[1:] for call in self.calls if call[0] == hook]

    def on_train_start(self, run: RunContext) -> None:
        self.calls.append(("on_train_start", run))

    def on_epoch_start(self, epoch: int) -> None:
        if epoch == self.stop_at:
            raise KeyboardInterrupt
        self.calls.append(("on_epoch_start", epoch))

    def replace_epoch(self, epoch: int) -> dict[str, Any] | None:
        self.calls.append(("replace_epoch", epoch))
        return {"sampled": True} if epoch == self.replace else None

    def on_step_start(self, epoch: int, step: int) -> None:
        self.calls.append(("on_step_start", epoch, step))

    def on_step_end(self, epoch: int, step: int, loss: float) -> None:
        self.calls.append(("on_step_end", epoch, step, loss))

    def on_epoch_end(self, epoch: int, record: dict[str, Any]) -> dict[str, Any] | None:
        self.calls.append(("on_epoch_end", epoch, dict(record)))
        return dict(self.extra) or None

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.calls.append(("load_state_dict", state))
