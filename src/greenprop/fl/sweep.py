"""The Table-8-shaped sweep: strategies x samplings x partitions x seeds, resumable, one Ray start.

``python -m greenprop.fl.sweep --out DIR [--seeds 0 1 2]`` runs every missing job and
then prints the table (``--table-only`` just prints it). The equal-budget baseline of a
sampled run with ``k`` sampled rounds is the plain run's accuracy after ``R - k`` rounds:
client sampling and local training are seeded per round, so a plain run stopped at round
``R - k`` is exactly the prefix of the ``R``-round one.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from greenprop.fl.app import FLSettings

STRATEGIES = ("fedavg", "fedprox", "fedspeed")
SAMPLINGS = ("none", "pe:5", "pe:10", "pr:0.2", "pr:0.5")
PARTITIONS = ("iid", "dirichlet:0.6")


def jobs(out: Path, seeds: list[int], base: FLSettings) -> list[tuple[FLSettings, Path]]:
    from dataclasses import replace

    found = []
    for seed in seeds:
        for part in PARTITIONS:
            for strat in STRATEGIES:
                for samp in SAMPLINGS:
                    s = replace(base, strategy=strat, sampling=samp, partition=part, seed=seed)
                    found.append(
                        (s, out / f"{strat}_{samp.replace(':', '')}_{part.replace(':', '')}_s{seed}")
                    )
    return found


def _ms(values: list[float]) -> str:
    if not values:
        return "-"
    m = 100 * statistics.mean(values)
    return f"{m:.2f} ± {100 * statistics.stdev(values):.2f}" if len(values) > 1 else f"{m:.2f}"


def table(out: Path, seeds: list[int], base: FLSettings) -> str:
    rows = [
        "| partition | strategy | sampling | Acc@1 | Acc@5 | rounds sampled | client FLOPs saved "
        "| bytes saved | equal-budget plain Acc@1 | Acc@1 minus equal-budget | seeds |",
        "|" + "---|" * 11,
    ]
    for part in PARTITIONS:
        for strat in STRATEGIES:
            for samp in SAMPLINGS:
                a1, a5, k, flops, nbytes, budget, gain = [], [], [], [], [], [], []
                for seed in seeds:
                    tag = f"{strat}_{samp.replace(':', '')}_{part.replace(':', '')}_s{seed}"
                    f = out / tag / "metrics.json"
                    p = out / f"{strat}_none_{part.replace(':', '')}_s{seed}" / "metrics.json"
                    if not f.exists() or not p.exists():
                        continue
                    d, plain = json.loads(f.read_text()), json.loads(p.read_text())
                    a1.append(d["totals"]["final"]["acc1"])
                    a5.append(d["totals"]["final"]["acc5"])
                    k.append(d["totals"]["rounds_sampled"])
                    flops.append(1 - d["totals"]["client_flops"] / plain["totals"]["client_flops"])
                    tb = d["totals"]["bytes_up"] + d["totals"]["bytes_down"]
                    pb = plain["totals"]["bytes_up"] + plain["totals"]["bytes_down"]
                    nbytes.append(1 - tb / pb)
                    stop = base.rounds - d["totals"]["rounds_sampled"]
                    budget.append(plain["rounds"][stop - 1]["acc1"])
                    gain.append(a1[-1] - budget[-1])
                if not a1:
                    continue
                ks = f"{statistics.mean(k):.1f}"
                rows.append(
                    f"| {part} | {strat} | {samp} | {_ms(a1)} | {_ms(a5)} | {ks} | "
                    f"{100 * statistics.mean(flops):.1f}% | {100 * statistics.mean(nbytes):.1f}% | "
                    f"{_ms(budget)} | {_ms(gain)} | {len(a1)} |"
                )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--subset", type=int, default=2000)
    ap.add_argument("--test-subset", type=int, default=1000)
    ap.add_argument("--model", default="cnn")
    ap.add_argument("--table-only", action="store_true")
    args = ap.parse_args(argv)
    base = FLSettings(
        rounds=args.rounds,
        clients=args.clients,
        subset=args.subset,
        fraction=0.5,
        test_subset=args.test_subset,
        model=args.model,
    )
    if not args.table_only:
        from greenprop.fl.runner import run_jobs
        from greenprop.train.signals import signal_number, sigterm_as_interrupt

        try:
            with sigterm_as_interrupt():
                run_jobs(jobs(args.out, args.seeds, base))
        except KeyboardInterrupt as err:
            print(f"greenprop: {err or 'interrupted'}", file=sys.stderr)
            sys.exit(128 + signal_number(err))
    print(table(args.out, args.seeds, base))


if __name__ == "__main__":
    main()
