"""Whole ResNet-18 training step: dense vs greenprop's ssProp vs a zero-overhead floor.

Four variants of the same CIFAR ResNet-18 (identical starting weights, one model
instance each) run forward + backward + SGD step on one fixed batch:

* ``a`` dense: the plain model;
* ``b`` greenprop: ``apply_ssprop(model, SSPropConfig(keep=K, round_to=R))``;
* ``c`` reference: the same convolutions converted to :class:`_narrow_conv.NarrowConv2d`, whose
  backward computes the *first* ``k`` output channels (the same ``k`` per layer as
  ``b``) with no ranking, gather or scatter. It is the floor of the approach on this
  machine: whatever ``b`` costs above ``c`` is greenprop's overhead, whatever ``c``
  costs above ``k/C`` of the dense backward is the kernels' (smaller GEMMs are less
  efficient) and the rest of the step's (forward, BatchNorm, optimizer);
* ``d`` greenprop without its C++ channel ops (``kernels.use_kernels(False)``): scoring,
  gather and scatter in PyTorch ops (``abs().sum()``, ``index_select``, ``zeros_like`` +
  ``index_copy_``), so ``d/c`` vs ``b/c`` shows what the ops close of the gap (``b``
  equals ``d`` where the ops cannot build).

Timings are interleaved: every round runs one step of each variant, in an order that
rotates so each variant goes first equally often (when ``--rounds`` is a multiple of
4), after untimed warm-up steps. The memory allocator matters a lot on CPU (large
activation buffers are mmap'ed and page-faulted on every step by default); set
``GLIBC_TUNABLES`` in the shell, see ``benchmarks/README.md``. This script never sets
it, because glibc reads it only at process start.

Run ``python benchmarks/ssprop_step.py --help`` for the options.
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import sys
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from _common import (
    CLOCKS,
    add_clock_option,
    add_common_options,
    check_ratios,
    clock_note,
    forward_backward_flops,
    header_lines,
    interleaved_times,
    markdown_table,
    memory_cell,
    quartiles,
    save_results,
    start,
    step_memory,
)
from _narrow_conv import apply_reference
from greenprop import kernels, models
from greenprop.ssprop import SSPropConfig, apply_ssprop, sparse_layers

#: Targets for greenprop's step time relative to dense, per keep.
TARGET_B_OVER_A: dict[float, float] = {0.6: 0.88, 0.4: 0.80}
#: greenprop should be within this factor of the zero-overhead reference (issue 13).
TARGET_B_OVER_C = 1.02
VARIANTS = ("a", "b", "c", "d")


# --------------------------------------------------------------------------- the step


@dataclass
class StepResult:
    """Timings of one keep value (seconds) and the derived ratios."""

    keep: float
    round_to: int
    layers_converted: int
    k_total: int
    channels_total: int
    flops_b_over_a: float
    flops_c_over_a: float
    median_s: dict[str, float]
    per_round_s: dict[str, list[float]]
    faults_per_step: dict[str, float]  # median minor page faults per timed step
    b_over_a: float  # median of per-round ratios
    b_over_a_iqr: tuple[float, float]
    b_over_a_of_medians: float
    c_over_a: float
    c_over_a_of_medians: float
    b_over_c: float
    b_over_c_of_medians: float
    d_over_c: float  # greenprop on PyTorch ops vs the reference
    b_over_d: float  # what the C++ channel ops change
    kernels_loaded: bool
    target_b_over_a: float | None
    final_loss: dict[str, float]
    memory: dict[str, dict[str, Any]]  # variant -> peak memory of one untimed step (step_memory)


def build_variants(
    base: nn.Module, keep: float, round_to: int, channels_last: bool
) -> tuple[dict[str, nn.Module], dict[str, int]]:
    """Dense, greenprop and reference copies of ``base`` and the per-layer ``k`` of b/c."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    dense = copy.deepcopy(base).to(memory_format=fmt)
    sparse = copy.deepcopy(base).to(memory_format=fmt)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "converted no layer" is checked below
        apply_ssprop(sparse, SSPropConfig(keep=keep, round_to=round_to))
    ks = {name: layer.k_for() for name, layer in sparse_layers(sparse).items()}
    if not ks:
        raise RuntimeError("apply_ssprop converted no layer")
    reference = apply_reference(copy.deepcopy(base).to(memory_format=fmt), ks)
    return {"a": dense, "b": sparse, "c": reference}, ks


def make_step(model: nn.Module, x: Tensor, y: Tensor, lr: float) -> Callable[[], Tensor]:
    """A closure running one SGD training step on the fixed batch; returns the loss."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    model.train()

    def step() -> Tensor:
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        return loss.detach()

    return step


def without_kernels(step: Callable[[], Tensor]) -> Callable[[], Tensor]:
    """``step`` with greenprop's C++ channel ops switched off (variant d)."""

    def run() -> Tensor:
        with kernels.use_kernels(False):
            return step()

    return run


def random_batch(batch: int, image_size: int, channels_last: bool, seed: int) -> tuple[Tensor, Tensor]:
    """A fixed CIFAR-shaped batch (data loading is not part of what is measured)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, image_size, image_size, generator=gen)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, torch.randint(0, 10, (batch,), generator=gen)


def benchmark_keep(base: nn.Module, keep: float, args: argparse.Namespace) -> StepResult:
    """Build the three variants at ``keep`` and time them over interleaved rounds."""
    variants, ks = build_variants(base, keep, args.round_to, args.channels_last)
    variants["d"] = copy.deepcopy(variants["b"])  # stepped with the C++ ops off
    x, y = random_batch(args.batch, args.image_size, args.channels_last, args.seed)
    fx, fy = random_batch(2, args.image_size, args.channels_last, args.seed)  # FLOPs scale with batch
    flops = {name: forward_backward_flops(m, fx, fy) for name, m in variants.items()}
    steps = {name: make_step(m, x, y, args.lr) for name, m in variants.items()}
    steps["d"] = without_kernels(steps["d"])
    timings = interleaved_times(steps, args.rounds, args.warmup, clock=CLOCKS[args.clock])
    times = timings.seconds
    final_loss = {name: float(step()) for name, step in steps.items()}  # one untimed step: a NaN check
    memory = step_memory(steps)
    medians = {name: statistics.median(t) for name, t in times.items()}

    def per_round(num: str, den: str) -> list[float]:
        return [n / d for n, d in zip(times[num], times[den], strict=True)]

    q1, ba, q3 = quartiles(per_round("b", "a"))
    channels = sum(m.out_channels for name, m in variants["b"].named_modules() if name in ks)
    return StepResult(
        keep=keep,
        round_to=args.round_to,
        layers_converted=len(ks),
        k_total=sum(ks.values()),
        channels_total=channels,
        flops_b_over_a=flops["b"] / flops["a"],
        flops_c_over_a=flops["c"] / flops["a"],
        median_s=medians,
        per_round_s=times,
        faults_per_step={name: statistics.median(f) for name, f in timings.minor_faults.items()},
        b_over_a=ba,
        b_over_a_iqr=(q1, q3),
        b_over_a_of_medians=medians["b"] / medians["a"],
        c_over_a=statistics.median(per_round("c", "a")),
        c_over_a_of_medians=medians["c"] / medians["a"],
        b_over_c=statistics.median(per_round("b", "c")),
        b_over_c_of_medians=medians["b"] / medians["c"],
        d_over_c=statistics.median(per_round("d", "c")),
        b_over_d=statistics.median(per_round("b", "d")),
        kernels_loaded=kernels.load(),
        target_b_over_a=TARGET_B_OVER_A.get(round(keep, 6)),
        final_loss=final_loss,
        memory=memory,
    )


# --------------------------------------------------------------------------- report


def _verdict(value: float, limit: float | None) -> str:
    if limit is None:
        return "-"
    return f"<= {limit:.2f} {'met' if value <= limit else 'MISSED'}"


def result_table(results: Sequence[StepResult]) -> list[str]:
    """The Markdown table of all keeps (times in ms)."""
    header = [
        "keep",
        "k / C (all convs)",
        "FLOPs b/a",
        "a dense (ms)",
        "b greenprop (ms)",
        "c reference (ms)",
        "d PyTorch ops (ms)",
        "b/a [IQR]",
        "b/a (of medians)",
        "c/a",
        "b/c",
        "d/c",
        "target b/a",
        "target b/c",
    ]
    rows = []
    for r in results:
        ms = {name: f"{1e3 * s:.1f}" for name, s in r.median_s.items()}
        rows.append(
            [
                f"{r.keep:g}" + (f" (round_to {r.round_to})" if r.round_to > 1 else ""),
                f"{r.k_total} / {r.channels_total}",
                f"{r.flops_b_over_a:.3f}",
                ms["a"],
                ms["b"],
                ms["c"],
                ms["d"],
                f"{r.b_over_a:.3f} [{r.b_over_a_iqr[0]:.3f}, {r.b_over_a_iqr[1]:.3f}]",
                f"{r.b_over_a_of_medians:.3f}",
                f"{r.c_over_a:.3f}",
                f"{r.b_over_c:.3f}",
                f"{r.d_over_c:.3f}",
                _verdict(r.b_over_a, r.target_b_over_a),
                _verdict(r.b_over_c, TARGET_B_OVER_C),
            ]
        )
    return markdown_table(header, rows)


def report(env: Mapping[str, Any], args: argparse.Namespace, results: Sequence[StepResult]) -> str:
    layout = "channels_last (NHWC)" if args.channels_last else "NCHW"
    lines = header_lines(env, "ssProp: whole training step, ResNet-18 (CIFAR)")
    lines += [
        f"Forward + backward + SGD step, batch {args.batch}, 3x{args.image_size}x{args.image_size}, "
        f"width {args.width}, {layout}; median of {args.rounds} interleaved rounds after "
        f"{args.warmup} warm-up rounds. a = dense, b = greenprop `apply_ssprop` (all "
        f"{results[0].layers_converted} convs, head dense), c = first-k reference (same k, "
        "no ranking/gather/scatter), d = greenprop with its C++ channel ops off (PyTorch-ops "
        "scoring, gather and scatter; C++ ops "
        f"{'built' if results[0].kernels_loaded else 'NOT built: b = d'}). "
        "Ratios are medians of per-round ratios unless noted; "
        "FLOPs b/a is the ideal step ratio if time followed counted FLOPs."
        + clock_note(args.clock),
        "",
        *result_table(results),
        "",
    ]
    faults = "; ".join(
        f"keep {r.keep:g}: " + " / ".join(f"{r.faults_per_step[v]:.0f}" for v in VARIANTS) for r in results
    )
    memory = "; ".join(
        f"keep {r.keep:g}: " + " / ".join(memory_cell(r.memory[v]) for v in VARIANTS) for r in results
    )
    lines += [
        f"Minor page faults per step, median, a / b / c / d: {faults}. Thousands per step mean the "
        "allocator hands each step fresh pages (see GLIBC_TUNABLES in benchmarks/README.md).",
        "",
        f"Peak memory of one untimed step above its start (MiB), a / b / c / d: {memory} "
        f"({results[0].memory['a']['source']}).",
        "",
    ]
    bad = [
        f"keep {r.keep:g} {v}" for r in results for v, loss in r.final_loss.items() if not math.isfinite(loss)
    ]
    if bad:
        lines += [
            f"WARNING: non-finite loss after timing ({', '.join(bad)}); timings may be meaningless.",
            "",
        ]
    return "\n".join(lines)


# --------------------------------------------------------------------------- CLI


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--keeps", type=float, nargs="+", default=[0.6, 0.4], help="keep ratios (default 0.6 0.4)")
    p.add_argument("--round-to", type=int, default=1, help="round k up to a multiple of this (default 1)")
    p.add_argument("--batch", type=int, default=128, help="batch size (default 128)")
    p.add_argument(
        "--rounds",
        type=int,
        default=24,
        help="timed rounds (default 24, a multiple of 4 so each variant goes first equally often)",
    )
    p.add_argument("--warmup", type=int, default=3, help="untimed warm-up rounds per keep (default 3)")
    p.add_argument("--channels-last", action="store_true", help="model and input in NHWC")
    p.add_argument("--width", type=int, default=64, help="ResNet-18 base width (default 64)")
    p.add_argument("--image-size", type=int, default=32, help="input side (default 32)")
    p.add_argument("--lr", type=float, default=0.01, help="SGD learning rate (default 0.01)")
    add_clock_option(p)
    add_common_options(p)
    args = p.parse_args(argv)
    for name in ("batch", "rounds", "width", "image_size", "round_to"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup < 0:
        p.error("--warmup must be >= 0")
    check_ratios(p, "--keeps", args.keeps)
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark, print the Markdown report, return (and optionally save) results."""
    args = parse_args(argv)
    env = start(args, __file__, argv)
    torch.manual_seed(args.seed)
    base = models.create("resnet18", in_channels=3, image_size=args.image_size, width=args.width)
    results = []
    for keep in args.keeps:
        print(f"timing keep={keep:g} ...", file=sys.stderr, flush=True)
        results.append(benchmark_keep(base, keep, args))
    print(report(env, args, results), flush=True)
    out = {"benchmark": "ssprop_step", "environment": env, "results": [asdict(r) for r in results]}
    return save_results(out, args)


if __name__ == "__main__":
    main()
