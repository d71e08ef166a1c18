"""Pure functions of training progress, so a resumed run recomputes them exactly.

- keep-ratio schedules for ssProp (:class:`KeepSchedule`): constant, linear, cosine,
  bar; per epoch or per iteration; warmup; interleave.
- epoch-sampling strategies for GradSamp: :class:`Periodic`, :class:`Probabilistic`,
  :class:`DelayedPeriodic`, :class:`DelayedRandom` (``parse_strategy("pe:5")``).
"""

from greenprop.schedules.keep import SCHEDULE_KINDS, KeepSchedule, keep_shape
from greenprop.schedules.strategies import (
    DelayedPeriodic,
    DelayedRandom,
    Periodic,
    Probabilistic,
    Strategy,
    parse_strategy,
)

__all__ = [
    "SCHEDULE_KINDS",
    "DelayedPeriodic",
    "DelayedRandom",
    "KeepSchedule",
    "Periodic",
    "Probabilistic",
    "Strategy",
    "keep_shape",
    "parse_strategy",
]
