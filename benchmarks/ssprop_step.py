"""Whole ResNet-18 training step: dense vs greenprop's ssProp vs a zero-overhead floor.

Three variants of the same CIFAR ResNet-18 (identical starting weights, one model
instance each) run forward + backward + SGD step on one fixed batch:

* ``a`` dense: the plain model;
* ``b`` greenprop: ``apply_ssprop(model, SSPropConfig(keep=K, round_to=R))``;
* ``c`` reference: the same convolutions converted to :class:`NarrowConv2d`, whose
  backward computes the *first* ``k`` output channels (the same ``k`` per layer as
  ``b``) with no ranking, gather or scatter. It is the floor of the approach on this
  machine: whatever ``b`` costs above ``c`` is greenprop's overhead, whatever ``c``
  costs above ``k/C`` of the dense backward is the kernels' (smaller GEMMs are less
  efficient) and the rest of the step's (forward, BatchNorm, optimizer).

Timings are interleaved: every round runs one step of each variant, in an order that
rotates so each variant goes first equally often (when ``--rounds`` is a multiple of
3), after untimed warm-up steps. The memory allocator matters a lot on CPU (large
activation buffers are mmap'ed and page-faulted on every step by default); set
``GLIBC_TUNABLES`` in the shell, see ``benchmarks/README.md``. This script never sets
it, because glibc reads it only at process start.

Run ``python benchmarks/ssprop_step.py --help`` for the options.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

try:
    import resource
except ImportError:  # not on Windows
    resource = None  # type: ignore[assignment]

from greenprop import models
from greenprop.ssprop import SSPropConfig, apply_ssprop, sparse_layers

#: Targets for greenprop's step time relative to dense, per keep.
TARGET_B_OVER_A: dict[float, float] = {0.6: 0.88, 0.4: 0.80}
#: greenprop should be within this factor of the zero-overhead reference.
TARGET_B_OVER_C = 1.03
VARIANTS = ("a", "b", "c")
#: Environment variables that change CPU timings; printed in the header.
TIMING_ENV = ("GLIBC_TUNABLES", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "LD_PRELOAD", "DNNL_MAX_CPU_ISA")


# --------------------------------------------------------------------------- reference


def _memory_format(t: Tensor) -> torch.memory_format:
    """The memory format ``t`` is physically in (channels_last only when unambiguous)."""
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _pad_rows(rows: Tensor, like: Tensor) -> Tensor:
    """``rows`` followed by zero rows, shaped and laid out like ``like``.

    ``empty_like`` + one copy + one memset writes every byte once, the least any
    padding can do, and autograd's AccumulateGrad can steal the fresh tensor as .grad.
    """
    out = torch.empty_like(like)
    k = rows.shape[0]
    out.narrow(0, 0, k).copy_(rows)
    out.narrow(0, k, out.shape[0] - k).zero_()
    return out


class _NarrowConv2dFunction(torch.autograd.Function):
    """conv2d whose backward uses only the first ``k`` output channels (groups=1)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        input: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        stride: tuple[int, int],
        padding: tuple[int, int],
        dilation: tuple[int, int],
        k: int,
    ) -> Tensor:
        ctx.save_for_backward(input, weight)
        ctx.conv = (stride, padding, dilation, bias is not None)
        ctx.k = k
        return F.conv2d(input, weight, bias, stride, padding, dilation)

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        input, weight = ctx.saved_tensors
        stride, padding, dilation, has_bias = ctx.conv
        need_in, need_w, need_b = ctx.needs_input_grad[:3]
        need_b = need_b and has_bias
        k = ctx.k
        # Any kernel needs the kept slice of dy dense, so this one copy is unavoidable.
        dy = grad_output.narrow(1, 0, k).contiguous(memory_format=_memory_format(grad_output))
        gi, gw, gb = torch.ops.aten.convolution_backward(
            dy,
            input,
            weight.narrow(0, 0, k),
            [k] if has_bias else None,
            list(stride),
            list(padding),
            list(dilation),
            False,
            [0, 0],
            1,
            [need_in, need_w, need_b],
        )
        grad_weight = _pad_rows(gw, weight) if need_w else None
        grad_bias = _pad_rows(gb, weight.new_empty(weight.shape[0])) if need_b else None
        return (gi if need_in else None, grad_weight, grad_bias, None, None, None, None)


class NarrowConv2d(nn.Conv2d):
    """Conv2d whose backward computes the first ``narrow_k`` output channels only.

    The benchmark's zero-overhead floor for ssProp: the same small
    ``convolution_backward`` greenprop runs, minus channel ranking, gather and scatter.
    Gradients are those of greenprop's sparse backward when its top-k channels happen
    to be the first ``k`` (tested in ``tests/test_benchmarks_smoke.py``). Supports
    ``groups=1``, numeric padding and ``padding_mode="zeros"`` (all ResNet-18 convs).
    """

    narrow_k: int

    def __init__(self, *args: Any, narrow_k: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.narrow_k = narrow_k
        _check_supported(self)

    def forward(self, input: Tensor) -> Tensor:
        if not torch.is_grad_enabled() or self.narrow_k >= self.out_channels:
            return super().forward(input)
        return _NarrowConv2dFunction.apply(
            input,
            self.weight,
            self.bias,
            self.stride,
            self.padding,
            self.dilation,
            self.narrow_k,
        )


def _check_supported(conv: nn.Conv2d) -> None:
    if conv.groups != 1 or isinstance(conv.padding, str) or conv.padding_mode != "zeros":
        raise ValueError("NarrowConv2d supports groups=1, numeric padding and padding_mode='zeros' only")


def apply_reference(model: nn.Module, ks: Mapping[str, int]) -> nn.Module:
    """Turn the plain Conv2d layers named in ``ks`` into :class:`NarrowConv2d`, in place.

    Swaps the class like ``apply_ssprop`` does, so parameters stay the same objects.
    """
    modules = dict(model.named_modules())
    for name, k in ks.items():
        module = modules[name]
        if type(module) is not nn.Conv2d:
            raise TypeError(f"{name} is a {type(module).__name__}, expected a plain nn.Conv2d")
        _check_supported(module)
        module.__class__ = NarrowConv2d
        module.narrow_k = k  # type: ignore[attr-defined]
    return model


# --------------------------------------------------------------------------- environment


def cpu_model() -> str:
    """The CPU's model name (Linux), for the header."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def command_line(script: str, argv: Sequence[str]) -> str:
    """The shell command that reproduces this run, timing-relevant variables included."""
    env = [f"{name}={shlex.quote(os.environ[name])}" for name in TIMING_ENV if name in os.environ]
    with contextlib.suppress(ValueError):  # another drive (Windows)
        script = os.path.relpath(script)
    return " ".join([*env, shlex.join(["python", script, *argv])])


def environment(script: str, argv: Sequence[str]) -> dict[str, Any]:
    """What the timings depend on besides the code: versions, threads, allocator, command."""
    return {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "env": {name: os.environ.get(name) for name in TIMING_ENV},
        "command": command_line(script, argv),
    }


def header_lines(env: Mapping[str, Any], title: str) -> list[str]:
    """The Markdown header printed above a result table."""
    lines = [
        f"### {title}",
        "",
        f"- torch {env['torch']}, Python {env['python']}, {env['threads']} torch threads, "
        f"CPU: {env['cpu']} ({env['logical_cpus']} logical CPUs)",
        f"- GLIBC_TUNABLES: `{env['env']['GLIBC_TUNABLES'] or '(unset)'}`",
    ]
    others = [f"{k}={v}" for k, v in env["env"].items() if k != "GLIBC_TUNABLES" and v is not None]
    if others:
        lines.append(f"- other environment: `{' '.join(others)}`")
    lines += [f"- command: `{env['command']}`", ""]
    return lines


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """A GitHub-flavoured Markdown table (first column left-aligned, the rest right)."""
    align = [":--" if i == 0 else "--:" for i in range(len(header))]
    return ["| " + " | ".join(r) + " |" for r in (header, align, *rows)]


# --------------------------------------------------------------------------- timing


def rotated(items: Sequence[str], shift: int) -> list[str]:
    """``items`` rotated left by ``shift``: round r starts with item ``r mod len``."""
    shift %= len(items)
    return [*items[shift:], *items[:shift]]


def minor_page_faults() -> int:
    """Minor page faults of this process so far (0 where ``resource`` is unavailable).

    Counted around every timed call: a large count per step means the allocator hands
    fresh (mmap'ed) pages to each step, i.e. GLIBC_TUNABLES did not take effect.
    """
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt if resource is not None else 0


@dataclass
class Timings:
    """Per-variant measurements of :func:`interleaved_times`, one entry per round."""

    seconds: dict[str, list[float]]
    minor_faults: dict[str, list[int]]


def interleaved_times(fns: Mapping[str, Callable[[], object]], rounds: int, warmup: int) -> Timings:
    """Seconds (and page faults) per call of each function, one call each per round.

    Interleaving exposes all variants to the same drift (thermal, other processes);
    the order rotates every round so none gets a first-in-round advantage. Python's
    GC is off while timing so a collection does not land in one variant's measurement.
    """
    names = list(fns)
    for i in range(warmup):
        for name in rotated(names, i):
            fns[name]()
    timings = Timings({name: [] for name in names}, {name: [] for name in names})
    gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for r in range(rounds):
            for name in rotated(names, r):
                faults = minor_page_faults()
                start = time.perf_counter()
                fns[name]()
                timings.seconds[name].append(time.perf_counter() - start)
                timings.minor_faults[name].append(minor_page_faults() - faults)
    finally:
        if gc_was_enabled:
            gc.enable()
    return timings


def quartiles(values: Sequence[float]) -> tuple[float, float, float]:
    """(25th percentile, median, 75th percentile); all three equal for one value."""
    if len(values) < 2:
        v = float(values[0])
        return v, v, v
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


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
    target_b_over_a: float | None
    final_loss: dict[str, float]


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


def forward_backward_flops(model: nn.Module, x: Tensor, y: Tensor) -> int:
    """FLOPs counted by FlopCounterMode for one forward + backward (no optimizer step)."""
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(model(x), y).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


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
    x, y = random_batch(args.batch, args.image_size, args.channels_last, args.seed)
    fx, fy = random_batch(2, args.image_size, args.channels_last, args.seed)  # FLOPs scale with batch
    flops = {name: forward_backward_flops(m, fx, fy) for name, m in variants.items()}
    steps = {name: make_step(m, x, y, args.lr) for name, m in variants.items()}
    timings = interleaved_times(steps, args.rounds, args.warmup)
    times = timings.seconds
    final_loss = {name: float(step()) for name, step in steps.items()}  # one untimed step: a NaN check
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
        target_b_over_a=TARGET_B_OVER_A.get(round(keep, 6)),
        final_loss=final_loss,
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
        "b/a [IQR]",
        "b/a (of medians)",
        "c/a",
        "b/c",
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
                f"{r.b_over_a:.3f} [{r.b_over_a_iqr[0]:.3f}, {r.b_over_a_iqr[1]:.3f}]",
                f"{r.b_over_a_of_medians:.3f}",
                f"{r.c_over_a:.3f}",
                f"{r.b_over_c:.3f}",
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
        "no ranking/gather/scatter). Ratios are medians of per-round ratios unless noted; "
        "FLOPs b/a is the ideal step ratio if time followed counted FLOPs.",
        "",
        *result_table(results),
        "",
    ]
    faults = "; ".join(
        f"keep {r.keep:g}: " + " / ".join(f"{r.faults_per_step[v]:.0f}" for v in VARIANTS) for r in results
    )
    lines += [
        f"Minor page faults per step, median, a / b / c: {faults}. Thousands per step mean the "
        "allocator hands each step fresh pages (see GLIBC_TUNABLES in benchmarks/README.md).",
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
        default=21,
        help="timed rounds (default 21, a multiple of 3 so each variant goes first equally often)",
    )
    p.add_argument("--warmup", type=int, default=3, help="untimed warm-up rounds per keep (default 3)")
    p.add_argument("--channels-last", action="store_true", help="model and input in NHWC")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--width", type=int, default=64, help="ResNet-18 base width (default 64)")
    p.add_argument("--image-size", type=int, default=32, help="input side (default 32)")
    p.add_argument("--lr", type=float, default=0.01, help="SGD learning rate (default 0.01)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, metavar="OUT", help="also write the results here")
    args = p.parse_args(argv)
    for name in ("batch", "rounds", "width", "image_size", "round_to"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup < 0:
        p.error("--warmup must be >= 0")
    if any(not 0.0 < k <= 1.0 for k in args.keeps):
        p.error("--keeps must be in (0, 1]")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark, print the Markdown report, return (and optionally save) results."""
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    env = environment(__file__, sys.argv[1:] if argv is None else argv)
    torch.manual_seed(args.seed)
    base = models.create("resnet18", in_channels=3, image_size=args.image_size, width=args.width)
    results = []
    for keep in args.keeps:
        print(f"timing keep={keep:g} ...", file=sys.stderr, flush=True)
        results.append(benchmark_keep(base, keep, args))
    print(report(env, args, results), flush=True)
    out = {"benchmark": "ssprop_step", "environment": env, "results": [asdict(r) for r in results]}
    return save_results(out, args)


def save_results(out: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Add the run's arguments to ``out`` and write it to ``--json`` when given; returns ``out``."""
    out["args"] = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return out


if __name__ == "__main__":
    main()
