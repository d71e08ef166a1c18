"""Whole training step (forward + backward) of MiniLM, ViT and ResNet-18-GN: VCAS at fixed ratios vs dense.

For each model (``minilm``: all-MiniLM-L6-v2 classifier, batch 32 x 56 tokens;
``vit``: the zoo tiny ViT on 28x28 grey images, batch 128; ``resnet``: the zoo
``resnet18-gn`` at width 16 on 28x28 grey images, batch 128) three copies with the
same weights run forward + ``loss.backward()`` (no optimizer) on one fixed batch:

* dense: the plain model;
* vcas: ``apply_vcas(model, VCASConfig(compact=False))`` in mode FULL, every block
  sampler's ``ratio = r`` and every ``VCASLinear``'s ``vcas_weight_ratio = nu`` fixed
  (no controller): the layers skip the dropped rows inside a full-size backward;
* compact: the same with ``compact=True``: each block's backward runs on the kept
  samples only (:mod:`greenprop.vcas.compaction`), op by op without re-running the
  block where a direct rule knows its type (:mod:`greenprop.vcas.direct`), else by
  re-running it on them;
* rerun (with ``--rerun``): as compact with ``direct=False``: every block re-runs;
* policy (with ``--policy``): as compact, plus the measured token policy
  (:mod:`greenprop.vcas.policy`): each Linear's weight gradient timed dense and sampled
  at its shape first; layers where sampling at ``nu`` would not pay run exact tokens.

Dropout is switched off (``p = 0``) in both copies: dropout masks would be random
work, and the samplers act per sample either way (``--keep-dropout`` keeps the model's
own, MiniLM's 0.1, as the ``vcas-minilm`` preset trains). ``--seq-len`` takes several
MiniLM lengths (the same models, each length in turn: the short, length-grouped batches of
that preset); ``--times-only`` skips each row's FLOP count and memory step and
``--skip-uncompacted`` the ``vcas`` variant, for a quick sweep. Forward and backward are timed
separately; gradients are reset (``set_to_none``, untimed) after every step. The
variants alternate and their order rotates every repeat, after untimed warm-up
steps; Python's GC is off while timing. Besides times, each row reports the runtime's
tally of the backward FLOPs VCAS runs itself (done / dense: the Linear layers, and the
attention of compacted ViT blocks and direct-path BERT layers), the kept rows per block,
FlopCounterMode's FLOPs of one whole step (vcas / dense; one random draw) and VCAS's
account of that step (the dense count minus the tally's saving), which should match the
count.

Set ``GLIBC_TUNABLES`` in the shell (see ``benchmarks/README.md``). Run from the
repository root: ``python benchmarks/vcas_step.py --help``.
"""

from __future__ import annotations

import argparse
import copy
import functools
import gc
import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from _common import (
    CLOCKS,
    MIB,
    add_clock_option,
    add_common_options,
    check_ratios,
    clock_note,
    forward_backward_flops,
    header_lines,
    markdown_table,
    memory_cell,
    quartiles,
    rotated,
    save_results,
    start,
    step_memory,
)
from greenprop import data, models
from greenprop.errors import GreenpropError
from greenprop.metering.memory import tensor_bytes
from greenprop.vcas import VCASConfig, apply_vcas
from greenprop.vcas.policy import measured_break_evens, recorded_shapes, set_break_evens
from greenprop.vcas.surgery import VCASHandle, vcas_handle

VARIANTS = ("dense", "vcas", "compact")  # "rerun" joins them with --rerun, "policy" with --policy
RERUN = "rerun"
POLICY = "policy"
DEFAULT_BATCH = {"minilm": 32, "vit": 128, "resnet": 128}
DATASET = {"minilm": "rotten-tomatoes", "vit": "fashion-mnist", "resnet": "fashion-mnist"}


@dataclass
class Row:
    """One (model, r, nu) measurement; times in seconds."""

    model: str
    r: float
    nu: float
    last_r: float | None  # the last block's sampler ratio (--last-r); None: r like the others
    median_s: dict[str, dict[str, float]]  # variant -> fwd / bwd / step
    bwd_ratio: dict[str, float]  # sampled variant -> its backward / dense backward, of medians
    step_ratio: dict[str, float]  # sampled variant -> its step / dense step, of medians
    step_ratio_per_repeat: dict[str, float]  # median of per-repeat ratios
    step_ratio_iqr: dict[str, tuple[float, float]]
    flops_counted: dict[str, float]  # FlopCounterMode, one step, variant / dense
    flops_tally: dict[str, float]  # VCASRuntime: tallied backward FLOPs done / dense, all timed steps
    flops_account: dict[str, float]  # the counted step's: dense step FLOPs minus the tally's saving, / dense
    kept_rows: dict[int, float]  # block -> mean rows kept per step (compact variant)
    seen_rows: dict[int, float]  # block -> mean rows entering its sampler per step (the batch)
    per_repeat_s: dict[str, dict[str, list[float]]]
    memory: dict[str, dict[str, Any]]  # variant -> peak memory of one untimed step (step_memory)
    # variant -> {"peak_mib", "held_mib"}: the allocator's tensor bytes of one untimed step (None: n/a)
    tensor_memory: dict[str, dict[str, float] | None]


def load_batch(name: str, batch: int, seq_len: int, source: str, seed: int) -> tuple[Tensor, Tensor, str]:
    """A fixed batch: the first of a fixed training subset, or random when asked or unavailable."""
    note = "random"
    if source == "real":
        try:
            x, y = data.load(DATASET[name], subset=batch).train[torch.arange(batch)]
            if name == "minilm":
                if seq_len > x.shape[2]:
                    raise GreenpropError(f"--seq-len {seq_len} is longer than the data's {x.shape[2]}")
                x = x[:, :, :seq_len].contiguous()
            return x, y, f"{DATASET[name]} (training subset of {batch})"
        except GreenpropError as err:
            note = f"random ({DATASET[name]} unavailable: {err})"
    gen = torch.Generator().manual_seed(seed)
    if name == "minilm":
        ids = torch.randint(1000, 20000, (batch, seq_len), generator=gen)
        x = torch.stack([ids, torch.ones_like(ids)], dim=1)  # token ids, attention mask all ones
        return x, torch.randint(0, 2, (batch,), generator=gen), note
    return torch.randn(batch, 1, 28, 28, generator=gen), torch.randint(0, 10, (batch,), generator=gen), note


def build(name: str, seed: int, keep_dropout: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    if name == "minilm":
        model = models.create("minilm", num_classes=2)
    elif name == "resnet":
        model = models.create("resnet18-gn", num_classes=10, in_channels=1, image_size=28, width=16)
    else:
        model = models.create("vit", num_classes=10, in_channels=1, image_size=28)
    for module in [] if keep_dropout else model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0  # BERT's eager attention reads its dropout module's p too
    return model.train()


def set_ratios(handle: VCASHandle, r: float, nu: float, last_r: float | None = None) -> None:
    """Fix every block sampler's ratio to ``r`` (the last block's to ``last_r`` if given) and every
    VCAS Linear's token ratio to ``nu``."""
    for sampler in handle.samplers:
        sampler.ratio = r
    if last_r is not None:
        handle.samplers[-1].ratio = last_r
    for layer in handle.linears.values():
        layer.vcas_weight_ratio = nu


def timed_step(
    model: nn.Module, x: Tensor, y: Tensor, clock: Callable[[], float] = time.perf_counter
) -> tuple[float, float]:
    """Seconds of the forward (with the loss) and of ``loss.backward()``; grads reset untimed."""
    start = clock()
    loss = F.cross_entropy(model(x), y)
    mid = clock()
    loss.backward()
    end = clock()
    model.zero_grad(set_to_none=True)
    return mid - start, end - mid


def measure(
    name: str,
    variants: dict[str, nn.Module],
    handles: dict[str, VCASHandle],
    batch: tuple[Tensor, Tensor],
    dense_flops: int,
    r: float,
    nu: float,
    args: argparse.Namespace,
) -> Row:
    """Set the VCAS ratios, then time the variants' steps interleaved."""
    names, sampled = tuple(variants), tuple(handles)
    for handle in handles.values():
        set_ratios(handle, r, nu, args.last_r)
    x, y = batch
    clock = CLOCKS[args.clock]
    # At least two: a compacted block's first forward checks it, and an exact block learns from
    # its first backward whether its gradient is token-sparse (then runs on its live tokens).
    for i in range(max(2, args.warmup)):
        for v in rotated(names, i):
            timed_step(variants[v], x, y)
    for handle in handles.values():
        handle.runtime.take_tally()  # the account of the counted step only
    if args.times_only:
        flops_counted = flops_account = {v: math.nan for v in sampled}
    else:
        flops_counted = {v: forward_backward_flops(variants[v], x, y) / dense_flops for v in sampled}
        flops_account = {v: 1 - handles[v].runtime.take_tally().saved / dense_flops for v in sampled}
    times: dict[str, dict[str, list[float]]] = {v: {"fwd": [], "bwd": []} for v in names}
    gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for i in range(args.repeats):
            for v in rotated(names, i):
                fwd, bwd = timed_step(variants[v], x, y, clock)
                times[v]["fwd"].append(fwd)
                times[v]["bwd"].append(bwd)
    finally:
        if gc_was_enabled:
            gc.enable()
    tallies = {v: handles[v].runtime.take_tally() for v in sampled}
    if args.times_only:
        memory = {v: {"growth_mib": None} for v in names}
        tensor_memory: dict[str, dict[str, float] | None] = {v: None for v in names}
    else:
        memory = step_memory({v: functools.partial(timed_step, variants[v], x, y) for v in names})
        tensor_memory = {
            v: step_tensor_bytes(functools.partial(timed_step, variants[v], x, y)) for v in names
        }
    for t in times.values():
        t["step"] = [f + b for f, b in zip(t["fwd"], t["bwd"], strict=True)]
    med = {v: {part: statistics.median(s) for part, s in t.items()} for v, t in times.items()}
    per_repeat = {
        v: quartiles([a / b for a, b in zip(times[v]["step"], times["dense"]["step"], strict=True)])
        for v in sampled
    }
    tally = tallies["compact"]
    return Row(
        model=name,
        r=r,
        nu=nu,
        last_r=args.last_r,
        median_s=med,
        bwd_ratio={v: med[v]["bwd"] / med["dense"]["bwd"] for v in sampled},
        step_ratio={v: med[v]["step"] / med["dense"]["step"] for v in sampled},
        step_ratio_per_repeat={v: q[1] for v, q in per_repeat.items()},
        step_ratio_iqr={v: (q[0], q[2]) for v, q in per_repeat.items()},
        flops_counted=flops_counted,
        flops_tally={v: t.done / t.dense for v, t in tallies.items()},
        flops_account=flops_account,
        kept_rows={b: kept / args.repeats for b, (kept, _) in sorted(tally.rows.items())},
        seen_rows={b: seen / args.repeats for b, (_, seen) in sorted(tally.rows.items())},
        per_repeat_s=times,
        memory=memory,
        tensor_memory=tensor_memory,
    )


def step_tensor_bytes(step: Callable[[], object]) -> dict[str, float] | None:
    """The allocator's tensor bytes of one step in MiB: the most held at once above the start,
    and what is left held after it (deterministic, unlike the RSS); None where not counted."""
    counted = tensor_bytes(step)
    return None if counted is None else {"peak_mib": counted.peak / MIB, "held_mib": counted.held / MIB}


def _tensor_cell(counted: dict[str, float] | None) -> str:
    if counted is None:
        return "n/a"
    held = counted["held_mib"]
    return f"{counted['peak_mib']:.1f}" + (f" (+{held:.1f} held)" if held > 0.05 else "")


def _iqr(quartiles: tuple[float, float]) -> str:
    return f"{quartiles[0]:.3f}, {quartiles[1]:.3f}"


def result_table(rows: Sequence[Row]) -> list[str]:
    names = tuple(rows[0].median_s)
    sampled = names[1:]
    header = ["r", "nu", *(f"{v} fwd / bwd" for v in names)]
    header += [f"bwd {v}/dense" for v in sampled] + [f"step {v}/dense [IQR]" for v in sampled]
    header += [f"step FLOPs (counted) {' / '.join(sampled)}", f"step FLOPs (account) {' / '.join(sampled)}"]
    header += ["layer bwd FLOPs (tally)", "kept rows / B"]
    header += ["peak MiB " + " / ".join(names), "tensor peak MiB " + " / ".join(names)]
    body = []
    for row in rows:
        ms = {
            v: " / ".join(f"{1e3 * t[part]:.1f}" for part in ("fwd", "bwd")) for v, t in row.median_s.items()
        }
        kept = statistics.mean(row.kept_rows.values()) if row.kept_rows else float("nan")
        seen = statistics.mean(row.seen_rows.values()) if row.seen_rows else float("nan")
        body.append(
            [
                f"{row.r:g}" + ("" if row.last_r is None else f" (last {row.last_r:g})"),
                f"{row.nu:g}",
                *(ms[v] for v in names),
                *(f"{row.bwd_ratio[v]:.3f}" for v in sampled),
                *(f"**{row.step_ratio[v]:.3f}** [{_iqr(row.step_ratio_iqr[v])}]" for v in sampled),
                " / ".join(f"{row.flops_counted[v]:.3f}" for v in sampled),
                " / ".join(f"{row.flops_account[v]:.3f}" for v in sampled),
                f"{row.flops_tally['compact']:.3f}",
                f"{kept:.1f} / {seen:g}",
                " / ".join(memory_cell(row.memory[v]) for v in names),
                " / ".join(_tensor_cell(row.tensor_memory[v]) for v in names),
            ]
        )
    return markdown_table(header, body)


def _break_even_text(break_even: dict[str, float]) -> str:
    """``fc1: 0 (off), qkv: 0.41, ...``: each layer name's last part and its break-even ratio."""
    by_kind: dict[str, list[float]] = {}
    for name, value in break_even.items():
        by_kind.setdefault(name.rsplit(".", 1)[-1], []).append(value)
    return ", ".join(
        f"{kind}: {min(values):.2f}-{max(values):.2f}"
        if min(values) != max(values)
        else f"{kind}: {values[0]:.2f}"
        for kind, values in by_kind.items()
    )


def _dropout_text(keep_dropout: bool) -> str:
    """The header's word on dropout: off (``p = 0``) unless ``--keep-dropout`` kept the model's."""
    return "the model's dropout on (--keep-dropout)" if keep_dropout else "dropout off"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument(
        "--models", nargs="+", choices=("minilm", "vit", "resnet"), default=["minilm", "vit", "resnet"]
    )
    p.add_argument("--batch", type=int, default=None, help="batch size (default: minilm 32, vit 128)")
    p.add_argument(
        "--seq-len",
        type=int,
        nargs="+",
        default=[56],
        help="MiniLM tokens per sample (default 56); several: each length in turn, the same models",
    )
    p.add_argument("--data", choices=("real", "random"), default="real", help="batch source (default real)")
    p.add_argument("--rs", type=float, nargs="+", default=[1.0, 0.5], help="block sampler ratios r")
    p.add_argument("--nus", type=float, nargs="+", default=[1.0, 0.3], help="Linear token ratios nu")
    p.add_argument("--repeats", type=int, default=20, help="timed steps per variant (default 20)")
    p.add_argument(
        "--warmup", type=int, default=3, help="untimed steps per variant first (default 3, at least 2 run)"
    )
    p.add_argument("--policy", action="store_true", help="also time compact with the measured token policy")
    p.add_argument("--rerun", action="store_true", help="also time compact with direct=False")
    p.add_argument(
        "--skip-uncompacted", action="store_true", help="leave out the vcas (compact=False) variant"
    )
    p.add_argument(
        "--keep-dropout",
        action="store_true",
        help="keep the model's dropout (MiniLM's encoder: 0.1, as the vcas-minilm preset trains); "
        "default: off, p = 0",
    )
    p.add_argument(
        "--times-only",
        action="store_true",
        help="time only: skip each row's FlopCounterMode count and memory step (much faster)",
    )
    p.add_argument(
        "--compact-max-ratio",
        type=float,
        default=VCASConfig().compact_max_ratio,
        help="compact blocks only at ratios up to this (default: VCASConfig's, 0.7; 1: always)",
    )
    add_common_options(p)
    add_clock_option(p)
    p.add_argument(
        "--direct-max-ratio",
        type=float,
        default=VCASConfig().direct_max_ratio,
        help="compact blocks on the direct path only at ratios up to this (default: VCASConfig's, 0.9)",
    )
    p.add_argument(
        "--sample-max-ratio",
        type=float,
        default=VCASConfig().sample_max_ratio,
        help="blocks sample only at ratios up to this and run exact above (default: VCASConfig's, "
        "0.8; 1: always sample, to time sampling near ratio 1)",
    )
    p.add_argument(
        "--last-r",
        type=float,
        default=None,
        help="the last block's sampler at this ratio, the others at r (a block that samples "
        "behind blocks that do not, as after VCAS's first update)",
    )
    args = p.parse_args(argv)
    if min(args.seq_len) < 1 or args.repeats < 1 or args.warmup < 0 or (args.batch or 1) < 1:
        p.error("--batch, --seq-len and --repeats must be >= 1, --warmup >= 0")
    last = [] if args.last_r is None else [args.last_r]
    check_ratios(p, "--rs, --nus and --last-r", [*args.rs, *args.nus, *last])
    if not 0.0 < args.sample_max_ratio <= 1.0:
        p.error(f"--sample-max-ratio must be in (0, 1], got {args.sample_max_ratio:g}")
    for option in ("compact_max_ratio", "direct_max_ratio"):
        value = getattr(args, option)
        if not 0.0 <= value <= 1.0:
            p.error(f"--{option.replace('_', '-')} must be in [0, 1], got {value:g}")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark, print the Markdown report, return (and optionally save) results."""
    args = parse_args(argv)
    env = start(args, __file__, argv)
    lines = header_lines(env, "VCAS: whole training step (forward + backward), fixed ratios vs dense")
    lines += [
        f"Median of {args.repeats} interleaved steps per variant after {max(2, args.warmup)} warm-up steps, "
        f"fp32, {_dropout_text(args.keep_dropout)}, no optimizer; times in ms. vcas = "
        "`apply_vcas(compact=False)` (mode FULL), "
        f"compact = `apply_vcas(compact=True)` (compacted at "
        f"ratios <= {args.direct_max_ratio:g} on the direct path (known blocks), "
        f"<= {args.compact_max_ratio:g} re-run (others); blocks sample at ratios <= "
        f"{args.sample_max_ratio:g} and run exact above), "
        + ("rerun = the same with `direct=False` (every block re-runs), " if args.rerun else "")
        + "every sampler's "
        "ratio = r"
        + ("" if args.last_r is None else f" but the last block's, {args.last_r:g}")
        + ", every Linear's "
        "`vcas_weight_ratio` = nu. Ratios are of medians; [IQR] of the per-repeat step ratios. step "
        "FLOPs: FlopCounterMode, one step (re-run forwards included); step FLOPs (account): the "
        "dense count minus the tallied saving, of the same step; layer bwd FLOPs: the "
        "compact runtime's tally over the timed steps; kept rows: mean per block per step; "
        "peak MiB: memory of one untimed step above its start (on CPU the rise of the process's "
        "peak RSS after freed heap pages went back to the OS; on CUDA torch.cuda.max_memory_allocated); "
        "tensor peak MiB: the most CPU tensor bytes that step held at once above its start, by the "
        "allocator's count (torch.profiler, deterministic; '+x held': left held after it)."
        + clock_note(args.clock),
        "",
    ]
    out: dict[str, Any] = {"benchmark": "vcas_step", "environment": env, "models": {}, "results": []}
    for name in args.models:
        batch_size = args.batch or DEFAULT_BATCH[name]
        dense = build(name, args.seed, args.keep_dropout)
        variants: dict[str, nn.Module] = {"dense": dense}
        handles: dict[str, VCASHandle] = {}
        sampled = ("compact",) if args.skip_uncompacted else VARIANTS[1:]
        for v in sampled + ((RERUN,) if args.rerun else ()) + ((POLICY,) if args.policy else ()):
            variants[v] = copy.deepcopy(dense)
            config = VCASConfig(
                seed=args.seed,
                compact=v != "vcas",
                compact_max_ratio=args.compact_max_ratio,
                direct=v != RERUN,
                direct_max_ratio=args.direct_max_ratio,
                sample_max_ratio=args.sample_max_ratio,
            )
            handles[v] = handle = vcas_handle(apply_vcas(variants[v], config))
        for seq_len in args.seq_len if name == "minilm" else args.seq_len[:1]:
            x, y, source = load_batch(name, batch_size, seq_len, args.data, args.seed)
            break_even: dict[str, float] = {}
            if args.policy:  # measured at this batch's shape
                with recorded_shapes(handles[POLICY].linears) as shapes:
                    variants[POLICY](x)
                break_even = measured_break_evens(shapes)
                set_break_evens(handles[POLICY].linears, break_even)
            dense_flops = 1 if args.times_only else forward_backward_flops(dense, x, y)
            rows = []
            for r in args.rs:
                for nu in args.nus:
                    print(f"  {name} {list(x.shape)} r={r:g} nu={nu:g}", file=sys.stderr, flush=True)
                    rows.append(measure(name, variants, handles, (x, y), dense_flops, r, nu, args))
            shape = " x ".join(str(s) for s in x.shape)
            info = {
                "input": shape,
                "data": source,
                "blocks": len(handle.samplers),
                "linears": len(handle.linears),
                "convs": len(handle.convs),
            }
            key = name if len(args.seq_len) == 1 or name != "minilm" else f"{name}/{seq_len}"
            out["models"][key] = {**info, "dense_step_flops": dense_flops, "break_even": break_even}
            out["results"] += [asdict(row) for row in rows]
            lines += [
                f"#### {name}: input {shape}, data {source}; {info['blocks']} sampled blocks, "
                f"{info['linears']} VCAS Linears, {info['convs']} VCAS Conv2d; "
                f"dense step {'not counted' if args.times_only else f'{dense_flops / 1e9:.2f} GFLOP'}",
                "",
                *(
                    [f"Token policy's break-even ratios: {_break_even_text(break_even)}", ""]
                    * bool(break_even)
                ),
                *result_table(rows),
                "",
            ]
    print("\n".join(lines), flush=True)
    return save_results(out, args)


if __name__ == "__main__":
    main()
