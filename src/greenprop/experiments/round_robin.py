"""Round-robin by epoch: every configuration's epoch 1, then every configuration's epoch 2, ...

Load on a shared machine drifts: other jobs start and stop. Configurations trained one
after another meet different loads, so their wall-time ratios measure the machine as
much as the method. Interleaving their epochs spreads the drift over all of them alike.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

__all__ = ["epoch_slices"]

T = TypeVar("T")


def epoch_slices(
    runs: Sequence[T], epochs: int, *, done: Callable[[T], int], finished: Callable[[T], bool]
) -> Iterator[tuple[T, int]]:
    """``(run, epoch)``: train ``run`` up to ``epoch`` (1-based), in round-robin order.

    ``done`` and ``finished`` are asked lazily, just before each slice, so a run that
    diverged drops out, and runs that are ahead (resumed after an interrupt) wait for
    the others to catch up.
    """
    for epoch in range(1, epochs + 1):
        for run in runs:
            if not finished(run) and done(run) < epoch:
                yield run, epoch
