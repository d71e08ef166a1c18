"""One process against two: the same ``greenprop train`` config and seed, run back to back.

For every method and seed this script runs ``greenprop train`` once in one process and
once with ``--nproc 2`` (DDP, gloo on loopback), one right after the other, alternating
which goes first from seed to seed so both see the same drift in background load. It
prints a Markdown table: accuracy of each, the ranks' parameter spread (from the DDP
run's ``metrics.json``), and the wall time of the 2-process run over the 1-process run
(whole commands, process start included), with the load average around each pair.
Every process gets ``--threads`` torch threads (default 1) in both runs, so the
2-process run uses twice the cores of the 1-process run: on cores that other jobs
share, more threads in one process can slow it down by far more than they help,
which would make the ratio about threads rather than about DDP.

Runs live in ``OUT/<method>/seed<N>/np<P>/``; a finished run is not run again (its wall
time is read from ``wall.json``), so an interrupted sweep continues where it stopped.

    python benchmarks/ddp_scaling.py --out runs/ddp-scaling --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from _common import environment, header_lines, markdown_table

#: The CNN runs: Fashion-MNIST subset, narrow CNN; 32 steps of 64 (2 ranks: 32 each) per epoch.
CNN = "--model cnn --width 16 --dataset fashion-mnist --subset 2000 --test-subset 1000"
CNN += " --epochs 4 --batch-size 64"
#: VCAS needs repeated blocks: the zoo ViT (depth 6) at width 32 on the same data.
VIT = CNN.replace("--model cnn --width 16", "--model vit --width 32")
#: (method spec, the options of its run).
RUNS: list[tuple[str, str]] = [
    ("baseline", CNN),
    ("ssprop:keep=0.6", CNN),
    ("gradsamp:strategy=pe:2", CNN),
    ("gradsamp:strategy=pe:2;ssprop:keep=0.6", CNN),
    ("baseline", VIT),
    ("vcas:update_every=16", VIT),
]


def slug(method: str, options: str) -> str:
    model = options.split("--model ")[1].split()[0]
    return f"{model}-" + re.sub(r"[^A-Za-z0-9.]+", "_", method)


def train_command(method: str, options: str, seed: int, nproc: int, out: Path) -> list[str]:
    command = [sys.executable, "-m", "greenprop", "train", *options.split(), "--method", method]
    command += ["--seed", str(seed), "--out", str(out), "--no-progress", "--overwrite"]
    return [*command, "--nproc", "2"] if nproc == 2 else command


def load_average() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def run_once(method: str, options: str, seed: int, nproc: int, out: Path) -> dict[str, Any]:
    """Train (unless ``out`` already holds the finished run); returns its wall time and record."""
    wall_file = out / "wall.json"
    if not wall_file.exists():
        command = train_command(method, options, seed, nproc, out)
        load = load_average()
        start = time.perf_counter()
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - start
        wall_file.write_text(json.dumps({"wall_s": wall, "load_before": load, "load_after": load_average()}))
    metrics = json.loads((out / "metrics.json").read_text())
    return {**json.loads(wall_file.read_text()), "metrics": metrics}


def measure(root: Path, seeds: Sequence[int]) -> dict[str, list[dict[str, Any]]]:
    """Every run's pair, 1 and 2 processes back to back (which goes first alternates per seed)."""
    results: dict[str, list[dict[str, Any]]] = {}
    for seed in seeds:  # every method's first seed first: a cut-short sweep still covers them all
        for method, options in RUNS:
            name = slug(method, options)
            order = (1, 2) if seed % 2 == 0 else (2, 1)
            pair = {
                p: run_once(method, options, seed, p, root / name / f"seed{seed}" / f"np{p}") for p in order
            }
            results.setdefault(name, []).append(
                {"seed": seed, "first": order[0], **{f"np{p}": pair[p] for p in order}}
            )
            print(f"{name} seed {seed}: done", file=sys.stderr, flush=True)
    return results


def _mean_sd(values: Sequence[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def _summary(run: dict[str, Any], quantity: str, part: str) -> float:
    return run["metrics"]["summary"][quantity][part]["value"]


def table(results: dict[str, list[dict[str, Any]]]) -> list[str]:
    rows = []
    for name, pairs in results.items():
        acc = {p: [pair[f"np{p}"]["metrics"]["summary"]["acc1"] for pair in pairs] for p in (1, 2)}
        spread = max(pair["np2"]["metrics"]["distributed"]["parameter_spread"] for pair in pairs)
        ratios = [pair["np2"]["wall_s"] / pair["np1"]["wall_s"] for pair in pairs]
        train = [
            _summary(pair["np2"], "time", "train") / _summary(pair["np1"], "time", "train") for pair in pairs
        ]
        flops = [
            _summary(pair["np2"], "flops", "backward") / _summary(pair["np1"], "flops", "backward")
            for pair in pairs
        ]
        loads = [pair[f"np{p}"][k] for pair in pairs for p in (1, 2) for k in ("load_before", "load_after")]
        rows.append(
            [
                name,
                _mean_sd(acc[1]),
                _mean_sd(acc[2]),
                " / ".join(f"{b - a:+.1f}" for a, b in zip(acc[1], acc[2], strict=True)),
                f"{spread:g}",
                " / ".join(f"{r:.2f}" for r in ratios),
                " / ".join(f"{r:.2f}" for r in train),
                " / ".join(f"{r:.3f}" for r in flops),
                f"{min(loads):.1f}-{max(loads):.1f}",
            ]
        )
    header = ["run", "acc@1 1 proc", "acc@1 2 procs", "2 - 1 per seed", "param spread", "wall 2/1 per seed"]
    header += ["train time 2/1", "bwd FLOPs 2/1", "load avg"]
    return markdown_table(header, rows)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder of the runs (resumable)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads of each process, in both runs (default: 1)"
    )
    args = parser.parse_args(argv)
    env = environment(__file__, sys.argv[1:] if argv is None else argv)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # every process, in both runs
    env["threads"] = args.threads
    results = measure(args.out, args.seeds)
    lines = header_lines(env, "DDP on 2 processes vs 1 process (greenprop train --nproc 2)")
    print("\n".join([*lines, *table(results)]))
    (args.out / "table.md").write_text("\n".join([*lines, *table(results)]) + "\n")


if __name__ == "__main__":
    main()
