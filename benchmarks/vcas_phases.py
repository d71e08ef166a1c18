"""Where a compacted VCAS training step spends its time: each phase's share of the step.

The same models, batches and fixed ratios as ``vcas_step.py`` (dropout off), dense and
compacted (``apply_vcas(compact=True)``) copies alternating. During the compacted steps
timers wrap the library's own functions (nested totals, so an inner phase is part of the
outer one):

* block forward: each block's graph-free forward (``_DirectBlock.forward`` for blocks a
  direct rule knows, ``_Run.forward`` for the others);
* block backward: ``_DirectBlock.backward`` / ``_CompactedBlock.backward`` as a whole,
  and inside it the block sampler's draw; on the direct path the gather of the saved
  tensors' kept rows (or live tokens); on the re-run path the re-run on the kept rows (of which: handing
  back the kept rows of the recorded layer outputs) and the backpropagation through it;
  on both the VCAS Linear / Conv2d backwards (on the re-run path part of the
  backpropagation), of the Linears the token-sampled weight gradient, of that the
  token draw with the gather and ``1/p`` scale of the kept rows (``samplers._kept_rows``:
  one C++ op where :mod:`greenprop.kernels` serves), and of that, on the PyTorch path
  only (``GREENPROP_NO_KERNELS=1``), the token scores, soft top-k and draw;
* the rest of the step (embedding, head, loss, autograd's work between the blocks) is
  the step minus the blocks' forward and backward.

``--rerun`` measures the re-run path everywhere (``direct=False``). With ``--threads 1
--clock cpu`` the phases are CPU time of the one busy thread, which a
shared machine disturbs less than wall time. Run from the repository root:
``python benchmarks/vcas_phases.py --help``.
"""

from __future__ import annotations

import argparse
import copy
import functools
import statistics
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any

import torch

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
from greenprop.vcas import VCASConfig, apply_vcas, compaction, direct, layers, samplers
from greenprop.vcas.surgery import vcas_handle
from vcas_step import DEFAULT_BATCH, build, load_batch, set_ratios, timed_step

FORWARD, BACKWARD = "block forward (graph-free)", "block backward, all of it"

#: (label, owner, attribute): the functions timed, outermost first; indented labels are inner
#: phases; a label named twice adds both functions (the two compaction paths).
PHASES: tuple[tuple[str, Any, str], ...] = (
    (FORWARD, compaction._Run, "forward"),
    (FORWARD, compaction._DirectBlock, "forward"),
    (BACKWARD, compaction._CompactedBlock, "backward"),
    (BACKWARD, compaction._DirectBlock, "backward"),
    ("- block sampler draw", layers.BlockSampler, "draw"),
    ("- gather of the saved tensors' kept rows (direct)", compaction, "_kept_rows"),
    ("- gather of the saved tensors' kept rows (direct)", direct.KeptRows, "take"),
    ("- gather of the saved tensors' kept rows (direct)", direct.KeptRows, "take_tokens"),
    ("- re-run on the kept rows", compaction._Run, "rerun"),
    ("-- replay of recorded layer outputs", compaction.BlockCache, "replay"),
    ("- backprop through the re-run", torch.autograd, "grad"),
    ("- VCAS Linear backward (re-run: part of the backprop)", layers, "_linear_grads"),
    ("-- token-sampled weight gradient", layers, "sampled_weight_grad"),
    ("--- token draw, gather and 1/p scale of the kept rows", samplers, "_kept_rows"),
    ("---- token scores, soft top-k, draw (PyTorch path)", samplers, "_leverage_draw"),
    ("---- token scores, soft top-k, draw (PyTorch path)", samplers, "_leverage_draw_among"),
    ("- VCAS Conv2d backward (re-run: part of the backprop)", layers, "_conv_grads"),
)
LABELS = tuple(dict.fromkeys(label for label, _, _ in PHASES))


@contextmanager
def timers(clock: Callable[[], float], totals: dict[str, float]) -> Iterator[None]:
    """Wrap every function of :data:`PHASES` with a timer adding to ``totals``; undone on exit."""

    def timed(label: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            begin = clock()
            try:
                return fn(*args, **kwargs)
            finally:
                totals[label] += clock() - begin

        return wrapper

    with ExitStack() as undo:
        for label, owner, name in PHASES:
            original = owner.__dict__[name]
            fn = original.__func__ if isinstance(original, staticmethod) else original
            wrapped = timed(label, fn)
            setattr(owner, name, staticmethod(wrapped) if isinstance(original, staticmethod) else wrapped)
            undo.callback(setattr, owner, name, original)
        yield


def measure(name: str, r: float, nu: float, args: argparse.Namespace) -> dict[str, Any]:
    """Median phase times (s) of the compacted step and the dense step's forward / backward."""
    x, y, source = load_batch(name, args.batch or DEFAULT_BATCH[name], args.seq_len, "real", args.seed)
    dense = build(name, args.seed)
    compact = copy.deepcopy(dense)
    # sample_max_ratio 1: the phases of a sampled step at any r (by default blocks above 0.8 run exact)
    config = VCASConfig(seed=args.seed, compact=True, direct=not args.rerun, sample_max_ratio=1.0)
    set_ratios(vcas_handle(apply_vcas(compact, config)), r, nu)
    clock = CLOCKS[args.clock]
    for _ in range(max(1, args.warmup)):  # at least one: a compacted block's first forward checks it
        timed_step(dense, x, y, clock)
        timed_step(compact, x, y, clock)
    runs: dict[str, list[float]] = defaultdict(list)
    for i in range(args.repeats):
        totals: dict[str, float] = defaultdict(float)
        for variant in ("dense", "compact") if i % 2 else ("compact", "dense"):
            if variant == "dense":
                fwd, bwd = timed_step(dense, x, y, clock)
            else:
                with timers(clock, totals):
                    fwd, bwd = timed_step(compact, x, y, clock)
            runs[f"{variant} forward"].append(fwd)
            runs[f"{variant} backward"].append(bwd)
            runs[f"{variant} step"].append(fwd + bwd)
        for label in LABELS:
            runs[label].append(totals[label])
        blocks = totals[FORWARD] + totals[BACKWARD]
        runs["rest of the step"].append(runs["compact step"][-1] - blocks)
    return {"model": name, "data": source, "median_s": {k: statistics.median(v) for k, v in runs.items()}}


def phase_table(result: dict[str, Any]) -> list[str]:
    med = result["median_s"]
    step, dense = med["compact step"], med["dense step"]
    labels = [label for label in LABELS if med[label] > 0] + ["rest of the step"]
    body = [
        [label, f"{1e3 * med[label]:.1f}", f"{med[label] / step:.1%}", f"{med[label] / dense:.3f}"]
        for label in labels
    ]
    body.append(["**compacted step**", f"{1e3 * step:.1f}", "100%", f"**{step / dense:.3f}**"])
    body.append(["dense step (forward / backward)", f"{1e3 * dense:.1f}", "", ""])
    body[-1][1] += f" ({1e3 * med['dense forward']:.1f} / {1e3 * med['dense backward']:.1f})"
    return markdown_table(["phase", "ms", "share of compacted step", "of dense step"], body)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument(
        "--models", nargs="+", choices=("minilm", "vit", "resnet"), default=["vit", "minilm", "resnet"]
    )
    p.add_argument("--batch", type=int, default=None, help="batch size (default: as vcas_step.py)")
    p.add_argument("--seq-len", type=int, default=56, help="MiniLM tokens per sample (default 56)")
    p.add_argument("--r", type=float, default=0.5, help="block sampler ratio (default 0.5)")
    p.add_argument("--nu", type=float, default=0.3, help="Linear token ratio (default 0.3)")
    p.add_argument("--repeats", type=int, default=8, help="timed steps per variant (default 8)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first (default 2)")
    p.add_argument("--rerun", action="store_true", help="every block re-runs (direct=False)")
    add_common_options(p)
    add_clock_option(p)
    args = p.parse_args(argv)
    if args.seq_len < 1 or args.repeats < 1 or args.warmup < 0 or (args.batch or 1) < 1:
        p.error("--batch, --seq-len and --repeats must be >= 1, --warmup >= 0")
    check_ratios(p, "--r and --nu", [args.r, args.nu])
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the breakdown, print the Markdown report, return (and optionally save) results."""
    args = parse_args(argv)
    env = start(args, __file__, argv)
    lines = header_lines(env, "VCAS: where the compacted training step's time goes")
    lines += [
        f"Block ratio r = {args.r:g}, token ratio nu = {args.nu:g}, fp32, dropout off, no optimizer, "
        + ("every block re-run (`direct=False`); " if args.rerun else "known blocks direct; ")
        + f"medians of {args.repeats} steps alternating with dense after {args.warmup} warm-up steps; "
        "phases nest (a '-' phase is part of the one above it)." + clock_note(args.clock),
        "",
    ]
    out: dict[str, Any] = {"benchmark": "vcas_phases", "environment": env, "results": []}
    for name in args.models:
        result = measure(name, args.r, args.nu, args)
        out["results"].append(result)
        lines += [f"#### {name}: data {result['data']}", "", *phase_table(result), ""]
    print("\n".join(lines), flush=True)
    return save_results(out, args)


if __name__ == "__main__":
    main()
