"""A reported figure together with where it came from."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

Kind = Literal["measured", "estimated", "unavailable", "counted"]
KINDS: tuple[str, ...] = ("measured", "estimated", "unavailable", "counted")


@dataclass(frozen=True)
class Quantity:
    """A value with its unit and provenance.

    ``kind`` says how the value was obtained; an ``unavailable`` quantity has
    ``value=None`` (never 0), so a missing measurement cannot be mistaken for a zero.
    """

    value: float | None
    unit: str
    kind: Kind
    source: str

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if (self.kind == "unavailable") != (self.value is None):
            raise ValueError(
                f"an unavailable quantity has value None and only it does "
                f"(kind={self.kind!r}, value={self.value!r})"
            )

    @classmethod
    def unavailable(cls, unit: str, source: str) -> Quantity:
        return cls(None, unit, "unavailable", source)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Quantity:
        return cls(data["value"], data["unit"], data["kind"], data["source"])

    def __add__(self, other: Quantity) -> Quantity:
        """Sum two figures; the result is only as good as the weaker of the two."""
        if self.unit != other.unit:
            raise ValueError(f"cannot add {self.unit} to {other.unit}")
        if self.value is None or other.value is None:
            missing = self if self.value is None else other
            return Quantity.unavailable(self.unit, missing.source)
        order = ["counted", "measured", "estimated"]
        kind = max(self.kind, other.kind, key=order.index)
        source = self.source if self.source == other.source else f"{self.source}; {other.source}"
        return Quantity(self.value + other.value, self.unit, kind, source)

    def format(self, scale: float = 1.0, unit: str | None = None, digits: int = 3) -> str:
        """Human-readable form; unavailable prints as 'n/a', estimates are marked with '~'."""
        if self.value is None:
            return "n/a"
        text = f"{self.value / scale:.{digits}g} {unit or self.unit}"
        return f"~{text} (est.)" if self.kind == "estimated" else text
