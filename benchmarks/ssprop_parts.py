"""Where ssProp's overhead over the first-k floor goes: each extra part of its backward, per step.

For every convolution of a CIFAR ResNet-18 (batch, width and keep as given) the parts of
greenprop's sparse backward that the first-k floor (``_narrow_conv.NarrowConv2d``) does
not do, or does differently, are timed on their own on that layer's real shapes and
summed over the network's 20 convolutions:

* scoring ``dy`` (the C++ op and, for comparison, PyTorch ops), and choosing the top-k
  (the C++ ``topk_channels`` op that scores, ranks and sorts in one call, and the PyTorch
  path: scores, then a stable sort);
* gathering the kept channels of ``dy`` (the C++ op, and ``index_select``) against the
  floor's copy of the first ``k`` channels;
* gathering the kept weight rows (the floor takes a view);
* writing grad_weight's kept rows into the full-size gradient (the C++ op, and
  ``zeros_like`` + ``index_copy_``) against the floor's zero-padding.

With ``--thread-share`` each part also reports whether it ran on more than one thread:
the process's threads' CPU ticks (``/proc/self/task``) are read around the part, so a
serial part shows up even on a busy machine. A serial part costs the same at 1 thread and twice its share
at 2, which is how ssProp's gap to the floor can be larger at 2 threads than at 1.

Run ``python benchmarks/ssprop_parts.py --help`` for the options.
"""

from __future__ import annotations

import argparse
import os
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from _common import add_common_options, header_lines, markdown_table, save_results, start
from _narrow_conv import _pad_rows
from greenprop import kernels
from greenprop.rows import scatter_rows
from greenprop.ssprop import functional


def resnet18_convs(width: int, size: int) -> list[tuple[int, int, int, int, int]]:
    """``(count, C_out, output side, C_in, kernel)`` of the 20 convolutions of a CIFAR ResNet-18."""
    convs = [(1, width, size, 3, 3), (4, width, size, width, 3)]  # stem, stage 1
    for stage in range(1, 4):
        c, side = width * 2**stage, max(1, size // 2**stage)
        convs += [(1, c, side, c // 2, 3), (3, c, side, c, 3), (1, c, side, c // 2, 1)]
    return convs


def _thread_ticks() -> dict[int, int]:
    """CPU ticks (user + system) of each thread of this process (Linux; empty elsewhere)."""
    ticks = {}
    task = Path("/proc/self/task")
    for tid in os.listdir(task) if task.is_dir() else []:
        try:
            fields = (task / tid / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ticks[int(tid)] = int(fields[11]) + int(fields[12])
    return ticks


#: Calls per part and layer when counting which threads did the work (ticks are ~10 ms).
SHARE_CALLS = 40


def thread_ticks_of(fn: Callable[[], object], calls: int) -> tuple[int, int]:
    """CPU ticks that ``calls`` runs of ``fn`` took on the calling thread and on all others."""
    before = _thread_ticks()
    for _ in range(calls):
        fn()
    after = _thread_ticks()
    spent = {tid: after[tid] - before.get(tid, 0) for tid in after}
    mine = spent.pop(threading.get_native_id(), 0)
    return mine, sum(spent.values())


def median_ms(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median milliseconds per call, calls interleaved with a rotating order."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    items = list(fns.items())
    for _, fn in items:
        fn()  # warm-up
    for r in range(repeats):
        for name, fn in items[r % len(items) :] + items[: r % len(items)]:
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}


def layer_parts(
    c_out: int, side: int, c_in: int, kernel: int, args: argparse.Namespace
) -> dict[str, Callable[[], object]]:
    """Zero-argument calls of every part, on one layer's shapes."""
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    gen = torch.Generator().manual_seed(args.seed)
    dy = torch.randn(args.batch, c_out, side, side, generator=gen).contiguous(memory_format=fmt)
    weight = torch.randn(c_out, c_in, kernel, kernel, generator=gen).contiguous(memory_format=fmt)
    k = functional.keep_count(args.keep, c_out)
    idx = functional.select_channels(dy, k)
    rows = functional._take_rows(weight, idx).clone(memory_format=fmt)  # a k-row gradient
    view = functional._channel_view(dy, 1)

    def torch_select() -> Tensor:
        return functional.top_k(functional.channel_scores_torch(view).unsqueeze(0), k).sort(dim=1).values

    return {
        "score (C++ op)": lambda: kernels.channel_abs_sum(view),
        "score (PyTorch ops)": lambda: functional.channel_scores_torch(view),
        "score + top-k (C++ op, one call)": lambda: kernels.topk_channels(view, k, 1),
        "score + top-k (PyTorch ops)": lambda: torch_select(),
        "gather dy (C++ op)": lambda: kernels.gather_channels(view, idx),
        "gather dy (index_select)": lambda: view.index_select(1, idx),
        "floor: copy dy[:, :k]": lambda: dy.narrow(1, 0, k).contiguous(memory_format=fmt),
        "weight rows (index_select)": lambda: functional._take_rows(weight, idx),
        "scatter grad_weight (C++ op)": lambda: scatter_rows(rows, idx, weight),
        "scatter (zeros_like + index_copy_)": lambda: torch.zeros_like(weight).index_copy_(0, idx, rows),
        "floor: zero-pad grad_weight": lambda: _pad_rows(rows, weight),
    }


def run(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Per part: milliseconds per step (all convs) and the share of CPU time off the main thread."""
    if not kernels.load():
        raise SystemExit("greenprop: error: the C++ channel ops could not be built; nothing to compare")
    totals: dict[str, float] = {}
    ticks: dict[str, tuple[int, int]] = {}
    for count, c_out, side, c_in, kernel in resnet18_convs(args.width, args.image_size):
        parts = layer_parts(c_out, side, c_in, kernel, args)
        for name, ms in median_ms(parts, args.repeats).items():
            totals[name] = totals.get(name, 0.0) + count * ms
        if args.thread_share:
            for name, fn in parts.items():
                mine, other = thread_ticks_of(fn, SHARE_CALLS)
                before = ticks.get(name, (0, 0))
                ticks[name] = (before[0] + mine, before[1] + other)
    share = {name: other / (mine + other) for name, (mine, other) in ticks.items() if mine + other >= 5}
    return {name: {"ms_per_step": ms, "other_threads_share": share.get(name)} for name, ms in totals.items()}


def report(env: dict[str, Any], args: argparse.Namespace, parts: dict[str, dict[str, Any]]) -> str:
    layout = "channels_last" if args.channels_last else "NCHW"
    lines = header_lines(env, "ssProp: the parts of the sparse backward beyond the first-k floor")
    lines += [
        f"CIFAR ResNet-18 convolutions (20), batch {args.batch}, width {args.width}, "
        f"{args.image_size}x{args.image_size} input, {layout}, keep {args.keep:g}; each part timed alone "
        f"on each layer's shapes (median of {args.repeats}, interleaved), summed over the layers. "
        "'Other threads' is the share of the part's CPU time spent off the calling thread "
        f"(0 = serial; {torch.get_num_threads()} torch threads; over {SHARE_CALLS} more calls per "
        "layer; '-' where not measured or under 5 clock ticks).",
        "",
    ]
    rows = []
    for name, part in parts.items():
        share = part["other_threads_share"]
        rows.append([name, f"{part['ms_per_step']:.1f}", "-" if share is None else f"{share:.2f}"])
    lines += markdown_table(["part", "ms per step", "other threads"], rows)
    return "\n".join([*lines, ""])


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--keep", type=float, default=0.6, help="kept fraction of channels (default 0.6)")
    p.add_argument("--batch", type=int, default=128, help="batch size (default 128)")
    p.add_argument("--width", type=int, default=64, help="ResNet-18 base width (default 64)")
    p.add_argument("--image-size", type=int, default=32, help="input side (default 32)")
    p.add_argument("--repeats", type=int, default=9, help="timed calls per part and layer (default 9)")
    p.add_argument("--channels-last", action="store_true", help="gradients and weights in NHWC")
    p.add_argument(
        "--thread-share",
        action="store_true",
        help=f"also count which threads did each part's work ({SHARE_CALLS} more calls per part and layer)",
    )
    add_common_options(p)
    args = p.parse_args(argv)
    for name in ("batch", "width", "image_size", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if not 0.0 < args.keep < 1.0:
        p.error("--keep must be in (0, 1)")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Time the parts, print the Markdown table, return (and optionally save) the results."""
    args = parse_args(argv)
    env = start(args, __file__, argv)
    parts = run(args)
    print(report(env, args, parts), flush=True)
    return save_results({"benchmark": "ssprop_parts", "environment": env, "parts": parts}, args)


if __name__ == "__main__":
    main()
