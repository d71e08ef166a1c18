"""Aggregate compare runs into a Table-2-style summary: CSV, JSON, Markdown and plots."""

from __future__ import annotations

import csv
import io
import statistics
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from greenprop.experiments.compare import RunResult
from greenprop.experiments.frontier import frontier_metrics, frontier_report
from greenprop.experiments.load_check import annotate_load, load_notes, time_ratio_cell
from greenprop.methods import get_method, parse_method
from greenprop.train.checkpoint import write_json, write_text

TERA = 1e12
MIB = 2**20
#: A run's task metrics when its metrics.json names none (written before tasks existed).
CLASSIFICATION_METRICS: tuple[dict[str, Any], ...] = (
    {"key": "acc1", "label": "Acc@1 (%)", "higher_is_better": True},
    {"key": "acc5", "label": "Acc@5 (%)", "higher_is_better": True},
)


def task_metrics(results: list[RunResult]) -> tuple[dict[str, Any], ...]:
    """The summary metrics of the comparison's task (``metrics.json``'s ``task``), best first."""
    task = results[0].metrics.get("task") if results else None
    return tuple(task["metrics"]) if task else CLASSIFICATION_METRICS


def _mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample std (None for a single run, so no fake '± 0' is shown)."""
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else None)


def _total(metrics: dict[str, Any], *path: str) -> dict[str, Any] | None:
    node: Any = metrics["summary"]
    for key in path:
        node = node.get(key) if isinstance(node, dict) else None
    return node


def _metric_stats(summaries: list[dict[str, Any]], key: str) -> tuple[float | None, float | None]:
    """Mean and std of a summary metric; None where a run has no value (e.g. an unscored FD)."""
    values = [s.get(key) for s in summaries]
    return (None, None) if any(v is None for v in values) else _mean_std(values)


def _method_row(
    method: str, runs: list[RunResult], metrics: tuple[dict[str, Any], ...] = CLASSIFICATION_METRICS
) -> dict[str, Any]:
    """Statistics over the runs that finished; diverged runs are only counted."""
    finished = [r for r in runs if not r.metrics.get("diverged")]
    row: dict[str, Any] = {
        "method": method,
        "seeds": [r.seed for r in runs],
        "diverged": len(runs) - len(finished),
    }
    if not finished:
        return {
            **row,
            "epochs": None,
            "epochs_replaced": None,
            **{f"{m['key']}_{stat}": None for m in metrics for stat in ("mean", "std")},
            "tflops_forward": None,
            "tflops_backward": None,
            "train_time_s": None,
            "energy_j": None,
            "energy_kind": "unavailable",
            "energy_source": "every run diverged",
            "peak_memory_mib": None,
        }
    summaries = [r.metrics["summary"] for r in finished]
    values = {}
    for m in metrics:
        values[f"{m['key']}_mean"], values[f"{m['key']}_std"] = _metric_stats(summaries, m["key"])
    energies = [s["energy"] for s in summaries]
    energy_known = all(e["value"] is not None for e in energies)
    return {
        **row,
        "epochs": summaries[0]["epochs_run"],
        "epochs_replaced": statistics.fmean(s["epochs_replaced"] for s in summaries),
        **values,
        "tflops_forward": statistics.fmean(s["flops"]["forward"]["value"] for s in summaries) / TERA,
        "tflops_backward": statistics.fmean(s["flops"]["backward"]["value"] for s in summaries) / TERA,
        "train_time_s": statistics.fmean(s["time"]["train"]["value"] for s in summaries),
        "energy_j": statistics.fmean(e["value"] for e in energies) if energy_known else None,
        "energy_kind": energies[0]["kind"] if energy_known else "unavailable",
        "energy_source": energies[0]["source"],
        "peak_memory_mib": _peak_memory_mib(summaries),
    }


def _peak_memory_mib(summaries: list[dict[str, Any]]) -> float | None:
    """Mean over seeds of each run's peak memory in MiB; None unless every run measured it."""
    peaks = [(s.get("peak_memory") or {}).get("value") for s in summaries]
    return None if None in peaks else statistics.fmean(peaks) / MIB


def aggregate(results: list[RunResult], baseline: str = "baseline") -> list[dict[str, Any]]:
    """One row per method: the task's metrics (mean/std), FLOPs, time, energy and savings vs baseline."""
    by_method: dict[str, list[RunResult]] = defaultdict(list)
    for r in results:
        by_method[r.method].append(r)
    metrics = task_metrics(results)
    rows = [_method_row(method, runs, metrics) for method, runs in by_method.items()]
    base = next((row for row in rows if row["method"] == baseline), None)
    for row in rows:  # a row with epochs None: every run diverged
        if base is None or base["epochs"] is None or row["epochs"] is None:
            row.update(flops_saved_pct=None, backward_saved_pct=None, time_ratio=None)
            continue
        base_total = base["tflops_forward"] + base["tflops_backward"]
        total = row["tflops_forward"] + row["tflops_backward"]
        row["flops_saved_pct"] = 100.0 * (1 - total / base_total)
        row["backward_saved_pct"] = 100.0 * (1 - row["tflops_backward"] / base["tflops_backward"])
        row["time_ratio"] = row["train_time_s"] / base["train_time_s"]
    annotate_load(rows, results, baseline)
    return rows


def _pm(mean: float | None, std: float | None, diverged: int = 0) -> str:
    if mean is None:
        return "diverged"
    text = f"{mean:.2f}" if std is None else f"{mean:.2f} ± {std:.2f}"
    return f"{text} ({diverged} diverged)" if diverged else text


def _opt(value: float | None, fmt: str) -> str:
    return "n/a" if value is None else format(value, fmt)


def columns(metrics: tuple[dict[str, Any], ...] = CLASSIFICATION_METRICS) -> tuple[str, ...]:
    """The table's header; a lower-is-better metric's label ends in "↓"."""
    labels = [m["label"] + ("" if m["higher_is_better"] else " ↓") for m in metrics]
    return (
        *("Method", "Saved (FLOPs)", "Saved (bwd)"),
        *labels,
        *("TFLOPs fwd / bwd", "Train time (s)", "Time vs base", "Energy (J)", "Peak mem (MiB)"),
    )


COLUMNS = columns()


def _metric_cell(row: dict[str, Any], key: str, first: bool) -> str:
    """The metric's mean ± std; the first metric also counts diverged runs."""
    mean, std = row[f"{key}_mean"], row[f"{key}_std"]
    if mean is None and row["epochs"] is not None:
        return "n/a"  # the runs finished without this metric (an FD never scored)
    return _pm(mean, std, row["diverged"] if first else 0)


def table_rows(
    rows: list[dict[str, Any]], metrics: tuple[dict[str, Any], ...] = CLASSIFICATION_METRICS
) -> list[list[str]]:
    out = []
    for r in rows:
        energy = _opt(r["energy_j"], ".4g")
        if r["energy_kind"] == "estimated":
            energy += " (est.)"
        out.append(
            [
                r["method"],
                _opt(r["flops_saved_pct"], ".1f") + ("%" if r["flops_saved_pct"] is not None else ""),
                _opt(r["backward_saved_pct"], ".1f") + ("%" if r["backward_saved_pct"] is not None else ""),
                *(_metric_cell(r, m["key"], i == 0) for i, m in enumerate(metrics)),
                f"{_opt(r['tflops_forward'], '.4g')} / {_opt(r['tflops_backward'], '.4g')}",
                _opt(r["train_time_s"], ".1f"),
                time_ratio_cell(r),
                energy,
                _opt(r["peak_memory_mib"], ".0f"),
            ]
        )
    return out


def format_table(
    rows: list[dict[str, Any]],
    markdown: bool = False,
    metrics: tuple[dict[str, Any], ...] = CLASSIFICATION_METRICS,
) -> str:
    """The comparison as aligned text (terminal) or a Markdown table; ``metrics``: :func:`task_metrics`."""
    return render_table(columns(metrics), table_rows(rows, metrics), markdown=markdown)


def render_table(header: Sequence[str], body: list[list[str]], *, markdown: bool = False) -> str:
    """Cells as aligned text (terminal) or a Markdown table."""
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(cells) + " |" for cells in body]
        return "\n".join(lines)
    widths = [max(len(h), *(len(c[i]) for c in body)) for i, h in enumerate(header)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join(
        [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
        + [fmt.format(*cells) for cells in body]
    )


def saving_plot_name(metric: dict[str, Any]) -> str:
    """The quality-vs-saving plot's file name after the task's first metric (``acc1``:
    ``accuracy_vs_saving.png``; perplexity or FD runs name theirs for what they plot)."""
    key = str(metric["key"])
    return "accuracy_vs_saving.png" if key.startswith("acc") else f"{key}_vs_saving.png"


def write_report(
    results: list[RunResult], out_dir: str | Path, *, title: str, command: str | None = None
) -> dict[str, Path]:
    """Write results.csv, results.json, report.md and the plots; returns their paths."""
    from greenprop.experiments.plots import (
        plot_accuracy_vs_saving,
        plot_curves,
        plot_step_losses,
    )

    out = Path(out_dir)
    rows = aggregate(results)
    metrics = task_metrics(results)
    paths = {
        "csv": out / "results.csv",
        "json": out / "results.json",
        "markdown": out / "report.md",
        "saving_plot": out / saving_plot_name(metrics[0]),
        "curves_plot": out / "curves.png",
        "step_loss_plot": out / "loss_steps.png",
    }
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=[k for k in rows[0] if k != "seeds"] + ["seeds"])
    writer.writeheader()
    for row in rows:
        writer.writerow({**row, "seeds": " ".join(map(str, row["seeds"]))})
    write_text(table.getvalue(), paths["csv"])
    frontier_rows, frontier_lines, frontier_paths = frontier_report(results, out)
    paths.update(frontier_paths)
    first = results[0].metrics
    write_json(
        {
            "rows": rows,
            "frontier": frontier_rows,
            "frontier_metrics": [m.to_dict() for m in frontier_metrics(results)] if frontier_rows else [],
            "config": first["config"],
            "environment": first["environment"],
            "runs": [
                {"method": r.method, "seed": r.seed, "path": str(r.path), "load": _total(r.metrics, "load")}
                for r in results
            ],
        },
        paths["json"],
    )
    plot_accuracy_vs_saving(rows, paths["saving_plot"], metrics[0])
    plot_curves(results, paths["curves_plot"], metrics[0])
    if not plot_step_losses(results, paths["step_loss_plot"]):
        del paths["step_loss_plot"]
    extras = method_extras(results, out)
    paths.update({path.stem: path for _, path in extras})
    env = first["environment"]
    cfg = first["config"]
    lines = [f"# {title}", ""]
    if command:
        lines += ["Reproduce with:", "", "```", command, "```", ""]
    lines += [
        f"Model `{cfg['model']}` on `{cfg['dataset']}` (train subset {cfg['subset'] or 'all'}, "
        f"test subset {cfg['test_subset'] or 'all'}), {cfg['epochs']} epochs, batch {cfg['batch_size']}, "
        f"{cfg['optimizer']} lr {cfg['lr']} ({cfg['lr_schedule']}), seeds "
        f"{', '.join(map(str, rows[0]['seeds']))}.",
        f"Machine: {env['platform']}, torch {env['torch']}, device {env['device']}, "
        f"{env['threads']} threads, GLIBC_TUNABLES={env['GLIBC_TUNABLES'] or 'unset'}.",
        tuning_line(results),
        "",
        format_table(rows, markdown=True, metrics=metrics),
        "",
        f"{_metrics_sentence(metrics)} "
        "FLOPs are counted with PyTorch's FlopCounterMode (training forward and backward"
        f"{flop_adjustments(results)}) "
        "and savings are relative to the baseline's counted FLOPs. Train time is measured wall "
        "time of the training phases (data, forward, backward, optimizer, epoch replacement), "
        f"without evaluation; energy and peak memory cover the same span. Energy: "
        f"{rows[0]['energy_kind']} ({rows[0]['energy_source']}). Peak memory: the highest epoch's, "
        f"{_peak_memory_source(results)}.",
        "",
        *load_notes(rows),
        "",
        f"![{paths['saving_plot'].stem.replace('_', ' ')}]({paths['saving_plot'].name})",
        "",
        f"![training curves]({paths['curves_plot'].name})",
        "",
    ]
    lines += frontier_lines
    if "step_loss_plot" in paths:
        lines += [f"![training loss per step]({paths['step_loss_plot'].name})", ""]
    for caption, path in extras:
        lines += [f"![{caption}]({path.name})", ""]
    write_text("\n".join(lines), paths["markdown"])
    return paths


def tuning_line(results: list[RunResult]) -> str:
    """Whether the runs were ``--tuned``, from each run's recorded environment, so a
    method's saving is not read as a setting's."""
    envs = [r.metrics.get("environment") or {} for r in results]
    tuned = {bool(e.get("tuned")) for e in envs}
    if tuned == {False}:
        return "Runtime settings: not tuned (no --tuned)."
    if tuned == {True, False}:
        return "Runtime settings: MIXED, some runs --tuned and some not; savings mix in the settings'."
    settings = {(e.get("threads"), e.get("channels_last"), e.get("GLIBC_TUNABLES")) for e in envs}
    described = "; ".join(
        f"{threads} threads, channels_last {'on' if cl else 'off'}, GLIBC_TUNABLES={tunables or 'unset'}"
        for threads, cl, tunables in sorted(settings, key=str)
    )
    return f"Runtime settings: --tuned, for the baseline and every method alike ({described})."


def _metrics_sentence(metrics: tuple[dict[str, Any], ...]) -> str:
    """What the metric columns are (the classification wording predates other tasks)."""
    if metrics == CLASSIFICATION_METRICS:
        return "Accuracy is the final epoch's test accuracy, mean ± sample std over seeds."
    labels = ", ".join(m["label"] for m in metrics)
    return (
        f"{labels}: the final epoch's values on the test split, mean ± sample std over seeds "
        "(↓: lower is better)."
    )


def _peak_memory_source(results: list[RunResult]) -> str:
    """What the runs' peak memory is (the first run's provenance)."""
    peak = results[0].metrics["summary"].get("peak_memory")
    return peak["source"] if peak else "not recorded"


def _method_names(results: list[RunResult]) -> list[str]:
    """Every method taking part in the comparison (the parts of combined ones too)."""
    names: set[str] = set()
    for r in results:
        spec = parse_method(r.metrics["config"]["method"])  # a frontier row's label is no spec
        names.update(part.name for part in (spec.parts or (spec,)))
    return sorted(names)


def method_extras(results: list[RunResult], out_dir: Path) -> list[tuple[str, Path]]:
    """The figures each method in the comparison adds to the report: ``(caption, path)``."""
    extras: list[tuple[str, Path]] = []
    for name in _method_names(results):
        draw = getattr(get_method(name), "report_extras", None)
        if draw is not None:
            extras += draw(results, out_dir)
    return extras


def flop_adjustments(results: list[RunResult]) -> str:
    """How methods adjusted the counted FLOPs, as the runs' metrics.json record it."""
    notes = dict.fromkeys(note for r in results for note in r.metrics.get("flop_adjustments", []))
    return "".join(f"; {note}" for note in notes)
