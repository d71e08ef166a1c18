"""The text ``greenprop advise`` prints: what was measured, the probes, the advice."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from greenprop.advise.recommend import Advice, Measurements, MethodAdvice

__all__ = ["format_advice", "to_json"]


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    align = [":--" if i == 0 else "--:" for i in range(len(header))]
    return ["| " + " | ".join(r) + " |" for r in (header, align, *rows)]


def _saving(fraction: float | None) -> str:
    return "n/a" if fraction is None else f"{-100 * fraction:+.1f}%"


def _ms(seconds: float) -> str:
    return f"{1e3 * seconds:.2f}"


def format_advice(
    m: Measurements,
    advice: Advice,
    *,
    title: str,
    environment: str,
    keeps: Sequence[float],
    predictions: Sequence[MethodAdvice] = (),
) -> str:
    """Markdown: the dense step, the per-layer timings, the probes, the advice and the reasons."""
    step = m.step
    lines = [
        f"### {title}",
        "",
        f"- {environment}",
        f"- dense step on one batch: forward {_ms(step.forward_s)} ms, backward {_ms(step.backward_s)} ms "
        f"(medians); counted {step.forward_flops / 1e9:.3g} GFLOP forward, {step.backward_flops / 1e9:.3g} "
        "GFLOP backward",
        "",
    ]
    if m.layers:
        lines += ["ssProp, each converted layer's backward alone (ms, medians side by side):", ""]
        header = ["layer", "kind", "out channels", "dense", *(f"keep {k:g}" for k in keeps)]
        rows = [
            [t.name, t.kind, str(t.channels), _ms(t.dense_s), *(_ms(t.sparse_s[k]) for k in keeps)]
            for t in m.layers
        ]
        lines += [*_table(header, rows), ""]
    if m.probes:
        dense = m.probes.get("baseline")
        lines += ["Probes (short runs on a small subset: a sanity check, too short to rank accuracy):", ""]
        rows = []
        for key, p in m.probes.items():
            if p.refused:
                rows.append([key, p.method, "refused: " + p.refused, "", "", "", ""])
                continue
            ratio = "n/a"
            if dense is not None and dense.flops and p.flops is not None:
                ratio = f"{p.flops / dense.flops:.3f}"
            loss = "n/a" if p.train_loss is None else f"{p.train_loss:.3f}"
            acc = "n/a" if p.acc1 is None else f"{p.acc1:.1f}"
            rows.append([key, f"`{p.method}`", str(p.steps), str(p.epochs_replaced), loss, acc, ratio])
        header = ["probe", "method", "steps", "epochs replaced", "last train loss", "acc1", "FLOPs vs dense"]
        lines += [*_table(header, rows), ""]
    lines += [
        f"Advice, predicted for {m.epochs} epochs of {m.steps_per_epoch} steps (vs dense training of "
        "the same length; time = forward + backward, measured here):",
        "",
    ]
    rows = [
        [
            r.method,
            f"`{r.spec}`" if r.spec else "-",
            _saving(r.flops_saving),
            _saving(r.time_saving),
            "yes" if r.recommended else "no",
        ]
        for r in advice.rows
    ]
    lines += [*_table(["method", "setting", "FLOPs", "time", "recommended"], rows), ""]
    lines += [f"- {r.method}: {reason}" for r in advice.rows for reason in r.reasons]
    if predictions:
        lines += ["", "Predicted for the settings asked for (--predict), by the same rules:", ""]
        rows = [[f"`{r.method}`", _saving(r.flops_saving), _saving(r.time_saving)] for r in predictions]
        lines += _table(["setting", "FLOPs", "time"], rows)
    best = advice.best
    lines += [
        "",
        f"recommended: --method '{best.spec}'" if best else "recommended: dense (no method saves time here)",
    ]
    return "\n".join(lines)


def to_json(m: Measurements, advice: Advice, predictions: Sequence[MethodAdvice] = ()) -> dict[str, Any]:
    """Measurements, advice and predictions as plain data (``--json``)."""
    return {
        "measurements": asdict(m),
        "advice": [asdict(r) for r in advice.rows],
        "predictions": [asdict(r) for r in predictions],
        "best": advice.best.spec if advice.best else None,
    }
