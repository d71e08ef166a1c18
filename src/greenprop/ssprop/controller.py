"""SSProp: the controller that drives the keep ratio of converted layers over training."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from greenprop.controller import Controller, RunContext
from greenprop.errors import GreenpropError
from greenprop.ssprop.accounting import SSPropFlops
from greenprop.ssprop.config import SSPropConfig
from greenprop.ssprop.layers import SparseLayer
from greenprop.ssprop.schedule import KeepSchedule
from greenprop.ssprop.surgery import sparse_layers
from greenprop.surgery import not_converted

__all__ = ["SSProp"]


def _tidy(value: float) -> float:
    """Drop float-summation noise (0.39999999999999997 -> 0.4) from reported means."""
    return round(value, 12)


class SSProp(Controller):
    """Sets every converted layer's keep ratio from a schedule, and accounts for it.

    Works with the reference trainer (through the hooks) or any loop::

        model = greenprop.apply_ssprop(model, greenprop.SSPropConfig(keep=0.6))
        ssprop = greenprop.SSProp(model, config, epochs=E, steps_per_epoch=S)
        for epoch in range(E):
            ssprop.on_epoch_start(epoch)
            for step, batch in enumerate(loader):
                ssprop.on_step_start(epoch, step)
                ...  # forward, backward, optimizer step
            fields = ssprop.on_epoch_end(epoch, record={})   # keep, realised/effective keep

    The schedule is a pure function of (epoch, step), so a resumed run recomputes it;
    ``state_dict`` holds only the accounting, the random-selection generators and any
    calibration decisions.

    Accounting (the epoch record fields :meth:`on_epoch_end` returns):

    * ``keep``: this epoch's mean scheduled keep over its steps;
    * ``realised_keep``: mean scheduled keep over every step so far (a dense step
      counts 1.0); ``1 - realised_keep`` is the nominal backward saving of the
      converted layers;
    * ``effective_keep``: like ``realised_keep`` but with each layer's actual kept
      fraction ``k / C`` (after flooring, ``round_to``, and calibrated-dense layers)
      weighted by the layer's backward cost in its last forward. Only steps announced
      through :meth:`on_step_start` are counted.

    Args:
        model: a model converted by :func:`greenprop.apply_ssprop`.
        schedule: an :class:`SSPropConfig` (its schedule settings are used), a
            :class:`KeepSchedule`, or a constant keep ratio.
        epochs, steps_per_epoch: the run's length, if known now; the trainer also
            passes them to :meth:`on_train_start`.
    """

    name = "ssprop"
    rank_local_state = ("generators", "calibration")  # each rank times its own backward

    def __init__(
        self,
        model: nn.Module,
        schedule: SSPropConfig | KeepSchedule | float,
        *,
        epochs: int | None = None,
        steps_per_epoch: int | None = None,
    ) -> None:
        self.layers: dict[str, SparseLayer] = sparse_layers(model)
        if not self.layers:
            raise not_converted("ssProp", "apply_ssprop")
        if isinstance(schedule, SSPropConfig):
            schedule = schedule.keep_schedule()
        elif not isinstance(schedule, KeepSchedule):
            schedule = KeepSchedule("constant", keep=float(schedule))
        if epochs is not None or steps_per_epoch is not None:
            schedule = dataclasses.replace(
                schedule,
                epochs=schedule.epochs if epochs is None else epochs,
                steps_per_epoch=(schedule.steps_per_epoch if steps_per_epoch is None else steps_per_epoch),
            )
            schedule.check_length()
        self.schedule: KeepSchedule = schedule
        self._current: float | None = None
        self._steps = 0
        self._keep_sum = 0.0
        self._effective_sum = 0.0
        self._epoch_steps = 0
        self._epoch_keep_sum = 0.0
        #: Recounts FLOPs when a layer's kept channels change (the trainer detects it).
        self.flop_account = SSPropFlops(self.layers)

    # -- driving the layers -------------------------------------------------------

    def set_keep(self, keep: float) -> None:
        """Set ``keep`` on every converted layer (no-op if unchanged)."""
        if keep != self._current:
            for layer in self.layers.values():
                layer.keep = keep
            self._current = keep

    @property
    def current_keep(self) -> float | None:
        """The keep ratio last set on the layers (None before the first hook)."""
        return self._current

    def effective_keep_at(self, keep: float) -> float:
        """Backward-cost-weighted fraction of channels the layers keep at ``keep``."""
        total = kept = 0.0
        for layer in self.layers.values():
            cost = layer.ssprop_channel_cost or layer.weight[0].numel()  # type: ignore[attr-defined]
            channels = layer.weight.shape[0]  # type: ignore[attr-defined]
            total += cost * channels
            kept += cost * channels * layer.kept_fraction(keep)
        return kept / total if total else 1.0

    # -- hooks ----------------------------------------------------------------------

    def on_train_start(self, run: RunContext) -> None:
        self.schedule = self.schedule.with_length(run.epochs, run.steps_per_epoch)
        self.schedule.check_length()

    def on_epoch_start(self, epoch: int) -> None:
        self._epoch_steps = 0
        self._epoch_keep_sum = 0.0
        self.set_keep(self.schedule.keep_at(epoch, 0))

    def on_step_start(self, epoch: int, step: int) -> None:
        keep = self.schedule.keep_at(epoch, step)
        self.set_keep(keep)
        self._steps += 1
        self._keep_sum += keep
        self._effective_sum += self.effective_keep_at(keep)
        self._epoch_steps += 1
        self._epoch_keep_sum += keep

    def on_epoch_end(self, epoch: int, record: dict[str, Any]) -> dict[str, float]:
        if self._epoch_steps:
            keep = self._epoch_keep_sum / self._epoch_steps
        else:
            keep = self.schedule.keep_at(epoch, 0)
        return {
            "keep": _tidy(keep),
            "realised_keep": _tidy(self.realised_keep),
            "effective_keep": _tidy(self.effective_keep),
        }

    # -- accounting -----------------------------------------------------------------

    @property
    def realised_keep(self) -> float:
        """Mean scheduled keep over all steps so far (1.0 before any step)."""
        return self._keep_sum / self._steps if self._steps else 1.0

    @property
    def effective_keep(self) -> float:
        """Mean cost-weighted kept fraction over all steps so far (1.0 before any)."""
        return self._effective_sum / self._steps if self._steps else 1.0

    # -- resume ---------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "steps": self._steps,
            "keep_sum": self._keep_sum,
            "effective_sum": self._effective_sum,
            "epoch_steps": self._epoch_steps,
            "epoch_keep_sum": self._epoch_keep_sum,
            "generators": {n: m.generator.get_state() for n, m in self.layers.items()},
            "calibration": {n: dict(m.calibration) for n, m in self.layers.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = set(state.get("generators", {})) ^ set(self.layers)
        if missing:
            raise GreenpropError(
                f"ssprop state does not match the model's converted layers: {sorted(missing)[:5]}"
            )
        self._steps = int(state["steps"])
        self._keep_sum = float(state["keep_sum"])
        self._effective_sum = float(state["effective_sum"])
        self._epoch_steps = int(state.get("epoch_steps", 0))
        self._epoch_keep_sum = float(state.get("epoch_keep_sum", 0.0))
        for name, layer in self.layers.items():
            gen_state = state["generators"][name]
            layer.generator.set_state(torch.as_tensor(gen_state, dtype=torch.uint8))
            layer.calibration.clear()
            layer.calibration.update({int(k): bool(v) for k, v in state["calibration"].get(name, {}).items()})
        self._current = None  # the next hook sets keep on the layers again
