"""The interface through which method controllers act on a training run.

The reference trainer calls these hooks; a user with a hand-written loop (or an adapter
for another framework) calls the same methods in the same order. Every hook is
optional: the base class does nothing, so a controller overrides only what it needs.
FLOP accounting is not a hook: a controller whose steps the FLOP counter cannot see
exposes a :class:`greenprop.metering.FlopAccount` as ``flop_account``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = ["Controller", "RunContext", "TrainerControl"]

#: ``draw_batch(generator)``: a random training batch, drawn with the given generator.
BatchSampler = Callable[[torch.Generator], Any]
#: ``loss_fn(model, batch)``: the scalar training loss of one batch.
BatchLoss = Callable[[nn.Module, Any], torch.Tensor]
#: ``batch_head(batch, n)``: the first ``n`` samples of a batch, cut as the loop cuts its batches.
BatchHead = Callable[[Any, int], Any]


@dataclass
class TrainerControl:
    """Requests a controller makes of the loop, read and reset by the loop after each hook.

    ``should_evaluate``: the controller changed the model after the epoch's evaluation
    (e.g. rolled a sampled epoch back), so the epoch's record must be evaluated again.
    """

    should_evaluate: bool = False


@dataclass
class RunContext:
    """What a controller may know about the run, passed once to :meth:`Controller.on_train_start`.

    Args:
        model: the (converted) model being trained.
        epochs: the run's length in epochs.
        steps_per_epoch: optimizer steps per real epoch.
        draw_batch: a random training batch on the run's device, for controllers that
            estimate something on batches of their own (VCAS); None if the loop has none.
        loss_fn: turns a batch into its scalar loss: ``loss_fn(model, batch)``.
        batch_head: the first ``n`` samples of a drawn batch as the loop would batch them
            (a run that trims text cuts them to their longest sequence); None: plainly the
            first ``n`` (:func:`greenprop.metering.flops.batch_head`).
        control: flags a controller sets to ask something of the loop.
    """

    model: nn.Module
    epochs: int
    steps_per_epoch: int
    draw_batch: BatchSampler | None = None
    loss_fn: BatchLoss | None = None
    batch_head: BatchHead | None = None
    control: TrainerControl = field(default_factory=TrainerControl)


class Controller:
    """Base class for method controllers (GradSamp, SSProp, VCAS, ...).

    Epochs and steps are counted from 0. The reference trainer runs::

        for c in controllers: c.on_train_start(run)         # also after a resume
        for epoch in range(start, run.epochs):
            for c in controllers: c.on_epoch_start(epoch)
            fields = first non-None c.replace_epoch(epoch)  # the epoch is replaced: no data,
            if fields is None:                              # no forward, no backward
                for step in range(run.steps_per_epoch):
                    for c in controllers: c.on_step_start(epoch, step)
                    loss = first non-None c.replace_step(epoch, step, batch)
                    if loss is None:                        # the step is replaced: no
                        forward, backward, optimizer step   # backward, no optimizer step
                    for c in controllers: c.on_step_end(epoch, step, loss)
            record = evaluate()
            for c in controllers:
                record[c.name] = c.on_epoch_end(epoch, record)  # plus replace_epoch's fields
                if run.control.should_evaluate: record.update(evaluate()); reset the flag
            checkpoint {c.name: c.state_dict() for c in controllers}

    ``record[c.name]`` holds the controller's own per-epoch fields (what
    :meth:`replace_epoch` and :meth:`on_epoch_end` returned); shared fields (``loss``,
    ``acc1``, ``replaced_by``, ...) are the trainer's.
    """

    #: Short name: the key of the controller's fields in each epoch record and of its
    #: state in checkpoints. Unique within a run.
    name: str = "controller"
    #: Keys of :meth:`state_dict` that differ between the ranks of a DDP run (generators
    #: whose use depends on the rank's data, per-rank tallies): checkpoints keep every
    #: rank's copy of them, the rest is rank 0's.
    rank_local_state: tuple[str, ...] = ()

    def on_train_start(self, run: RunContext) -> None:
        """Called once before the first epoch run (also after a resume)."""

    def on_epoch_start(self, epoch: int) -> None:
        """Called before every epoch, real or replaced."""

    def replace_epoch(self, epoch: int) -> dict[str, Any] | None:
        """Do the epoch's work without data (e.g. apply a sampled update), or return None.

        None (the default) means train the epoch normally. A dict means the epoch was
        replaced; its items become the controller's fields in the epoch record.
        """
        return None

    def on_step_start(self, epoch: int, step: int) -> None:
        """Called before the forward pass of every training step."""

    def replace_step(self, epoch: int, step: int, batch: Any) -> torch.Tensor | None:
        """Do the step's work on ``batch`` yourself and return its loss, or return None.

        None (the default) means the loop runs its forward, backward and optimizer step.
        A loss means the controller updated the model itself (MeZO: two forward passes,
        no backward); the loop counts the FLOPs of this call as the step's, by calling
        it once more on a slice of the batch with the parameters restored afterwards, so
        keep the run's tallies in :meth:`on_step_end`, which follows the real call only.
        """
        return None

    def on_step_end(self, epoch: int, step: int, loss: float) -> None:
        """Called after the optimizer step of every training step."""

    def on_epoch_end(self, epoch: int, record: dict[str, Any]) -> dict[str, Any] | None:
        """Called after every epoch and its evaluation (``record`` holds ``loss``, ``acc1``, ...).

        Returns the controller's fields for the epoch record (or None). A controller that
        changes the model here sets ``run.control.should_evaluate``.
        """
        return None

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly after a resume."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
