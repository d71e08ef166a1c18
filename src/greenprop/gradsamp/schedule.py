"""GradSamp's epoch-sampling strategies: which epochs are replaced by a sampled update.

Four rules from the GradSamp paper (Section 4.1), over ``E`` epochs counted from 0:

========================  ==========================================  ===================
strategy                  rule                                        realised saving
========================  ==========================================  ===================
``Periodic(P)``  Pe=P     P real epochs, then one sampled (P=5:       ``1/(P+1)``
                          epochs 5, 11, 17, ... sampled)
``Probabilistic(rho)``    after each real epoch the next is sampled   ``~rho/(1+rho)``
                          with probability rho
``DelayedPeriodic(P)``    nothing in the first half (``E // 2``       ``~1/(2(P+1))``
                          epochs), then Periodic(P) counted from it
``DelayedRandom(rho)``    nothing in the first half, then             ``~rho/(2(1+rho))``
                          Probabilistic(rho)
========================  ==========================================  ===================

Common rules: the first epoch and (when ``epochs`` is known) the last epoch are always
real, and a sampled epoch always follows a real one. The latter is what the paper's own
numbers show (Appendix D: Pe=5 over 200 epochs is 167 real + 33 sampled, not 160 + 40;
Table 2's TFLOPs give ~rho/(1+rho) for Pr); ``allow_consecutive=True`` lifts it (then Pr
saves ~rho), a documented deviation.

Every decision is a pure function of ``(seed, epoch)``: a random epoch's coin is drawn from
a NumPy generator seeded with ``(seed, epoch)``, not from a running RNG, so a resumed run
takes the same decisions without storing any RNG state.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from functools import lru_cache
from typing import ClassVar

from greenprop.errors import GreenpropError
from greenprop.seeding import strategy_coin

__all__ = [
    "STRATEGY_KINDS",
    "DelayedPeriodic",
    "DelayedRandom",
    "Periodic",
    "Probabilistic",
    "Strategy",
    "parse_strategy",
]

@lru_cache(maxsize=1 << 16)
def _coin(seed: int, epoch: int) -> float:
    """Uniform [0, 1) value for ``(seed, epoch)``; the same on every machine and every run."""
    return strategy_coin(seed, epoch)


def _check_int(owner: str, name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise GreenpropError(f"{owner}: {name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_rho(owner: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise GreenpropError(f"{owner}: rho must be a number in [0, 1), got {value!r}")
    rho = float(value)
    if not (0.0 <= rho < 1.0):
        raise GreenpropError(f"{owner}: rho must be in [0, 1), got {value!r}")
    return rho


@dataclass(frozen=True)
class Strategy:
    """Base class: decides, per epoch, whether GradSamp replaces it by a sampled update.

    Args:
        seed: seeds the coins of the random strategies (decision of epoch ``e`` depends only
            on ``(seed, e)``).
        epochs: the run's length; needed by the delayed strategies (to find the half)
            and to keep the last epoch real. Methods accept it as an override.
        allow_consecutive: allow a sampled epoch right after a sampled one (off: the paper's
            realised behaviour).
    """

    seed: int = field(default=0, kw_only=True)
    epochs: int | None = field(default=None, kw_only=True)
    allow_consecutive: bool = field(default=False, kw_only=True)

    #: Short kind used in specs (``pe``, ``pr``, ``dp``, ``dr``).
    kind: ClassVar[str] = ""
    #: Whether the rule needs ``epochs`` (the delayed ones do).
    needs_total: ClassVar[bool] = False

    def __post_init__(self) -> None:
        owner = type(self).__name__
        if isinstance(self.seed, bool) or not isinstance(self.seed, numbers.Integral):
            raise GreenpropError(f"{owner}: seed must be an integer, got {self.seed!r}")
        if self.epochs is not None:
            _check_int(owner, "epochs", self.epochs, 1)
        if not isinstance(self.allow_consecutive, bool):
            raise GreenpropError(
                f"{owner}: allow_consecutive must be True or False, got {self.allow_consecutive!r}"
            )

    # -- the rule ---------------------------------------------------------------------------
    def _wants(self, epoch: int, total: int | None) -> bool:
        """Whether the rule would sample ``epoch`` if the previous epoch was real."""
        raise NotImplementedError

    # -- reporting --------------------------------------------------------------------------
    @property
    def label(self) -> str:
        """The paper's name, e.g. ``Pe=5`` or ``Pr=0.2``."""
        raise NotImplementedError

    @property
    def spec(self) -> str:
        """The string :func:`parse_strategy` reads back, e.g. ``pe:5``."""
        raise NotImplementedError

    @property
    def nominal_saving(self) -> float:
        """The saving the paper's labels state (1/P, rho, and half of that when delayed).

        It overstates the realised saving; report both.
        """
        raise NotImplementedError

    def _asymptotic_saving(self) -> float:
        raise NotImplementedError

    # -- decisions --------------------------------------------------------------------------
    def _total(self, epochs: int | None) -> int | None:
        total = self.epochs if epochs is None else epochs
        if total is not None:
            _check_int(type(self).__name__, "epochs", total, 1)
        elif self.needs_total:
            raise GreenpropError(f"{type(self).__name__}: epochs is needed (the delay is half the run)")
        return total

    def should_skip(self, epoch: int, epochs: int | None = None) -> bool:
        """True when ``epoch`` is sampled instead of trained (epochs count from 0)."""
        total = self._total(epochs)
        epoch = _check_int(type(self).__name__, "epoch", epoch, 0)
        if total is not None and epoch >= total:
            raise GreenpropError(f"epoch {epoch} is outside a run of {total} epochs")
        if epoch == 0 or (total is not None and epoch == total - 1):
            return False
        return _mask(self, total, epoch + 1)[epoch]

    def skipped_epochs(self, epochs: int | None = None) -> list[int]:
        """The realised set of sampled epochs of a run, sorted."""
        total = self._total(epochs)
        if total is None:
            raise GreenpropError(f"{type(self).__name__}: epochs is needed for the skip set")
        mask = _mask(self, total, total)
        return [e for e in range(1, total - 1) if mask[e]]

    def realised_saving(self, epochs: int | None = None) -> float:
        """Fraction of epochs this seed actually samples (the saving of the run)."""
        total = self._total(epochs)
        if total is None:
            raise GreenpropError(f"{type(self).__name__}: epochs is needed")
        return len(self.skipped_epochs(total)) / total

    def expected_saving(self, epochs: int | None = None) -> float:
        """Expected fraction of sampled epochs over a run of ``epochs``.

        Exact for the run's length (first/last epoch real, no two sampled in a row); without
        a length, the long-run value (``1/(P+1)``, ``rho/(1+rho)``; ``rho`` if consecutive
        sampled epochs are allowed).
        """
        total = self._total(epochs)
        if total is None:
            return self._asymptotic_saving()
        return self._expected_count(total) / total

    def _expected_count(self, total: int) -> float:
        return float(len(self.skipped_epochs(total)))

    def describe(self, epochs: int | None = None) -> dict[str, object]:
        """Label, nominal, expected and (with a length) realised saving, for reports."""
        total = self._total(epochs)
        out: dict[str, object] = {
            "strategy": self.label,
            "spec": self.spec,
            "seed": int(self.seed),
            "allow_consecutive": self.allow_consecutive,
            "nominal_saving": self.nominal_saving,
            "expected_saving": self.expected_saving(total),
        }
        if total is not None:
            skipped = self.skipped_epochs(total)
            out.update(epochs=total, skipped_epochs=skipped, realised_saving=len(skipped) / total)
        return out


def _mask(strategy: Strategy, total: int | None, n: int) -> tuple[bool, ...]:
    """Decisions for epochs ``0..n-1`` (first epoch real, no forced-real last epoch).

    The last-epoch rule is applied by the caller: forcing the final epoch real changes no
    earlier decision. Computed for a power-of-two length and cached, so a run asking epoch by
    epoch costs O(E log E), not O(E^2).
    """
    size = max(64, 1 << (max(n, 1) - 1).bit_length())
    if total is not None:
        size = min(size, total)
    return _mask_cached(strategy, total, max(size, n))


@lru_cache(maxsize=256)
def _mask_cached(strategy: Strategy, total: int | None, n: int) -> tuple[bool, ...]:
    out = [False] * n
    for e in range(1, n):
        if (strategy.allow_consecutive or not out[e - 1]) and strategy._wants(e, total):
            out[e] = True
    return tuple(out)


@dataclass(frozen=True)
class Periodic(Strategy):
    """``Pe=P``: P real epochs, then one sampled, repeating (P=5: epochs 5, 11, 17, ...)."""

    P: int
    kind: ClassVar[str] = "pe"

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_int(type(self).__name__, "P", self.P, 1)

    def _wants(self, epoch: int, total: int | None) -> bool:
        return (epoch + 1) % (self.P + 1) == 0

    @property
    def label(self) -> str:
        return f"Pe={self.P}"

    @property
    def spec(self) -> str:
        return f"pe:{self.P}"

    @property
    def nominal_saving(self) -> float:
        return 1.0 / self.P

    def _asymptotic_saving(self) -> float:
        return 1.0 / (self.P + 1)


@dataclass(frozen=True)
class Probabilistic(Strategy):
    """``Pr=rho``: after each real epoch, the next is sampled with probability ``rho``."""

    rho: float
    kind: ClassVar[str] = "pr"

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "rho", _check_rho(type(self).__name__, self.rho))

    def _start(self, total: int | None) -> int:
        return 1

    def _wants(self, epoch: int, total: int | None) -> bool:
        return epoch >= self._start(total) and _coin(int(self.seed), epoch) < self.rho

    @property
    def label(self) -> str:
        return f"Pr={self.rho:g}"

    @property
    def spec(self) -> str:
        return f"pr:{self.rho:g}"

    @property
    def nominal_saving(self) -> float:
        return self.rho

    def _asymptotic_saving(self) -> float:
        return self.rho if self.allow_consecutive else self.rho / (1.0 + self.rho)

    def _expected_count(self, total: int) -> float:
        # p_e = P(epoch e sampled) = rho * P(epoch e-1 real), from the first eligible epoch;
        # the first and last epoch are real.
        start = max(1, self._start(total))
        p_prev, count = 0.0, 0.0
        for e in range(total):
            if e < start or e == total - 1:
                p = 0.0
            else:
                p = self.rho if self.allow_consecutive else self.rho * (1.0 - p_prev)
            count += p
            p_prev = p
        return count


@dataclass(frozen=True)
class DelayedPeriodic(Periodic):
    """``DP=P``: no sampling in the first half (``epochs // 2`` epochs), then Pe=P
    counted from the half (with E=200, P=5: epochs 105, 111, ...)."""

    kind: ClassVar[str] = "dp"
    needs_total: ClassVar[bool] = True

    def _wants(self, epoch: int, total: int | None) -> bool:
        assert total is not None
        half = total // 2
        return epoch >= half and (epoch - half + 1) % (self.P + 1) == 0

    @property
    def label(self) -> str:
        return f"DP={self.P}"

    @property
    def spec(self) -> str:
        return f"dp:{self.P}"

    @property
    def nominal_saving(self) -> float:
        return 1.0 / (2 * self.P)

    def _asymptotic_saving(self) -> float:  # pragma: no cover - needs_total makes it unreachable
        return 1.0 / (2 * (self.P + 1))


@dataclass(frozen=True)
class DelayedRandom(Probabilistic):
    """``DR=rho``: no sampling in the first half (``epochs // 2`` epochs), then Pr=rho."""

    kind: ClassVar[str] = "dr"
    needs_total: ClassVar[bool] = True

    def _start(self, total: int | None) -> int:
        assert total is not None
        return total // 2

    @property
    def label(self) -> str:
        return f"DR={self.rho:g}"

    @property
    def spec(self) -> str:
        return f"dr:{self.rho:g}"

    @property
    def nominal_saving(self) -> float:
        return self.rho / 2

    def _asymptotic_saving(self) -> float:  # pragma: no cover - needs_total makes it unreachable
        base = self.rho if self.allow_consecutive else self.rho / (1.0 + self.rho)
        return base / 2


STRATEGY_KINDS: dict[str, type[Strategy]] = {
    "pe": Periodic,
    "pr": Probabilistic,
    "dp": DelayedPeriodic,
    "dr": DelayedRandom,
}
_ALIASES = {
    "periodic": "pe",
    "probabilistic": "pr",
    "random": "pr",
    "delayed-periodic": "dp",
    "delayed_periodic": "dp",
    "delayed-random": "dr",
    "delayed_random": "dr",
}


def parse_strategy(
    spec: str | Strategy,
    *,
    epochs: int | None = None,
    seed: int = 0,
    allow_consecutive: bool = False,
) -> Strategy:
    """Parse ``"pe:5"``, ``"pr:0.2"``, ``"dp:5"`` or ``"dr:0.2"`` (also ``Pe=5``, ``periodic:5``).

    A :class:`Strategy` passes through (given ``epochs`` fills a missing length).
    Errors are :class:`~greenprop.errors.GreenpropError` (a ValueError) naming the bad part.
    """
    if isinstance(spec, Strategy):
        if spec.epochs is None and epochs is not None:
            from dataclasses import replace

            return replace(spec, epochs=epochs)
        return spec
    if not isinstance(spec, str):
        raise GreenpropError(f"strategy must be a string like 'pe:5', got {spec!r}")
    text = spec.strip()
    sep = ":" if ":" in text else "="
    kind, found, value = text.partition(sep)
    kind = kind.strip().lower()
    kind = _ALIASES.get(kind, kind)
    if not found or not value.strip():
        raise GreenpropError(f"strategy {spec!r} must look like pe:5, pr:0.2, dp:5 or dr:0.2 (kind:value)")
    if kind not in STRATEGY_KINDS:
        raise GreenpropError(f"strategy {spec!r}: unknown kind {kind!r}; choose from pe, pr, dp, dr")
    cls = STRATEGY_KINDS[kind]
    value = value.strip()
    common = {"seed": seed, "epochs": epochs, "allow_consecutive": allow_consecutive}
    if issubclass(cls, Periodic):
        try:
            period = int(value)
        except ValueError:
            raise GreenpropError(f"strategy {spec!r}: P must be an integer >= 1, got {value!r}") from None
        return cls(period, **common)
    try:
        rho = float(value)
    except ValueError:
        raise GreenpropError(f"strategy {spec!r}: rho must be a number in [0, 1), got {value!r}") from None
    if not math.isfinite(rho):
        raise GreenpropError(f"strategy {spec!r}: rho must be in [0, 1), got {value!r}")
    return cls(rho, **common)
