"""Exact blocks before a sampling block: keep VCAS's Functions (skip the dropped rows) or run plain?

Since session 27 a block whose sampler and every later one run exact (``VCASRuntime.exact_tail``)
uses autograd's own Linear / conv ops. Exact blocks *before* a sampling block keep the VCAS
Functions instead: the later block's dropped rows reach them as zero rows, which the
Functions skip (found from the sampler's norms). This script measures that choice on the
fixed batches of ``vcas_step.py``: every block at ``--exact-ratio`` (above the default
``sample_max_ratio``, so exact) except one at ``--sampled-ratio`` (the last block, or the
first with ``--where first``), three variants interleaved:

* ``dense``: the unconverted model;
* ``functions``: the library as it is;
* ``plain``: ``exact_tail`` patched to look at its own block only, so every exact block runs
  plain and computes its zero rows too.

With ``--where first`` the sampling block is the first in forward order, so no exact block
sits before it and both VCAS variants run the same code: their difference is the noise.

Run from the repository root: ``python benchmarks/vcas_exact_tail.py --help``.
"""

from __future__ import annotations

import argparse
import copy
import gc
import statistics
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from _common import (
    CLOCKS,
    add_clock_option,
    add_common_options,
    check_ratios,
    clock_note,
    header_lines,
    markdown_table,
    save_results,
    start,
)
from greenprop.vcas import VCASConfig, apply_vcas
from greenprop.vcas.layers import Mode, VCASRuntime
from greenprop.vcas.surgery import vcas_handle
from vcas_step import DEFAULT_BATCH, build, load_batch, timed_step

VARIANTS = ("dense", "functions", "plain")


def _own_block_only(runtime: VCASRuntime, block: int) -> bool:
    """``exact_tail`` that ignores later blocks: every exact block runs plain."""
    return runtime.mode is Mode.FULL and any(
        s.index == block and s.drawn_ratio >= 1.0 for s in runtime.samplers
    )


@contextmanager
def _patched(variant: str) -> Iterator[None]:
    original = VCASRuntime.exact_tail
    if variant == "plain":
        VCASRuntime.exact_tail = _own_block_only  # type: ignore[method-assign]
    try:
        yield
    finally:
        VCASRuntime.exact_tail = original  # type: ignore[method-assign]


def measure(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Median step time of each variant on one model, and each VCAS variant's ratio to dense."""
    x, y, source = load_batch(name, args.batch or DEFAULT_BATCH[name], args.seq_len, "real", args.seed)
    dense = build(name, args.seed)
    models = {"dense": dense}
    for variant in VARIANTS[1:]:
        model = apply_vcas(copy.deepcopy(dense), VCASConfig(seed=args.seed))
        samplers = vcas_handle(model).samplers
        for sampler in samplers:
            sampler.ratio = args.exact_ratio
        samplers[-1 if args.where == "last" else 0].ratio = args.sampled_ratio
        models[variant] = model
    clock = CLOCKS[args.clock]

    def step(variant: str) -> float:
        with _patched(variant):
            forward, backward = timed_step(models[variant], x, y, clock)
        return forward + backward

    for _ in range(args.warmup):
        for variant in VARIANTS:
            step(variant)
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    gc.disable()
    try:
        for i in range(args.repeats):
            for variant in VARIANTS[i % 3 :] + VARIANTS[: i % 3]:  # rotate who goes first
                times[variant].append(step(variant))
    finally:
        gc.enable()
    medians = {v: statistics.median(t) for v, t in times.items()}
    return {
        "source": source,
        "median_s": medians,
        "ratio": {v: medians[v] / medians["dense"] for v in VARIANTS[1:]},
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Measure, print the Markdown report, return (and optionally save) the results."""
    args = parse_args(argv)
    env = start(args, __file__, argv)
    lines = header_lines(env, "VCAS: exact blocks before a sampling block, Functions or plain")
    lines += [
        f"Every block at ratio {args.exact_ratio:g} (exact) but the {args.where} at {args.sampled_ratio:g}; "
        f"median of {args.repeats} interleaved steps after {args.warmup} warm-up rounds, step / dense."
        + clock_note(args.clock),
        "",
    ]
    out: dict[str, Any] = {"benchmark": "vcas_exact_tail", "environment": env, "models": {}}
    rows = []
    for name in args.models:
        result = measure(name, args)
        out["models"][name] = result
        ratio = result["ratio"]
        rows.append(
            [
                name,
                f"{1000 * result['median_s']['dense']:.1f}",
                f"{ratio['functions']:.3f}",
                f"{ratio['plain']:.3f}",
            ]
        )
    lines += markdown_table(["model", "dense ms", "functions / dense", "plain / dense"], rows)
    print("\n".join(lines))
    return save_results(out, args)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--models", nargs="+", choices=("minilm", "vit", "resnet"), default=["vit", "resnet"])
    p.add_argument("--batch", type=int, default=None, help="batch size (default: minilm 32, vit/resnet 128)")
    p.add_argument("--seq-len", type=int, default=56, help="MiniLM tokens per sample (default 56)")
    p.add_argument("--where", choices=("last", "first"), default="last", help="the sampling block")
    p.add_argument("--sampled-ratio", type=float, default=0.5, help="its ratio (default 0.5)")
    p.add_argument(
        "--exact-ratio", type=float, default=0.9, help="the other blocks' ratio (default 0.9: above 0.8)"
    )
    p.add_argument("--repeats", type=int, default=10, help="timed steps per variant (default 10)")
    p.add_argument("--warmup", type=int, default=3, help="untimed rounds first (default 3)")
    add_clock_option(p)
    add_common_options(p)
    args = p.parse_args(argv)
    check_ratios(p, "--sampled-ratio/--exact-ratio", [args.sampled_ratio, args.exact_ratio])
    if args.repeats < 1 or args.warmup < 0 or (args.batch or 1) < 1:
        p.error("--repeats and --batch must be >= 1, --warmup >= 0")
    return args


if __name__ == "__main__":
    main()
