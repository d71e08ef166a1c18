"""Keep-ratio schedules for ssProp: pure functions of (epoch, step).

A schedule says which fraction of output channels the sparse backward keeps at a
given point of training (1.0 = dense). Nothing here has state, so a resumed run
recomputes exactly the same values from its epoch and step counters.

Shapes over the progress ``t`` in [0, 1], from ``keep`` to ``min_keep``:

* ``constant``: ``keep`` throughout;
* ``linear``: straight line from ``keep`` to ``min_keep``;
* ``cosine``: half cosine from ``keep`` to ``min_keep``;
* ``bar``: ``keep`` for the first half, ``min_keep`` for the second.

Progress runs over the epochs after warmup (stepped once per epoch), or, per
iteration, over a period of ``period`` iterations that repeats (the shape restarts
every period). ``warmup`` epochs are dense first; ``interleave`` makes every even
epoch dense (epochs 1, 3, 5, ... are sparse), as in the paper's headline run.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from greenprop.errors import GreenpropError

__all__ = ["SCHEDULE_KINDS", "KeepSchedule", "keep_shape"]

#: Names of the schedule shapes.
SCHEDULE_KINDS: tuple[str, ...] = ("constant", "linear", "cosine", "bar")


def keep_shape(kind: str, t: float, keep: float, min_keep: float) -> float:
    """Value of shape ``kind`` at progress ``t`` (clamped to [0, 1]), from keep to min_keep."""
    t = min(1.0, max(0.0, t))
    if kind == "constant":
        return keep
    if kind == "linear":
        return keep + (min_keep - keep) * t
    if kind == "cosine":
        return min_keep + (keep - min_keep) * 0.5 * (1.0 + math.cos(math.pi * t))
    if kind == "bar":
        return keep if t < 0.5 else min_keep
    raise GreenpropError(f"schedule must be one of {SCHEDULE_KINDS}, got {kind!r}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class KeepSchedule:
    """The keep ratio over training; ``keep_at(epoch, step)`` is a pure function.

    Args:
        kind: one of :data:`SCHEDULE_KINDS`.
        keep: starting (and, for "constant", only) keep ratio, in (0, 1].
        min_keep: final keep ratio, in (0, keep]; required unless ``kind="constant"``.
        epochs: total epochs of the run (needed by per-epoch non-constant schedules
            and by per-step schedules without a ``period``).
        steps_per_epoch: iterations per epoch (needed by per-step schedules).
        period: per-iteration schedule repeating every ``period`` (>= 1) iterations,
            counted from the end of warmup. Implies ``per_step``.
        per_step: step per iteration; without ``period`` one cycle spans the whole
            post-warmup run.
        warmup: dense epochs at the start (>= 0).
        interleave: even epochs dense, odd epochs sparse (after warmup).
    """

    kind: str = "constant"
    keep: float = 1.0
    min_keep: float | None = None
    epochs: int | None = None
    steps_per_epoch: int | None = None
    period: int | None = None
    per_step: bool = False
    warmup: int = 0
    interleave: bool = False

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULE_KINDS:
            raise GreenpropError(f"schedule must be one of {SCHEDULE_KINDS}, got {self.kind!r}")
        if not _is_real(self.keep) or not 0.0 < self.keep <= 1.0:
            raise GreenpropError(f"keep must be in (0, 1], got {self.keep!r}")
        if self.min_keep is not None:
            if not _is_real(self.min_keep) or not 0.0 < self.min_keep <= 1.0:
                raise GreenpropError(f"min_keep must be in (0, 1], got {self.min_keep!r}")
            if self.min_keep > self.keep:
                raise GreenpropError(f"min_keep ({self.min_keep}) must not exceed keep ({self.keep})")
        elif self.kind != "constant":
            raise GreenpropError(f"schedule={self.kind!r} needs min_keep (its final keep ratio)")
        if self.period is not None and (not _is_int(self.period) or self.period < 1):
            raise GreenpropError(f"period must be an integer >= 1, got {self.period!r}")
        for name in ("epochs", "steps_per_epoch"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value < 1):
                raise GreenpropError(f"{name} must be an integer >= 1, got {value!r}")
        if not _is_int(self.warmup) or self.warmup < 0:
            raise GreenpropError(f"warmup must be an integer >= 0, got {self.warmup!r}")
        for name in ("per_step", "interleave"):
            if not isinstance(getattr(self, name), bool):
                raise GreenpropError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.period is not None and not self.per_step:
            object.__setattr__(self, "per_step", True)

    @property
    def varies(self) -> bool:
        """True when the sparse-epoch keep changes over training."""
        return self.kind != "constant" and self.min_keep != self.keep

    def with_length(self, epochs: int, steps_per_epoch: int) -> KeepSchedule:
        """The same schedule for a run of ``epochs`` x ``steps_per_epoch``."""
        return dataclasses.replace(self, epochs=epochs, steps_per_epoch=steps_per_epoch)

    def check_length(self) -> None:
        """Raise if the schedule needs a run length it was not given."""
        if not self.varies:
            return
        if self.per_step and self.steps_per_epoch is None:
            raise GreenpropError("a per-step schedule needs steps_per_epoch")
        if (not self.per_step or self.period is None) and self.epochs is None:
            raise GreenpropError(f"schedule={self.kind!r} needs the number of epochs")

    def is_dense_epoch(self, epoch: int) -> bool:
        """True for warmup epochs and, with ``interleave``, the even epochs."""
        return epoch < self.warmup or (self.interleave and epoch % 2 == 0)

    def progress(self, epoch: int, step: int = 0) -> float:
        """Progress ``t`` in [0, 1] of the schedule's shape at (epoch, step)."""
        if not self.varies:
            return 0.0
        self.check_length()
        i = epoch - self.warmup
        if self.per_step:
            spe = self.steps_per_epoch
            assert spe is not None
            period = self.period
            if period is None:
                assert self.epochs is not None
                period = max(1, (self.epochs - self.warmup) * spe)
            g = max(0, i * spe + step)
            return (g % period) / (period - 1) if period > 1 else 0.0
        assert self.epochs is not None
        n = self.epochs - self.warmup
        return min(1.0, max(0.0, i / (n - 1))) if n > 1 else 0.0

    def keep_at(self, epoch: int, step: int = 0) -> float:
        """Keep ratio at ``epoch`` (from 0) and ``step`` within it (from 0)."""
        if self.is_dense_epoch(epoch):
            return 1.0
        if not self.varies:
            return float(self.keep)
        assert self.min_keep is not None
        return keep_shape(self.kind, self.progress(epoch, step), self.keep, self.min_keep)

    def mean_keep(self) -> float:
        """Mean keep over every step of the run (needs epochs and steps_per_epoch).

        1 - mean_keep is the fraction of the converted layers' backward the schedule
        removes, before rounding of k and layers left dense.
        """
        if self.epochs is None or self.steps_per_epoch is None:
            raise GreenpropError("mean_keep needs epochs and steps_per_epoch")
        total = 0.0
        for epoch in range(self.epochs):
            if self.per_step and self.varies and not self.is_dense_epoch(epoch):
                total += sum(self.keep_at(epoch, s) for s in range(self.steps_per_epoch))
            else:
                total += self.keep_at(epoch) * self.steps_per_epoch
        return total / (self.epochs * self.steps_per_epoch)
