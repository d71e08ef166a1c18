"""The GradSamp controller: skip whole epochs and apply an update sampled from a GGD instead.

Algorithm 1 of the GradSamp paper, for any training loop. In a real epoch the controller
remembers the pre-epoch parameters and, at the epoch's end, turns that copy into the
epoch's update ``delta = theta(k) - theta(k-1)``. In a sampled epoch (no data, no forward,
no backward) it adds, to each trainable parameter, a draw from the rule in
:mod:`greenprop.gradsamp.sampling` (a GGD fitted to that tensor's ``delta``). Buffers
(BatchNorm statistics, ...) are left as they are.

Memory: one extra copy of the trainable parameters (the same buffer holds the snapshot,
then the update). The guard with ``allow_consecutive=True`` is the one case that needs a
second copy.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from greenprop.controller import Controller, RunContext
from greenprop.errors import GreenpropError
from greenprop.gradsamp import ggd
from greenprop.gradsamp.config import GradSampConfig
from greenprop.gradsamp.sampling import DrawStats, FitMethod, ToleranceMode, UpdateVariant, sample_update
from greenprop.gradsamp.schedule import Strategy, parse_strategy
from greenprop.seeding import gradsamp_draw_seed

__all__ = ["GradSamp", "NothingSampledWarning"]

_STATE_FORMAT = 1


class NothingSampledWarning(UserWarning):
    """A schedule that samples no epoch of the run: it trains exactly like dense."""


class GradSamp(Controller):
    """Replace some epochs by a GGD-sampled update (GradSamp, Algorithm 1).

    Use it from the reference trainer (it implements the :class:`Controller` hooks) or from
    any loop::

        gs = GradSamp(model, GradSampConfig(strategy="pe:5", seed=0), epochs=E)
        for epoch in range(E):
            gs.on_epoch_start(epoch)
            if gs.should_skip(epoch):
                gs.sampled_update()          # no data, no forward, no backward
            else:
                train_one_epoch(model)
            gs.on_epoch_end(epoch)

    Args:
        model: its trainable parameters (``requires_grad`` at construction) are sampled.
        config: the settings (:class:`GradSampConfig`; default ``GradSampConfig()``, the
            paper's ``pe:5`` with the safe draw). The first and last epoch are always real.
        epochs: the run's length (the delayed strategies need it; the last epoch real).

    The settings are also attributes (``update``, ``tolerance``, ...), with ``clamp`` and
    ``beta_bounds`` resolved for the tolerance mode. ``guard_threshold`` enables
    :meth:`guard`: after a sampled epoch, roll back if the validation loss rose by more than
    that fraction of its previous value.
    """

    name = "gradsamp"

    def __init__(self, model: nn.Module, config: GradSampConfig | None = None, *, epochs: int) -> None:
        config = GradSampConfig() if config is None else config
        if not isinstance(config, GradSampConfig):
            raise GreenpropError(f"GradSamp takes a GradSampConfig, got {config!r}")
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
            raise GreenpropError(f"epochs must be an integer >= 1, got {epochs!r}")
        self.config = config
        self.strategy: Strategy = parse_strategy(
            config.strategy, epochs=epochs, seed=config.seed, allow_consecutive=config.allow_consecutive
        )
        self.epochs = epochs
        self.seed = config.seed
        if not self.strategy.skipped_epochs(epochs):
            warnings.warn(
                f"GradSamp {self.strategy.spec} samples no epoch of this {epochs}-epoch run "
                f"(seed {config.seed}; the first and last epochs are always real), "
                "so it trains exactly like dense",
                NothingSampledWarning,
                stacklevel=2,
            )
        self.tolerance = config.tolerance
        self.tolerance_mode: ToleranceMode = config.tolerance_mode
        self.update: UpdateVariant = config.update
        self.update_scale = config.update_scale
        self.clamp = config.clamp_draws
        self.beta_bounds = config.beta_bounds
        self.fit_method: FitMethod = config.fit_method
        self.guard_threshold = config.guard_threshold
        self.record_fits = config.record_fits

        self._params: list[tuple[str, nn.Parameter]] = [
            (n, p) for n, p in model.named_parameters() if p.requires_grad
        ]
        if not self._params:
            raise GreenpropError("GradSamp: the model has no trainable parameters")
        # One buffer: the pre-epoch snapshot during a real epoch, its update afterwards, and
        # (with the guard) the pre-sample parameters after a sampled epoch.
        self._buf: list[torch.Tensor] | None = None
        self._buf_kind: str = "empty"  # empty | snapshot | delta | pre_sample
        self._buf_epoch: int | None = None
        self._pre: list[torch.Tensor] | None = None  # guard + allow_consecutive only
        self._pending_rollback: int | None = None
        self._current_epoch: int | None = None
        self._last_finished: int | None = None
        self.sampled_epochs: list[int] = []
        self.rolled_back_epochs: list[int] = []
        self.fallback_count = 0
        self._last_val_loss: float | None = None  # the guard's reference
        self._run: RunContext | None = None  # set by on_train_start: the guard asks it to re-evaluate
        #: Fitted GGD per tensor name at the last sampled epoch.
        self.last_fits: dict[str, ggd.GGDParams] = {}

    # ------------------------------------------------------------------ schedule
    def should_skip(self, epoch: int) -> bool:
        """Whether ``epoch`` is sampled instead of trained."""
        return self.strategy.should_skip(epoch, self.epochs)

    def skipped_epochs(self) -> list[int]:
        """The epochs this run samples."""
        return self.strategy.skipped_epochs(self.epochs)

    def expected_saving(self) -> float:
        """Expected fraction of epochs sampled (their forward and backward are not done)."""
        return self.strategy.expected_saving(self.epochs)

    def describe(self) -> dict[str, Any]:
        """Strategy, savings and settings, for reports and metrics.json."""
        out = dict(self.strategy.describe(self.epochs))
        out.update(
            update=self.update,
            tolerance=self.tolerance,
            tolerance_mode=self.tolerance_mode,
            clamp=self.clamp,
            beta_bounds=[b if math.isfinite(b) else None for b in self.beta_bounds],  # JSON-safe
            update_scale=self.update_scale,
            fit_method=self.fit_method,
            guard_threshold=self.guard_threshold,
        )
        return out

    # ------------------------------------------------------------------ hooks
    def on_train_start(self, run: RunContext) -> None:
        self._run = run
        if run.epochs != self.epochs:
            warnings.warn(
                f"GradSamp was built for {self.epochs} epochs but the run has "
                f"{run.epochs}; using {run.epochs}",
                stacklevel=2,
            )
            self.epochs = run.epochs

    def on_epoch_start(self, epoch: int) -> None:
        """Snapshot the parameters before a real epoch (into the reused buffer)."""
        self._current_epoch = epoch
        self._pending_rollback = None
        if self.should_skip(epoch):
            return
        buf = self._buffer()
        with torch.no_grad():
            for b, (_, p) in zip(buf, self._params, strict=True):
                b.copy_(p)
        self._buf_kind, self._buf_epoch = "snapshot", epoch

    def replace_epoch(self, epoch: int) -> dict[str, Any] | None:
        """Apply the sampled update in a sampled epoch; None in a real one."""
        return self.sampled_update(epoch) if self.should_skip(epoch) else None

    def on_epoch_end(self, epoch: int, record: dict[str, Any] | None = None) -> dict[str, Any] | None:
        """After a real epoch, turn the snapshot into the epoch's update (in place).

        ``record["loss"]`` (the evaluated loss, if given) feeds the guard: after a sampled
        epoch whose loss rose too much, the guard rolls the sample back, asks the loop to
        evaluate again (``run.control.should_evaluate``) and returns its decision.
        """
        loss = None if record is None else record.get("loss")
        fields = None
        if loss is not None and self._guard_pending(epoch):
            before = self._last_val_loss
            rolled_back = self.guard(before, loss)  # type: ignore[arg-type]
            self._pending_rollback = None  # decided: checkpoints need not carry the pre-sample copy
            fields = {"guard": {"loss_before": before, "loss_after": loss, "rolled_back": rolled_back}}
            if rolled_back and self._run is not None:
                self._run.control.should_evaluate = True
            if not rolled_back:  # rolled back: the model, hence its loss, is the previous one
                self._last_val_loss = float(loss)
        elif loss is not None:
            self._last_val_loss = float(loss)
        self._last_finished = epoch
        if self._buf_kind == "snapshot" and self._buf_epoch == epoch:
            assert self._buf is not None
            with torch.no_grad():
                for b, (_, p) in zip(self._buf, self._params, strict=True):
                    b.neg_().add_(p)  # p - snapshot, exactly, without a temporary
            self._buf_kind = "delta"
        return fields

    def _guard_pending(self, epoch: int) -> bool:
        return (
            self.guard_threshold is not None
            and self._pending_rollback == epoch
            and self._last_val_loss is not None
        )

    # ------------------------------------------------------------------ sampling
    def sampled_update(self, epoch: int | None = None) -> dict[str, Any]:
        """Add a sampled update to every trainable parameter; returns record fields.

        Each tensor's draw comes from :func:`~greenprop.gradsamp.sampling.sample_update`,
        fitted to the update of the most recent real epoch, from a generator seeded by
        ``(seed, epoch)`` (one per device; the tensors draw from it in model order).
        """
        epoch = self._current_epoch if epoch is None else epoch
        if epoch is None:
            raise GreenpropError("sampled_update: pass the epoch (or call on_epoch_start first)")
        if self._buf_kind != "delta" or self._buf is None:
            raise RuntimeError(
                "GradSamp has no real update to sample from: call on_epoch_start(epoch) and "
                "on_epoch_end(epoch) around at least one real epoch first"
            )
        from_epoch = self._buf_epoch
        guard = self.guard_threshold is not None
        if guard and self.strategy.allow_consecutive and self._pre is None:
            self._pre = [torch.empty_like(p) for _, p in self._params]
        seed = gradsamp_draw_seed(self.seed, epoch)
        generators: dict[torch.device, torch.Generator] = {}
        fit_generator = torch.Generator().manual_seed(seed)
        stats = DrawStats()
        with torch.no_grad():
            for i, (name, p) in enumerate(self._params):
                delta = self._buf[i]
                if delta.device not in generators:
                    generators[delta.device] = torch.Generator(device=delta.device).manual_seed(seed)
                draw, fitted = sample_update(
                    delta,
                    update=self.update,
                    tolerance=self.tolerance,
                    tolerance_mode=self.tolerance_mode,
                    update_scale=self.update_scale,
                    clamp=self.clamp,
                    beta_bounds=self.beta_bounds,
                    fit_method=self.fit_method,
                    generator=generators[delta.device],
                    fit_generator=fit_generator,
                    name=name,
                )
                stats.add(name, delta, draw, fitted)
                if guard:
                    (self._pre if self.strategy.allow_consecutive else self._buf)[i].copy_(p)
                p.add_(draw.to(p.dtype))
                del draw
        if guard:
            if not self.strategy.allow_consecutive:
                self._buf_kind, self._buf_epoch = "pre_sample", epoch
            self._pending_rollback = epoch
        self.last_fits = stats.fits
        self.sampled_epochs.append(epoch)
        self.fallback_count += len(stats.fallbacks)
        summary = {"from_epoch": from_epoch, "update": self.update, "tensors": len(self._params)}
        summary.update(stats.summary(record_fits=self.record_fits))
        return {"sampled": True, "ggd": summary}

    # ------------------------------------------------------------------ guard
    def guard(self, val_loss_before: float, val_loss_after: float) -> bool:
        """Roll the last sampled epoch back if it made the validation loss worse.

        Call it after evaluating a sampled epoch (before the next epoch starts). Rolls back
        (restores the pre-sample parameters exactly) and returns True when ``val_loss_after``
        is NaN/Inf or exceeds ``val_loss_before`` by more than ``guard_threshold *
        |val_loss_before|``; otherwise returns False. Returns False when the last epoch was
        not sampled.
        """
        if self.guard_threshold is None:
            raise GreenpropError("GradSamp.guard needs guard_threshold (it is off)")
        epoch = self._pending_rollback
        if epoch is None:
            return False
        before, after = float(val_loss_before), float(val_loss_after)
        rose = not math.isfinite(after) or (
            math.isfinite(before) and after - before > self.guard_threshold * abs(before)
        )
        if not rose:
            return False
        source = self._pre if self.strategy.allow_consecutive else self._buf
        assert source is not None
        with torch.no_grad():
            for s, (_, p) in zip(source, self._params, strict=True):
                p.copy_(s)
        self._pending_rollback = None
        self.rolled_back_epochs.append(epoch)
        return True

    # ------------------------------------------------------------------ state
    def _buffer(self) -> list[torch.Tensor]:
        if self._buf is None:
            self._buf = [torch.empty_like(p, memory_format=torch.preserve_format) for _, p in self._params]
        return self._buf

    def _next_epoch_samples(self) -> bool:
        nxt = 0 if self._last_finished is None else self._last_finished + 1
        return nxt < self.epochs and self.should_skip(nxt)

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to skip the same epochs and draw the same samples.

        The buffer (one copy of the parameters) is included only when it is still needed:
        the next epoch is sampled, a rollback is pending, or a real epoch is in progress.
        Tensors are returned by reference, like ``nn.Module.state_dict``.
        """
        need_buf = self._buf is not None and (
            self._buf_kind == "snapshot"
            or (self._buf_kind == "delta" and self._next_epoch_samples())
            or (self._buf_kind == "pre_sample" and self._pending_rollback is not None)
        )
        need_pre = self._pre is not None and self._pending_rollback is not None
        return {
            "format": _STATE_FORMAT,
            "strategy": self.strategy.spec,
            "allow_consecutive": self.strategy.allow_consecutive,
            "strategy_seed": int(self.strategy.seed),
            "seed": self.seed,
            "epochs": self.epochs,
            "names": [n for n, _ in self._params],
            "buffer_kind": self._buf_kind if need_buf else "empty",
            "buffer_epoch": self._buf_epoch if need_buf else None,
            "buffer": list(self._buf) if need_buf and self._buf is not None else None,
            "pre_buffer": list(self._pre) if need_pre and self._pre is not None else None,
            "pending_rollback": self._pending_rollback,
            "current_epoch": self._current_epoch,
            "last_finished": self._last_finished,
            "sampled_epochs": list(self.sampled_epochs),
            "rolled_back_epochs": list(self.rolled_back_epochs),
            "fallback_count": self.fallback_count,
            "last_val_loss": self._last_val_loss,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; refuses a state from another strategy, seed or model."""
        if state.get("format") != _STATE_FORMAT:
            raise GreenpropError(f"GradSamp state has format {state.get('format')!r}, expected 1")
        mine = (self.strategy.spec, self.strategy.allow_consecutive, int(self.strategy.seed), self.seed)
        theirs = (state["strategy"], state["allow_consecutive"], state["strategy_seed"], state["seed"])
        if mine != theirs:
            raise GreenpropError(
                "GradSamp state was saved with (strategy, allow_consecutive, strategy seed, seed) "
                f"= {theirs}, this run uses {mine}"
            )
        names = [n for n, _ in self._params]
        if list(state["names"]) != names:
            raise GreenpropError("GradSamp state was saved for a model with other parameters")
        kind = state["buffer_kind"]
        if kind != "empty":
            buf = self._buffer()
            with torch.no_grad():
                for b, saved in zip(buf, _checked(state["buffer"], buf), strict=True):
                    b.copy_(saved)
        if state.get("pre_buffer") is not None:
            if self._pre is None:
                self._pre = [torch.empty_like(p) for _, p in self._params]
            with torch.no_grad():
                for b, saved in zip(self._pre, _checked(state["pre_buffer"], self._pre), strict=True):
                    b.copy_(saved)
        self._buf_kind = kind
        self._buf_epoch = state["buffer_epoch"]
        self._pending_rollback = state["pending_rollback"]
        self._current_epoch = state["current_epoch"]
        self._last_finished = state["last_finished"]
        self.sampled_epochs = list(state["sampled_epochs"])
        self.rolled_back_epochs = list(state["rolled_back_epochs"])
        self.fallback_count = int(state["fallback_count"])
        self._last_val_loss = state.get("last_val_loss")

    def extra_repr(self) -> str:
        return (
            f"strategy={self.strategy.label}, update={self.update}, tolerance={self.tolerance:g} "
            f"({self.tolerance_mode}), clamp={self.clamp}, beta_bounds={self.beta_bounds}"
        )

    def __repr__(self) -> str:
        return f"GradSamp({self.extra_repr()})"


def _checked(saved: list[torch.Tensor] | None, like: list[torch.Tensor]) -> Iterator[torch.Tensor]:
    if saved is None or len(saved) != len(like):
        raise GreenpropError("GradSamp state has a missing or mismatched buffer")
    for s, b in zip(saved, like, strict=True):
        if tuple(s.shape) != tuple(b.shape):
            raise GreenpropError(
                f"GradSamp state buffer has shape {tuple(s.shape)}, expected {tuple(b.shape)}"
            )
        yield s

