"""Kept rows back into a zero full-size tensor: the C++ op against two PyTorch-op versions.

Times the three ways to write ``kept`` (``r * n`` rows of dim 0, random, ascending) into a
full-size tensor that is zero everywhere else, on the shapes ssProp and VCAS scatter
(:func:`greenprop.rows.scatter_rows` serves both):

* ``C++ op``: ``empty`` + the ``scatter_rows_`` op of :mod:`greenprop.kernels`, every byte
  written once (timed at every size; the library's own threshold is ``kernels.MIN_NUMEL``);
* ``index_fill_``: ``empty`` + ``index_copy_`` of the kept rows + ``index_fill_`` of the
  dropped ones (the dropped indices computed from a mask each call);
* ``zeros``: ``zeros`` + ``index_copy_``.

VCAS shapes are input gradients: ResNet-18-GN stage inputs at batch 128 on 28x28
Fashion-MNIST (NCHW and channels_last), the tiny ViT's tokens (128 x 50 x 128 / 512) and
MiniLM's (32 x 56 x 384 / 1536), at ``--rs``. ssProp's are the weight gradients (and one
bias) of a CIFAR ResNet-18 (width 64) at ``--keeps``, both layouts. Calls interleaved with
a rotating order; medians. Run ``python benchmarks/row_scatter.py --help`` for the options.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from _common import (
    add_common_options,
    check_ratios,
    header_lines,
    interleaved_times,
    markdown_table,
    save_results,
    start,
)
from greenprop import kernels
from greenprop.rows import row_matrix

CL = torch.channels_last
#: (method, what, shape) of the full tensors; 4-D ones are timed in both layouts.
VCAS_SHAPES = [
    ("VCAS", "ResNet-18-GN stage 1 input grad", (128, 64, 28, 28)),
    ("VCAS", "ResNet-18-GN stage 2 input grad", (128, 128, 14, 14)),
    ("VCAS", "ResNet-18-GN stage 3 input grad", (128, 256, 7, 7)),
    ("VCAS", "ViT tokens, dim 128", (128, 50, 128)),
    ("VCAS", "ViT tokens, MLP 512", (128, 50, 512)),
    ("VCAS", "MiniLM tokens, dim 384", (32, 56, 384)),
    ("VCAS", "MiniLM tokens, MLP 1536", (32, 56, 1536)),
]
SSPROP_SHAPES = [
    ("ssProp", "conv weight grad", (64, 64, 3, 3)),
    ("ssProp", "conv weight grad", (128, 128, 3, 3)),
    ("ssProp", "conv weight grad", (256, 256, 3, 3)),
    ("ssProp", "conv weight grad", (512, 256, 3, 3)),
    ("ssProp", "conv weight grad", (512, 512, 3, 3)),
    ("ssProp", "shortcut weight grad", (512, 256, 1, 1)),
    ("ssProp", "bias grad", (512,)),
]
SMALL_SHAPES = [("VCAS", "smoke", (8, 4, 5, 5)), ("ssProp", "smoke", (16, 8))]


def cpp_op(out: Tensor, idx: Tensor, kept: Tensor) -> Callable[[], Tensor]:
    """``empty`` + the C++ op, on the physical row matrices (any size)."""
    fmt = CL if out.dim() == 4 and not out.is_contiguous() else torch.contiguous_format

    def run() -> Tensor:
        full = torch.empty_like(out)
        kernels.scatter_rows_(row_matrix(full), idx, row_matrix(kept.contiguous(memory_format=fmt)))
        return full

    return run


def fill_dropped(out: Tensor, idx: Tensor, kept: Tensor) -> Callable[[], Tensor]:
    """``empty`` + ``index_copy_`` of the kept rows + ``index_fill_`` of the dropped ones."""

    def run() -> Tensor:
        dropped = torch.ones(out.shape[0], dtype=torch.bool)
        dropped[idx] = False
        full = torch.empty_like(out).index_copy_(0, idx, kept)
        return full.index_fill_(0, dropped.nonzero().squeeze(1), 0)

    return run


def zeros_copy(out: Tensor, idx: Tensor, kept: Tensor) -> Callable[[], Tensor]:
    """``zeros`` + ``index_copy_``."""
    return lambda: torch.zeros_like(out).index_copy_(0, idx, kept)


VARIANTS = {"C++ op": cpp_op, "index_fill_": fill_dropped, "zeros": zeros_copy}


def cases(args: argparse.Namespace) -> list[tuple[str, str, tuple[int, ...], str, float]]:
    """(method, what, shape, layout, ratio) of every timed case."""
    if args.small:
        shapes = [(m, w, s, args.rs) for m, w, s in SMALL_SHAPES]
    else:
        shapes = [(m, w, s, args.rs) for m, w, s in VCAS_SHAPES]
        shapes += [(m, w, s, args.keeps) for m, w, s in SSPROP_SHAPES]
    out = []
    for method, what, shape, ratios in shapes:
        layouts = ["NCHW", "channels_last"] if len(shape) == 4 else ["-"]
        out += [(method, what, shape, layout, r) for layout in layouts for r in ratios]
    return out


def time_case(
    shape: tuple[int, ...], layout: str, ratio: float, args: argparse.Namespace
) -> dict[str, float]:
    """Median ms of each variant, and a check that all three agree."""
    gen = torch.Generator().manual_seed(args.seed)
    fmt = CL if layout == "channels_last" else torch.contiguous_format
    n = shape[0]
    idx = torch.randperm(n, generator=gen)[: max(1, round(ratio * n))].sort().values
    out = torch.empty(shape).contiguous(memory_format=fmt)
    kept = torch.randn(idx.numel(), *shape[1:], generator=gen).contiguous(memory_format=fmt)
    fns = {name: make(out, idx, kept) for name, make in VARIANTS.items()}
    want = fns["zeros"]()
    for name, fn in fns.items():
        if not torch.equal(fn(), want):
            raise SystemExit(f"greenprop: error: {name} gave a different result on {shape} {layout}")
    timings = interleaved_times(fns, args.repeats, args.warmup)
    return {name: 1e3 * statistics.median(s) for name, s in timings.seconds.items()}


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    if not kernels.load():
        raise SystemExit("greenprop: error: the C++ ops could not be built; nothing to compare")
    results = []
    for method, what, shape, layout, ratio in cases(args):
        ms = time_case(shape, layout, ratio, args)
        numel = 1
        for s in shape:
            numel *= s
        results.append(
            {
                "method": method,
                "what": what,
                "shape": list(shape),
                "layout": layout,
                "ratio": ratio,
                "mib": 4 * numel / 2**20,
                "kernel_serves": numel >= kernels.MIN_NUMEL,
                "ms": ms,
            }
        )
        if args.progress:
            print(f"  {method} {shape} {layout} {ratio:g}: {ms}", flush=True)
    return results


def report(env: dict[str, Any], args: argparse.Namespace, results: list[dict[str, Any]]) -> str:
    lines = header_lines(env, "Row scatter: C++ op vs index_fill_ vs zeros + index_copy_")
    lines += [
        f"float32; kept rows = round(r * n), random, ascending; median ms of {args.repeats} calls per "
        "variant, interleaved. `kernel` says whether greenprop uses the C++ op at that size "
        f"(n elements >= {kernels.MIN_NUMEL}).",
        "",
    ]
    rows = []
    for res in results:
        ms = res["ms"]
        z = ms["zeros"]
        rows.append(
            [
                res["method"],
                res["what"],
                "x".join(map(str, res["shape"])),
                res["layout"],
                f"{res['ratio']:g}",
                f"{res['mib']:.2f}",
                "yes" if res["kernel_serves"] else "no",
                f"{ms['C++ op']:.3f}",
                f"{ms['index_fill_']:.3f}",
                f"{z:.3f}",
                f"{ms['C++ op'] / z:.2f}",
                f"{ms['index_fill_'] / z:.2f}",
            ]
        )
    header = [
        "method",
        "tensor",
        "shape",
        "layout",
        "r / keep",
        "MiB",
        "kernel",
        "C++ op",
        "index_fill_",
        "zeros",
        "C++/zeros",
        "fill/zeros",
    ]
    lines += markdown_table(header, rows)
    return "\n".join([*lines, ""])


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument(
        "--rs", type=float, nargs="+", default=[0.5, 0.8], help="VCAS kept sample ratios (0.5 0.8)"
    )
    p.add_argument("--keeps", type=float, nargs="+", default=[0.6, 0.4], help="ssProp keep ratios (0.6 0.4)")
    p.add_argument("--repeats", type=int, default=21, help="timed calls per variant and case (21)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls per variant first (2)")
    p.add_argument("--small", action="store_true", help="two tiny shapes (smoke test; timings mean nothing)")
    p.add_argument("--progress", action="store_true", help="print each case as it finishes")
    add_common_options(p)
    args = p.parse_args(argv)
    check_ratios(p, "--rs", args.rs)
    check_ratios(p, "--keeps", args.keeps)
    if args.repeats < 1 or args.warmup < 0:
        p.error("--repeats must be >= 1 and --warmup >= 0")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Time every case, print the Markdown table, return (and optionally save) the results."""
    args = parse_args(argv)
    env = start(args, __file__, argv)
    results = run(args)
    print(report(env, args, results), flush=True)
    return save_results({"benchmark": "row_scatter", "environment": env, "cases": results}, args)


if __name__ == "__main__":
    main()
