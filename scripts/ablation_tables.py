"""Print docs/ablations.md's tables from the comparisons' results.json files.

Usage: python scripts/ablation_tables.py RUNS_DIR  (the folders the commands in
docs/ablations.md wrote: RUNS_DIR/<preset>, RUNS_DIR/<preset>-dense<E>, ...).
Each row is the mean +- std over the seeds its results.json holds (n given).
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path


def rows(folder: Path) -> dict[str, dict]:
    """``method -> row`` of a comparison's results.json, or of ``greenprop train`` runs in seed*/."""
    path = folder / "results.json"
    if path.exists():
        return {row["method"]: row for row in json.loads(path.read_text())["rows"]}
    runs = [json.loads(p.read_text()) for p in sorted(folder.glob("seed*/metrics.json"))]
    runs = [m for m in runs if m["complete"]]
    if not runs:
        return {}
    acc1 = [m["summary"]["acc1"] for m in runs]
    acc5 = [m["summary"]["acc5"] for m in runs]
    flops = runs[0]["summary"]["flops"]
    row = {
        "seeds": [m["config"]["seed"] for m in runs],
        "epochs": runs[0]["config"]["epochs"],
        "epochs_replaced": statistics.fmean(m["summary"]["epochs_replaced"] for m in runs),
        "acc1_mean": statistics.fmean(acc1),
        "acc1_std": statistics.stdev(acc1) if len(runs) > 1 else None,
        "acc5_mean": statistics.fmean(acc5),
        "acc5_std": statistics.stdev(acc5) if len(runs) > 1 else None,
        "tflops_forward": flops["forward"]["value"] / 1e12,
        "tflops_backward": flops["backward"]["value"] / 1e12,
        "train_time_s": statistics.fmean(m["summary"]["time"]["train"]["value"] for m in runs),
    }
    return {runs[0]["method"]["label"]: row}


def pm(row: dict, key: str) -> str:
    mean, std = row[f"{key}_mean"], row[f"{key}_std"]
    return f"{mean:.1f}" if std is None else f"{mean:.1f} ± {std:.1f}"


def real_epochs(row: dict) -> float:
    return row["epochs"] - (row["epochs_replaced"] or 0.0)


def strategy_table(runs: Path, presets: list[str], labels: list[str]) -> str:
    """One row per (setting, method); the last column is the dense run with as many real epochs."""
    lines = [
        "| setting | method | Acc@1 (%) | Acc@5 (%) | real epochs | dense, same real epochs: Acc@1 |",
        "|---|---|---|---|---|---|",
    ]
    for preset, label in zip(presets, labels, strict=True):
        dense = {e: rows(runs / f"{preset}-dense{e}").get("baseline") for e in (8, 9)}
        for method, row in rows(runs / preset).items():
            real = real_epochs(row)
            same = row if round(real) == row["epochs"] else dense.get(round(real))
            cells = [label, f"`{method}`", f"{pm(row, 'acc1')} (n={len(row['seeds'])})", pm(row, "acc5")]
            cells += [f"{real:.1f}", "(itself)" if same is row else (pm(same, "acc1") if same else "not run")]
            lines.append("| " + " | ".join(cells) + " |")
        for e, row in dense.items():
            if row is not None:
                cells = [label, f"dense, {e} epochs", f"{pm(row, 'acc1')} (n={len(row['seeds'])})"]
                lines.append("| " + " | ".join([*cells, pm(row, "acc5"), str(e), ""]) + " |")
    return "\n".join(lines)


def flops_table(runs: Path, folders: list[str]) -> str:
    lines = [
        "| run | seeds | epochs (real) | Acc@1 | counted TFLOPs fwd / bwd | train time (s) |",
        "|---|---|---|---|---|---|",
    ]
    for folder in folders:
        for method, row in rows(runs / folder).items():
            lines.append(
                f"| {method} ({folder}) | {len(row['seeds'])} | {row['epochs']} ({real_epochs(row):g}) | "
                f"{pm(row, 'acc1')} | {row['tflops_forward']:.4g} / {row['tflops_backward']:.4g} | "
                f"{row['train_time_s']:.0f} |"
            )
    return "\n".join(lines)


def main(runs: Path) -> None:
    optimizers = ["gradsamp-adagrad", "gradsamp-adadelta"]
    print("Table 10\n" + strategy_table(runs, optimizers, ["AdaGrad", "AdaDelta"]))
    acts = ["gradsamp-relu", "gradsamp-sigmoid", "gradsamp-tanh"]
    print("\nTable 19\n" + strategy_table(runs, acts, ["ReLU", "Sigmoid", "Tanh"]))
    print("\nssProp x Dropout\n" + flops_table(runs, ["ssprop-dropout0", "ssprop-dropout0.2"]))
    minilm = ["mezo-minilm", "mezo-minilm-dense2", "mezo-minilm-mezo", "mezo-minilm-mezo-gradsamp"]
    print("\nTable 11\n" + flops_table(runs, minilm))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
