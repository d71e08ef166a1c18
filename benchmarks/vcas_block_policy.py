"""The limits VCAS's measured block policy picks for MiniLM, ViT and ResNet-18-GN, and what the timing costs.

For each model (the same models and fixed batches as ``vcas_step.py``: ``minilm`` batch 32
x 56 tokens, ``vit`` and ``resnet`` batch 128, dropout off) this runs what the controller
runs at its first update with ``VCASConfig(block_policy="measured")``
(:func:`~greenprop.vcas.block_policy.measured_block_limits`, no timing cache): one forward
without grad records each block's input, then each distinct block (type and shapes) is
timed exact and sampled at 0.5 / 0.7 / 0.9 (forward + backward of a random output
gradient, interleaved, medians), and the break-even of a line through the sampled times is
each block's own sampling limit. ``--rounds N`` measures N times afresh (the limits'
spread on this machine). Printed next to each model: the whole step's break-even that
``vcas_step.py --sample-max-ratio 1 --rs 0.7 0.8 0.9 0.95`` measured in session 26.

Run from the repository root: ``python benchmarks/vcas_block_policy.py --help``.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Sequence
from typing import Any

from _common import add_common_options, header_lines, markdown_table, save_results, start
from greenprop.vcas import VCASConfig, apply_vcas
from greenprop.vcas.block_policy import BLOCK_PROBE_RATIOS, measured_block_limits
from greenprop.vcas.policy import TimingCache, break_even
from greenprop.vcas.surgery import vcas_handle
from vcas_step import DEFAULT_BATCH, build, load_batch

#: The whole step's break-even (direct step = dense) measured in session 26 (docs/vcas.md).
STEP_BREAK_EVEN = {"minilm": 0.9, "vit": 0.85, "resnet": 0.7}


def _label(key: str) -> str:
    """``BasicBlock [128, 16, 28, 28] 4.6k``: a timing key's block class, first input shape, parameters."""
    parts = key.split("/")
    block = parts[4].rsplit(".", 1)[-1]
    shape = parts[5].removeprefix("in=").split("]")[0].split("[", 1)[-1]
    shapes = [s.strip("[]") for s in parts[6].removeprefix("params=").split("],[") if s.strip("[]")]
    count = sum(math.prod(int(d) for d in s.split(",")) for s in shapes)
    return f"{block} [{shape}] {count / 1000:.1f}k"


def measure_once(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """One fresh measurement of a model's block limits: limits by block, timings by key, seconds."""
    x, _, source = load_batch(name, args.batch or DEFAULT_BATCH[name], args.seq_len, args.data, args.seed)
    model = apply_vcas(build(name, args.seed), VCASConfig(block_policy="measured")).train()
    handle = vcas_handle(model)
    cache = TimingCache()
    start_s = time.perf_counter()
    limits = measured_block_limits(
        model,
        handle.runtime,
        handle.samplers,
        lambda: model(x),
        cache,
        repeats=args.repeats,
        warmup=args.warmup,
    )
    seconds = time.perf_counter() - start_s
    return {"source": source, "limits": limits, "timings": cache.timings, "seconds": seconds}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Measure, print the Markdown report, return (and optionally save) the results."""
    args = parse_args(argv)
    env = start(args, __file__, argv)
    lines = header_lines(env, "VCAS: the measured block policy's limits and cost")
    ratios = " / ".join(f"{r:g}" for r in BLOCK_PROBE_RATIOS)
    lines += [
        f"Each distinct block timed exact and sampled at {ratios} (median of {args.repeats} interleaved "
        f"forward + backward runs after {args.warmup} warm-up runs, fp32, dropout off); times in ms; "
        "limit = where the line through the sampled times meets the exact time. cost = seconds of the "
        "whole measurement (the forward recording the inputs included). step break-even: session 26's "
        "whole-step measurement.",
        "",
    ]
    out: dict[str, Any] = {"benchmark": "vcas_block_policy", "environment": env, "models": {}}
    for name in args.models:
        rounds = [measure_once(name, args) for _ in range(args.rounds)]
        limits = [sorted(r["limits"].values()) for r in rounds]
        lines += [
            f"#### {name} ({rounds[0]['source']}; step break-even {STEP_BREAK_EVEN[name]:g})",
            "",
        ]
        rows = []
        for i, r in enumerate(rounds):
            for key, t in r["timings"].items():
                sampled = " / ".join(f"{1000 * s:.2f}" for s in t.sampled_s)
                rows.append(
                    [f"{i + 1}", _label(key), f"{1000 * t.dense_s:.2f}", sampled, f"{break_even(t):.2f}"]
                )
        lines += markdown_table(
            ["round", "block [input] params", "exact", f"sampled at {ratios}", "limit"], rows
        )
        costs = [r["seconds"] for r in rounds]
        lines += [
            "",
            f"limits per block (round 1): {', '.join(f'{v:.2f}' for v in rounds[0]['limits'].values())}; "
            f"median over rounds and blocks {statistics.median(v for lim in limits for v in lim):.2f}; "
            f"cost {', '.join(f'{c:.2f}' for c in costs)} s",
            "",
        ]
        out["models"][name] = {
            "step_break_even": STEP_BREAK_EVEN[name],
            "rounds": [
                {
                    "source": r["source"],
                    "limits": r["limits"],
                    "seconds": r["seconds"],
                    "timings": {k: vars(t) for k, t in r["timings"].items()},
                }
                for r in rounds
            ],
        }
    print("\n".join(lines))
    return save_results(out, args)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument(
        "--models", nargs="+", choices=("minilm", "vit", "resnet"), default=["vit", "resnet", "minilm"]
    )
    p.add_argument("--batch", type=int, default=None, help="batch size (default: minilm 32, vit/resnet 128)")
    p.add_argument("--seq-len", type=int, default=56, help="MiniLM tokens per sample (default 56)")
    p.add_argument("--data", choices=("real", "random"), default="real", help="batch source (default real)")
    p.add_argument(
        "--repeats", type=int, default=5, help="timed runs per variant (default 5, the controller's)"
    )
    p.add_argument(
        "--warmup", type=int, default=1, help="untimed runs per variant first (default 1, the controller's)"
    )
    p.add_argument("--rounds", type=int, default=1, help="fresh measurements per model (default 1)")
    add_common_options(p)
    args = p.parse_args(argv)
    if args.seq_len < 1 or args.repeats < 1 or args.warmup < 0 or args.rounds < 1 or (args.batch or 1) < 1:
        p.error("--batch, --seq-len, --repeats and --rounds must be >= 1, --warmup >= 0")
    return args


if __name__ == "__main__":
    main()
