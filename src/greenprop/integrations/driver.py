"""Drive a method's controllers from another framework's hooks, as the reference trainer does.

Lightning and the Hugging Face Trainer call their callbacks at different points, but a
method needs the same things from both: surgery before the optimizer exists, the
controllers' hooks in the order of :class:`greenprop.controller.Controller`, FLOPs
counted the way the reference trainer counts them, and one state to checkpoint. This
module holds that common part; the adapters only map their framework's events onto it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable
from contextlib import ExitStack
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Sampler

from greenprop.controller import BatchLoss, Controller, RunContext
from greenprop.data.dataset import trim_mapping_to_longest
from greenprop.data.grouping import grouped_batch
from greenprop.errors import GreenpropError
from greenprop.metering.accounting import flop_accounts
from greenprop.metering.flops import FlopCount, batch_head, count_flops_per_sample, sample_shapes
from greenprop.methods import MethodSpec, build_method, parse_method
from greenprop.seeding import trainer_epoch_seed

__all__ = ["EpochShuffle", "MethodDriver", "batch_head_to_longest", "batch_size_of", "draw_from_dataset"]

_STATE_FORMAT = 1


class _LossModule(nn.Module):
    """``forward(batch) = loss_fn(model, batch)``: lets the FLOP counter slice any batch."""

    def __init__(self, model: nn.Module, loss_fn: BatchLoss) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: Any) -> Tensor:
        return self.loss_fn(self.model, batch)


def batch_size_of(batch: Any) -> int:
    """Samples in a batch: dim 0 of its first tensor (tensors, tuples, lists, mappings)."""
    if isinstance(batch, Tensor):
        return int(batch.shape[0]) if batch.dim() else 1
    values = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (tuple, list)) else ()
    for value in values:
        try:
            return batch_size_of(value)
        except GreenpropError:
            continue
    raise GreenpropError(f"cannot tell the number of samples in a batch of type {type(batch).__name__}")


def batch_head_to_longest(batch: Any, n: int) -> Any:
    """The first ``n`` samples of a batch; a dict batch padded on the right is also cut to their
    own longest sequence (:func:`greenprop.data.trim_mapping_to_longest`), as dynamic padding
    would batch them: VCAS's estimation part then computes no padding columns."""
    return trim_mapping_to_longest(batch_head(batch, n))


def draw_from_dataset(
    dataset: Any,
    batch_size: int,
    collate: Callable[[list[Any]], Any],
    generator: torch.Generator,
    grouping: tuple[Tensor, int] | None = None,
) -> Any:
    """A random batch of ``batch_size`` items, the indices drawn as the reference trainer draws them.

    With ``grouping``, ``(lengths, group_size)`` of a loop that trains on length-grouped batches,
    it is one batch of such an order instead (:func:`greenprop.data.grouping.grouped_batch`).
    """
    if grouping is None:
        index = torch.randperm(len(dataset), generator=generator)[:batch_size]
    else:
        lengths, group_size = grouping
        index = grouped_batch(lengths, batch_size, generator, group_size)
    return collate([dataset[int(i)] for i in index])


class EpochShuffle(Sampler[int]):
    """Shuffles like greenprop's trainer: epoch ``e``'s order depends only on ``(seed, e)``.

    A plain ``shuffle=True`` loader draws its order from the global RNG, which a resumed
    run does not reproduce; with this sampler a run resumed at an epoch boundary sees the
    same batches as an uninterrupted one, and the batches equal those of
    ``greenprop train`` with the same seed. The framework calls :meth:`set_epoch`
    (Lightning and the Hugging Face Trainer both do).
    """

    def __init__(self, size: int, seed: int) -> None:
        self.size, self.seed, self.epoch = int(size), int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.size

    def __iter__(self):  # type: ignore[no-untyped-def]
        generator = torch.Generator().manual_seed(trainer_epoch_seed(self.seed, self.epoch))
        return iter(torch.randperm(self.size, generator=generator).tolist())


class MethodDriver:
    """One method's controllers, FLOP count and per-epoch records for a framework adapter.

    Args:
        spec: a method spec as the CLI takes it (``"ssprop:keep=0.6"``,
            ``"gradsamp:strategy=pe:5;ssprop:keep=0.6"``, ``"vcas"``).
        loss_fn: ``loss_fn(model, batch)``, the scalar training loss; FLOPs are counted
            only with it, and VCAS needs it for its variance passes.
        flops_samples: the FLOP count of a step runs on this many samples of its batch.
        framework: named in errors (``"Lightning"``, ``"the Hugging Face Trainer"``).
    """

    def __init__(
        self,
        spec: str | MethodSpec,
        *,
        loss_fn: BatchLoss | None = None,
        flops_samples: int = 16,
        framework: str = "this framework",
    ) -> None:
        self.spec = parse_method(spec) if isinstance(spec, str) else spec
        self.loss_fn = loss_fn
        self.flops_samples = flops_samples
        self.framework = framework
        self.model: nn.Module | None = None
        self.controllers: list[Controller] = []
        self.run: RunContext | None = None
        #: Per-epoch records: ``epoch``, ``replaced_by``, ``steps``, ``flops`` and each
        #: controller's fields under its name, as in the reference trainer's metrics.
        self.history: list[dict[str, Any]] = []
        self.replaced_epoch: int | None = None
        self._record: dict[str, Any] | None = None
        self._flops_cache: dict[tuple[Hashable, ...], FlopCount] = {}

    # ------------------------------------------------------------------ setup
    @property
    def applied(self) -> bool:
        return self.model is not None

    def apply(self, model: nn.Module, *, epochs: int, steps_per_epoch: int, seed: int) -> None:
        """Surgery on ``model`` (in place) and the controllers; call before the optimizer exists."""
        if self.model is not None:
            if model is not self.model:
                raise GreenpropError(f"{self.spec.label!r} was applied to another model already")
            return
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
            raise GreenpropError(f"{self.framework} run needs a whole number of epochs >= 1, got {epochs!r}")
        controllers = build_method(
            self.spec, model, epochs=epochs, steps_per_epoch=max(1, steps_per_epoch), seed=seed
        )
        for controller in controllers:
            if type(controller).replace_step is not Controller.replace_step:
                raise GreenpropError(
                    f"method {controller.name!r} replaces the training step (forward passes only), "
                    f"which the {self.framework} adapter cannot hand over; use greenprop train"
                )
            if getattr(controller, "guard_threshold", None) is not None:
                raise GreenpropError(
                    f"gradsamp option guard_threshold={controller.guard_threshold!r}: the guard needs "  # type: ignore[attr-defined]
                    f"the validation loss of the sampled epoch, which the {self.framework} adapter "
                    "does not evaluate before the next epoch; use greenprop train for the guard"
                )
        self.model, self.controllers = model, controllers

    @property
    def in_epoch(self) -> bool:
        """True between an epoch's start and its end (a checkpoint here is mid-epoch)."""
        return self._record is not None

    def replaces_epochs(self) -> bool:
        """Whether some controller may replace whole epochs (GradSamp)."""
        return any(type(c).replace_epoch is not Controller.replace_epoch for c in self.controllers)

    def needs_batches(self) -> bool:
        """Whether some controller estimates on batches of its own (VCAS)."""
        return any(c.name == "vcas" for c in self.controllers)

    def start(
        self, *, epochs: int, steps_per_epoch: int, draw_batch: Callable[[torch.Generator], Any] | None = None
    ) -> None:
        """``on_train_start`` of every controller (also after a resume)."""
        if self.model is None:
            raise GreenpropError("the method was not applied: the adapter's setup hook did not run")
        if self.needs_batches() and (draw_batch is None or self.loss_fn is None):
            raise GreenpropError(
                f"{self.spec.label!r} estimates on batches of its own: give the {self.framework} "
                "adapter loss_fn=... (loss_fn(model, batch) -> scalar loss)"
            )
        self.run = RunContext(
            model=self.model,
            epochs=epochs,
            steps_per_epoch=steps_per_epoch,
            draw_batch=draw_batch,
            loss_fn=self.loss_fn,
            batch_head=batch_head_to_longest,
        )
        for controller in self.controllers:
            controller.on_train_start(self.run)

    # ------------------------------------------------------------------ the hooks
    def epoch_start(self, epoch: int) -> bool:
        """``on_epoch_start`` then ``replace_epoch``; True when a controller replaced the epoch."""
        record: dict[str, Any] = {"epoch": epoch, "replaced_by": None, "steps": 0, "samples": 0}
        self._record = record
        self._epoch_flops = {"forward": 0.0, "backward": 0.0}
        for controller in self.controllers:
            controller.on_epoch_start(epoch)
        self.replaced_epoch = None
        for controller in self.controllers:
            fields = controller.replace_epoch(epoch)
            if fields is not None:
                record["replaced_by"] = controller.name
                record[controller.name] = dict(fields)
                self.replaced_epoch = epoch
                break
        return self.replaced_epoch == epoch

    def step_start(self, epoch: int, step: int, batch: Any = None) -> None:
        """``on_step_start``, then the step's counted FLOPs (before its forward).

        ``batch`` None: the framework does not show the batch to the adapter; the step is
        counted, its samples and FLOPs are not.
        """
        for controller in self.controllers:
            controller.on_step_start(epoch, step)
        self._current()["steps"] += 1
        if batch is not None:
            self.count_batch(epoch, step, batch)

    def count_batch(self, epoch: int, step: int, batch: Any) -> None:
        """Samples and counted FLOPs of one (micro-)batch of the current step."""
        record = self._current()
        samples = batch_size_of(batch)
        record["samples"] += samples
        if self.loss_fn is not None:
            booked = self._flops_per_sample(epoch, step, batch).scale(samples)
            self._epoch_flops["forward"] += booked.forward
            self._epoch_flops["backward"] += booked.backward
            for _, account in flop_accounts(self.controllers):
                account.booked(booked, samples)

    def step_end(self, epoch: int, step: int, loss: float) -> None:
        """``on_step_end`` (after the optimizer step) and the methods' FLOP adjustments."""
        for controller in self.controllers:
            controller.on_step_end(epoch, step, loss)
        for _, account in flop_accounts(self.controllers):
            for phase, delta in account.adjustment(epoch, step).items():
                self._epoch_flops[phase] += delta

    def epoch_end(self, epoch: int, metrics: dict[str, Any] | None = None) -> dict[str, Any]:
        """``on_epoch_end`` of every controller; returns (and keeps) the epoch's record."""
        record = self._current()
        record.update(metrics or {})
        for controller in self.controllers:
            fields = controller.on_epoch_end(epoch, record)
            if fields:
                record[controller.name] = {**record.get(controller.name, {}), **fields}
        if self.run is not None:
            self.run.control.should_evaluate = False  # only the guard sets it, and it is refused
        if self.loss_fn is not None:
            record["flops"] = dict(self._epoch_flops)
        self.history.append(record)
        self._record = None
        return record

    def _current(self) -> dict[str, Any]:
        if self._record is None:
            raise GreenpropError("a step or epoch end came before its epoch start")
        return self._record

    def _flops_per_sample(self, epoch: int, step: int, batch: Any) -> FlopCount:
        """Counted like the reference trainer: once per distinct cost key and sample shape (a
        dynamically padded batch's length), on a slice, untimed."""
        accounts = flop_accounts(self.controllers)
        key = (*(account.cost_key(epoch, step) for _, account in accounts), sample_shapes(batch))
        if key not in self._flops_cache:
            assert self.model is not None and self.loss_fn is not None
            with ExitStack() as stack:
                for _, account in accounts:
                    stack.enter_context(account.counting())
                self._flops_cache[key] = count_flops_per_sample(
                    _LossModule(self.model, self.loss_fn),
                    (batch,),
                    None,
                    lambda loss, _: loss,
                    max_samples=self.flops_samples,
                )
        return self._flops_cache[key]

    # ------------------------------------------------------------------ results
    @property
    def sampled_epochs(self) -> list[int]:
        """Epochs a controller replaced (no forward, no backward ran in them)."""
        return [r["epoch"] for r in self.history if r["replaced_by"] is not None]

    def total_flops(self) -> dict[str, float] | None:
        """Counted forward/backward FLOPs of all finished epochs (None without a loss_fn)."""
        if self.loss_fn is None:
            return None
        total = {"forward": 0.0, "backward": 0.0}
        for record in self.history:
            for phase in total:
                total[phase] += record["flops"][phase]
        return total

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Controllers' state by name plus the records: tensors and plain containers only."""
        return {
            "format": _STATE_FORMAT,
            "method": self.spec.label,
            "controllers": {c.name: c.state_dict() for c in self.controllers},
            "history": [_plain(r) for r in self.history],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or state.get("format") != _STATE_FORMAT:
            raise GreenpropError(f"greenprop adapter state has an unknown format: {_describe(state)}")
        if state["method"] != self.spec.label:
            raise GreenpropError(
                f"the checkpoint was trained with method {state['method']!r}, "
                f"this run uses {self.spec.label!r}"
            )
        saved = state["controllers"]
        names = [c.name for c in self.controllers]
        if sorted(saved) != sorted(names):
            raise GreenpropError(f"the checkpoint holds controllers {sorted(saved)}, this run has {names}")
        for controller in self.controllers:
            controller.load_state_dict(saved[controller.name])
        self.history = list(state["history"])
        self._flops_cache.clear()


def _describe(state: Any) -> str:
    return f"format {state.get('format')!r}" if isinstance(state, dict) else type(state).__name__


def _plain(value: Any) -> Any:
    """Records as JSON-like containers (tuples become lists, floats stay finite or None)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
