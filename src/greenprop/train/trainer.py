"""The reference trainer: a plain PyTorch loop with metering, checkpoints and resume.

It is the engine of ``greenprop train`` and ``greenprop compare``. Methods act only
through their controllers' hooks (:class:`greenprop.controller.Controller`) and, for
FLOP counting, their :class:`greenprop.metering.FlopAccount`, so the same controllers
work in a user's own loop.
"""

from __future__ import annotations

import math
import sys
import time
from collections import defaultdict
from collections.abc import Generator, Hashable
from contextlib import ExitStack
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn
from tqdm.auto import tqdm

from greenprop import data as gp_data
from greenprop import kernels
from greenprop.controller import Controller, RunContext
from greenprop.data.grouping import grouped_batch, sequence_lengths
from greenprop.errors import GreenpropError, TrainingDiverged
from greenprop.metering import (
    EnergyMeter,
    FlopCount,
    PeakMemory,
    PhaseTimer,
    Quantity,
    count_flops_per_sample,
)
from greenprop.metering.accounting import flop_accounts
from greenprop.metering.flops import SOURCE as FLOP_SOURCE
from greenprop.metering.flops import batch_head, count_step_flops, sample_shapes
from greenprop.metering.load import LoadMeter
from greenprop.methods import build_method, parse_method
from greenprop.seeding import trainer_epoch_seed
from greenprop.train.checkpoint import (
    CHECKPOINT_KEYS,
    describe_model_mismatch,
    ensure_writable_dir,
    load_checkpoint,
    remove_stale_temp_files,
    save_checkpoint,
    write_json,
)
from greenprop.train.config import TrainConfig
from greenprop.train.distributed import Shard, parallelism, with_rank_state
from greenprop.train.evaluate import prepare_inputs
from greenprop.train.lock import OutputLock
from greenprop.train.optimizers import make_optimizer
from greenprop.train.setup import check_preloaded, create_model, resolve_device
from greenprop.train.signals import RunInterrupted, signal_number
from greenprop.train.summary import environment, summarize
from greenprop.train.tasks import call_model, make_task
from greenprop.train.tuning import apply_threads

CHECKPOINT = "checkpoint.pt"
#: Methods whose backward uses greenprop's C++ ops (greenprop.kernels), built before training.
_KERNEL_USERS = frozenset({"ssprop", "vcas"})
METRICS = "metrics.json"
#: 2: controller state keyed by controller name (1: a list by position).
CHECKPOINT_FORMAT = 2
#: The trainer's own fields in every epoch record; a controller's fields go under its name.
RECORD_FIELDS = frozenset(
    {
        *("epoch", "lr", "energy", "memory", "loss", "acc1", "acc5", "flops", "time", "steps", "samples"),
        *("train_loss", "train_acc", "step_losses", "replaced_by", "reevaluated_by", "load"),
        *("fd", "fd_samples", "fd_floor", "sample_grid"),  # the diffusion task's (diffusion/task.py)
        "ppl",  # the causal-LM task's (greenprop.lm.task)
    }
)

_Result = TypeVar("_Result")


def _run_to_end(steps: Generator[Any, None, _Result]) -> _Result:
    """Run a generator to its end; what it returns."""
    while True:
        try:
            next(steps)
        except StopIteration as end:
            return end.value


class Trainer:
    """Train one configuration, writing ``metrics.json`` and a checkpoint every epoch.

    Args:
        config: the run.
        out_dir: where metrics and checkpoints go (None: keep nothing on disk).
        resume: continue from ``out_dir/checkpoint.pt``; the result is the same as an
            uninterrupted run.
        overwrite: allow replacing results already in ``out_dir``.
        controllers: extra controllers, after those of ``config.method``.
        data: preloaded datasets (otherwise loaded from ``config.dataset``).

    Inside a running process group (``torchrun``, ``greenprop train --nproc``) each rank
    trains its shard under DDP and only rank 0 writes (:mod:`greenprop.train.distributed`).
    """

    def __init__(
        self,
        config: TrainConfig,
        out_dir: str | Path | None = None,
        *,
        resume: bool = False,
        overwrite: bool = False,
        controllers: list[Controller] | None = None,
        data: gp_data.DatasetPair | None = None,
    ) -> None:
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.parallel = parallelism()
        if not self.parallel.is_main:
            config = config.replace(progress=False)
        #: Whether this process writes metrics and checkpoints (rank 0 of a DDP run).
        self.writes = self.out_dir is not None and self.parallel.is_main
        self._lock = OutputLock(self.out_dir) if self.writes else None
        #: (epoch, step) being run, for the line an interrupted run prints.
        self.position: tuple[int, int | None] | None = None
        #: How to go on after an interrupt, in that line.
        self.resume_hint = "continue with --resume"
        checkpoint = self._check_out_dir(resume, overwrite)
        if checkpoint is not None:
            try:
                saved = TrainConfig.from_dict(checkpoint["config"])
            except (TypeError, GreenpropError) as err:
                raise GreenpropError(
                    f"checkpoint {self.out_dir / CHECKPOINT} is not a greenprop checkpoint of this run "
                    f"(its config: {err})"
                ) from err
            diff = saved.differences(config)
            if diff:
                shown = ", ".join(f"{k}: saved {a!r} vs now {b!r}" for k, (a, b) in diff.items())
                raise GreenpropError(f"cannot resume {self.out_dir}: options differ ({shown})")
        self.config = config
        self.device = self.parallel.device(resolve_device(config.device))
        if config.deterministic:
            torch.use_deterministic_algorithms(True)
        if config.tuned:
            apply_threads()
        self.method = parse_method(config.method)
        if data is not None:
            check_preloaded(data, config)
        data = data or gp_data.load(
            config.dataset,
            data_dir=config.data_dir,
            subset=config.subset,
            test_subset=config.test_subset,
        )
        # Trimmed, every batch drawn from the data (training, estimation, evaluation) is cut
        # to its longest sequence; FLOPs are counted per batch shape (_flops_per_sample).
        self.data = gp_data.trim_padding(data) if config.trim_padding else data
        #: Real tokens per training sample, when batches are grouped by length (else None).
        self.train_lengths: torch.Tensor | None = None
        if config.group_by_length:
            info = self.data.info
            what = f"the {info.modality} dataset {info.name!r}"
            self.train_lengths = sequence_lengths(self.data.train, what)
        #: What the model learns: batches to inputs and targets, loss, evaluation (train/tasks.py).
        self.task = make_task(config, self.data, self.parallel.world_size)
        torch.manual_seed(config.seed)
        self.model: nn.Module = create_model(config, self.data.info).to(self.device)
        if config.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.steps_per_epoch = self.parallel.steps_per_epoch(len(self.data.train), config.batch_size)
        self.controllers = build_method(
            self.method,
            self.model,
            epochs=config.epochs,
            steps_per_epoch=self.steps_per_epoch,
            seed=config.seed,
        ) + list(controllers or [])
        names = [controller.name for controller in self.controllers]
        if len(set(names)) != len(names):
            raise GreenpropError(f"controller names must be unique within a run, got {names}")
        if clash := sorted(set(names) & RECORD_FIELDS):
            raise GreenpropError(f"controller name(s) {clash} would overwrite the epoch record's own fields")
        #: Controllers that may do a training step their own way (MeZO); see replace_step.
        self.step_replacers = [
            c for c in self.controllers if type(c).replace_step is not Controller.replace_step
        ]
        if self.step_replacers and self.parallel.world_size > 1:
            raise GreenpropError(
                f"method {self.method.label!r} replaces the training step, which greenprop does not "
                "run across processes (each rank would estimate its own update); use one process"
            )
        self.flop_accounts = flop_accounts(self.controllers)
        #: How methods adjust the counted FLOPs, one line each (in the provenance and metrics.json).
        self.flop_adjustments = [
            f"{name}: {text}" for name, account in self.flop_accounts if (text := account.describe())
        ]
        self.eval_model: nn.Module = torch.compile(self.model) if config.compile else self.model
        self.train_model: nn.Module = self.eval_model
        wrapped = self.parallel.wrap(self.model, self.device)  # after the surgery, as DDP requires
        if wrapped is not self.model:
            self.train_model = torch.compile(wrapped) if config.compile else wrapped
        self.loss_fn = self.task.loss_fn
        self.run = RunContext(
            model=self.model,
            epochs=config.epochs,
            steps_per_epoch=self.steps_per_epoch,
            draw_batch=self._draw_batch,
            loss_fn=self._batch_loss,
            batch_head=self._batch_head,
        )
        self.optimizer = self._make_optimizer()
        self.scheduler = self._make_scheduler()
        self.energy_meter = EnergyMeter(self.device, watts=config.watts)
        self.memory_meter = PeakMemory(self.device)
        self.load_meter = LoadMeter()
        self._flops_cache: dict[tuple[Hashable, ...], FlopCount] = {}
        #: The same for steps a controller replaces (None: it declined on the counted slice).
        self._replaced_flops: dict[tuple[Hashable, ...], FlopCount | None] = {}
        self.history: list[dict[str, Any]] = []
        self.start_epoch = 0
        #: Largest |difference| of any rank's parameters from rank 0's after the last epoch.
        self.parameter_spread: float | None = None
        if checkpoint is not None:
            self._restore(checkpoint)

    # ----------------------------------------------------------------- setup
    def _check_out_dir(self, resume: bool, overwrite: bool) -> dict[str, Any] | None:
        if self.out_dir is None:
            if resume:
                raise GreenpropError("resume needs an output directory")
            return None
        if self.out_dir.is_dir() and self._lock is not None:
            self._take_lock()
        if resume:
            state = load_checkpoint(self.out_dir / CHECKPOINT, required=CHECKPOINT_KEYS)
            if self.writes:
                ensure_writable_dir(self.out_dir)
            return state
        if (self.out_dir / METRICS).exists() and not overwrite:
            raise GreenpropError(
                f"{self.out_dir} already holds results; pass --resume to continue them "
                "or --overwrite to replace them"
            )
        if self.writes:
            ensure_writable_dir(self.out_dir)
        self._take_lock()
        return None

    def _take_lock(self) -> None:
        """One run per folder; then the temp files a killed write left are safe to remove."""
        if self._lock is None or self._lock.held or self.out_dir is None:
            return
        self._lock.acquire()
        remove_stale_temp_files(self.out_dir)

    def release(self) -> None:
        """Let another run use the output folder (done when :meth:`fit` ends)."""
        if self._lock is not None:
            self._lock.release()

    def _draw_batch(self, generator: torch.Generator) -> tuple[Any, Any]:
        """A random training batch (full batch size) for controllers that estimate on their own:
        the task's ``(inputs, targets)``, its random draws (DDPM's noise) from ``generator`` too."""
        source = self.parallel.estimation_data(self.data.train)
        size = self.parallel.rank_batch_size(self.config.batch_size)
        x, y = source[self._estimation_indices(source, size, generator)]
        return self.task.batch(
            prepare_inputs(x, self.device, self.config.channels_last), y.to(self.device), generator
        )

    def _estimation_indices(self, source: Any, size: int, generator: torch.Generator) -> torch.Tensor:
        """The samples of one drawn batch, drawn as the loop draws its batches: a random ``size``
        of ``source``, or with ``group_by_length`` one batch of a length-grouped order of it (VCAS
        estimates the variance of the batches training runs on: random batches of mixed length
        would measure another SGD variance, and cost more once trimmed)."""
        if self.train_lengths is None:
            return torch.randperm(len(source), generator=generator)[:size]
        lengths = self.train_lengths[source.indices] if isinstance(source, Shard) else self.train_lengths
        return grouped_batch(lengths, size, generator)

    def _batch_head(self, batch: tuple[Any, Any], n: int) -> tuple[Any, Any]:
        """The first ``n`` samples of a drawn batch, trimmed to their own longest sequence where
        the run trims (exact, as every trimmed batch is: VCAS estimates on such a part)."""
        head = batch_head(batch, n)
        return self.task.trimmed(head) if self.config.trim_padding else head

    def _batch_loss(self, model: nn.Module, batch: tuple[Any, Any]) -> torch.Tensor:
        inputs, targets = batch
        return self.loss_fn(call_model(model, inputs), targets)

    def _make_optimizer(self) -> torch.optim.Optimizer:
        c = self.config
        return make_optimizer(
            c.optimizer, self.model.parameters(), lr=c.lr, weight_decay=c.weight_decay, momentum=c.momentum
        )

    def _make_scheduler(self) -> torch.optim.lr_scheduler.LRScheduler:
        c = self.config
        if c.lr_schedule == "cosine":
            return torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, T_max=c.epochs)
        if c.lr_schedule == "step":
            return torch.optim.lr_scheduler.StepLR(self.optimizer, c.step_size, c.gamma)
        return torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda _: 1.0)

    def _restore(self, state: dict[str, Any]) -> None:
        if state.get("format") != CHECKPOINT_FORMAT:
            raise GreenpropError(
                f"checkpoint in {self.out_dir} has format {state.get('format')!r}, this greenprop "
                f"writes format {CHECKPOINT_FORMAT} (controller state keyed by name, method fields "
                "namespaced in the records): it was written by an older greenprop; start the run "
                "again with --overwrite"
            )
        if mismatch := describe_model_mismatch(self.model, state["model"]):
            raise GreenpropError(
                f"checkpoint {self.out_dir / CHECKPOINT} is not a greenprop checkpoint of this run "
                f"({mismatch})"
            )
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            saved_controllers = state.get("controllers", {})
            names = [controller.name for controller in self.controllers]
            if not isinstance(saved_controllers, dict) or sorted(saved_controllers) != sorted(names):
                held = sorted(saved_controllers) if isinstance(saved_controllers, dict) else saved_controllers
                raise ValueError(f"the checkpoint holds controllers {held!r}, this run has {names}")
            rank_states = state.get("rank_controllers")
            for controller in self.controllers:
                saved = with_rank_state(
                    saved_controllers[controller.name], controller.name, rank_states, self.parallel.rank
                )
                controller.load_state_dict(saved)
        except (KeyError, RuntimeError, ValueError, TypeError, IndexError) as err:
            detail = " ".join(str(err).split())[:300]
            raise GreenpropError(f"checkpoint in {self.out_dir} does not match this run: {detail}") from err
        saved_world = state.get("world_size", 1)
        if saved_world != self.parallel.world_size:
            raise GreenpropError(
                f"checkpoint in {self.out_dir} was written by a run on {saved_world} process(es), this "
                f"run has {self.parallel.world_size}: the data order differs, resume with the same number"
            )
        self.history = list(state.get("history", []))
        self.start_epoch = int(state["epoch"])

    def _checkpoint_state(self, next_epoch: int, rank_states: list[Any] | None = None) -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT,
            "epoch": next_epoch,
            "config": self.config.to_dict(),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "controllers": {c.name: c.state_dict() for c in self.controllers},
            "history": self.history,
            "world_size": self.parallel.world_size,
            "rank_controllers": rank_states,
        }

    # ----------------------------------------------------------------- loop
    def fit(self, until_epoch: int | None = None) -> dict[str, Any]:
        """Run the remaining epochs; returns the metrics written to ``metrics.json``.

        ``until_epoch`` stops after that many epochs (a slice: ``compare`` runs its
        configurations round-robin, one epoch each, continuing each by exact resume).

        Ctrl-C (or SIGTERM under :func:`greenprop.train.signals.sigterm_as_interrupt`)
        raises :class:`~greenprop.train.signals.RunInterrupted` saying where the run
        stopped; the last finished epoch's checkpoint is kept.
        """
        self._take_lock()
        try:
            return self._fit(self.config.epochs if until_epoch is None else until_epoch)
        except KeyboardInterrupt as err:
            raise RunInterrupted(self._interrupted_line(), signal_number(err)) from err
        finally:
            self.release()

    def _interrupted_line(self) -> str:
        where = "before the first epoch"
        if self.position is not None:
            epoch, step = self.position
            where = f"in epoch {epoch + 1}/{self.config.epochs}"
            if step is not None:
                where += f" at step {step + 1}/{self.steps_per_epoch}"
        done = len(self.history)
        if self.out_dir is None:
            return f"interrupted {where}; nothing is saved (no output folder)"
        if done == 0:
            return f"interrupted {where}; no epoch had finished, nothing to resume in {self.out_dir}"
        return (
            f"interrupted {where}; the checkpoint after epoch {done} is kept in "
            f"{self.out_dir / CHECKPOINT} ({self.resume_hint})"
        )

    def _fit(self, until_epoch: int) -> dict[str, Any]:
        c = self.config
        for controller in self.controllers:
            controller.on_train_start(self.run)
        if self.device.type == "cpu" and any(ctl.name in _KERNEL_USERS for ctl in self.controllers):
            kernels.load()  # a first build (8-9 s of gcc) before any timed phase: not the method's cost
        stop = min(until_epoch, c.epochs)
        for epoch in range(self.start_epoch, stop):
            torch.manual_seed(trainer_epoch_seed(c.seed, epoch))
            self.position = (epoch, None)
            try:
                record = self._run_epoch(epoch)
            except TrainingDiverged as err:
                if self.writes:  # say so next to the results kept so far
                    diverged = {"epoch": epoch, "reason": str(err)}
                    write_json(self.metrics(complete=False, diverged=diverged), self.out_dir / METRICS)
                raise
            self.history.append(record)
            self._report_epoch(record)
            if epoch + 1 == c.epochs:  # every rank takes part; the record says how far they agree
                self.parameter_spread = self.parallel.parameter_spread(self.model)
            rank_states = self.parallel.rank_states(self.controllers) if self.out_dir is not None else None
            if self.writes:
                save_checkpoint(self._checkpoint_state(epoch + 1, rank_states), self.out_dir / CHECKPOINT)
                write_json(self.metrics(complete=epoch + 1 == c.epochs), self.out_dir / METRICS)
        if stop < c.epochs:  # a slice ended; metrics.json may lag a checkpoint when killed between them
            metrics = self.metrics(complete=False)
            if self.writes and self.start_epoch >= stop:
                write_json(metrics, self.out_dir / METRICS)
            return metrics
        if self.parameter_spread is None:  # resumed from a finished run: measure it again
            self.parameter_spread = self.parallel.parameter_spread(self.model)
        metrics = self.metrics(complete=True)
        if self.writes and self.start_epoch == c.epochs:
            write_json(metrics, self.out_dir / METRICS)
        return metrics

    def _run_epoch(self, epoch: int) -> dict[str, Any]:
        """One epoch. Energy and peak memory cover the same work as "train time": not the evaluation."""
        return _run_to_end(self._epoch_steps(epoch, PhaseTimer(self.device)))

    def _epoch_steps(self, epoch: int, timer: PhaseTimer) -> Generator[int, None, dict[str, Any]]:
        """:meth:`_run_epoch`'s work, timed on ``timer``, pausing after each training step (it
        yields the step's index) and returning the epoch's record: the epoch's start runs with
        its first step, its end (scheduler, evaluation, ``on_epoch_end``) after its last.

        ``benchmarks/vcas_run_forward.py`` steps two runs in turn through it, as this loop runs them.
        """
        # None: the steps are a controller's own (MeZO), the run's optimizer is never stepped
        lr = None if self.step_replacers else self.optimizer.param_groups[0]["lr"]
        record: dict[str, Any] = {"epoch": epoch, "lr": lr}
        self.energy_meter.start()
        self.memory_meter.start()
        self.load_meter.start()
        try:
            flops, source = yield from self._train_or_replace(epoch, timer, record)
        finally:  # a failed epoch must not leave the meter running
            energy = self.energy_meter.stop()
            memory = self.memory_meter.stop()
            load = self.load_meter.stop()
        record["energy"] = self.parallel.energy(energy, self.energy_meter.describe()).to_dict()
        record["memory"] = memory.to_dict()
        # Every rank of a DDP run is this run's own work, not background (ranks share the host).
        record["load"] = load.record(own_s=self.parallel.sum_values({"own_s": load.own_s})["own_s"])
        flops = self.parallel.sum_values(flops)
        if not self.step_replacers:
            self.scheduler.step()
        with timer.phase("eval"):
            record.update(self._evaluate())
        record["reevaluated_by"] = None
        control = self.run.control
        for controller in self.controllers:
            fields = controller.on_epoch_end(epoch, record)
            if fields:
                record[controller.name] = {**record.get(controller.name, {}), **fields}
            if control.should_evaluate:  # the controller changed the model after evaluation
                control.should_evaluate = False
                record["reevaluated_by"] = controller.name
                with timer.phase("eval"):
                    record.update(self._evaluate())
        with timer.phase("eval"):  # scoring is evaluation: not in the train time
            if self.parallel.is_main:
                record.update(self.task.score(self.eval_model, epoch, self.out_dir if self.writes else None))
        if not math.isfinite(record["loss"]):
            what = f"the update of {record['replaced_by']}" if record["replaced_by"] else "training"
            raise TrainingDiverged(
                f"test loss is {record['loss']} after epoch {epoch + 1} ({what}); "
                "the last good checkpoint is kept"
            )
        record["flops"] = {k: Quantity(v, "FLOP", "counted", source).to_dict() for k, v in flops.items()}
        record["time"] = {k: q.to_dict() for k, q in timer.to_quantities().items()}
        return record

    def _train_or_replace(
        self, epoch: int, timer: PhaseTimer, record: dict[str, Any]
    ) -> Generator[int, None, tuple[dict[str, float], str]]:
        """The epoch's work: the hooks, then real steps (yielding each one's index) or a
        controller's replacement."""
        with timer.phase("hooks"):  # a method's own overhead counts in its train time
            for controller in self.controllers:
                controller.on_epoch_start(epoch)
        replacer = None
        with timer.phase("replace") as span:
            for controller in self.controllers:
                fields = controller.replace_epoch(epoch)
                if fields is not None:
                    replacer = controller
                    record[controller.name] = dict(fields)
                    break
            if replacer is None:  # nobody replaced the epoch: asking was hook overhead
                span.name = "hooks"
        if replacer is not None:
            record.update(replaced_by=replacer.name, steps=0, samples=0, train_loss=None)
            flops = {"forward": 0.0, "backward": 0.0}
            source = f"no steps executed (epoch replaced by {replacer.name})"
        else:
            record["replaced_by"] = None
            flops, source = yield from self._train_epoch(epoch, timer, record)
        return flops, source

    def _evaluate(self) -> dict[str, float]:
        return self.parallel.evaluate(
            self.eval_model,
            self.data.test,
            task=self.task,
            batch_size=self.config.eval_batch_size,
            device=self.device,
            channels_last=self.config.channels_last,
        )

    def _train_epoch(
        self, epoch: int, timer: PhaseTimer, record: dict[str, Any]
    ) -> Generator[int, None, tuple[dict[str, float], str]]:
        c = self.config
        model, optimizer = self.train_model, self.optimizer
        model.train()
        batches = self.parallel.epoch_batches(
            self.data.train, c.batch_size, c.seed, epoch, lengths=self.train_lengths
        )
        flops = {"forward": 0.0, "backward": 0.0}
        loss_sum, samples, scored = 0.0, 0, 0  # scored: samples whose outputs the task saw
        task_sums: dict[str, float] = {}
        step_losses: list[float] = []
        bar = tqdm(
            total=self.steps_per_epoch,
            desc=f"epoch {epoch + 1}/{c.epochs}",
            unit="step",
            disable=None if c.progress else True,
            leave=False,
            file=sys.stderr,
            dynamic_ncols=True,
        )
        start = time.perf_counter()
        for step in range(self.steps_per_epoch):
            self.position = (epoch, step)
            with timer.phase("data"):
                x, y = next(batches)
                x, y = prepare_inputs(x, self.device, c.channels_last), y.to(self.device)
                inputs, targets = self.task.batch(x, y)
            with timer.phase("hooks"):
                for controller in self.controllers:
                    controller.on_step_start(epoch, step)
            replaced = self._replaced_step(epoch, step, inputs, targets, timer)
            if replaced is not None:
                loss, per_sample = replaced
            else:
                per_sample = self._flops_per_sample(epoch, step, inputs, targets)
                with timer.phase("forward"):
                    outputs = call_model(model, inputs)
                    loss = self.loss_fn(outputs, targets)
                with timer.phase("backward"):
                    loss.backward()
                with timer.phase("optimizer"):
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                for key, value in self.task.train_sums(outputs.detach(), targets).items():
                    task_sums[key] = task_sums.get(key, 0.0) + value
                scored += len(y)
            booked = per_sample.scale(len(y))
            flops["forward"] += booked.forward
            flops["backward"] += booked.backward
            loss_value = self.parallel.mean(float(loss.detach()))  # every rank stops at the same step
            if not math.isfinite(loss_value):
                raise TrainingDiverged(
                    f"training diverged: loss is {loss_value} at epoch {epoch + 1} step {step + 1} "
                    f"(try a lower lr than {c.lr}); the last good checkpoint is kept"
                )
            with timer.phase("hooks"):
                for controller in self.controllers:
                    controller.on_step_end(epoch, step, loss_value)
            for _, account in self.flop_accounts:
                account.booked(booked, len(y))
                for phase, delta in account.adjustment(epoch, step).items():
                    flops[phase] += delta
            step_losses.append(loss_value)
            loss_sum += loss_value * len(y)
            samples += len(y)
            bar.update()
            if step % 10 == 0 or step + 1 == self.steps_per_epoch:
                rate = samples / max(time.perf_counter() - start, 1e-9)
                bar.set_postfix(loss=f"{loss_value:.3f}", img_s=f"{rate:.0f}")
            yield step
        bar.close()
        totals = self.parallel.sum_values(
            {**task_sums, "loss_sum": loss_sum, "samples": samples, "scored": scored}
        )
        loss_sum, samples, scored = totals.pop("loss_sum"), int(totals.pop("samples")), totals.pop("scored")
        if scored:
            train_fields = self.task.train_fields(totals, int(scored))
        else:  # every step was replaced (MeZO): its passes ran at perturbed weights, so no train metric
            train_fields = dict.fromkeys(self.task.train_fields(defaultdict(float), 1))
        record.update(
            steps=self.steps_per_epoch,
            samples=samples,
            train_loss=loss_sum / samples,
            **train_fields,
            step_losses=step_losses,
        )
        source = (
            f"{FLOP_SOURCE} on {min(c.flops_samples, c.batch_size)} "
            "samples, recounted whenever a method changes what a step computes or a batch's "
            "sample shape changes, x samples run"
        )
        if self.flop_adjustments:
            source += "; " + "; ".join(self.flop_adjustments)
        return flops, source

    def _replaced_step(
        self, epoch: int, step: int, x: Any, y: Any, timer: PhaseTimer
    ) -> tuple[torch.Tensor, FlopCount] | None:
        """The step as a controller runs it (loss, counted FLOPs per sample), or None."""
        for controller in self.step_replacers:
            key = (controller.name, *self._cost_key(epoch, step), sample_shapes(x))
            if key not in self._replaced_flops:  # counted before the step, on a slice, then undone
                self._replaced_flops[key] = self._count_replaced_step(controller, epoch, step, (x, y))
            with timer.phase("forward"):  # a replaced step runs forward passes only, or says so
                loss = controller.replace_step(epoch, step, (x, y))
            if loss is not None:
                count = self._replaced_flops[key]
                if count is None:  # its FLOP account's cost key must tell such steps apart
                    raise GreenpropError(
                        f"{controller.name}: replace_step declined when its step was counted and "
                        "then took the step: give it a FLOP account whose cost_key changes with that"
                    )
                return loss, count
        return None

    def _count_replaced_step(
        self, controller: Controller, epoch: int, step: int, batch: tuple[Any, Any]
    ) -> FlopCount | None:
        """Counted FLOPs per sample of ``controller.replace_step`` on a slice (None: it declined)."""
        n = min(self.config.flops_samples, len(batch[1]))
        head = batch_head(batch, n)
        losses: list[torch.Tensor | None] = []
        count = count_step_flops(
            self.model, lambda: losses.append(controller.replace_step(epoch, step, head))
        )
        return count.per_sample(n) if losses[0] is not None else None

    def _cost_key(self, epoch: int, step: int) -> tuple[Hashable, ...]:
        return tuple(account.cost_key(epoch, step) for _, account in self.flop_accounts)

    def _flops_per_sample(self, epoch: int, step: int, x: Any, y: Any) -> FlopCount:
        """Counted FLOPs of one sample's step, cached by the FLOP accounts' cost keys and the
        batch's sample shapes (a trimmed text batch's length), so each distinct step is counted once.

        Counting runs outside the timed phases: FlopCounterMode slows a step many times.
        """
        key = (*self._cost_key(epoch, step), sample_shapes(x))
        if key not in self._flops_cache:
            with ExitStack() as stack:
                for _, account in self.flop_accounts:
                    stack.enter_context(account.counting())
                self._flops_cache[key] = count_flops_per_sample(
                    self.model, x, y, self.loss_fn, max_samples=self.config.flops_samples
                )
        return self._flops_cache[key]

    # ----------------------------------------------------------------- reporting
    def _report_epoch(self, record: dict[str, Any]) -> None:
        if not self.config.progress:
            return
        c = self.config
        parts = [f"epoch {record['epoch'] + 1}/{c.epochs}"]
        if record["replaced_by"]:
            parts.append(f"[{record['replaced_by']}: no backprop]")
        else:
            parts.append(f"train loss {record['train_loss']:.4f}")
        parts += self.task.describe(record)
        seconds = sum(q["value"] for q in record["time"].values())
        parts.append(f"{seconds:.1f} s")
        print("  ".join(parts), flush=True)

    def metrics(self, *, complete: bool, diverged: dict[str, Any] | None = None) -> dict[str, Any]:
        """The run's metrics: config, environment, per-epoch records and a summary."""
        return {
            "format": 1,
            "complete": complete,
            "diverged": diverged,
            "config": self.config.to_dict(),
            "method": {"name": self.method.name, "options": self.method.options, "label": self.method.label},
            "environment": environment(
                self.device, channels_last=self.config.channels_last, tuned=self.config.tuned
            ),
            "energy_source": self.energy_meter.describe(),
            "flop_adjustments": self.flop_adjustments,
            "model_parameters": sum(p.numel() for p in self.model.parameters()),
            "distributed": {**self.parallel.describe(), "parameter_spread": self.parameter_spread},
            "task": self.task.to_dict(),
            "epochs": self.history,
            "summary": summarize(self.history, self.task),
        }
