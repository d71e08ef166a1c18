"""The VCAS controller: estimate the samplers' extra variance every F steps and adapt the ratios.

Every ``update_every`` steps the controller measures, on ``mc_repeats`` fresh batches,
the SGD variance and the variance each sampler adds (:mod:`greenprop.vcas.estimation`),
then moves the ratios (pure functions in :mod:`greenprop.vcas.control`): ``s`` steps
against ``tau_act``, each block's ratio is the fraction of samples reaching ``s`` of its
norm mass (EMA-smoothed), and each Linear's token ratio is multiplied or divided by
``weight_ratio_multiplier`` against ``tau_w``. Its FLOP accounting
(:mod:`greenprop.vcas.accounting`) counts the estimation passes, so the reported saving
is net of the controller's own overhead.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from greenprop.controller import BatchLoss, Controller, RunContext
from greenprop.errors import GreenpropError
from greenprop.metering.flops import FlopCount, batch_head, batch_size
from greenprop.seeding import vcas_entries_seed, vcas_estimation_seed
from greenprop.surgery import not_converted
from greenprop.train.distributed import pooled_over_ranks
from greenprop.vcas import control
from greenprop.vcas.accounting import VCASFlops
from greenprop.vcas.block_policy import measured_block_limits, set_block_limits
from greenprop.vcas.config import VCASConfig
from greenprop.vcas.estimation import GradientDraws, pick_entries, two_backwards, variance_ratios
from greenprop.vcas.layers import BackwardTally, VCASRuntime
from greenprop.vcas.policy import measured_break_evens, recorded_shapes, set_break_evens
from greenprop.vcas.surgery import VCASHandle, vcas_handle

__all__ = ["VCAS"]

_STATE_FORMAT = 3  # 3: the FLOP account's dense counts per batch shape (trimmed text)
# estimation_fraction never leaves fewer: the block ratios are read off this many norms
# (a ratio in steps of 1/8 at worst, averaged over M draws and the EMA).
_MIN_ESTIMATION_SAMPLES = 8


def _mean_or_none(values: Iterable[float]) -> float | None:
    """Mean, or None for no values (a CNN's blocks have no Linear, hence no token ratios)."""
    values = list(values)
    return statistics.fmean(values) if values else None


class VCAS(Controller):
    """Variance-controlled adaptive sampling for any training loop (and the reference trainer).

    ::

        apply_vcas(model, VCASConfig(update_every=50))      # convert first, then drive it
        vcas = VCAS(model)
        for batch in loader:
            vcas.step(estimation_batches, loss_fn)            # before the step's forward
            loss_fn(model, batch).backward(); opt.step(); opt.zero_grad()
        print(vcas.flops_report())

    ``estimation_batches`` is an iterator (or iterable, e.g. a shuffled DataLoader) of
    training batches and ``loss_fn(model, batch)`` returns the scalar loss; the
    controller draws ``mc_repeats`` batches from it at each update. The model's batch
    dimension must be dim 0 of every block's output. In the reference trainer the
    batches and the loss come from the :class:`~greenprop.controller.RunContext`.

    Args:
        model: a model converted by :func:`~greenprop.vcas.surgery.apply_vcas`.
        config: None uses the config it was converted with; any other config must
            equal that one.
    """

    name = "vcas"
    rank_local_state = ("generators", "flops")  # the token draws depend on the rank's data

    def __init__(self, model: nn.Module, config: VCASConfig | None = None) -> None:
        handle = vcas_handle(model)
        if handle is None:
            raise not_converted("VCAS", "apply_vcas")
        if config is not None and config != handle.config:
            raise GreenpropError("model already has VCAS with another config; call remove_vcas first")
        self.model = model
        self.handle: VCASHandle = handle
        self.config = handle.config
        self.s = self.config.initial_s
        self.steps = 0
        self.updates = 0
        self.history: list[dict[str, Any]] = []
        #: Tallies the sampled backward and the estimation passes (the trainer detects it).
        self.flop_account = VCASFlops(model, handle.runtime)
        self._smoothed: list[float | None] = [None] * len(handle.samplers)
        self._entries = pick_entries(
            handle.layers,
            self.config.variance_sample_fraction,
            torch.Generator().manual_seed(vcas_entries_seed(self.config.seed)),
        )
        self._estimation_generator = torch.Generator().manual_seed(vcas_estimation_seed(self.config.seed))
        #: Leave the activation pass out where no block samples (estimation.two_backwards): the
        #: same estimates, one backward fewer. False runs it anyway (A/B benchmarks, tests).
        self.fold_exact = True
        self._run: RunContext | None = None
        #: Each Linear's break-even token ratio once the measured token policy has run (policy.py).
        self.token_break_even: dict[str, float] | None = None
        #: Each block's own sampling limit once the measured block policy has run (block_policy.py),
        #: and the seconds its timing took (None: read from the state, not timed in this process).
        self.block_limits: dict[str, float] | None = None
        self.block_timing_s: float | None = None
        self._epoch_start: tuple[BackwardTally, int] = (BackwardTally(), 0)

    # ------------------------------------------------------------------ state
    @property
    def runtime(self) -> VCASRuntime:
        return self.handle.runtime

    @property
    def dense_per_sample(self) -> FlopCount | None:
        """Dense forward/backward FLOPs of one sample (counted on the first update's estimation batch)."""
        return self.flop_account.dense_per_sample

    def _trainable(self) -> dict[str, Any]:
        """Converted layers whose weight is trained: frozen ones (fine-tuning, LoRA) have no gradient."""
        return {name: layer for name, layer in self.handle.layers.items() if layer.weight.requires_grad}

    def ratios(self) -> dict[str, Any]:
        """The current ``s``, each block's sample ratio and each Linear's token ratio."""
        return {
            "s": self.s,
            "activation": {sampler.name: sampler.ratio for sampler in self.handle.samplers},
            "weight": {name: layer.vcas_weight_ratio for name, layer in self.handle.linears.items()},
        }

    # ------------------------------------------------------------------ the loop
    def step(self, batches: Iterable[Any] | Iterator[Any], loss_fn: BatchLoss) -> dict[str, Any] | None:
        """Call once per training step, before its forward: updates the ratios every F steps.

        Returns the update's record (variance ratios, new ratios) on update steps, else None.
        """
        self.flop_account.collect_train()
        record = None
        if self.steps % self.config.update_every == 0:
            record = self.update(iter(batches), loss_fn)
        self.steps += 1
        return record

    def update(self, batches: Iterator[Any], loss_fn: BatchLoss) -> dict[str, Any]:
        """Estimate the variances on ``mc_repeats`` batches and adapt every ratio (one update)."""
        account = self.flop_account
        account.collect_train()
        layers = self._trainable()
        if not layers:
            raise GreenpropError("no converted layer inside the VCAS blocks has a trainable weight")
        draws = []
        for repeat in range(self.config.mc_repeats):
            try:
                batch = next(batches)
            except StopIteration:
                raise GreenpropError(
                    f"VCAS needs {self.config.mc_repeats} batches per update, the batch iterator ran out"
                ) from None
            if repeat == 0 and self.config.block_policy == "measured" and self.block_limits is None:
                self._apply_block_policy(batch, loss_fn)
            full, batch = self._estimation_part(batch)
            # Counted later, on first use: FlopCounterMode is slow and this method is timed. The
            # part, not the batch: a trimmed part has a shape of its own.
            account.remember_batch(batch, loss_fn)
            measure = repeat == 0 and self.config.token_policy == "measured" and self.token_break_even is None
            record = self.handle.linears if measure else {}
            with recorded_shapes(record, full / batch_size(batch)) as shapes:
                draw = two_backwards(
                    self.model, self.handle, batch, loss_fn, layers, self._entries, fold=self.fold_exact
                )
            account.collect_overhead(batch, draw.sampled_pass)
            draws.append(draw)
            if measure:
                self._apply_token_policy(shapes)
        # Under DDP every rank pools all ranks' draws, so all adapt the same ratios.
        record = self._adapt(pooled_over_ranks(draws, GradientDraws.on_cpu))
        self.updates += 1
        self.history.append(record)
        return record

    def _estimation_part(self, batch: Any) -> tuple[int, Any]:
        """The batch's size and the samples of it the variances are estimated on (estimation_fraction),
        cut as the loop cuts its batches (the run's ``batch_head``: a trimmed run's text to the
        part's own longest sequence)."""
        full = batch_size(batch)
        keep = max(min(full, _MIN_ESTIMATION_SAMPLES), math.ceil(self.config.estimation_fraction * full))
        if keep >= full:
            return full, batch
        run = self._run
        head = batch_head if run is None or run.batch_head is None else run.batch_head
        return full, head(batch, keep)

    def _apply_token_policy(self, shapes: dict[str, Any]) -> None:
        """Time each Linear shape (or read the timing cache), set every layer's break-even ratio.

        Under DDP every rank takes rank 0's policy, so all ranks run the same layers sampled.
        """
        decided = pooled_over_ranks([measured_break_evens(shapes, self.config.timing_cache)])[0]
        self._set_break_even(decided)

    def _apply_block_policy(self, batch: Any, loss_fn: BatchLoss) -> None:
        """Time each distinct block on its input from this (full) training batch, or read the
        timing cache; set every block's own sampling limit. Under DDP every rank takes rank 0's."""
        start = time.perf_counter()
        limits = measured_block_limits(
            self.model,
            self.runtime,
            self.handle.samplers,
            lambda: loss_fn(self.model, batch),
            self.config.timing_cache,
        )
        self._set_block_limits(pooled_over_ranks([limits])[0])
        self.block_timing_s = time.perf_counter() - start

    def _set_block_limits(self, limits: dict[str, float]) -> None:
        self.block_limits = dict(limits)
        set_block_limits(self.handle.samplers, limits)

    def _set_break_even(self, decided: dict[str, float]) -> None:
        self.token_break_even = dict(decided)
        set_break_evens(self.handle.linears, decided)

    def _adapt(self, draws: list[GradientDraws]) -> dict[str, Any]:
        cfg = self.config
        ratios = variance_ratios(draws, list(self.handle.linears))
        self.s = control.update_s(self.s, ratios.activation, cfg.tau_act, cfg.s_step)
        for i, sampler in enumerate(self.handle.samplers):
            if draws[0].norms[i] is None:  # no gradient reaches this block: leave its ratio
                continue
            new = statistics.fmean(control.block_ratio(d.norms[i], self.s) for d in draws)
            smoothed = control.ema(self._smoothed[i], new, cfg.ema_decay)
            self._smoothed[i] = smoothed
            sampler.ratio = min(1.0, max(cfg.min_ratio, smoothed))
        for name, ratio in ratios.weight.items():
            layer = self.handle.linears[name]
            layer.vcas_weight_ratio = control.update_weight_ratio(
                layer.vcas_weight_ratio, ratio, cfg.tau_w, cfg.weight_ratio_multiplier, cfg.min_ratio
            )
        now = self.ratios()
        return {
            "step": self.steps,
            "sgd_variance": ratios.sgd,
            "activation_variance_ratio": ratios.activation,
            "weight_variance_ratio_mean": _mean_or_none(ratios.weight.values()),
            "s": self.s,
            "activation_ratio_mean": statistics.fmean(now["activation"].values()),
            "weight_ratio_mean": _mean_or_none(now["weight"].values()),
        }

    def flops_report(self) -> dict[str, Any]:
        """Backward and whole-step FLOPs of the sampled training relative to dense, overhead included.

        Sampled-layer backward FLOPs are tallied exactly as run; everything else in the
        backward (attention, norms) is taken at its dense count, since it runs on the
        full tensors. The dense per-sample FLOPs are counted (FlopCounterMode) once per
        batch shape, on first use; the training steps' dense FLOPs are what the loop booked
        (the reference trainer and the adapters book each batch at its length), else the
        first update's batch's per sample. ``None`` ratios mean nothing was counted yet.
        """
        return {"steps": self.steps, "updates": self.updates, **self.flop_account.report(), **self.ratios()}

    # ------------------------------------------------------------------ hooks
    def on_train_start(self, run: RunContext) -> None:
        self._run = run

    def on_step_start(self, epoch: int, step: int) -> None:
        run = self._run
        if run is None or run.draw_batch is None or run.loss_fn is None:
            raise GreenpropError("VCAS in a trainer needs a RunContext with draw_batch and loss_fn")
        draw, generator = run.draw_batch, self._estimation_generator
        self.step(iter(lambda: draw(generator), None), run.loss_fn)

    def on_epoch_start(self, epoch: int) -> None:
        account = self.flop_account
        account.collect_train()
        rows = {k: list(v) for k, v in account.train.rows.items()}
        self._epoch_start = (BackwardTally(rows=rows), self.updates)

    def on_epoch_end(self, epoch: int, record: dict[str, Any]) -> dict[str, Any]:
        """Ratios now, rows kept this epoch, the epoch's updates and the FLOP ratios so far."""
        report = self.flops_report()
        start, start_updates = self._epoch_start
        rows = self.flop_account.train.rows
        realised = {}
        for sampler in self.handle.samplers:
            kept, seen = rows.get(sampler.index, [0, 0])
            kept0, seen0 = start.rows.get(sampler.index, [0, 0])
            realised[sampler.name] = (kept - kept0) / (seen - seen0) if seen > seen0 else None
        return {
            "s": self.s,
            "updates": self.updates,
            "activation_ratios": report["activation"],
            "weight_ratio_mean": _mean_or_none(report["weight"].values()),
            "realised_activation_ratio": realised,
            "block_limits": self.block_limits,  # the measured block policy's (None: sample_max_ratio)
            "block_timing_s": self.block_timing_s,
            "backward_ratio": report["backward_ratio"],
            "total_ratio_with_overhead": report["total_ratio_with_overhead"],
            "history": self.history[start_updates:],
        }

    def state_dict(self) -> dict[str, Any]:
        runtime = self.runtime
        return {
            "format": _STATE_FORMAT,
            "config": self.config.to_dict(),
            "blocks": [s.name for s in self.handle.samplers],
            "s": self.s,
            "steps": self.steps,
            "updates": self.updates,
            "activation_ratios": [s.ratio for s in self.handle.samplers],
            "smoothed": list(self._smoothed),
            "weight_ratios": {n: layer.vcas_weight_ratio for n, layer in self.handle.linears.items()},
            "generators": {
                "activation": runtime.activation_generator.get_state(),
                "weight": runtime.weight_generator.get_state(),
                "estimation": self._estimation_generator.get_state(),
            },
            "flops": self.flop_account.state_dict(),
            "history": list(self.history),
            "token_break_even": self.token_break_even,
            "block_limits": self.block_limits,
            # what each compacted block learnt of its output gradient (CompactedForward.watch):
            # a resumed run takes the same paths, so its gradients are the same bit for bit
            "live_gradients": [[b.forward.live_gradient, b.forward.unwatched] for b in self.handle.compacted],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("format") != _STATE_FORMAT:
            raise GreenpropError(
                f"VCAS state format {state.get('format')!r} is not this greenprop's ({_STATE_FORMAT}): "
                "the checkpoint was saved by another version and cannot be resumed; start the run anew"
            )
        blocks = [s.name for s in self.handle.samplers]
        if state["blocks"] != blocks or sorted(state["weight_ratios"]) != sorted(self.handle.linears):
            raise GreenpropError(f"VCAS state is for blocks {state['blocks']} but this model has {blocks}")
        if VCASConfig.from_dict(state["config"]) != self.config:
            raise GreenpropError("VCAS state was saved with another config")
        runtime = self.runtime
        self.s, self.steps, self.updates = state["s"], state["steps"], state["updates"]
        for sampler, ratio in zip(self.handle.samplers, state["activation_ratios"], strict=True):
            sampler.ratio = ratio
        self._smoothed = list(state["smoothed"])
        for name, ratio in state["weight_ratios"].items():
            self.handle.linears[name].vcas_weight_ratio = ratio
        generators = state["generators"]
        runtime.activation_generator.set_state(generators["activation"])
        runtime.weight_generator.set_state(generators["weight"])
        self._estimation_generator.set_state(generators["estimation"])
        self.flop_account.load_state_dict(state["flops"])
        self.history = list(state["history"])
        if state.get("token_break_even") is not None:  # the measured policy, not measured again
            self._set_break_even(state["token_break_even"])
        if state.get("block_limits") is not None:  # the measured block policy, not timed again
            self._set_block_limits(state["block_limits"])
        learnt = state.get("live_gradients", ())  # absent from states saved before session 29
        for block, (live, unwatched) in zip(self.handle.compacted, learnt, strict=False):
            block.forward.live_gradient, block.forward.unwatched = live, unwatched
