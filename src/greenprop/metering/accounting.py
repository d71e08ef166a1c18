"""How a method tells the FLOP meter what its steps cost, when counting alone cannot.

The trainer counts a step's FLOPs with ``FlopCounterMode`` on a slice of a batch, once
per distinct configuration (counting is slow). A method whose steps change over
training, or whose backward is random, exposes a :class:`FlopAccount` as its
controller's ``flop_account`` attribute; the trainer detects it with
:func:`flop_accounts`. This keeps FLOP bookkeeping out of the controller hooks, as a
separate monitor does in Composer and Lightning.
"""

from __future__ import annotations

import contextlib
from collections.abc import Hashable, Iterable
from typing import Any, Protocol, runtime_checkable

from greenprop.metering.flops import FlopCount

__all__ = ["FlopAccount", "HasFlopAccount", "flop_accounts"]


class FlopAccount:
    """A method's part in counting a step's FLOPs. Every method has a no-op default.

    The trainer, per training step (after the controllers' ``on_step_start``):

    1. if the tuple of all accounts' :meth:`cost_key` (with the batch's sample shapes) is
       new, counts the step's FLOPs again inside every account's :meth:`counting` context;
    2. tells every account what it booked for the batch (:meth:`booked`);
    3. adds each account's :meth:`adjustment` to the counted forward/backward.
    """

    def cost_key(self, epoch: int, step: int) -> Hashable:
        """What this step's FLOPs depend on (e.g. each layer's kept channels); None: nothing."""
        return None

    def counting(self) -> contextlib.AbstractContextManager[Any]:
        """Context the count runs in: e.g. make a random backward dense, protect generators."""
        return contextlib.nullcontext()

    def adjustment(self, epoch: int, step: int) -> dict[str, float]:
        """FLOPs to add to this step's ``forward`` / ``backward`` (negative: saved).

        For work the counter cannot see on its slice: a random backward's saving, or a
        method's own extra passes.
        """
        return {}

    def describe(self) -> str | None:
        """One line for the FLOP provenance, if the account changes the counted figures."""
        return None

    def booked(self, count: FlopCount, samples: int) -> None:
        """The counted FLOPs the loop booked for one batch (``samples`` samples), before any adjustment.

        For an account that reports ratios against the loop's count: the count is per
        batch shape, so with batches of varying length (text trimmed to its longest
        sequence) no single per-sample figure is the dense reference.
        """


@runtime_checkable
class HasFlopAccount(Protocol):
    """A controller that takes part in FLOP counting."""

    flop_account: FlopAccount


def flop_accounts(controllers: Iterable[Any]) -> list[tuple[str, FlopAccount]]:
    """``(controller name, account)`` of every controller that has a FLOP account."""
    return [
        (getattr(c, "name", type(c).__name__), c.flop_account)
        for c in controllers
        if isinstance(c, HasFlopAccount)
    ]
