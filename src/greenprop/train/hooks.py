"""The hook interface through which method controllers act on a training run.

The reference trainer calls these hooks; a user with a hand-written loop calls the
same methods on the controller directly. Every hook is optional: the base class does
nothing, so a controller overrides only what it needs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Hashable
from typing import Any


class Controller:
    """Base class for method controllers (GradSamp, SSProp, VCAS, ...).

    Epochs and steps are counted from 0. The trainer calls, in order::

        attach_data(draw_batch, loss_fn)     # once, after the controllers are built
        on_train_start(total_epochs, steps_per_epoch)
        for each epoch:
            on_epoch_start(epoch)
            if skip_epoch(epoch):            # any controller may take the epoch over
                info = replace_epoch(epoch)  # no data, no forward, no backward
            else:
                for each step: on_step_start(epoch, step); ...; on_step_end(epoch, step, loss);
                               flops_delta(epoch, step)
            evaluate; if any after_evaluation(epoch, record): evaluate again
            on_epoch_end(epoch, record)      # record: the epoch's metrics, may be extended
    """

    #: Short name used in logs and metrics.json.
    name: str = "controller"

    def attach_data(self, draw_batch: Callable[[Any], Any], loss_fn: Callable[[Any, Any], Any]) -> None:
        """Receive a way to draw extra training batches and to turn one into a loss.

        ``draw_batch(generator)`` returns a random training batch ``(x, y)`` on the run's
        device, drawn with the given ``torch.Generator``; ``loss_fn(model, batch)`` returns
        its scalar loss. Controllers that estimate something on their own batches (VCAS's
        variance estimation) use them; the default ignores them.
        """

    def on_train_start(self, total_epochs: int, steps_per_epoch: int) -> None:
        """Called once before the first epoch (also after a resume)."""

    def on_epoch_start(self, epoch: int) -> None:
        """Called before every epoch, real or replaced."""

    def skip_epoch(self, epoch: int) -> bool:
        """Return True to replace this epoch by :meth:`replace_epoch`."""
        return False

    def replace_epoch(self, epoch: int) -> dict[str, Any]:
        """Do the epoch's work without data (e.g. apply a sampled update).

        Returns extra fields for the epoch's record.
        """
        raise NotImplementedError(f"{type(self).__name__} skips epochs but cannot replace them")

    def on_step_start(self, epoch: int, step: int) -> None:
        """Called before the forward pass of every training step."""

    def flops_key(self, epoch: int, step: int) -> Hashable:
        """What the step's FLOPs depend on (e.g. ssProp's current keep), after on_step_start.

        The trainer counts FLOPs again (outside the timed phases) whenever the key of
        any controller changes, so schedules that change within an epoch are counted
        right. The default, None, means the controller never changes the FLOPs.
        """
        return None

    def flops_context(self) -> contextlib.AbstractContextManager[Any]:
        """Context the trainer counts a step's FLOPs in (default: none).

        A method whose backward is random (VCAS) makes it dense here and reports what
        it saved through :meth:`flops_delta` instead.
        """
        return contextlib.nullcontext()

    def on_step_end(self, epoch: int, step: int, loss: float) -> None:
        """Called after the optimizer step of every training step."""

    def flops_delta(self, epoch: int, step: int) -> dict[str, float]:
        """FLOPs to add to this step's counted ``forward`` / ``backward`` (negative: saved).

        For work the counter cannot see on its slice: a random backward's saving, or a
        controller's own extra passes. Default: nothing.
        """
        return {}

    def after_evaluation(self, epoch: int, record: dict[str, Any]) -> bool:
        """Called after the epoch's evaluation (``record`` holds ``loss``, ``acc1``, ...).

        Return True if the controller changed the model (e.g. rolled a sampled epoch
        back); the trainer then evaluates again so the record describes the model kept.
        """
        return False

    def on_epoch_end(self, epoch: int, record: dict[str, Any]) -> None:
        """Called after every epoch (and its evaluation); may add fields to ``record``."""

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly after a resume."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
