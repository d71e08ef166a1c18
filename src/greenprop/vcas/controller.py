"""The VCAS controller: measure the samplers' extra variance every F steps and adapt the ratios.

Every ``update_every`` steps, on ``mc_repeats`` fresh batches, one forward each and
three backward passes on the same graph:

1. exact: the batch's true gradient ``E_m`` and each block's per-sample gradient norms;
2. activation sampling only: ``A_m``;
3. activation and token sampling, with the activation draws replayed from (2): ``W_m``.

The SGD variance is the variance of ``E_m`` across the batches; the activation
sampler's extra variance is the mean of ``(A_m - E_m)^2``; each Linear's token
sampler's is the mean of ``(W_m - A_m)^2`` on its own weight (the same activation
sample, so only the token draw differs). All are measured on a fixed random
``variance_sample_fraction`` of each sampled Linear's weight entries. Then (pure
functions in :mod:`greenprop.vcas.control`): ``s`` steps against ``tau_act``, each
block's ratio is the fraction of samples reaching ``s`` of its norm mass (EMA-smoothed),
and each Linear's token ratio is multiplied or divided by 0.95 against ``tau_w``.

The estimation passes are extra work; :meth:`VCAS.flops_report` counts them, so the
reported saving is net of the controller's own overhead.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from greenprop.errors import GreenpropError
from greenprop.metering.flops import FlopCount, batch_head, count_flops_per_sample
from greenprop.surgery import not_converted
from greenprop.train.hooks import Controller
from greenprop.vcas import control
from greenprop.vcas.config import VCASConfig
from greenprop.vcas.layers import FlopTally, Mode, VCASRuntime
from greenprop.vcas.surgery import VCASHandle, vcas_handle

__all__ = ["VCAS", "BatchLoss"]

#: ``loss_fn(model, batch) -> scalar loss``: how a batch becomes a loss (any model, any batch).
BatchLoss = Callable[[nn.Module, Any], Tensor]

_STATE_FORMAT = 1
_COUNT_SAMPLES = 16  # the dense FLOP count runs on this many samples of one batch


def _mean_or_none(values: Iterable[float]) -> float | None:
    """Mean, or None for no values (a CNN's blocks have no Linear, hence no token ratios)."""
    values = list(values)
    return statistics.fmean(values) if values else None


class _LossOf(nn.Module):
    """``forward(batch) = loss_fn(model, batch)``, so the FLOP counter can slice any batch."""

    def __init__(self, model: nn.Module, loss_fn: BatchLoss) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: Any) -> Tensor:
        return self.loss_fn(self.model, batch)


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
    dimension must be dim 0 of every block's output.

    Args:
        model: a model converted by :func:`~greenprop.vcas.surgery.apply_vcas`.
        config: None uses the config it was converted with; any other config must
            equal that one.
    """

    name = "vcas"

    def __init__(self, model: nn.Module, config: VCASConfig | None = None) -> None:
        handle = vcas_handle(model)
        if handle is None:
            raise not_converted("VCAS", "apply_vcas")
        if config is not None and config != handle.config:
            raise GreenpropError("model already has VCAS with another config; call remove_vcas first")
        self.model = model
        self.handle: VCASHandle = handle
        self.config = handle.config
        self.s = self.config.initial_keep
        self.steps = 0
        self.updates = 0
        self.history: list[dict[str, Any]] = []
        self.train_tally = FlopTally()
        self.overhead_tally = FlopTally()
        self.overhead_samples = {"forward": 0, "exact_backward": 0, "sampled_backward": 0}
        self._dense: FlopCount | None = None
        self._pending_count: tuple[Any, BatchLoss] | None = None
        self._smoothed: list[float | None] = [None] * len(handle.samplers)
        self._entries = self._pick_entries()
        self._estimation_generator = torch.Generator().manual_seed(self.config.seed + 2)
        self._draw: Callable[[torch.Generator], Any] | None = None
        self._loss: BatchLoss | None = None
        self._reported = FlopTally()
        self._reported_overhead: dict[str, float] = {"forward": 0.0, "backward": 0.0}

    # ------------------------------------------------------------------ state
    @property
    def runtime(self) -> VCASRuntime:
        return self.handle.runtime

    def _pick_entries(self) -> dict[str, Tensor]:
        """A fixed random subset of each converted layer's weight entries (at least one)."""
        gen = torch.Generator().manual_seed(self.config.seed + 3)
        entries = {}
        for name, layer in self.handle.layers.items():
            n = layer.weight.numel()
            k = max(1, round(self.config.variance_sample_fraction * n))
            entries[name] = torch.randperm(n, generator=gen)[:k].sort().values
        return entries

    def _trainable(self) -> dict[str, Any]:
        """Converted layers whose weight is trained: frozen ones (fine-tuning, LoRA) have no gradient."""
        return {name: layer for name, layer in self.handle.layers.items() if layer.weight.requires_grad}

    def ratios(self) -> dict[str, Any]:
        """The current ``s``, each block's sample keep ratio and each Linear's token ratio."""
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
        self._collect_train_tally()
        record = None
        if self.steps % self.config.update_every == 0:
            record = self.update(iter(batches), loss_fn)
        self.steps += 1
        return record

    def update(self, batches: Iterator[Any], loss_fn: BatchLoss) -> dict[str, Any]:
        """Estimate the variances on ``mc_repeats`` batches and adapt every ratio (one update)."""
        self._collect_train_tally()
        cfg = self.config
        exact, act, full, norms = [], [], [], []
        for _ in range(cfg.mc_repeats):
            try:
                batch = next(batches)
            except StopIteration:
                raise GreenpropError(
                    f"VCAS needs {cfg.mc_repeats} batches per update, the batch iterator ran out"
                ) from None
            if self._dense is None and self._pending_count is None:
                # Counted later, on first use (flops_delta, flops_report): FlopCounterMode is slow
                # and the trainer times this method; the FLOPs do not depend on the weights.
                self._pending_count = (batch_head(batch, _COUNT_SAMPLES), loss_fn)
            e, a, w, n = self._three_backwards(batch, loss_fn)
            exact.append(e)
            act.append(a)
            full.append(w)
            norms.append(n)
        self.overhead_tally.add(self.runtime.take_tally())
        record = self._adapt(exact, act, full, norms)
        self.updates += 1
        self.history.append(record)
        return record

    def _three_backwards(
        self, batch: Any, loss_fn: BatchLoss
    ) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, Tensor], list[Tensor]]:
        runtime = self.runtime
        layers = self._trainable()
        if not layers:
            raise GreenpropError("no converted layer inside the VCAS blocks has a trainable weight")
        names = list(layers)
        weights = [layers[name].weight for name in names]
        with torch.enable_grad():
            loss = loss_fn(self.model, batch)
        if not isinstance(loss, Tensor) or loss.numel() != 1 or not loss.requires_grad:
            raise GreenpropError("loss_fn(model, batch) must return a scalar loss that requires grad")
        previous = runtime.mode
        try:
            runtime.mode, runtime.record_norms = Mode.EXACT, True
            runtime.norms.clear()
            grads_exact = torch.autograd.grad(loss, weights, retain_graph=True)
            runtime.record_norms = False
            missing = [s.name for s in self.handle.samplers if s.index not in runtime.norms]
            if len(missing) == len(self.handle.samplers):
                raise GreenpropError(
                    f"VCAS saw no gradient at block(s) {', '.join(missing)}: estimate with the model "
                    "in training mode (model.train()) and a loss that uses every block"
                )
            # Blocks below the lowest trainable layer get no backward at all: nothing to sample.
            block_norms = [runtime.norms.get(s.index) for s in self.handle.samplers]
            replay = runtime.activation_generator.get_state()
            runtime.mode = Mode.ACTIVATION
            grads_act = torch.autograd.grad(loss, weights, retain_graph=True)
            runtime.activation_generator.set_state(replay)
            runtime.mode = Mode.FULL
            grads_full = torch.autograd.grad(loss, weights)
        finally:
            runtime.mode, runtime.record_norms = previous, False
        n = len(next(norm for norm in block_norms if norm is not None))
        self.overhead_samples["forward"] += n
        self.overhead_samples["exact_backward"] += n
        self.overhead_samples["sampled_backward"] += 2 * n

        def pick(grads: Sequence[Tensor]) -> dict[str, Tensor]:
            return {
                name: g.detach().reshape(-1)[self._entries[name].to(g.device)].double().cpu()
                for name, g in zip(names, grads, strict=True)
            }

        return pick(grads_exact), pick(grads_act), pick(grads_full), block_norms

    def _adapt(
        self,
        exact: list[dict[str, Tensor]],
        act: list[dict[str, Tensor]],
        full: list[dict[str, Tensor]],
        norms: list[list[Tensor]],
    ) -> dict[str, Any]:
        cfg = self.config
        names = list(self._trainable())  # Linear and Conv2d: all see the activation sampler
        # SGD variance per entry: across the M batches' exact gradients (Bessel-corrected).
        per_entry = {name: torch.stack([e[name] for e in exact]).var(dim=0, correction=1) for name in names}
        sgd = {name: float(v.mean()) for name, v in per_entry.items()}
        sgd_all = float(torch.cat(list(per_entry.values())).mean())
        all_exact = torch.cat([e[name] for e in exact for name in names])
        all_act = torch.cat([a[name] for a in act for name in names])
        act_ratio = control.variance_ratio(all_act[None], all_exact, sgd_all)
        weight_ratios = {}
        for name in names:
            if name not in self.handle.linears:  # token sampling: Linear layers only
                continue
            sampled = torch.cat([f[name] for f in full])[None]
            reference = torch.cat([a[name] for a in act])
            weight_ratios[name] = control.variance_ratio(sampled, reference, sgd[name])
        self.s = control.update_activation_keep(self.s, act_ratio, cfg.tau_act, cfg.s_step)
        for i, sampler in enumerate(self.handle.samplers):
            if norms[0][i] is None:  # no gradient reaches this block: leave its ratio
                continue
            new = statistics.fmean(control.block_keep_ratio(n[i], self.s) for n in norms)
            smoothed = control.ema(self._smoothed[i], new, cfg.ema_decay)
            self._smoothed[i] = smoothed
            sampler.ratio = min(1.0, max(cfg.min_ratio, smoothed))
        for name in weight_ratios:
            layer = self.handle.linears[name]
            layer.vcas_weight_ratio = control.update_weight_ratio(
                layer.vcas_weight_ratio,
                weight_ratios[name],
                cfg.tau_w,
                cfg.weight_ratio_multiplier,
                cfg.min_ratio,
            )
        ratios = self.ratios()
        return {
            "step": self.steps,
            "sgd_variance": sgd_all,
            "activation_variance_ratio": act_ratio,
            "weight_variance_ratio_mean": _mean_or_none(weight_ratios.values()),
            "s": self.s,
            "activation_ratio_mean": statistics.fmean(ratios["activation"].values()),
            "weight_ratio_mean": _mean_or_none(ratios["weight"].values()),
        }

    # ------------------------------------------------------------------ FLOPs
    @contextmanager
    def exact_backward(self) -> Iterator[None]:
        """Dense, untallied backward inside the block (for FLOP counting of the dense step)."""
        runtime = self.runtime
        previous, saved = runtime.mode, runtime.take_tally()
        runtime.mode = Mode.EXACT
        try:
            yield
        finally:
            runtime.mode = previous
            runtime.tally = saved

    @property
    def dense_per_sample(self) -> FlopCount | None:
        """Dense forward/backward FLOPs of one sample (counted on the first update's batch)."""
        if self._dense is None and self._pending_count is not None:
            batch, loss_fn = self._pending_count
            self._dense = self._count_dense(batch, loss_fn)
            self._pending_count = None
        return self._dense

    def _count_dense(self, batch: Any, loss_fn: BatchLoss) -> FlopCount:
        with self.exact_backward():
            return count_flops_per_sample(_LossOf(self.model, loss_fn), (batch,), None, lambda loss, _: loss)

    def _collect_train_tally(self) -> None:
        tally = self.runtime.take_tally()
        self.train_tally.add(tally)

    def flops_report(self) -> dict[str, Any]:
        """Backward and whole-step FLOPs of the sampled training relative to dense, overhead included.

        Linear backward FLOPs are tallied exactly as run; everything else in the
        backward (attention, norms) is taken at its dense count, since it runs on the
        full tensors. The dense per-sample FLOPs are counted (FlopCounterMode) once,
        at the first update. ``None`` values mean nothing was counted yet.
        """
        self._collect_train_tally()
        dense = self.dense_per_sample
        report: dict[str, Any] = {
            "steps": self.steps,
            "updates": self.updates,
            "train_samples": self.train_tally.samples,
            "linear_backward_saved": self.train_tally.saved,
            "overhead_samples": dict(self.overhead_samples),
            **self.ratios(),
        }
        if dense is None or self.train_tally.samples == 0:
            report.update(backward_ratio=None, total_ratio=None, total_ratio_with_overhead=None)
            return report
        n = self.train_tally.samples
        dense_bwd = n * dense.backward
        bwd = dense_bwd - self.train_tally.saved
        overhead = self._overhead_flops()
        dense_total = n * dense.total
        report.update(
            dense_forward_per_sample=dense.forward,
            dense_backward_per_sample=dense.backward,
            backward_ratio=bwd / dense_bwd,
            total_ratio=(n * dense.forward + bwd) / dense_total,
            overhead_flops=overhead["forward"] + overhead["backward"],
            total_ratio_with_overhead=(n * dense.forward + bwd + sum(overhead.values())) / dense_total,
        )
        return report

    def _overhead_flops(self) -> dict[str, float]:
        dense = self.dense_per_sample
        if dense is None:
            return {"forward": 0.0, "backward": 0.0}
        o = self.overhead_samples
        backward = (o["exact_backward"] + o["sampled_backward"]) * dense.backward - self.overhead_tally.saved
        return {"forward": o["forward"] * dense.forward, "backward": backward}

    # ------------------------------------------------------------------ trainer hooks
    def attach_data(self, draw_batch: Callable[[torch.Generator], Any], loss_fn: BatchLoss) -> None:
        self._draw, self._loss = draw_batch, loss_fn

    def _estimation_batches(self) -> Iterator[Any]:
        if self._draw is None or self._loss is None:
            raise GreenpropError("VCAS in a trainer needs attach_data(draw_batch, loss_fn) first")
        while True:
            yield self._draw(self._estimation_generator)

    def on_step_start(self, epoch: int, step: int) -> None:
        self.step(self._estimation_batches(), self._loss)  # type: ignore[arg-type]

    def flops_context(self) -> Any:
        return self.exact_backward()

    def flops_delta(self, epoch: int, step: int) -> dict[str, float]:
        """This step's Linear-backward saving and any estimation overhead since the last call."""
        self._collect_train_tally()
        saved = self.train_tally.saved - self._reported.saved
        self._reported = FlopTally(self.train_tally.done, self.train_tally.dense)
        overhead = self._overhead_flops()
        delta = {k: overhead[k] - self._reported_overhead[k] for k in ("forward", "backward")}
        self._reported_overhead = overhead
        delta["backward"] -= saved
        return delta

    def on_epoch_start(self, epoch: int) -> None:
        self._collect_train_tally()
        self._epoch_start = (
            FlopTally(rows={k: list(v) for k, v in self.train_tally.rows.items()}),
            self.updates,
        )

    def on_epoch_end(self, epoch: int, record: dict[str, Any]) -> None:
        """Adds ``record["vcas"]``: ratios now, rows kept this epoch, the epoch's updates."""
        report = self.flops_report()
        start, start_updates = getattr(self, "_epoch_start", (FlopTally(), 0))
        realised = {}
        for sampler in self.handle.samplers:
            kept, seen = self.train_tally.rows.get(sampler.index, [0, 0])
            kept0, seen0 = start.rows.get(sampler.index, [0, 0])
            realised[sampler.name] = (kept - kept0) / (seen - seen0) if seen > seen0 else None
        record["vcas"] = {
            "s": self.s,
            "updates": self.updates,
            "activation_ratios": report["activation"],
            "weight_ratio_mean": _mean_or_none(report["weight"].values()),
            "realised_activation_keep": realised,
            "backward_ratio": report["backward_ratio"],
            "total_ratio_with_overhead": report["total_ratio_with_overhead"],
            "history": self.history[start_updates:],
        }

    def state_dict(self) -> dict[str, Any]:
        self._collect_train_tally()
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
            "train_tally": (
                self.train_tally.done,
                self.train_tally.dense,
                self.train_tally.samples,
                {k: list(v) for k, v in self.train_tally.rows.items()},
            ),
            "overhead_tally": (self.overhead_tally.done, self.overhead_tally.dense),
            "overhead_samples": dict(self.overhead_samples),
            "dense_per_sample": None
            if self.dense_per_sample is None
            else (self.dense_per_sample.forward, self.dense_per_sample.backward),
            "reported": (self._reported.done, self._reported.dense, dict(self._reported_overhead)),
            "history": list(self.history),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("format") != _STATE_FORMAT:
            raise GreenpropError(f"unknown VCAS state format {state.get('format')!r}")
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
        done, dense, samples, rows = state["train_tally"]
        self.train_tally = FlopTally(done, dense, samples, {int(k): list(v) for k, v in rows.items()})
        self.overhead_tally = FlopTally(*state["overhead_tally"])
        self.overhead_samples = dict(state["overhead_samples"])
        d = state["dense_per_sample"]
        self._dense = None if d is None else FlopCount(*d)
        self._pending_count = None
        done, dense, overhead = state["reported"]
        self._reported, self._reported_overhead = FlopTally(done, dense), dict(overhead)
        self.history = list(state["history"])
        runtime.take_tally()
