"""Shared test fixtures: toy blocks, tiny zoo models, batches, a recording controller.

Plain functions and classes (import them: ``from fixtures import tiny_vit``); the pytest
fixtures built on them live in ``conftest.py``. One copy here, so a test that needs "a
small ViT on digits" gets the same one everywhere.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Hashable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from greenprop import Controller
from greenprop import data as gp_data
from greenprop import models as gp_models
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


def weights(model: nn.Module) -> dict[str, Tensor]:
    """A copy of the model's state (parameters and buffers)."""
    return {k: v.clone() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------------------------------------
# controllers


class Recorder(Controller):
    """Records every hook call as ``(hook name, *arguments)``; can take over an epoch or stop the run.

    Args:
        replace: the epoch it takes over (``skip_epoch`` says yes; ``replace_epoch``
            returns ``{"sampled": True}``).
        stop_at: raise KeyboardInterrupt at the start of this epoch, like Ctrl-C (to
            test resuming).
        extra: fields it adds to every epoch's record in ``on_epoch_end``.
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

    def attach_data(self, draw_batch: Callable[[Any], Any], loss_fn: Callable[[Any, Any], Any]) -> None:
        self.calls.append(("attach_data", draw_batch, loss_fn))

    def on_train_start(self, total_epochs: int, steps_per_epoch: int) -> None:
        self.calls.append(("on_train_start", total_epochs, steps_per_epoch))

    def on_epoch_start(self, epoch: int) -> None:
        if epoch == self.stop_at:
            raise KeyboardInterrupt
        self.calls.append(("on_epoch_start", epoch))

    def skip_epoch(self, epoch: int) -> bool:
        self.calls.append(("skip_epoch", epoch))
        return epoch == self.replace

    def replace_epoch(self, epoch: int) -> dict[str, Any]:
        self.calls.append(("replace_epoch", epoch))
        return {"sampled": True}

    def on_step_start(self, epoch: int, step: int) -> None:
        self.calls.append(("on_step_start", epoch, step))

    def flops_key(self, epoch: int, step: int) -> Hashable:
        self.calls.append(("flops_key", epoch, step))
        return None

    def flops_context(self) -> contextlib.AbstractContextManager[Any]:
        self.calls.append(("flops_context",))
        return contextlib.nullcontext()

    def on_step_end(self, epoch: int, step: int, loss: float) -> None:
        self.calls.append(("on_step_end", epoch, step, loss))

    def flops_delta(self, epoch: int, step: int) -> dict[str, float]:
        self.calls.append(("flops_delta", epoch, step))
        return {}

    def after_evaluation(self, epoch: int, record: dict[str, Any]) -> bool:
        self.calls.append(("after_evaluation", epoch, record))
        return False

    def on_epoch_end(self, epoch: int, record: dict[str, Any]) -> None:
        record.update(self.extra)
        self.calls.append(("on_epoch_end", epoch, record))

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.calls.append(("load_state_dict", state))
