"""greenprop in PyTorch Lightning: one callback, the same method specs as the CLI.

``Trainer(callbacks=[GreenpropCallback("ssprop:keep=0.6")])``. The callback converts the
LightningModule in :meth:`~GreenpropCallback.setup` (before Lightning builds the
optimizers and wraps the model for DDP), drives the controllers from the batch and epoch
hooks, and checkpoints their state with Lightning's own checkpoints.

GradSamp replaces whole epochs. A callback cannot skip an epoch in Lightning: only the
LightningModule's ``on_train_batch_start`` returning -1 does. So, for a method that
replaces epochs, the callback wraps the module's ``on_train_batch_start`` (and restores
it at teardown). What Lightning then does on a sampled epoch:

* it loads the epoch's first batch and moves it to the device, then stops the epoch:
  no ``training_step``, no forward, no backward, no optimizer step;
* it skips the epoch's validation (Lightning issue 4481, "working as intended"), so the
  sampled update is first validated at the next real epoch;
* ``global_step`` does not advance, so ``ModelCheckpoint`` (with or without
  ``monitor=``) writes no checkpoint for the sampled epoch: it sees the step it already
  saved. The checkpoint of the real epoch before it resumes exactly (the sampled draw is
  a function of the seed and the epoch);
* LR schedulers with ``interval="epoch"`` step as usual, ``interval="step"`` ones do not.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import DataLoader

from greenprop.errors import GreenpropError

try:
    import lightning.pytorch as pl
except ModuleNotFoundError as err:  # pragma: no cover - depends on the install
    raise GreenpropError(
        "greenprop.integrations.lightning needs Lightning: pip install 'greenprop[lightning]'"
    ) from err

from greenprop.controller import BatchLoss
from greenprop.integrations.driver import MethodDriver, draw_from_dataset
from greenprop.seeding import trainer_epoch_seed

__all__ = ["GreenpropCallback"]

_FRAMEWORK = "Lightning"


class GreenpropCallback(pl.Callback):
    """Apply a greenprop method to the LightningModule and drive it through training.

    Args:
        method: a method spec, as ``greenprop train --method`` takes it.
        loss_fn: ``loss_fn(module, batch)``, the batch's scalar training loss. With it the
            callback counts FLOPs as ``greenprop train`` does (:attr:`history`,
            :meth:`total_flops`); VCAS needs it for its variance passes.
        seed: the method's seed (GradSamp's draws, ssProp's and VCAS's generators).
        reseed_epochs: seed torch's global RNG at each epoch start from ``(seed, epoch)``,
            as ``greenprop train`` does, so a resumed run draws what an uninterrupted
            one draws (dropout, random augmentation).

    A step is a training batch (with gradient accumulation, a micro-batch). Resume from
    checkpoints written at an epoch's end (``ModelCheckpoint``'s default); a checkpoint
    written inside an epoch is refused, since the controllers are mid-epoch.
    """

    def __init__(
        self,
        method: str,
        *,
        loss_fn: BatchLoss | None = None,
        seed: int = 0,
        reseed_epochs: bool = True,
        flops_samples: int = 16,
    ) -> None:
        self.driver = MethodDriver(method, loss_fn=loss_fn, flops_samples=flops_samples, framework=_FRAMEWORK)
        self.seed = int(seed)
        self.reseed_epochs = reseed_epochs
        self._skipping = False
        self._wrapped: pl.LightningModule | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(method=self.driver.spec.label)

    @property
    def controllers(self) -> list[Any]:
        return self.driver.controllers

    @property
    def history(self) -> list[dict[str, Any]]:
        """One record per finished epoch: ``replaced_by``, ``steps``, ``flops``, method fields."""
        return self.driver.history

    def total_flops(self) -> dict[str, float] | None:
        return self.driver.total_flops()

    # ------------------------------------------------------------------ setup
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        epochs = trainer.max_epochs
        if epochs is None or epochs < 1:
            raise GreenpropError(
                f"GreenpropCallback needs Trainer(max_epochs=N) with N >= 1, got max_epochs={epochs!r}"
            )
        # The true steps per epoch are known only once the data is set up (on_train_start).
        self.driver.apply(pl_module, epochs=epochs, steps_per_epoch=1, seed=self.seed)
        if self.driver.replaces_epochs() and self._wrapped is None:
            self._wrap_batch_start(pl_module)

    def _wrap_batch_start(self, pl_module: pl.LightningModule) -> None:
        """Make the module's ``on_train_batch_start`` return -1 on a replaced epoch."""
        original = pl_module.on_train_batch_start

        def on_train_batch_start(batch: Any, batch_idx: int) -> Any:
            if self._skipping:
                return -1
            return original(batch, batch_idx)

        pl_module.__dict__["on_train_batch_start"] = on_train_batch_start
        self._wrapped = pl_module

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._wrapped is not None:
            self._wrapped.__dict__.pop("on_train_batch_start", None)
            self._wrapped = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        steps = trainer.num_training_batches
        if steps == float("inf"):
            raise GreenpropError("GreenpropCallback needs a training loader with a length (steps per epoch)")
        draw = self._batch_drawer(trainer) if self.driver.needs_batches() else None
        self.driver.start(epochs=int(trainer.max_epochs or 0), steps_per_epoch=int(steps), draw_batch=draw)

    def _batch_drawer(self, trainer: pl.Trainer) -> Any:
        loader = trainer.train_dataloader
        if not isinstance(loader, DataLoader) or loader.batch_size is None:
            raise GreenpropError(
                "VCAS in Lightning draws its estimation batches from the training DataLoader: "
                f"give the Trainer one DataLoader with a batch_size, got {type(loader).__name__}"
            )

        def draw(generator: torch.Generator) -> Any:
            batch = draw_from_dataset(loader.dataset, loader.batch_size, loader.collate_fn, generator)
            return trainer.strategy.batch_to_device(batch)

        return draw

    # ------------------------------------------------------------------ the hooks
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch
        if self.reseed_epochs:
            torch.manual_seed(trainer_epoch_seed(self.seed, epoch))
        self._skipping = self.driver.epoch_start(epoch)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if not self._skipping:
            self.driver.step_start(trainer.current_epoch, batch_idx, batch)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        value = float(loss.detach()) if isinstance(loss, torch.Tensor) else float("nan")
        self.driver.step_end(trainer.current_epoch, batch_idx, value)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        metrics: dict[str, Any] = {}
        if not self._skipping:  # on a sampled epoch they are the previous epoch's
            items = trainer.callback_metrics.items()
            metrics = {k: float(v) for k, v in items if torch.is_tensor(v) and v.numel() == 1}
        self.driver.epoch_end(trainer.current_epoch, metrics)
        self._skipping = False

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Tensors and plain containers only: Lightning loads checkpoints with ``weights_only``."""
        return {**self.driver.state_dict(), "in_epoch": self.driver.in_epoch}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("in_epoch"):
            raise GreenpropError(
                "this checkpoint was written inside an epoch; greenprop resumes exactly only from "
                "checkpoints written at an epoch's end (ModelCheckpoint's default)"
            )
        self.driver.load_state_dict({k: v for k, v in state_dict.items() if k != "in_epoch"})
