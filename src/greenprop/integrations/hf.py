"""greenprop in the Hugging Face Trainer: the same method specs as the CLI.

Two pieces, because a ``TrainerCallback`` sees neither the batches nor the loop:

* :class:`GreenpropCallback` converts the model in ``on_init_end`` (inside
  ``Trainer.__init__``, before the Trainer builds its optimizer) and drives the
  controllers from the step and epoch events. With a plain ``Trainer`` it runs methods
  that only change the backward pass (ssProp); FLOPs are then not counted, since a
  callback never sees a batch.
* :class:`GreenpropTrainer` (a ``Trainer`` subclass) adds what a callback cannot do:
  GradSamp's sampled epochs, VCAS's variance passes on batches of its own, and FLOPs
  counted as ``greenprop train`` counts them. It shuffles with
  :class:`~greenprop.integrations.driver.EpochShuffle`, so its batches are those of
  ``greenprop train`` with the same seed.

A step is an optimizer update (HF's ``global_step``); with gradient accumulation the
FLOPs of every micro-batch are counted. What a GradSamp sampled epoch does here:

* no batch is loaded, no forward, backward or optimizer step runs;
* the LR scheduler steps once per skipped update and ``global_step`` advances by the
  epoch's updates, so ``global_step // steps_per_epoch`` (how the Trainer finds the
  epoch to resume at) stays right and the schedule ends where a dense run's ends;
* ``on_epoch_end`` runs, so with ``eval_strategy="epoch"`` the sampled model **is**
  evaluated (unlike Lightning) and with ``save_strategy="epoch"`` it is checkpointed;
* no training loss is logged for it, and its updates count neither in ``train_loss``
  nor in the speed metrics (no sample was processed).

greenprop's state (controllers, records) goes to ``greenprop_state.pt`` in each
checkpoint folder, written atomically in ``on_save``, after the Trainer's own files.
It is restored on resume whatever ``restore_callback_states_from_checkpoint`` says
(the callback is not an ``ExportableState``). Resume from checkpoints written at an
epoch's end (``save_strategy="epoch"``); one written inside an epoch is refused.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from greenprop.errors import GreenpropError

try:
    import transformers
    from transformers import Trainer, TrainerCallback
    from transformers.trainer_pt_utils import LengthGroupedSampler
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, has_length
except ModuleNotFoundError as err:  # pragma: no cover - depends on the install
    raise GreenpropError(
        "greenprop.integrations.hf needs transformers and accelerate: pip install 'greenprop[text]'"
    ) from err
try:
    from transformers.optimization import GreedyLR
except ImportError:  # pragma: no cover - older transformers
    GreedyLR = torch.optim.lr_scheduler.ReduceLROnPlateau

from greenprop.controller import BatchLoss
from greenprop.integrations.driver import EpochShuffle, MethodDriver, draw_from_dataset
from greenprop.seeding import trainer_epoch_seed
from greenprop.train.checkpoint import load_checkpoint, save_checkpoint

__all__ = [
    "STATE_FILE",
    "Classifier",
    "GreenpropCallback",
    "GreenpropTrainer",
    "LabelledDataset",
    "last_checkpoint",
]

_FRAMEWORK = "the Hugging Face Trainer"
#: greenprop's side file in each checkpoint folder.
STATE_FILE = "greenprop_state.pt"
_STATE_FORMAT = 1
_NOT_STEPPED = (torch.optim.lr_scheduler.ReduceLROnPlateau, GreedyLR)  # as the Trainer's loop


def _whole_epochs(args: Any) -> int:
    epochs = args.num_train_epochs
    if args.max_steps > 0 or float(epochs) != int(epochs) or int(epochs) < 1:
        raise GreenpropError(
            "greenprop in the Hugging Face Trainer needs a whole number of epochs and no max_steps, "
            f"got num_train_epochs={epochs!r}, max_steps={args.max_steps!r}"
        )
    return int(epochs)


class GreenpropCallback(TrainerCallback):
    """Apply a greenprop method to the Trainer's model and drive it through training.

    Args:
        method: a method spec, as ``greenprop train --method`` takes it.
        loss_fn: ``loss_fn(model, batch)``, the batch's scalar loss, used by
            :class:`GreenpropTrainer` to count FLOPs and for VCAS (default there: the
            Trainer's ``compute_loss``).
        seed: the method's seed (GradSamp's draws, ssProp's and VCAS's generators);
            default the Trainer's ``args.seed``.
    """

    def __init__(
        self,
        method: str,
        *,
        loss_fn: BatchLoss | None = None,
        seed: int | None = None,
        flops_samples: int = 16,
    ) -> None:
        self.driver = MethodDriver(method, loss_fn=loss_fn, flops_samples=flops_samples, framework=_FRAMEWORK)
        self.seed = seed
        #: The GreenpropTrainer that drives epochs and steps itself (None: a plain Trainer).
        self.trainer: GreenpropTrainer | None = None
        #: The checkpoint folder a resumed run starts from (else found from output_dir).
        self.resume_from: str | None = None
        self.steps_per_epoch = 0
        self.epoch = 0
        self._new_update = False
        self._update_loss = 0.0

    @property
    def controllers(self) -> list[Any]:
        return self.driver.controllers

    @property
    def history(self) -> list[dict[str, Any]]:
        """One record per finished epoch: ``replaced_by``, ``steps``, ``flops``, ``eval``, method fields."""
        return self.driver.history

    def total_flops(self) -> dict[str, float] | None:
        return self.driver.total_flops()

    # ------------------------------------------------------------------ setup
    def on_init_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if model is None:
            raise GreenpropError("GreenpropCallback needs the Trainer's model (Trainer(model=...))")
        epochs = _whole_epochs(args)
        if self.seed is None:
            self.seed = int(args.seed)
        # The steps per epoch are known only once the Trainer builds its loader (on_train_begin).
        self.driver.apply(model, epochs=epochs, steps_per_epoch=1, seed=self.seed)

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.trainer is None:
            if self.driver.replaces_epochs() or self.driver.needs_batches():
                raise GreenpropError(
                    f"{self.driver.spec.label!r} replaces epochs or estimates on batches of its own, which "
                    "a Trainer callback cannot do: train with greenprop.integrations.hf.GreenpropTrainer"
                )
            if self.driver.loss_fn is not None:
                raise GreenpropError(
                    "loss_fn is for GreenpropTrainer: a plain Trainer shows its callbacks no batch, "
                    "so FLOPs cannot be counted"
                )
        epochs = _whole_epochs(args)
        self.steps_per_epoch = state.max_steps // epochs
        if state.global_step > 0:
            self._restore(args, state)
        draw = self.trainer.draw_batch if self.trainer is not None and self.driver.needs_batches() else None
        self.driver.start(epochs=epochs, steps_per_epoch=self.steps_per_epoch, draw_batch=draw)

    # ------------------------------------------------------------------ the events
    def begin_epoch(self, epoch: int) -> bool:
        """The epoch's start; True when a controller replaced the epoch (it has no steps)."""
        self.epoch = epoch
        return self.driver.epoch_start(epoch)

    def on_epoch_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.trainer is None:  # a GreenpropTrainer calls begin_epoch with the loop's epoch
            self.begin_epoch(state.global_step // self.steps_per_epoch)

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.trainer is None:
            self.driver.step_start(self.epoch, self._step(state))
        else:  # the trainer's next training_step starts the update, with its batch
            self._new_update = True

    def micro_batch(self, state: Any, batch: Any) -> None:
        """Called by GreenpropTrainer before each micro-batch's forward."""
        if self._new_update:
            self._new_update, self._update_loss = False, 0.0
            self.driver.step_start(self.epoch, self._step(state), batch)
        else:
            self.driver.count_batch(self.epoch, self._step(state), batch)

    def add_loss(self, loss: float) -> None:
        """A micro-batch's (already scaled) loss; their sum is the update's loss."""
        self._update_loss += loss

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        loss = self._update_loss if self.trainer is not None else math.nan
        self.driver.step_end(self.epoch, self._step(state) - 1, loss)  # global_step has advanced

    def _step(self, state: Any) -> int:
        return state.global_step - self.epoch * self.steps_per_epoch

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.driver.epoch_end(self.epoch)

    def on_evaluate(self, args: Any, state: Any, control: Any, metrics: Any = None, **kwargs: Any) -> None:
        """Evaluations at an epoch's end go into that epoch's record (``record["eval"]``)."""
        history = self.driver.history
        at_epoch_end = bool(history) and not self.driver.in_epoch
        if (
            metrics
            and at_epoch_end
            and state.global_step == (history[-1]["epoch"] + 1) * self.steps_per_epoch
        ):
            values = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
            history[-1].setdefault("eval", {}).update(values)

    # ------------------------------------------------------------------ state
    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Write the side file last: its presence means the Trainer's files are complete."""
        if not args.should_save:
            return
        folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        if not folder.is_dir():
            raise GreenpropError(
                f"the Trainer saved no checkpoint folder {folder}: cannot add greenprop's state"
            )
        saved = {
            "format": _STATE_FORMAT,
            "global_step": int(state.global_step),
            "in_epoch": self.driver.in_epoch,
            "driver": self.driver.state_dict(),
        }
        save_checkpoint(saved, folder / STATE_FILE)

    def _restore(self, args: Any, state: Any) -> None:
        folder = Path(
            self.resume_from or Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        )
        path = folder / STATE_FILE
        if not path.is_file():
            raise GreenpropError(
                f"resuming at global step {state.global_step}, but {path} (greenprop's state) is missing: "
                "resume from a checkpoint folder that a greenprop run finished writing"
            )
        saved = load_checkpoint(path, required=("format", "global_step", "in_epoch", "driver"))
        if saved["format"] != _STATE_FORMAT or saved["global_step"] != state.global_step:
            raise GreenpropError(
                f"{path} is not greenprop's state of this checkpoint (format {saved['format']!r}, "
                f"global step {saved['global_step']!r}; the Trainer's is {state.global_step})"
            )
        if saved["in_epoch"]:
            raise GreenpropError(
                f"{folder} was written inside an epoch (global step {state.global_step}); greenprop resumes "
                "exactly only from checkpoints written at an epoch's end (save_strategy='epoch')"
            )
        self.driver.load_state_dict(saved["driver"])


class GreenpropTrainer(Trainer):
    """A ``Trainer`` that runs a greenprop method: ``GreenpropTrainer(method="...", model=..., args=...)``.

    Args:
        method: a method spec, or a :class:`GreenpropCallback` to use.
        loss_fn: ``loss_fn(model, batch)`` (default: the Trainer's ``compute_loss``).
        reseed_epochs: seed torch's global RNG at each epoch's start from ``(seed,
            epoch)``, as ``greenprop train`` does (also after the Trainer restored its
            saved RNG state on resume), so a resumed run draws what an uninterrupted
            one draws.
        The other arguments are the ``Trainer``'s.
    """

    def __init__(
        self,
        *args: Any,
        method: str | GreenpropCallback,
        loss_fn: BatchLoss | None = None,
        reseed_epochs: bool = True,
        flops_samples: int = 16,
        **kwargs: Any,
    ) -> None:
        if not hasattr(Trainer, "_run_epoch"):  # the hook a sampled epoch replaces
            raise GreenpropError(
                f"GreenpropTrainer needs a transformers whose Trainer has _run_epoch (5.x; tested "
                f"with 5.25), this is {transformers.__version__}"
            )
        if isinstance(method, GreenpropCallback):
            callback = method
        else:
            callback = GreenpropCallback(method, loss_fn=loss_fn, flops_samples=flops_samples)
        if callback.driver.loss_fn is None:
            callback.driver.loss_fn = self._compute_batch_loss
        callback.trainer = self
        self.greenprop = callback
        self.reseed_epochs = reseed_epochs
        self._greenprop_epoch: int | None = None
        #: The dataset VCAS last drew from and its length grouping (_length_grouping).
        self._greenprop_grouping: tuple[Any, tuple[torch.Tensor, int] | None] | None = None
        kwargs["callbacks"] = [*(kwargs.get("callbacks") or []), callback]
        super().__init__(*args, **kwargs)

    def _compute_batch_loss(self, model: torch.nn.Module, batch: Any) -> torch.Tensor:
        return self.compute_loss(model, batch)

    def draw_batch(self, generator: torch.Generator) -> Any:
        """A training batch for VCAS's estimation, drawn as the training loop draws its batches:
        random as ``greenprop train`` draws it, or, where the train sampler groups by length
        (``train_sampling_strategy="group_by_length"``), one batch of a length-grouped order.
        VCAS's token sampler keeps a share of all positions, padding included, so an estimate
        on random (padded) batches measures a gentler sampler than grouped training runs."""
        loader = self.callback_handler.train_dataloader
        dataset = loader.dataset
        grouping = self._length_grouping(dataset)
        batch = draw_from_dataset(dataset, self._train_batch_size, loader.collate_fn, generator, grouping)
        return self._prepare_inputs(batch)

    def _length_grouping(self, dataset: Any) -> tuple[torch.Tensor, int] | None:
        """``(lengths, group size)`` of the ``LengthGroupedSampler`` the Trainer trains ``dataset``
        with (its lengths: the ``length_column_name`` column, else each item's model input's
        length), or None where the sampler does not group; found once per dataset."""
        if self._greenprop_grouping is None or self._greenprop_grouping[0] is not dataset:
            sampler = self._get_train_sampler(dataset)
            grouping = None
            if isinstance(sampler, LengthGroupedSampler):
                grouping = (torch.as_tensor(sampler.lengths, dtype=torch.int64), int(sampler.batch_size))
            self._greenprop_grouping = (dataset, grouping)
        return self._greenprop_grouping[1]

    def _get_train_sampler(self, train_dataset: Any = None) -> Any:
        dataset = self.train_dataset if train_dataset is None else train_dataset
        if self.args.train_sampling_strategy == "random" and dataset is not None and has_length(dataset):
            return EpochShuffle(len(dataset), int(self.greenprop.seed))
        return super()._get_train_sampler(train_dataset)

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs: Any) -> Any:
        """As ``Trainer.train``; ``resume_from_checkpoint=True`` takes the newest checkpoint
        whose greenprop state was written (a run killed while saving leaves one without)."""
        if resume_from_checkpoint is True:
            resume_from_checkpoint = str(last_checkpoint(self.args.output_dir))
        self.greenprop.resume_from = resume_from_checkpoint or None
        return super().train(resume_from_checkpoint=resume_from_checkpoint or None, **kwargs)

    def training_step(
        self, model: torch.nn.Module, inputs: Any, num_items_in_batch: Any = None
    ) -> torch.Tensor:
        model.train()  # VCAS estimates before the Trainer's own model.train()
        self.greenprop.micro_batch(self.state, inputs)
        loss = super().training_step(model, inputs, num_items_in_batch)
        self.greenprop.add_loss(float(loss))
        return loss

    def _run_epoch(self, **kwargs: Any) -> None:
        epoch = kwargs["epoch"]
        self._greenprop_epoch = epoch
        if self.reseed_epochs:
            torch.manual_seed(trainer_epoch_seed(int(self.greenprop.seed), epoch))
        if not self.greenprop.begin_epoch(epoch):
            super()._run_epoch(**kwargs)
            return
        resume = kwargs["resume_from_checkpoint"]
        if epoch == kwargs["epochs_trained"] and resume is not None:
            self._load_rng_state(resume)  # what the Trainer does at a resumed epoch's start
        updates = kwargs["num_update_steps_per_epoch"]
        if not isinstance(self.lr_scheduler, _NOT_STEPPED):
            for _ in range(updates):
                self.lr_scheduler.step()
        self.state.global_step += updates
        self.state.epoch = float(epoch + 1)
        self._globalstep_last_logged += updates  # no loss was computed in them
        self._initial_global_step += updates  # nor were they trained (train_loss, speed metrics)
        self.control = self.callback_handler.on_epoch_end(self.args, self.state, self.control)
        self._maybe_log_save_evaluate(
            self._tr_loss,
            None,
            kwargs["model"],
            kwargs["trial"],
            epoch,
            kwargs["ignore_keys_for_eval"],
            kwargs["start_time"],
            learning_rate=self._get_learning_rate(),
        )

    def _load_rng_state(self, checkpoint: str | None) -> None:
        super()._load_rng_state(checkpoint)
        if self.reseed_epochs and checkpoint is not None and self._greenprop_epoch is not None:
            torch.manual_seed(trainer_epoch_seed(int(self.greenprop.seed), self._greenprop_epoch))


def last_checkpoint(output_dir: str | os.PathLike[str]) -> Path:
    """The newest ``checkpoint-N`` folder under ``output_dir`` that holds greenprop's state."""
    pattern = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
    found = [
        (int(match.group(1)), path)
        for path in Path(output_dir).glob(f"{PREFIX_CHECKPOINT_DIR}-*")
        if (match := pattern.match(path.name)) and (path / STATE_FILE).is_file()
    ]
    if not found:
        raise GreenpropError(f"no checkpoint with greenprop's state ({STATE_FILE}) in {output_dir}")
    return max(found)[1]


class LabelledDataset(torch.utils.data.Dataset):
    """``(x, y)`` items (greenprop's datasets) as the dicts the Trainer's collator stacks."""

    def __init__(self, pairs: Any) -> None:
        self.pairs = pairs

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        x, y = self.pairs[index]
        return {"inputs": x, "labels": y}


class Classifier(nn.Module):
    """A plain classifier (e.g. a zoo model) in the Trainer's shape: ``forward(inputs, labels)``
    returns ``{"loss": cross-entropy, "logits": ...}``. The model is ``self.model``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, inputs: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        logits = self.model(inputs)
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = F.cross_entropy(logits, labels)
        return out
