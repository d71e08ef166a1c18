"""Backward time of VCAS's sampled Linear vs the dense Linear, at the shapes VCAS is run on.

For every Linear shape of all-MiniLM-L6-v2 (BERT, hidden 384, intermediate 1536) and
of the zoo tiny ViT (``models.create("vit", num_classes=10, in_channels=1,
image_size=28)``, shapes read off its first block), and every row keep fraction ``r``
and token ratio ``nu``, two backwards are timed side by side on the same weights:

* dense: a plain ``nn.Linear``, upstream gradient ``dy`` dense;
* sampled: the same layer turned into :class:`~greenprop.vcas.layers.VCASLinear` the way
  ``apply_vcas`` does it (class swap, a seeded ``VCASRuntime`` in mode FULL,
  ``vcas_weight_ratio = nu``), with ``dy`` zero except a fixed random ``r*B`` subset
  of samples (what the block sampler hands down; kept rows equal dense ``dy``'s).

Every repetition runs one forward per variant (untimed) and times only
``torch.autograd.grad`` w.r.t. input, weight and bias; variants alternate and their
order rotates every repetition. ``ideal = r * (1 + nu) / 2`` is the FLOPs ratio of
grad_input + grad_weight (``r`` as the realised ``k / B``).

With ``--policy`` each shape's break-even token ratio is measured as VCAS's measured
token policy measures it (:mod:`greenprop.vcas.policy`, on the whole batch's tokens),
and each row also shows what the layer runs under that policy: the sampled ratio where
``nu`` is below the break-even, else the same ``r``'s ``nu = 1`` row (tokens exact).

With ``--draw`` only the token draw of the weight gradient is timed, per shape and token
ratio ``nu < 1``, on the ``r*B*T`` tokens the block sampler leaves: the scores, soft top-k
probabilities, Bernoulli draw, gather and ``1/p`` scale of the kept rows
(``samplers._kept_rows``), through the fused C++ op (:func:`greenprop.kernels.leverage_rows`)
and through PyTorch ops (``kernels.use_kernels(False)``), interleaved. ``--batch`` sets the
samples per batch (smaller shapes, e.g. for the op's size threshold).

Run from the repository root: ``python benchmarks/vcas_linear.py --help``.
"""

from __future__ import annotations

import argparse
import copy
import gc
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from _common import (
    add_common_options,
    check_ratios,
    header_lines,
    markdown_table,
    quartiles,
    rotated,
    save_results,
    start,
)
from greenprop import kernels, models
from greenprop.vcas import samplers
from greenprop.vcas.layers import Mode, VCASLinear, VCASRuntime
from greenprop.vcas.policy import WeightGradShape, break_even, time_weight_grad

VARIANTS = ("dense", "sampled")
DRAW_VARIANTS = ("pytorch ops", "fused op")


@dataclass(frozen=True)
class LinearShape:
    model: str
    layers: str
    d_in: int
    d_out: int
    batch: int
    tokens: int  # per sample


def minilm_shapes(seq_len: int, batch: int = 32) -> list[LinearShape]:
    """all-MiniLM-L6-v2's encoder Linears (hidden 384, intermediate 1536)."""
    return [
        LinearShape("MiniLM", "query/key/value/attn-out", 384, 384, batch, seq_len),
        LinearShape("MiniLM", "intermediate", 384, 1536, batch, seq_len),
        LinearShape("MiniLM", "output", 1536, 384, batch, seq_len),
    ]


def vit_shapes(batch: int = 128) -> list[LinearShape]:
    """The zoo tiny ViT's block Linears (qkv, proj, fc1, fc2), read off the model."""
    vit = models.create("vit", num_classes=10, in_channels=1, image_size=28)
    tokens = vit.patch_embed.num_patches + 1  # + cls token
    return [
        LinearShape("ViT", name, m.in_features, m.out_features, batch, tokens)
        for name, m in vit.blocks[0].named_modules()
        if isinstance(m, nn.Linear)
    ]


@dataclass
class Row:
    """One (shape, r, nu) measurement; times in seconds."""

    model: str
    layers: str
    d_in: int
    d_out: int
    batch: int
    tokens: int
    r: float
    nu: float
    kept_rows: int
    median_s: dict[str, float]
    ratio: float  # sampled / dense, of medians
    ratio_per_repeat: float  # median of per-repeat sampled / dense
    ratio_iqr: tuple[float, float]
    ideal: float  # (k / B) * (1 + nu) / 2
    flops_tally: float  # VCASRuntime's FLOPs done / dense over all calls (nu as actually drawn)
    per_repeat_s: dict[str, list[float]]
    break_even: float | None = None  # --policy: the shape's measured break-even token ratio
    policy_ratio: float | None = None  # --policy: sampled / dense under the policy


def measure(shape: LinearShape, r: float, nu: float, args: argparse.Namespace) -> Row:
    """Time the dense and the sampled backward of one shape, interleaved."""
    gen = torch.Generator().manual_seed(args.seed)
    dense = nn.Linear(shape.d_in, shape.d_out)
    sampled = copy.deepcopy(dense)
    sampled.__class__ = VCASLinear  # as apply_vcas does
    runtime = VCASRuntime(
        activation_generator=torch.Generator().manual_seed(args.seed),
        weight_generator=torch.Generator().manual_seed(args.seed + 1),
        mode=Mode.FULL,
    )
    sampled.vcas_runtime, sampled.vcas_weight_ratio, sampled.vcas_block = runtime, nu, 0
    x = torch.randn(shape.batch, shape.tokens, shape.d_in, generator=gen, requires_grad=True)
    dy = torch.randn(shape.batch, shape.tokens, shape.d_out, generator=gen)
    k = max(1, round(r * shape.batch))
    keep = torch.randperm(shape.batch, generator=gen)[:k].sort().values
    # What the block's sampler records for the layers inside the block: the rows it kept.
    runtime.alive[0] = (shape.batch, None if k == shape.batch else keep)
    dy_sampled = torch.zeros_like(dy)
    dy_sampled[keep] = dy[keep]
    setups = {"dense": (dense, dy), "sampled": (sampled, dy_sampled)}

    def backward(name: str) -> float:
        layer, grad = setups[name]
        out = layer(x)  # untimed forward, a fresh graph every call
        start = time.perf_counter()
        torch.autograd.grad(out, (x, layer.weight, layer.bias), grad)
        return time.perf_counter() - start

    times = time_interleaved(VARIANTS, backward, args)
    tally = runtime.take_tally()
    med = {name: statistics.median(t) for name, t in times.items()}
    per_repeat = [s / d for s, d in zip(times["sampled"], times["dense"], strict=True)]
    q1, q2, q3 = quartiles(per_repeat)
    return Row(
        **asdict(shape),
        r=r,
        nu=nu,
        kept_rows=k,
        median_s=med,
        ratio=med["sampled"] / med["dense"],
        ratio_per_repeat=q2,
        ratio_iqr=(q1, q3),
        ideal=k / shape.batch * (1 + nu) / 2,
        flops_tally=tally.done / tally.dense,
        per_repeat_s=times,
    )


def time_interleaved(
    variants: Sequence[str], timed: Callable[[str], float], args: argparse.Namespace
) -> dict[str, list[float]]:
    """``args.warmup`` untimed then ``args.repeats`` timed calls of ``timed(name)`` per variant, in
    rotated order (so no variant always runs first), GC off while timing."""
    for i in range(args.warmup):
        for name in rotated(variants, i):
            timed(name)
    times: dict[str, list[float]] = {name: [] for name in variants}
    gc.collect()
    gc.disable()
    try:
        for i in range(args.repeats):
            for name in rotated(variants, i):
                times[name].append(timed(name))
    finally:
        gc.enable()
    return times


@dataclass
class DrawRow:
    """One (shape, r, nu) timing of the token draw alone; times in seconds."""

    model: str
    layers: str
    d_in: int
    d_out: int
    tokens: int  # r*B*T, the rows drawn from
    nu: float
    median_s: dict[str, float]
    ratio: float  # fused / pytorch, of medians
    per_repeat_s: dict[str, list[float]]


def measure_draw(shape: LinearShape, r: float, nu: float, args: argparse.Namespace) -> DrawRow:
    """Time ``samplers._kept_rows`` with and without the C++ op, interleaved, on one shape (the op
    at every size: below ``kernels.DRAW_MIN_NUMEL`` too)."""
    gen = torch.Generator().manual_seed(args.seed)
    tokens = max(1, round(r * shape.batch)) * shape.tokens
    dy = torch.randn(tokens, shape.d_out, generator=gen) * torch.rand(tokens, 1, generator=gen)
    x = torch.randn(tokens, shape.d_in, generator=gen)
    draws = torch.Generator().manual_seed(args.seed + 1)

    def draw(name: str) -> float:
        least, kernels.DRAW_MIN_NUMEL = kernels.DRAW_MIN_NUMEL, 0
        try:
            with kernels.use_kernels(name == "fused op"):
                start = time.perf_counter()
                samplers._kept_rows(dy, x, nu, draws, None)
                return time.perf_counter() - start
        finally:
            kernels.DRAW_MIN_NUMEL = least

    times = time_interleaved(DRAW_VARIANTS, draw, args)
    med = {name: statistics.median(t) for name, t in times.items()}
    return DrawRow(
        shape.model,
        shape.layers,
        shape.d_in,
        shape.d_out,
        tokens,
        nu,
        med,
        med["fused op"] / med["pytorch ops"],
        times,
    )


def draw_report(env: dict[str, Any], args: argparse.Namespace, rows: Sequence[DrawRow]) -> str:
    lines = header_lines(env, "VCAS: the token draw of a Linear's weight gradient, C++ op vs PyTorch ops")
    fused = "fused op" if kernels.load() else "fused op (NOT BUILT: PyTorch ops too)"
    lines += [
        f"Scores, soft top-k, draw, gather and 1/p scale of the kept rows (`samplers._kept_rows`), "
        f"fp32, on the r*B*T tokens left by the block sampler; median of {args.repeats} interleaved "
        f"repeats after {args.warmup} warm-up calls.",
        "",
        *markdown_table(
            ["model: layers (in->out)", "tokens", "nu", "pytorch ops (us)", f"{fused} (us)", "fused/pytorch"],
            [
                [
                    f"{r.model}: {r.layers} ({r.d_in}->{r.d_out})",
                    str(r.tokens),
                    f"{r.nu:g}",
                    f"{1e6 * r.median_s['pytorch ops']:.0f}",
                    f"{1e6 * r.median_s['fused op']:.0f}",
                    f"{r.ratio:.3f}",
                ]
                for r in rows
            ],
        ),
        "",
    ]
    return "\n".join(lines)


def with_policy(shape: LinearShape, rows: Sequence[Row]) -> None:
    """Fill in the shape's break-even ratio and each row's ratio under the token policy."""
    timing = time_weight_grad(WeightGradShape(shape.batch * shape.tokens, shape.d_in, shape.d_out))
    ratio_one = {row.r: row.ratio for row in rows if row.nu == 1.0}
    for row in rows:
        row.break_even = break_even(timing)
        row.policy_ratio = row.ratio if row.nu < row.break_even else ratio_one.get(row.r)


def result_table(rows: Sequence[Row]) -> list[str]:
    header = ["model: layers (in->out)", "tokens B x T", "r", "nu", "dense (ms)", "sampled (ms)"]
    header += ["sampled/dense", "per-repeat [IQR]", "ideal", "FLOPs (tally)", "break-even", "with policy"]
    body = [
        [
            f"{r.model}: {r.layers} ({r.d_in}->{r.d_out})",
            f"{r.batch} x {r.tokens}",
            f"{r.r:g}",
            f"{r.nu:g}",
            f"{1e3 * r.median_s['dense']:.2f}",
            f"{1e3 * r.median_s['sampled']:.2f}",
            f"{r.ratio:.3f}",
            f"{r.ratio_per_repeat:.3f} [{r.ratio_iqr[0]:.3f}, {r.ratio_iqr[1]:.3f}]",
            f"{r.ideal:.3f}",
            f"{r.flops_tally:.3f}",
            "-" if r.break_even is None else f"{r.break_even:.2f}",
            "-" if r.policy_ratio is None else f"{r.policy_ratio:.3f}",
        ]
        for r in rows
    ]
    return markdown_table(header, body)


def report(env: dict[str, Any], args: argparse.Namespace, rows: Sequence[Row]) -> str:
    lines = header_lines(env, "VCAS: sampled vs dense Linear backward (MiniLM and tiny ViT shapes)")
    lines += [
        f"Backward only (grad_input + grad_weight + grad_bias), fp32; median of {args.repeats} "
        f"interleaved repeats after {args.warmup} warm-up calls, a fresh forward (untimed) before "
        "each. sampled = `VCASLinear` (mode FULL, `vcas_weight_ratio = nu`) with dy zero outside "
        "a fixed random r*B samples; dense = `nn.Linear` with the dense dy. ideal = r(1 + nu)/2, "
        "the FLOPs ratio; FLOPs (tally) = the runtime's counted ratio, nu as actually drawn.",
        "",
        *result_table(rows),
        "",
    ]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--shapes", choices=("minilm", "vit", "all"), default="all", help="(default all)")
    p.add_argument("--seq-len", type=int, default=56, help="MiniLM sequence length (default 56, as our data)")
    p.add_argument("--rs", type=float, nargs="+", default=[1.0, 0.5, 0.25], help="row keep fractions")
    p.add_argument("--nus", type=float, nargs="+", default=[1.0, 0.5, 0.25], help="token ratios")
    p.add_argument("--repeats", type=int, default=30, help="timed repeats per variant (default 30)")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls per variant first (default 3)")
    p.add_argument("--policy", action="store_true", help="measure each shape's token policy (needs nu 1)")
    p.add_argument("--draw", action="store_true", help="time only the token draw, C++ op vs PyTorch ops")
    p.add_argument("--batch", type=int, default=None, help="samples per batch (default: MiniLM 32, ViT 128)")
    add_common_options(p)
    args = p.parse_args(argv)
    if args.seq_len < 1 or args.repeats < 1 or args.warmup < 0 or (args.batch is not None and args.batch < 1):
        p.error("--seq-len, --batch and --repeats must be >= 1, --warmup >= 0")
    check_ratios(p, "--rs and --nus", [*args.rs, *args.nus])
    if args.draw and (args.policy or all(nu >= 1 for nu in args.nus)):
        p.error("--draw times token ratios below 1 (give --nus below 1) and takes no --policy")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark, print the Markdown report, return (and optionally save) results."""
    args = parse_args(argv)
    env = start(args, __file__, argv)
    batch = {} if args.batch is None else {"batch": args.batch}
    shapes = minilm_shapes(args.seq_len, **batch) if args.shapes in ("minilm", "all") else []
    shapes += vit_shapes(**batch) if args.shapes in ("vit", "all") else []
    if args.draw:
        kernels.load()  # built before timing
        draws = [
            measure_draw(shape, r, nu, args) for shape in shapes for r in args.rs for nu in args.nus if nu < 1
        ]
        print(draw_report(env, args, draws), flush=True)
        out = {"benchmark": "vcas_linear_draw", "environment": env, "results": [asdict(row) for row in draws]}
        return save_results(out, args)
    rows = []
    for shape in shapes:
        shape_rows = []
        for r in args.rs:
            for nu in args.nus:
                print(f"  {shape.model} {shape.layers} r={r:g} nu={nu:g}", file=sys.stderr, flush=True)
                shape_rows.append(measure(shape, r, nu, args))
        if args.policy:
            with_policy(shape, shape_rows)
        rows += shape_rows
    print(report(env, args, rows), flush=True)
    out = {"benchmark": "vcas_linear", "environment": env, "results": [asdict(row) for row in rows]}
    return save_results(out, args)


if __name__ == "__main__":
    main()
