"""Per-layer backward time vs keep for the convolutions of a CIFAR ResNet-18.

For every conv shape and keep ratio four backwards of the same layer (same weights,
same input, same output gradient) are timed side by side:

* dense: autograd through a plain ``nn.Conv2d`` (one ``aten.convolution_backward``
  for grad_input + grad_weight);
* sparse: greenprop's :class:`~greenprop.ssprop.SparseConv2d` at that keep (top-k
  ranking, gather, ``convolution_backward`` on ``k`` channels, scatter);
* floor: :class:`_narrow_conv.NarrowConv2d` with the same ``k``: the same small
  ``convolution_backward`` on the first ``k`` channels, no ranking/gather/scatter;
* torch_ops: the sparse layer with greenprop's C++ channel ops switched off
  (``kernels.use_kernels(False)``): its scoring, gather and scatter in PyTorch ops.

Only the backward is timed (``torch.autograd.grad(..., retain_graph=True)`` on a
graph built once). Calls are interleaved and the order rotates every repeat; the
reported time is the median. ``speedup = dense / sparse``; the ideal is ``C / k``
(``k`` after flooring and ``--round-to`` rounding), and ``of ideal = speedup * k / C``.

Run from the repository root: ``python benchmarks/ssprop_layers.py --help``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from _common import (
    CLOCKS,
    add_clock_option,
    add_common_options,
    check_ratios,
    clock_note,
    header_lines,
    interleaved_times,
    markdown_table,
    save_results,
    start,
)
from _narrow_conv import NarrowConv2d
from greenprop import kernels
from greenprop.ssprop import SparseConv2d
from greenprop.ssprop.functional import keep_count

DEFAULT_KEEPS = (1.0, 0.8, 0.6, 0.4, 0.2)
VARIANTS = ("dense", "sparse", "floor", "torch_ops")


@dataclass(frozen=True)
class ConvShape:
    """One convolution of the network: channels, input side, kernel and stride."""

    group: str
    c_in: int
    c_out: int
    size: int
    kernel: int
    stride: int

    @property
    def label(self) -> str:
        ch = f"{self.c_in}" if self.c_in == self.c_out else f"{self.c_in}->{self.c_out}"
        return f"{ch} {self.kernel}x{self.kernel}/{self.stride} @{self.size}x{self.size}"

    def conv_args(self) -> dict[str, Any]:
        return {
            "in_channels": self.c_in,
            "out_channels": self.c_out,
            "kernel_size": self.kernel,
            "stride": self.stride,
            "padding": self.kernel // 2,
            "bias": False,
        }


def resnet18_shapes(width: int = 64, size: int = 32, downsample: bool = True) -> list[ConvShape]:
    """The distinct conv shapes of a CIFAR ResNet-18 (the 3-channel stem excluded).

    Stride-1 3x3 convs of the four stages, the stride-2 3x3 convs opening stages 2-4,
    and (``downsample``) the 1x1 stride-2 shortcut convs beside them.
    """
    stages = [(width * 2**i, max(1, size // 2**i)) for i in range(4)]
    shapes = [ConvShape("3x3 stride 1", c, c, hw, 3, 1) for c, hw in stages]
    shapes += [ConvShape("3x3 stride 2", c, 2 * c, hw, 3, 2) for c, hw in stages[:3]]
    if downsample:
        shapes += [ConvShape("1x1 stride 2", c, 2 * c, hw, 1, 2) for c, hw in stages[:3]]
    return shapes


#: --shapes choices: the real network, or a tiny one for smoke tests.
SHAPE_SETS: dict[str, Callable[[bool], list[ConvShape]]] = {
    "resnet18": lambda ds: resnet18_shapes(64, 32, ds),
    "small": lambda ds: resnet18_shapes(8, 8, ds),
}


@dataclass
class LayerResult:
    """One (shape, keep, round_to) row; times in seconds."""

    group: str
    shape: str
    keep: float
    round_to: int
    channels: int
    k: int
    median_s: dict[str, float]
    speedup: float  # dense / sparse, ratio of medians
    speedup_per_repeat: float  # median of per-repeat dense / sparse
    ideal: float  # C / k
    of_ideal: float  # speedup * k / C
    sparse_over_floor: float
    torch_ops_over_floor: float
    reused_from_round_to: int | None = None


def backward_calls(
    shape: ConvShape, keep: float, round_to: int, batch: int, channels_last: bool, seed: int
) -> tuple[int, dict[str, Callable[[], object]]]:
    """``k`` and one zero-argument backward per variant, on shared weights/input/dy."""
    torch.manual_seed(seed)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    dense = nn.Conv2d(**shape.conv_args())
    sparse = SparseConv2d(**shape.conv_args(), keep=keep, round_to=round_to)
    k = sparse.k_for()
    floor = NarrowConv2d(**shape.conv_args(), narrow_k=k)
    for layer in (sparse, floor):
        layer.load_state_dict(dense.state_dict())
    layers = {"dense": dense, "sparse": sparse, "floor": floor}
    for layer in layers.values():
        layer.to(memory_format=fmt)
    x = torch.randn(batch, shape.c_in, shape.size, shape.size).contiguous(memory_format=fmt)
    x.requires_grad_(True)
    outputs = {name: layer(x) for name, layer in layers.items()}
    dy = torch.randn_like(outputs["dense"])  # randn_like keeps the output's memory format

    def call(out: Tensor, weight: Tensor) -> Callable[[], object]:
        return lambda: torch.autograd.grad(out, (x, weight), dy, retain_graph=True)

    calls = {name: call(outputs[name], layers[name].weight) for name in ("dense", "sparse", "floor")}
    sparse_call = calls["sparse"]

    def torch_ops() -> object:
        with kernels.use_kernels(False):
            return sparse_call()

    return k, {**calls, "torch_ops": torch_ops}


def measure(
    shape: ConvShape, keep: float, round_to: int, args: argparse.Namespace
) -> tuple[int, dict[str, list[float]]]:
    """``k`` and the interleaved backward times of the three variants."""
    k, calls = backward_calls(shape, keep, round_to, args.batch, args.channels_last, args.seed)
    return k, interleaved_times(calls, args.repeats, args.warmup, clock=CLOCKS[args.clock]).seconds


def summarise(
    shape: ConvShape, keep: float, round_to: int, k: int, times: dict[str, list[float]]
) -> LayerResult:
    med = {name: statistics.median(t) for name, t in times.items()}
    speedup = med["dense"] / med["sparse"]
    per_repeat = [d / s for d, s in zip(times["dense"], times["sparse"], strict=True)]
    return LayerResult(
        group=shape.group,
        shape=shape.label,
        keep=keep,
        round_to=round_to,
        channels=shape.c_out,
        k=k,
        median_s=med,
        speedup=speedup,
        speedup_per_repeat=statistics.median(per_repeat),
        ideal=shape.c_out / k,
        of_ideal=speedup * k / shape.c_out,
        sparse_over_floor=med["sparse"] / med["floor"],
        torch_ops_over_floor=med["torch_ops"] / med["floor"],
    )


def run(args: argparse.Namespace) -> list[LayerResult]:
    """All rows; a (shape, k) already timed under another round_to is not timed again."""
    results: list[LayerResult] = []
    for shape in SHAPE_SETS[args.shapes](not args.no_downsample):
        timed: dict[int, tuple[int, dict[str, list[float]]]] = {}  # k -> (round_to, times)
        for keep in args.keeps:
            for round_to in args.round_to:
                k = keep_count(keep, shape.c_out, round_to)
                if k in timed:
                    first_round_to, times = timed[k]
                    row = summarise(shape, keep, round_to, k, times)
                    row.reused_from_round_to = first_round_to
                else:
                    k, times = measure(shape, keep, round_to, args)
                    timed[k] = (round_to, times)
                    row = summarise(shape, keep, round_to, k, times)
                results.append(row)
                if args.progress:
                    note = f"keep={keep:g} round_to={round_to}: speedup {row.speedup:.2f}x"
                    print(f"  {shape.label} {note}", file=sys.stderr)
    return results


def result_table(results: Sequence[LayerResult]) -> list[str]:
    header = [
        "conv (Cin->Cout k/stride @in)",
        "keep",
        "round_to",
        "k / C",
        "dense (ms)",
        "sparse (ms)",
        "floor (ms)",
        "PyTorch ops (ms)",
        "speedup",
        "ideal C/k",
        "of ideal",
        "sparse/floor",
        "PyTorch ops/floor",
    ]
    rows = []
    for r in results:
        ms = {name: f"{1e3 * s:.2f}" for name, s in r.median_s.items()}
        rows.append(
            [
                r.shape,
                f"{r.keep:g}",
                f"{r.round_to}",
                f"{r.k} / {r.channels}",
                ms["dense"],
                ms["sparse"],
                ms["floor"],
                ms["torch_ops"],
                f"{r.speedup:.2f}x",
                f"{r.ideal:.2f}x",
                f"{100 * r.of_ideal:.0f}%",
                f"{r.sparse_over_floor:.2f}",
                f"{r.torch_ops_over_floor:.2f}",
            ]
        )
    return markdown_table(header, rows)


def report(env: dict[str, Any], args: argparse.Namespace, results: Sequence[LayerResult]) -> str:
    layout = "channels_last (NHWC)" if args.channels_last else "NCHW"
    lines = header_lines(env, "ssProp: per-layer backward time vs keep (ResNet-18 CIFAR conv shapes)")
    lines += [
        f"Backward only (grad_input + grad_weight), batch {args.batch}, fp32, {layout}; median of "
        f"{args.repeats} interleaved repeats after {args.warmup} warm-up calls. speedup = dense / "
        "sparse (greenprop `SparseConv2d`), ideal = C/k, of ideal = speedup * k/C; floor = "
        "first-k `convolution_backward` with no ranking/gather/scatter (the same k); PyTorch ops = "
        f"the sparse layer with its C++ channel ops off (ops {'built' if kernels.load() else 'NOT built'})."
        + clock_note(args.clock),
        "",
        *result_table(results),
        "",
    ]
    if any(r.reused_from_round_to is not None for r in results):
        lines += ["Rows whose k equals an earlier round_to's reuse that measurement.", ""]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--batch", type=int, default=128, help="batch size (default 128)")
    p.add_argument(
        "--keeps",
        type=float,
        nargs="+",
        default=list(DEFAULT_KEEPS),
        help="keep ratios (default 1 .8 .6 .4 .2)",
    )
    p.add_argument(
        "--round-to",
        type=int,
        nargs="+",
        default=[1],
        help="round k up to a multiple of this; several values give one row each (e.g. 1 16)",
    )
    p.add_argument("--repeats", type=int, default=15, help="timed repeats per variant (default 15)")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls per variant first (default 3)")
    p.add_argument("--channels-last", action="store_true", help="input, weights and dy in NHWC")
    p.add_argument(
        "--shapes", choices=sorted(SHAPE_SETS), default="resnet18", help="shape set (default resnet18)"
    )
    p.add_argument("--no-downsample", action="store_true", help="skip the 1x1 stride-2 shortcut convs")
    p.add_argument("--progress", action="store_true", help="one line per row on stderr while running")
    add_clock_option(p)
    add_common_options(p)
    args = p.parse_args(argv)
    if args.batch < 1 or args.repeats < 1 or args.warmup < 0 or min(args.round_to) < 1:
        p.error("--batch, --repeats and --round-to must be >= 1, --warmup >= 0")
    check_ratios(p, "--keeps", args.keeps)
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark, print the Markdown report, return (and optionally save) results."""
    args = parse_args(argv)
    env = start(args, __file__, argv)
    results = run(args)
    print(report(env, args, results), flush=True)
    out = {"benchmark": "ssprop_layers", "environment": env, "results": [asdict(r) for r in results]}
    return save_results(out, args)


if __name__ == "__main__":
    main()
