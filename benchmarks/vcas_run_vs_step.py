"""Does a VCAS preset's whole run cost what the step benchmark says at the ratios it ran?

Reads a ``greenprop compare`` folder (a dense baseline and one VCAS method, any seeds) and
predicts each VCAS epoch's train time from its exact twin's: the exact epoch's forward +
backward times the compacted step's cost relative to dense at the epoch's realised block
ratio (the mean over blocks of the rows kept; piecewise linear between the step table's
ratios), plus the exact epoch's optimizer and data time and the VCAS epoch's own ``hooks``
time (the controller's estimation). A run whose measured ratio matches the prediction spends
nothing beyond the step's cost and the estimation; a gap is time the step benchmark does not
see. Epochs alternate between the runs (round-robin), so single epochs carry the machine's noise.

The step table comes from ``benchmarks/vcas_step.py --json FILE`` (the compact variant's
step ratio, mean over the token ratios measured at each block ratio) or from ``--step r=ratio``
pairs. Run from the repository root::

    python benchmarks/vcas_run_vs_step.py runs/compare-vcas-vit --model vit --step-json step.json
    python benchmarks/vcas_run_vs_step.py runs/compare-vcas-resnet --step 0.3=0.624 0.5=0.776 1=1.012
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


def step_table(path: Path, model: str) -> list[tuple[float, float]]:
    """(block ratio, compact step / dense step) of ``model`` from a vcas_step.py JSON, ascending."""
    by_ratio: dict[float, list[float]] = {}
    for row in json.loads(path.read_text())["results"]:
        if row["model"] == model and row["last_r"] is None:
            by_ratio.setdefault(row["r"], []).append(row["step_ratio"]["compact"])
    if not by_ratio:
        raise SystemExit(f"{path} has no rows of model {model!r}")
    return sorted((r, statistics.fmean(v)) for r, v in by_ratio.items())


def parse_pairs(pairs: Sequence[str]) -> list[tuple[float, float]]:
    table = []
    for pair in pairs:
        ratio, _, cost = pair.partition("=")
        try:
            table.append((float(ratio), float(cost)))
        except ValueError:
            raise SystemExit(f"--step takes r=ratio pairs such as 0.5=0.79, got {pair!r}") from None
    return sorted(table)


def interpolate(table: list[tuple[float, float]], r: float) -> float:
    """Piecewise linear in the table; held constant beyond its ends (``numpy.interp``)."""
    ratios, costs = zip(*table, strict=True)
    return float(np.interp(r, ratios, costs))


def _seconds(epoch: dict[str, Any], *phases: str) -> float:
    return sum(epoch["time"].get(p, {}).get("value", 0.0) for p in phases)


def _train_seconds(epoch: dict[str, Any]) -> float:
    """Every phase but evaluation, as the run's summary counts train time (train/summary.py)."""
    return sum(q["value"] for p, q in epoch["time"].items() if p != "eval")


def compare_runs(folder: Path) -> dict[int, dict[str, dict[str, Any]]]:
    """seed -> {"exact": metrics, "vcas": metrics} of a compare folder with one VCAS method."""
    runs: dict[int, dict[str, dict[str, Any]]] = {}
    for run in json.loads((folder / "results.json").read_text())["runs"]:
        kind = "exact" if run["method"] == "baseline" else "vcas"
        metrics = json.loads((Path(run["path"]) / "metrics.json").read_text())
        if kind == "vcas" and "vcas" not in metrics["epochs"][0]:
            continue  # another method: not ours to predict
        if kind in runs.setdefault(run["seed"], {}):
            raise SystemExit(f"{folder} holds more than one {kind} run of seed {run['seed']}")
        runs[run["seed"]][kind] = metrics
    return runs


def predict_seed(
    exact: dict[str, Any], vcas: dict[str, Any], table: list[tuple[float, float]]
) -> dict[str, Any]:
    """Measured and predicted VCAS / exact train time, per epoch and in all."""
    epochs, measured, predicted, base, hooks = [], 0.0, 0.0, 0.0, 0.0
    for e_exact, e_vcas in zip(exact["epochs"], vcas["epochs"], strict=True):
        kept = [r for r in e_vcas["vcas"]["realised_activation_ratio"].values() if r is not None]
        ratio = statistics.fmean(kept) if kept else 1.0
        t_exact, t_vcas = _train_seconds(e_exact), _train_seconds(e_vcas)
        t_hooks = _seconds(e_vcas, "hooks")
        guess = (
            interpolate(table, ratio) * _seconds(e_exact, "forward", "backward")
            + _seconds(e_exact, "optimizer", "data")
            + t_hooks
        )
        epochs.append({"ratio": ratio, "measured": t_vcas / t_exact, "predicted": guess / t_exact})
        measured, predicted = measured + t_vcas, predicted + guess
        base, hooks = base + t_exact, hooks + t_hooks
    return {
        "measured": measured / base,
        "predicted": predicted / base,
        "hooks_share": hooks / measured,
        "epochs": epochs,
    }


def main(argv: Sequence[str] | None = None) -> dict[int, dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, help="a greenprop compare output folder")
    parser.add_argument("--model", default=None, help="vcas_step.py's model name (vit, resnet, minilm)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--step-json", type=Path, help="a vcas_step.py --json output")
    source.add_argument("--step", nargs="+", metavar="R=RATIO", help="the step table by hand")
    args = parser.parse_args(argv)
    if args.step_json is not None and args.model is None:
        parser.error("--step-json needs --model")
    table = step_table(args.step_json, args.model) if args.step_json else parse_pairs(args.step)
    out = {}
    for seed, pair in sorted(compare_runs(args.folder).items()):
        if set(pair) != {"exact", "vcas"}:
            continue
        result = out[seed] = predict_seed(pair["exact"], pair["vcas"], table)
        per_epoch = " ".join(
            f"{e['ratio']:.2f}:{e['measured']:.2f}/{e['predicted']:.2f}" for e in result["epochs"]
        )
        print(
            f"seed {seed}: VCAS / exact train time measured {result['measured']:.3f}, predicted "
            f"{result['predicted']:.3f} (estimation {result['hooks_share']:.1%} of VCAS's); "
            f"per epoch, realised ratio: measured/predicted {per_epoch}"
        )
    if not out:
        print(f"{args.folder}: no seed with both an exact and a VCAS run", file=sys.stderr)
    return out


if __name__ == "__main__":
    main()
