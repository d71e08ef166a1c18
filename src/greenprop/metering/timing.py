"""Wall-clock time per training phase (forward, backward, optimizer, ...).

CUDA kernels run asynchronously: a phase that only reads the host clock would
measure kernel launches, not the work. On CUDA (and MPS) the timer synchronizes the
device when a phase starts and ends, so each phase is charged the time its kernels
took. That costs a little throughput, which is the price of an honest split; on CPU
the timer never touches the device APIs.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from greenprop.metering.quantity import Quantity


@dataclass
class Span:
    """The phase an open timing is charged to."""

    name: str


class PhaseTimer:
    """Accumulates wall seconds per phase name.

    Different phases may nest (e.g. ``"step"`` around ``"forward"``); entering a
    phase that is already open raises, since its time would be counted twice.

    Args:
        device: the device the timed work runs on; decides whether to synchronize.
        clock: seconds as a float; ``time.perf_counter`` (tests pass a fake clock).
    """

    def __init__(
        self,
        device: torch.device | str = "cpu",
        *,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.device = torch.device(device)
        self._clock = clock
        self._totals: dict[str, float] = {}
        self._counts: dict[str, int] = {}
        self._open: set[str] = set()

    @property
    def source(self) -> str:
        if self.device.type in ("cuda", "mps"):
            return f"time.perf_counter after torch.{self.device.type}.synchronize"
        return "time.perf_counter"

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        elif self.device.type == "mps":
            torch.mps.synchronize()

    @contextmanager
    def phase(self, name: str) -> Iterator[Span]:
        """Time the body and add its seconds to ``name`` (also when the body raises).

        The body may set the yielded span's ``name`` to charge the time to another phase
        once it knows what the work was (e.g. an epoch a method might have replaced).
        """
        if name in self._open:
            raise RuntimeError(
                f"phase {name!r} is already being timed; close it before entering it again"
            )
        self._open.add(name)
        span = Span(name)
        try:
            self._synchronize()
            start = self._clock()
            try:
                yield span
            finally:
                self._synchronize()
                elapsed = self._clock() - start
                self._totals[span.name] = self._totals.get(span.name, 0.0) + elapsed
                self._counts[span.name] = self._counts.get(span.name, 0) + 1
        finally:
            self._open.discard(name)

    def is_open(self, name: str) -> bool:
        """Whether phase ``name`` is being timed now (a probe inside the work can tell whose it is)."""
        return name in self._open

    def totals(self) -> dict[str, float]:
        """Seconds per phase, in the order phases were first entered."""
        return dict(self._totals)

    def counts(self) -> dict[str, int]:
        """How many times each phase was entered."""
        return dict(self._counts)

    def reset(self) -> None:
        """Forget all totals (e.g. at the start of an epoch); open phases may not be reset."""
        if self._open:
            raise RuntimeError(f"cannot reset while phases are open: {sorted(self._open)}")
        self._totals.clear()
        self._counts.clear()

    def to_quantities(self) -> dict[str, Quantity]:
        """Totals as measured Quantities in seconds."""
        return {
            name: Quantity(seconds, "s", "measured", self.source)
            for name, seconds in self._totals.items()
        }
