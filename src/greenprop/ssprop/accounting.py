"""ssProp's part in FLOP counting: recount when a layer's kept channels change.

The sparse backward runs real, smaller kernels, so ``FlopCounterMode`` sees the saving
directly; the trainer only has to count again when some layer's ``k`` changes, and the
count must not consume the random-selection generators (a resumed run would draw
differently).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

from greenprop.metering.accounting import FlopAccount
from greenprop.ssprop.layers import SparseLayer

__all__ = ["SSPropFlops"]


class SSPropFlops(FlopAccount):
    """Cost key = each converted layer's kept fraction; counting leaves generators as they were."""

    def __init__(self, layers: Mapping[str, SparseLayer]) -> None:
        self.layers = layers

    def cost_key(self, epoch: int, step: int) -> tuple[float, ...]:
        """Each layer's kept fraction (k per layer, calibrated-dense as 1).

        Integer ``k`` changes far less often than a per-step float keep, and a layer
        that calibration turned dense is counted dense.
        """
        return tuple(layer.kept_fraction() for layer in self.layers.values())

    @contextmanager
    def counting(self) -> Iterator[None]:
        states = [(layer.generator, layer.generator.get_state()) for layer in self.layers.values()]
        try:
            yield
        finally:
            for generator, state in states:
                generator.set_state(state)
