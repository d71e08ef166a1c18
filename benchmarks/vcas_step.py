"""Whole training step (forward + backward) of MiniLM and the tiny ViT: VCAS at fixed ratios vs dense.

For each model (``minilm``: all-MiniLM-L6-v2 classifier, batch 32 x 56 tokens;
``vit``: the zoo tiny ViT on 28x28 grey images, batch 128) two copies with the same
weights run forward + ``loss.backward()`` (no optimizer) on one fixed batch:

* dense: the plain model;
* vcas: ``apply_vcas(model)`` in mode FULL, every block sampler's ``ratio = r`` and
  every ``VCASLinear``'s ``vcas_weight_ratio = nu`` fixed (no controller);
* policy (with ``--policy``): as vcas, plus the measured token policy
  (:mod:`greenprop.vcas.policy`): each Linear's weight gradient timed dense and sampled
  at its shape first; layers where sampling at ``nu`` would not pay run exact tokens.

Dropout is switched off (``p = 0``) in both copies: dropout masks would be random
work, and the samplers act per sample either way. Forward and backward are timed
separately; gradients are reset (``set_to_none``, untimed) after every step. The
variants alternate and their order rotates every repeat, after untimed warm-up
steps; Python's GC is off while timing. Besides times, each row reports the runtime's
tally of the Linear backward FLOPs (done / dense), the kept rows per block, and
FlopCounterMode's FLOPs of one whole step (vcas / dense; one random draw).

Set ``GLIBC_TUNABLES`` in the shell (see ``benchmarks/README.md``). Run from the
repository root: ``python benchmarks/vcas_step.py --help``.
"""

from __future__ import annotations

import argparse
import copy
import functools
import gc
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from _common import (
    add_common_options,
    check_ratios,
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
from greenprop.vcas import VCASConfig, apply_vcas
from greenprop.vcas.policy import measured_break_evens, recorded_shapes, set_break_evens
from greenprop.vcas.surgery import VCASHandle, vcas_handle

VARIANTS = ("dense", "vcas")
POLICY = "policy"
DEFAULT_BATCH = {"minilm": 32, "vit": 128}
DATASET = {"minilm": "rotten-tomatoes", "vit": "fashion-mnist"}


@dataclass
class Row:
    """One (model, r, nu) measurement; times in seconds."""

    model: str
    r: float
    nu: float
    median_s: dict[str, dict[str, float]]  # variant -> fwd / bwd / step
    bwd_ratio: float  # vcas / dense backward, of medians
    step_ratio: float  # vcas / dense step, of medians
    policy_bwd_ratio: float | None  # the same for vcas with the measured token policy (--policy)
    policy_step_ratio: float | None
    step_ratio_per_repeat: float  # median of per-repeat ratios
    step_ratio_iqr: tuple[float, float]
    flops_counted: float  # FlopCounterMode, one step, vcas / dense
    flops_tally: float  # VCASRuntime: Linear backward FLOPs done / dense, all timed steps
    kept_rows: dict[int, float]  # block -> mean rows kept per step
    seen_rows: dict[int, float]  # block -> mean rows entering its sampler per step (the batch)
    per_repeat_s: dict[str, dict[str, list[float]]]
    memory: dict[str, dict[str, Any]]  # variant -> peak memory of one untimed step (step_memory)


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


def build(name: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    if name == "minilm":
        model = models.create("minilm", num_classes=2)
    else:
        model = models.create("vit", num_classes=10, in_channels=1, image_size=28)
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0  # BERT's eager attention reads its dropout module's p too
    return model.train()


def set_ratios(handle: VCASHandle, r: float, nu: float) -> None:
    """Fix every block sampler's ratio to ``r`` and every VCAS Linear's token ratio to ``nu``."""
    for sampler in handle.samplers:
        sampler.ratio = r
    for layer in handle.linears.values():
        layer.vcas_weight_ratio = nu


def timed_step(model: nn.Module, x: Tensor, y: Tensor) -> tuple[float, float]:
    """Seconds of the forward (with the loss) and of ``loss.backward()``; grads reset untimed."""
    start = time.perf_counter()
    loss = F.cross_entropy(model(x), y)
    mid = time.perf_counter()
    loss.backward()
    end = time.perf_counter()
    model.zero_grad(set_to_none=True)
    return mid - start, end - mid


def measure(
    name: str,
    variants: dict[str, nn.Module],
    handles: list[VCASHandle],
    batch: tuple[Tensor, Tensor],
    dense_flops: int,
    r: float,
    nu: float,
    args: argparse.Namespace,
) -> Row:
    """Set the VCAS ratios, then time every variant's steps interleaved."""
    for h in handles:
        set_ratios(h, r, nu)
    handle = handles[0]
    names = tuple(variants)
    x, y = batch
    flops_counted = forward_backward_flops(variants["vcas"], x, y) / dense_flops
    for i in range(args.warmup):
        for v in rotated(names, i):
            timed_step(variants[v], x, y)
    handle.runtime.take_tally()  # count the timed steps only
    times: dict[str, dict[str, list[float]]] = {v: {"fwd": [], "bwd": []} for v in names}
    gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for i in range(args.repeats):
            for v in rotated(names, i):
                fwd, bwd = timed_step(variants[v], x, y)
                times[v]["fwd"].append(fwd)
                times[v]["bwd"].append(bwd)
    finally:
        if gc_was_enabled:
            gc.enable()
    tally = handle.runtime.take_tally()
    memory = step_memory({v: functools.partial(timed_step, variants[v], x, y) for v in VARIANTS})
    for t in times.values():
        t["step"] = [f + b for f, b in zip(t["fwd"], t["bwd"], strict=True)]
    med = {v: {part: statistics.median(s) for part, s in t.items()} for v, t in times.items()}
    per_repeat = [a / b for a, b in zip(times["vcas"]["step"], times["dense"]["step"], strict=True)]
    q1, q2, q3 = quartiles(per_repeat)
    return Row(
        model=name,
        r=r,
        nu=nu,
        median_s=med,
        bwd_ratio=med["vcas"]["bwd"] / med["dense"]["bwd"],
        step_ratio=med["vcas"]["step"] / med["dense"]["step"],
        policy_bwd_ratio=med[POLICY]["bwd"] / med["dense"]["bwd"] if POLICY in med else None,
        policy_step_ratio=med[POLICY]["step"] / med["dense"]["step"] if POLICY in med else None,
        step_ratio_per_repeat=q2,
        step_ratio_iqr=(q1, q3),
        flops_counted=flops_counted,
        flops_tally=tally.done / tally.dense,
        kept_rows={b: kept / args.repeats for b, (kept, _) in sorted(tally.rows.items())},
        seen_rows={b: seen / args.repeats for b, (_, seen) in sorted(tally.rows.items())},
        per_repeat_s=times,
        memory=memory,
    )


def result_table(rows: Sequence[Row]) -> list[str]:
    header = ["r", "nu", "dense fwd", "dense bwd", "vcas fwd", "vcas bwd", "bwd vcas/dense"]
    header += ["step vcas/dense [IQR]", "step FLOPs (counted)", "Linear bwd FLOPs (tally)", "kept rows / B"]
    header += ["peak MiB dense / vcas", "with policy: bwd / step"]
    body = []
    for row in rows:
        ms = {v: {part: f"{1e3 * s:.1f}" for part, s in t.items()} for v, t in row.median_s.items()}
        kept = statistics.mean(row.kept_rows.values())
        seen = statistics.mean(row.seen_rows.values())
        body.append(
            [
                f"{row.r:g}",
                f"{row.nu:g}",
                *(ms[v][part] for v in VARIANTS for part in ("fwd", "bwd")),
                f"{row.bwd_ratio:.3f}",
                f"{row.step_ratio:.3f} [{row.step_ratio_iqr[0]:.3f}, {row.step_ratio_iqr[1]:.3f}]",
                f"{row.flops_counted:.3f}",
                f"{row.flops_tally:.3f}",
                f"{kept:.1f} / {seen:g}",
                " / ".join(memory_cell(row.memory[v]) for v in VARIANTS),
                "-"
                if row.policy_step_ratio is None
                else f"{row.policy_bwd_ratio:.3f} / {row.policy_step_ratio:.3f}",
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


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--models", nargs="+", choices=("minilm", "vit"), default=["minilm", "vit"])
    p.add_argument("--batch", type=int, default=None, help="batch size (default: minilm 32, vit 128)")
    p.add_argument("--seq-len", type=int, default=56, help="MiniLM tokens per sample (default 56)")
    p.add_argument("--data", choices=("real", "random"), default="real", help="batch source (default real)")
    p.add_argument("--rs", type=float, nargs="+", default=[1.0, 0.5], help="block sampler ratios r")
    p.add_argument("--nus", type=float, nargs="+", default=[1.0, 0.3], help="Linear token ratios nu")
    p.add_argument("--repeats", type=int, default=20, help="timed steps per variant (default 20)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per variant first (default 3)")
    p.add_argument("--policy", action="store_true", help="also time vcas with the measured token policy")
    add_common_options(p)
    args = p.parse_args(argv)
    if args.seq_len < 1 or args.repeats < 1 or args.warmup < 0 or (args.batch or 1) < 1:
        p.error("--batch, --seq-len and --repeats must be >= 1, --warmup >= 0")
    check_ratios(p, "--rs and --nus", [*args.rs, *args.nus])
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark, print the Markdown report, return (and optionally save) results."""
    args = parse_args(argv)
    env = start(args, __file__, argv)
    lines = header_lines(env, "VCAS: whole training step (forward + backward), fixed ratios vs dense")
    lines += [
        f"Median of {args.repeats} interleaved steps per variant after {args.warmup} warm-up steps, "
        "fp32, dropout off, no optimizer; times in ms. vcas = `apply_vcas` (mode FULL), every "
        "sampler's ratio = r, every Linear's `vcas_weight_ratio` = nu. Ratios are of medians; "
        "[IQR] of the per-repeat step ratios. step FLOPs: FlopCounterMode, one step; Linear bwd "
        "FLOPs: the runtime's tally over the timed steps; kept rows: mean per block per step; "
        "peak MiB: memory of one untimed step above its start (on CPU the rise of the process's "
        "peak RSS after freed heap pages went back to the OS; on CUDA torch.cuda.max_memory_allocated).",
        "",
    ]
    out: dict[str, Any] = {"benchmark": "vcas_step", "environment": env, "models": {}, "results": []}
    for name in args.models:
        batch_size = args.batch or DEFAULT_BATCH[name]
        x, y, source = load_batch(name, batch_size, args.seq_len, args.data, args.seed)
        dense = build(name, args.seed)
        vcas = copy.deepcopy(dense)
        handle = vcas_handle(apply_vcas(vcas, VCASConfig(seed=args.seed)))
        variants = {"dense": dense, "vcas": vcas}
        handles = [handle]
        break_even: dict[str, float] = {}
        if args.policy:
            variants[POLICY] = copy.deepcopy(dense)
            handles.append(vcas_handle(apply_vcas(variants[POLICY], VCASConfig(seed=args.seed))))
            with recorded_shapes(handles[1].linears) as shapes:
                variants[POLICY](x)
            break_even = measured_break_evens(shapes)
            set_break_evens(handles[1].linears, break_even)
        dense_flops = forward_backward_flops(dense, x, y)
        rows = []
        for r in args.rs:
            for nu in args.nus:
                print(f"  {name} r={r:g} nu={nu:g}", file=sys.stderr, flush=True)
                rows.append(measure(name, variants, handles, (x, y), dense_flops, r, nu, args))
        shape = " x ".join(str(s) for s in x.shape)
        info = {
            "input": shape,
            "data": source,
            "blocks": len(handle.samplers),
            "linears": len(handle.linears),
        }
        out["models"][name] = {**info, "dense_step_flops": dense_flops, "break_even": break_even}
        out["results"] += [asdict(row) for row in rows]
        lines += [
            f"#### {name}: input {shape}, data {source}; {info['blocks']} sampled blocks, "
            f"{info['linears']} VCAS Linears; dense step {dense_flops / 1e9:.2f} GFLOP",
            "",
            *(
                [f"Token policy's break-even ratios: {_break_even_text(break_even)}", ""]
                if break_even
                else []
            ),
            *result_table(rows),
            "",
        ]
    print("\n".join(lines), flush=True)
    return save_results(out, args)


if __name__ == "__main__":
    main()
