"""From measurements to a recommendation: pure functions, so the same timings give the same advice.

Predictions are per training run of ``epochs`` epochs, relative to dense training:

- **ssProp** saves, in every sparse epoch, the measured backward time (and counted
  FLOPs) of the layers it converts at that keep: ``sum(dense - sparse)`` over them.
  Candidates are each keep constant or interleaved (every other epoch dense), on the
  layer set that saves most (a layer type and a ``min_channels`` threshold, which the
  method spec can express); only candidates whose mean kept fraction is at least
  ``1 - max_drop`` are considered (0.6 by default: the ssProp paper's headline drops 40%).
- **VCAS**: the whole backward measured at the ratios the probe's controller reached,
  side by side with dense, plus the controller's estimation passes (``M`` forwards and
  ``3M`` backwards every ``update_every`` steps, charged at dense cost: an upper bound).
- **GradSamp** replaces whole epochs (the first and last always train): it saves their
  FLOPs and training time; its accuracy cost cannot be probed in a few steps.
- **The combination**: GradSamp with the better of ssProp and VCAS (where it saves
  time); the savings multiply, since GradSamp's replaced epochs run no step at all.

A method is recommended only where its predicted wall-time saving is at least
``min_saving`` (1%): a FLOPs cut that does not shorten the step on this machine is shown,
not recommended.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from greenprop.advise.measure import LayerTiming, StepTiming, VCASTiming
from greenprop.advise.probe import ProbeResult
from greenprop.errors import GreenpropError
from greenprop.gradsamp.config import GradSampConfig
from greenprop.gradsamp.schedule import parse_strategy
from greenprop.methods import MethodSpec, parse_method
from greenprop.ssprop.config import SSPropConfig
from greenprop.vcas.config import VCASConfig

__all__ = [
    "Advice",
    "Measurements",
    "MethodAdvice",
    "SSPropChoice",
    "check_predictable",
    "choose_ssprop",
    "predict_spec",
    "recommend",
    "vcas_update_every",
]

#: VCAS's Monte-Carlo batches per update (its default M).
VCAS_REPEATS = 2
#: The controller settings of the demo and the vcas presets (faster than the paper's for short runs).
VCAS_FAST = "s_step=0.05,weight_ratio_multiplier=0.8"
GRADSAMP_STRATEGY = "pe:2"


@dataclass
class Measurements:
    """Everything :func:`recommend` reads: timings, counts and probe results."""

    epochs: int
    steps_per_epoch: int
    step: StepTiming
    layers: list[LayerTiming]
    vcas: VCASTiming | None = None
    probes: dict[str, ProbeResult] = field(default_factory=dict)

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Measurements:
        """The inverse of ``dataclasses.asdict`` (what ``--json`` writes under "measurements")."""

        def keeps(values: dict[Any, float]) -> dict[float, float]:  # JSON made the keeps strings
            return {float(k): v for k, v in values.items()}

        layers = [
            LayerTiming(**{**t, "sparse_s": keeps(t["sparse_s"]), "sparse_flops": keeps(t["sparse_flops"])})
            for t in data["layers"]
        ]
        vcas = VCASTiming(**data["vcas"]) if data.get("vcas") else None
        probes = {k: ProbeResult(**v) for k, v in data.get("probes", {}).items()}
        return cls(data["epochs"], data["steps_per_epoch"], StepTiming(**data["step"]), layers, vcas, probes)


@dataclass
class SSPropChoice:
    """An ssProp candidate: keep, schedule, layer set, and what it saves per sparse step."""

    keep: float
    interleave: bool
    layer_types: tuple[str, ...]
    min_channels: int
    layers: list[str]
    saved_s: float  # per step in a sparse epoch
    saved_flops: float
    dense_layer_s: float  # the chosen layers' dense backward, per step

    @property
    def mean_keep(self) -> float:
        return (1.0 + self.keep) / 2 if self.interleave else self.keep

    @property
    def sparse_share(self) -> float:
        """Fraction of epochs that run sparse (interleaving: every other one)."""
        return 0.5 if self.interleave else 1.0

    def spec(self) -> str:
        parts = [f"keep={self.keep:g}"]
        if self.interleave:
            parts.append("interleave=true")
        if self.layer_types != ("conv",):
            parts.append("layers=" + "+".join(self.layer_types))
        if self.min_channels > 1:
            parts.append(f"min_channels={self.min_channels}")
        return "ssprop:" + ",".join(parts)


@dataclass
class MethodAdvice:
    """One row of the advice: the setting, its predicted savings (fractions) and why."""

    method: str
    spec: str | None  # None: not applicable
    flops_saving: float | None
    time_saving: float | None
    recommended: bool
    reasons: list[str]
    #: (FLOPs, time) saving of each epoch of the run; the savings above are their means.
    per_epoch: list[tuple[float, float]] = field(default_factory=list)


def _mean_savings(per_epoch: Sequence[tuple[float, float]]) -> tuple[float, float]:
    return (
        sum(f for f, _ in per_epoch) / len(per_epoch),
        sum(t for _, t in per_epoch) / len(per_epoch),
    )


@dataclass
class Advice:
    rows: list[MethodAdvice]

    @property
    def best(self) -> MethodAdvice | None:
        """The recommended row that saves the most predicted time (None: dense is best here)."""
        chosen = [r for r in self.rows if r.recommended and r.time_saving is not None]
        return max(chosen, key=lambda r: r.time_saving) if chosen else None  # type: ignore[arg-type,return-value]


def _pct(fraction: float) -> str:
    return f"{-100 * fraction:+.0f}%"


def _layer_sets(layers: Sequence[LayerTiming]) -> list[tuple[tuple[str, ...], int]]:
    """Every (layer types, min_channels) pair a spec can express, over the measured layers."""
    kinds = sorted({layer.kind for layer in layers})
    type_sets = [(kind,) for kind in kinds] + ([tuple(kinds)] if len(kinds) > 1 else [])
    out = []
    for types in type_sets:
        channels = sorted({layer.channels for layer in layers if layer.kind in types})
        out += [(types, c if c > channels[0] else 1) for c in channels]
    return out


def ssprop_setting(
    layers: Sequence[LayerTiming], keep: float, interleave: bool, types: tuple[str, ...], min_channels: int
) -> SSPropChoice:
    """What one ssProp setting saves per sparse step, from the layers' measured backward."""
    chosen = [t for t in layers if t.kind in types and t.channels >= min_channels]
    missing = [t.name for t in chosen if keep not in t.sparse_s]
    if missing:
        raise GreenpropError(f"keep {keep:g} was not timed (layer {missing[0]}); add it to --keeps")
    return SSPropChoice(
        keep=keep,
        interleave=interleave,
        layer_types=types,
        min_channels=min_channels,
        layers=[t.name for t in chosen],
        saved_s=sum(t.dense_s - t.sparse_s[keep] for t in chosen),
        saved_flops=sum(t.dense_flops - t.sparse_flops[keep] for t in chosen),
        dense_layer_s=sum(t.dense_s for t in chosen),
    )


def choose_ssprop(
    layers: Sequence[LayerTiming], keeps: Sequence[float], *, max_drop: float = 0.4
) -> SSPropChoice | None:
    """The ssProp setting with the largest predicted time saving, or None when none saves.

    Ties go to the higher mean keep, then to fewer layers (deterministic).
    """
    best: SSPropChoice | None = None
    for keep in sorted(set(keeps), reverse=True):
        for interleave in (False, True):
            mean_keep = (1.0 + keep) / 2 if interleave else keep
            if mean_keep < 1.0 - max_drop - 1e-9:
                continue
            for types, min_channels in _layer_sets(layers):
                candidate = ssprop_setting(layers, keep, interleave, types, min_channels)
                if best is None or _better(candidate, best):
                    best = candidate
    return best if best is not None and best.saved_s > 0 else None


def _better(a: SSPropChoice, b: SSPropChoice) -> bool:
    key_a = (round(a.saved_s * a.sparse_share, 12), a.mean_keep, -len(a.layers))
    key_b = (round(b.saved_s * b.sparse_share, 12), b.mean_keep, -len(b.layers))
    return key_a > key_b


def vcas_update_every(total_steps: int) -> int:
    """Controller updates for a run: about 8 within it, every 16 to 100 steps (paper: 100)."""
    return max(16, min(100, total_steps // 8))


def _probe_note(probes: dict[str, ProbeResult], key: str) -> str | None:
    mine, dense = probes.get(key), probes.get("baseline")
    if mine is None or mine.refused or mine.train_loss is None or dense is None or dense.train_loss is None:
        return None
    losses = f"{mine.train_loss:.3f} vs dense {dense.train_loss:.3f}"
    return f"probe: last-epoch train loss {losses} ({mine.steps} steps)"


def _ssprop_advice(
    m: Measurements, keeps: Sequence[float], max_drop: float, min_saving: float
) -> MethodAdvice:
    if not m.layers:
        return MethodAdvice("ssprop", None, None, None, False, ["no layer ssProp converts in this model"])
    choice = choose_ssprop(m.layers, keeps, max_drop=max_drop)
    if choice is None:
        return MethodAdvice(
            "ssprop",
            None,
            None,
            None,
            False,
            [
                f"no keep >= {1 - max_drop:g} (mean) made any layer's backward faster than dense "
                "on this machine"
            ],
        )
    return _ssprop_row(m, choice, min_saving)


def _ssprop_row(m: Measurements, choice: SSPropChoice, min_saving: float) -> MethodAdvice:
    if not choice.layers:
        return MethodAdvice(
            "ssprop", None, None, None, False, ["this setting converts no layer of the model"]
        )
    sparse = (choice.saved_flops / m.step.step_flops, choice.saved_s / m.step.step_s)
    # Interleaving runs the odd epochs sparse (ssProp's schedule), the even ones dense.
    per_epoch = [sparse if not choice.interleave or e % 2 else (0.0, 0.0) for e in range(m.epochs)]
    flops_saving, time_saving = _mean_savings(per_epoch)
    schedule = "interleaved (every other epoch dense)" if choice.interleave else "constant"
    where = "+".join(choice.layer_types) + (
        f" >= {choice.min_channels} channels" if choice.min_channels > 1 else ""
    )
    reasons = [
        f"keep {choice.keep:g} {schedule} on {len(choice.layers)} {where} layer(s): those layers' backward "
        f"{_pct(choice.saved_s / choice.dense_layer_s)}, whole backward "
        f"{_pct(time_saving * m.step.step_s / m.step.backward_s)}, whole step {_pct(time_saving)}"
    ]
    note = _probe_note(m.probes, "ssprop")
    if note:
        reasons.append(note)
    recommended = time_saving >= min_saving
    return MethodAdvice("ssprop", choice.spec(), flops_saving, time_saving, recommended, reasons, per_epoch)


def _vcas_advice(m: Measurements, min_saving: float, every: int | None = None) -> MethodAdvice:
    timing = m.vcas
    if timing is None or timing.refused:
        why = timing.refused if timing is not None and timing.refused else "not measured"
        return MethodAdvice("vcas", None, None, None, False, [f"does not apply: {why}"])
    assert timing.backward_s is not None and timing.dense_backward_s is not None
    assert timing.backward_flops is not None
    every = vcas_update_every(m.total_steps) if every is None else every
    spec = f"vcas:update_every={every},{VCAS_FAST}"
    step = m.step
    # Estimation per update: M forwards and 3M backwards, charged at dense cost.
    overhead_s = VCAS_REPEATS * (step.forward_s + 3 * timing.dense_backward_s) / every
    overhead_flops = VCAS_REPEATS * (step.forward_flops + 3 * step.backward_flops) / every
    dense_step_s = step.forward_s + timing.dense_backward_s
    time_saving = (timing.dense_backward_s - timing.backward_s - overhead_s) / dense_step_s
    flops_saving = (step.backward_flops - timing.backward_flops - overhead_flops) / step.step_flops
    blocks = timing.ratios.get("blocks", [])
    mean_ratio = sum(blocks) / len(blocks) if blocks else 1.0
    reasons = [
        f"at the probe's final ratios (blocks keep {mean_ratio:.2f} of the rows on average): backward "
        f"{_pct(1 - timing.backward_s / timing.dense_backward_s)} measured, minus estimation "
        f"every {every} steps "
        f"({100 * overhead_s / dense_step_s:.0f}% of a step): whole step {_pct(time_saving)}"
    ]
    if time_saving < min_saving:
        reasons.append("not recommended: it does not shorten the step on this machine")
    note = _probe_note(m.probes, "vcas")
    if note:
        reasons.append(note)
    per_epoch = [(flops_saving, time_saving)] * m.epochs
    return MethodAdvice(
        "vcas", spec, flops_saving, time_saving, time_saving >= min_saving, reasons, per_epoch
    )


def _gradsamp_advice(m: Measurements, min_saving: float, chosen: str = GRADSAMP_STRATEGY) -> MethodAdvice:
    strategy = parse_strategy(chosen, epochs=m.epochs)
    skipped = strategy.skipped_epochs(m.epochs)
    saving = len(skipped) / m.epochs
    if not skipped:
        return MethodAdvice(
            "gradsamp",
            None,
            None,
            None,
            False,
            [f"{m.epochs} epoch(s): the first and last always train, so no epoch can be replaced"],
        )
    reasons = [
        f"{strategy.label} replaces epoch(s) {', '.join(str(e) for e in skipped)} of {m.epochs} by a "
        "sampled update: "
        f"their FLOPs and training time saved ({_pct(saving)}); its accuracy cost is not probed here"
    ]
    note = _probe_note(m.probes, "gradsamp")
    if note:
        reasons.append(note)
    spec = f"gradsamp:strategy={chosen}"
    per_epoch = [(1.0, 1.0) if e in skipped else (0.0, 0.0) for e in range(m.epochs)]
    return MethodAdvice("gradsamp", spec, saving, saving, saving >= min_saving, reasons, per_epoch)


def _combination(rows: Sequence[MethodAdvice]) -> MethodAdvice | None:
    by_name = {r.method: r for r in rows}
    gradsamp = by_name["gradsamp"]
    partners = [r for r in (by_name["ssprop"], by_name["vcas"]) if r.recommended]
    if not gradsamp.recommended or not partners:
        return None
    return _combine(gradsamp, max(partners, key=lambda r: r.time_saving or 0.0))


def _combine(gradsamp: MethodAdvice, partner: MethodAdvice) -> MethodAdvice:
    """GradSamp with a per-step method, epoch by epoch: a replaced epoch runs no step at all.

    So the savings multiply within each epoch; over the run they need not (GradSamp Pe=2
    may replace exactly the epochs an interleaved ssProp runs dense).
    """
    per_epoch = [
        (1 - (1 - gf) * (1 - pf), 1 - (1 - gt) * (1 - pt))
        for (gf, gt), (pf, pt) in zip(gradsamp.per_epoch, partner.per_epoch, strict=True)
    ]
    flops, time = _mean_savings(per_epoch)
    return MethodAdvice(
        f"gradsamp+{partner.method}",
        f"{gradsamp.spec};{partner.spec}",
        flops,
        time,
        gradsamp.recommended and partner.recommended,
        [
            f"GradSamp's replaced epochs run no step; the others save as {partner.method} alone: "
            f"time {_pct(time)}"
        ],
        per_epoch,
    )


def check_predictable(spec: str, keeps: Sequence[float] | None = None) -> MethodSpec:
    """``spec`` parsed, if :func:`predict_spec` can predict it; else GreenpropError saying why."""
    parsed = parse_method(spec)
    if parsed.parts:
        names = [p.name for p in parsed.parts]
        if len(parsed.parts) != 2 or names[0] != "gradsamp" or names[1] not in ("ssprop", "vcas"):
            raise GreenpropError(
                f"cannot predict {spec!r}: only gradsamp;ssprop and gradsamp;vcas combine here"
            )
        for part in parsed.parts:
            check_predictable(part.label, keeps)
        return parsed
    if parsed.name == "gradsamp":
        GradSampConfig.from_dict(parsed.options)
    elif parsed.name == "vcas":
        VCASConfig.from_dict(parsed.options)
    elif parsed.name == "ssprop":
        config = SSPropConfig.from_dict(parsed.options)
        if config.schedule != "constant" or config.warmup or config.include_output:
            raise GreenpropError(f"cannot predict {spec!r}: only a constant or interleaved keep, no warmup")
        if keeps is not None and config.keep < 1.0 and config.keep not in keeps:
            raise GreenpropError(f"cannot predict {spec!r}: keep {config.keep:g} is not in --keeps")
    elif parsed.name != "baseline":
        raise GreenpropError(f"cannot predict {spec!r}: advise models gradsamp, ssprop and vcas")
    return parsed


def predict_spec(m: Measurements, spec: str, *, min_saving: float = 0.01) -> MethodAdvice:
    """The prediction for one given method spec (``--predict``), by the same rules as the advice.

    Covers baseline, ``gradsamp`` (any strategy), ``ssprop`` (constant or interleaved keep
    among the timed ones, ``layers``, ``min_channels``), ``vcas`` (its ``update_every``) and
    GradSamp combined with one of the other two. Anything else raises GreenpropError.
    """
    parsed = check_predictable(spec)
    if parsed.parts:
        rows = [predict_spec(m, p.label, min_saving=min_saving) for p in parsed.parts]
        if rows[0].spec is None or rows[1].spec is None:
            return MethodAdvice(spec, None, None, None, False, [r for row in rows for r in row.reasons])
        combined = _combine(rows[0], rows[1])
        combined.method, combined.spec = spec, spec
        return combined
    if parsed.name == "baseline":
        return MethodAdvice(spec, spec, 0.0, 0.0, False, ["dense training"])
    if parsed.name == "gradsamp":
        row = _gradsamp_advice(m, min_saving, GradSampConfig.from_dict(parsed.options).strategy)
    elif parsed.name == "vcas":
        row = _vcas_advice(m, min_saving, VCASConfig.from_dict(parsed.options).update_every)
    else:
        config = SSPropConfig.from_dict(parsed.options)
        choice = ssprop_setting(m.layers, config.keep, config.interleave, config.layers, config.min_channels)
        row = _ssprop_row(m, choice, min_saving)
    row.method = spec
    if row.spec is not None:
        row.spec = spec
    return row


def recommend(
    m: Measurements, keeps: Sequence[float], *, max_drop: float = 0.4, min_saving: float = 0.01
) -> Advice:
    """The advice for these measurements (deterministic: the same input gives the same rows)."""
    if not 0.0 <= max_drop < 1.0 or not math.isfinite(min_saving):
        raise ValueError(
            f"max_drop must be in [0, 1) and min_saving finite, got {max_drop!r}, {min_saving!r}"
        )
    rows = [
        _ssprop_advice(m, keeps, max_drop, min_saving),
        _vcas_advice(m, min_saving),
        _gradsamp_advice(m, min_saving),
    ]
    combined = _combination(rows)
    if combined is not None:
        rows.append(combined)
    return Advice(rows)
