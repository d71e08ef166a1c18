"""SSPropConfig: every ssProp setting in one frozen, validated dataclass."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from greenprop.errors import GreenpropError
from greenprop.ssprop.functional import SELECTIONS
from greenprop.ssprop.schedule import KeepSchedule

__all__ = ["LAYER_TYPES", "SSPropConfig"]

#: Layer types ssProp can convert: "conv" (nn.Conv2d) and "linear" (nn.Linear).
LAYER_TYPES: tuple[str, ...] = ("conv", "linear")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class SSPropConfig:
    """Settings of ssProp (scheduled channel-sparse backward), validated on construction.

    ``SSPropConfig(keep=0.6)`` is the simplest use: every Conv2d except the model's
    output layer computes its backward with 60% of its output channels.

    Args:
        keep: fraction of output channels kept in sparse steps, in (0, 1]. Default 0.6
            (the paper's ~40% backward saving). The schedule's starting value.
        schedule: how keep evolves: "constant" (default), "linear" / "cosine" (keep ->
            min_keep), "bar" (keep for the first half, min_keep for the second).
        min_keep: the schedule's final value, in (0, keep]; needed unless constant.
        period: if set (an integer >= 1), the schedule is stepped per iteration and
            repeats every ``period`` iterations; otherwise it is stepped per epoch.
        per_step: step per iteration with one cycle over the whole (post-warmup) run
            when no ``period`` is given. Default False (per epoch).
        warmup: number of dense epochs first. Default 0.
        interleave: alternate dense and sparse epochs (even epochs dense, odd sparse,
            after warmup). The paper's headline run: keep 0.2 interleaved, ~40% saved.
        selection: "topk" (channels with the largest mean |dy|; default) or "random"
            (the paper's ablation; reproducible from ``seed``).
        layers: which layer types to convert: ("conv",) by default; add "linear" to
            include nn.Linear (opt-in: see ``include_output``).
        include_output: also convert the layer producing the model's output (default
            False). That layer is the last Conv2d/Linear in ``model.modules()`` order,
            plus any Conv2d/Linear named ``head`` (the zoo's classifiers). A prototype
            that sparsified a 10-way classifier head at keep 0.4 diverged (9% accuracy).
        min_channels: layers with fewer output channels (per group) stay dense: tiny
            layers save little and pay the ranking overhead. Default 1 (convert all).
        round_to: round k up to a multiple of this (capped at the channel count).
            oneDNN pads channels to 16, so an odd k costs as much as the next multiple.
            Default 1 (no rounding).
        calibrate: time each layer's dense and sparse backward once (per k) on the
            first sparse step and keep it dense where sparse is not faster. Off by
            default (it changes gradients based on timing, so it is not reproducible
            across machines).
        seed: seeds the random selection (each layer gets its own generator).
    """

    keep: float = 0.6
    schedule: str = "constant"
    min_keep: float | None = None
    period: int | None = None
    per_step: bool = False
    warmup: int = 0
    interleave: bool = False
    selection: str = "topk"
    layers: tuple[str, ...] = field(default=("conv",))
    include_output: bool = False
    min_channels: int = 1
    round_to: int = 1
    calibrate: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.layers, str):
            object.__setattr__(self, "layers", _parse_layers(self.layers))
        elif isinstance(self.layers, list):
            object.__setattr__(self, "layers", tuple(self.layers))
        if not isinstance(self.layers, tuple) or not self.layers:
            raise GreenpropError(f"layers must be a non-empty tuple of {LAYER_TYPES}")
        bad = [t for t in self.layers if t not in LAYER_TYPES]
        if bad:
            raise GreenpropError(f"layers: unknown layer type {bad[0]!r}; choose from {LAYER_TYPES}")
        if self.selection not in SELECTIONS:
            raise GreenpropError(f"selection must be one of {SELECTIONS}, got {self.selection!r}")
        for name in ("include_output", "calibrate", "interleave", "per_step"):
            if not isinstance(getattr(self, name), bool):
                raise GreenpropError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if not _is_int(self.min_channels) or self.min_channels < 1:
            raise GreenpropError(f"min_channels must be an integer >= 1, got {self.min_channels!r}")
        if not _is_int(self.round_to) or self.round_to < 1:
            raise GreenpropError(f"round_to must be an integer >= 1, got {self.round_to!r}")
        if not _is_int(self.seed):
            raise GreenpropError(f"seed must be an integer, got {self.seed!r}")
        # The schedule validates keep, schedule, min_keep, period, warmup.
        self.keep_schedule()

    def keep_schedule(self, epochs: int | None = None, steps_per_epoch: int | None = None) -> KeepSchedule:
        """The keep-ratio schedule these settings describe, for a run of that length."""
        return KeepSchedule(
            kind=self.schedule,
            keep=self.keep,
            min_keep=self.min_keep,
            epochs=epochs,
            steps_per_epoch=steps_per_epoch,
            period=self.period,
            per_step=self.per_step,
            warmup=self.warmup,
            interleave=self.interleave,
        )

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> SSPropConfig:
        """Build from a dict (YAML/JSON values or the CLI's strings).

        Strings are parsed per field ("0.6", "true", "conv,linear", "none"); an unknown
        key or an unparsable value raises :class:`GreenpropError` naming the option.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in values.items():
            if key not in names:
                raise GreenpropError(f"unknown ssprop option {key!r}; known: {', '.join(sorted(names))}")
            kwargs[key] = _PARSERS[key](key, value) if isinstance(value, str) else value
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python dict of the settings (lists for tuples), for logs and YAML."""
        d = dataclasses.asdict(self)
        d["layers"] = list(self.layers)
        return d


def _parse_float(key: str, s: str) -> float:
    try:
        return float(s)
    except ValueError:
        raise GreenpropError(f"{key} must be a number, got {s!r}") from None


def _parse_int(key: str, s: str) -> int:
    try:
        return int(s)
    except ValueError:
        raise GreenpropError(f"{key} must be an integer, got {s!r}") from None


def _parse_bool(key: str, s: str) -> bool:
    low = s.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise GreenpropError(f"{key} must be true or false, got {s!r}")


def _optional(parse: Any) -> Any:
    def parser(key: str, s: str) -> Any:
        return None if s.strip().lower() in ("", "none", "null") else parse(key, s)

    return parser


def _parse_str(key: str, s: str) -> str:
    return s.strip().lower()


def _parse_layers(s: str, key: str = "layers") -> tuple[str, ...]:
    return tuple(p.strip().lower() for p in s.replace("+", ",").split(",") if p.strip())


_PARSERS: dict[str, Any] = {
    "keep": _parse_float,
    "schedule": _parse_str,
    "min_keep": _optional(_parse_float),
    "period": _optional(_parse_int),
    "per_step": _parse_bool,
    "warmup": _parse_int,
    "interleave": _parse_bool,
    "selection": _parse_str,
    "layers": lambda key, s: _parse_layers(s, key),
    "include_output": _parse_bool,
    "min_channels": _parse_int,
    "round_to": _parse_int,
    "calibrate": _parse_bool,
    "seed": _parse_int,
}
