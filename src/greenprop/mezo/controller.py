"""The MeZO controller: each training step is two forward passes and a seeded update.

It takes the place of the loop's forward, backward and optimizer step through
:meth:`Controller.replace_step`; the run's optimizer is never stepped and no ``.grad``
is ever written. The direction of step ``s`` of epoch ``e`` is seeded by
``stream_seed(seed, "mezo", e, s)``, so a resumed run draws the same directions
without storing generator state.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from greenprop.controller import BatchLoss, Controller, RunContext
from greenprop.errors import GreenpropError, TrainingDiverged
from greenprop.mezo.config import MeZOConfig
from greenprop.mezo.zo import projected_gradient, zo_update
from greenprop.seeding import stream_seed

__all__ = ["MeZO", "step_seed"]


def step_seed(seed: int, epoch: int, step: int) -> int:
    """The seed of the direction ``z`` of one step."""
    return stream_seed(seed, "mezo", epoch, step)


class MeZO(Controller):
    """Zeroth-order SGD with the memory of inference, for the reference trainer or any loop.

    ::

        mezo = MeZO(model, MeZOConfig(eps=1e-3, lr=1e-5))
        mezo.on_train_start(RunContext(model, epochs, steps, loss_fn=loss_fn))
        for step, batch in enumerate(loader):
            loss = mezo.replace_step(epoch, step, batch)   # no backward, no optimizer

    Both losses are taken with the model in eval mode (as in the paper's code): the two
    passes must compute the same function, which dropout would break. The loss the step
    reports is the mean of the two, an O(eps^2) estimate of the loss at theta.
    """

    name = "mezo"

    def __init__(self, model: nn.Module, config: MeZOConfig | None = None) -> None:
        self.model = model
        self.config = config or MeZOConfig()
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise GreenpropError("mezo: the model has no trainable parameters")
        self.loss_fn: BatchLoss | None = None
        #: Steps taken over the whole run (checkpointed: a resume continues the count).
        self.steps_taken = 0
        self._epoch_grads: list[float] = []
        #: The projected gradient g of the latest step.
        self.last_grad = math.nan

    def on_train_start(self, run: RunContext) -> None:
        if run.loss_fn is None:
            raise GreenpropError("mezo needs the loop's loss_fn(model, batch) to take its forward passes")
        self.loss_fn = run.loss_fn

    def on_epoch_start(self, epoch: int) -> None:
        self._epoch_grads = []

    def replace_step(self, epoch: int, step: int, batch: Any) -> torch.Tensor:
        """Two forward passes at theta +- eps z, then theta <- theta - lr * g * z."""
        if self.loss_fn is None:
            raise GreenpropError("mezo: on_train_start was not called (it needs the run's loss_fn)")
        c, model, loss_fn = self.config, self.model, self.loss_fn
        seed = step_seed(c.seed, epoch, step)
        modes = [(module, module.training) for module in model.modules()]
        model.eval()
        try:
            grad, loss_plus, loss_minus = projected_gradient(
                lambda: loss_fn(model, batch), self.params, seed, c.eps
            )
        finally:
            for module, mode in modes:
                module.training = mode
        if not math.isfinite(grad):
            raise TrainingDiverged(
                f"mezo: the projected gradient is {grad} at epoch {epoch + 1} step {step + 1} "
                f"(losses {loss_plus} and {loss_minus}); try a smaller eps or lr"
            )
        zo_update(self.params, seed, grad, c.lr, c.weight_decay)
        self.last_grad = grad
        return torch.tensor((loss_plus + loss_minus) / 2.0)

    def on_step_end(self, epoch: int, step: int, loss: float) -> None:
        # tallied here, not in replace_step, which the trainer may call again to count FLOPs
        self.steps_taken += 1
        self._epoch_grads.append(self.last_grad)

    def on_epoch_end(self, epoch: int, record: dict[str, Any]) -> dict[str, Any] | None:
        grads = self._epoch_grads
        if not grads:
            return None
        return {
            "steps": len(grads),
            "mean_abs_projected_grad": sum(abs(g) for g in grads) / len(grads),
            "steps_taken": self.steps_taken,
        }

    def state_dict(self) -> dict[str, Any]:
        return {"steps_taken": self.steps_taken, "config": self.config.to_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("config") != self.config.to_dict():
            raise ValueError(f"the checkpoint's mezo settings {state.get('config')} differ from this run's")
        self.steps_taken = int(state["steps_taken"])
