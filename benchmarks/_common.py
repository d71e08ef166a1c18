"""What the benchmark scripts share: common options, the environment header, interleaved timing, results.

The interleaved timing itself lives in :mod:`greenprop.metering.interleave` (``greenprop
advise`` uses it too) and is re-exported here.

Every script prints a header that records what its timings depend on (versions,
threads, CPU, allocator settings, the exact command), times its variants interleaved
so all see the same drift, and can save every measurement with ``--json OUT``.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from greenprop.metering import PeakMemory
from greenprop.metering.flops import flop_counter
from greenprop.metering.interleave import (  # noqa: F401 (re-exported for the scripts)
    Timings,
    interleaved_times,
    minor_page_faults,
    rotated,
    synchronizer,
)
from greenprop.metering.memory import release_free_heap

MIB = 2**20
#: Environment variables that change CPU timings; printed in the header.
TIMING_ENV = (
    "GLIBC_TUNABLES",
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "LD_PRELOAD",
    "DNNL_MAX_CPU_ISA",
    "GREENPROP_NO_KERNELS",
)


# --------------------------------------------------------------------------- options


def add_threads_option(parser: argparse.ArgumentParser) -> None:
    """``--threads N``: torch's intra-op threads (timings depend on it)."""
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")


def add_common_options(parser: argparse.ArgumentParser) -> None:
    """``--threads``, ``--seed`` and ``--json OUT``, the options every timing script has."""
    add_threads_option(parser)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, metavar="OUT", help="also write the results here")


#: ``--clock`` choices: wall time, or the process's CPU time (all its threads).
CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}


def add_clock_option(parser: argparse.ArgumentParser) -> None:
    """``--clock wall|cpu``: what interleaved timings measure."""
    parser.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="wall",
        help="wall time (default) or the process's CPU time: steadier than wall time when other "
        "processes oversubscribe the cores; with --threads 1 it is the work's own time",
    )


def clock_note(clock: str) -> str:
    """A sentence for the report saying what the times are."""
    if clock == "cpu":
        return " Times are the process's CPU time (`--clock cpu`), not wall time."
    return ""


def check_ratios(parser: argparse.ArgumentParser, flags: str, values: Sequence[float]) -> None:
    """Exit with a usage error unless every keep ratio in ``values`` is in (0, 1]."""
    if any(not 0.0 < v <= 1.0 for v in values):
        parser.error(f"{flags} must be in (0, 1]")


def set_threads(args: argparse.Namespace) -> None:
    """Apply ``--threads`` when given (process-wide)."""
    if args.threads is not None:
        torch.set_num_threads(args.threads)


def start(args: argparse.Namespace, script: str, argv: Sequence[str] | None) -> dict[str, Any]:
    """Apply ``--threads``, then return the environment the header reports.

    ``argv`` is what ``main`` was given (None: the process's own arguments).
    """
    set_threads(args)
    return environment(script, sys.argv[1:] if argv is None else argv)


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


def save_results(out: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Add the run's arguments to ``out`` and write it to ``--json`` when given; returns ``out``."""
    out["args"] = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return out


# --------------------------------------------------------------------------- timing


def step_memory(
    fns: Mapping[str, Callable[[], object]], device: torch.device | str | None = None
) -> dict[str, dict[str, Any]]:
    """Peak memory of one untimed call of each function, as MiB above the call's start.

    The rise above the start is what the call itself needed at its worst moment (its
    activations, gradients, workspaces); the models and data every variant keeps
    resident are not in it. On CPU freed heap pages are handed back to the OS first
    (:func:`greenprop.metering.memory.release_free_heap`), or a call reusing them
    would not raise the RSS. ``{name: {"growth_mib", "peak_mib", "kind", "source"}}``.
    """
    out: dict[str, dict[str, Any]] = {}
    for name, fn in fns.items():
        gc.collect()
        release_free_heap()
        meter = PeakMemory(device or "cpu")
        meter.start()
        fn()
        reading = meter.stop()
        growth = reading.growth()
        out[name] = {
            "growth_mib": None if growth.value is None else growth.value / MIB,
            "peak_mib": None if reading.peak.value is None else reading.peak.value / MIB,
            "kind": growth.kind,
            "source": growth.source,
        }
    return out


def memory_cell(reading: Mapping[str, Any]) -> str:
    """A :func:`step_memory` reading for a table: its rise in MiB, or n/a (never 0)."""
    return "n/a" if reading["growth_mib"] is None else f"{reading['growth_mib']:.1f}"


def quartiles(values: Sequence[float]) -> tuple[float, float, float]:
    """(25th percentile, median, 75th percentile); all three equal for one value."""
    if len(values) < 2:
        v = float(values[0])
        return v, v, v
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


def forward_backward_flops(model: nn.Module, x: Tensor, y: Tensor) -> int:
    """FLOPs counted by FlopCounterMode for one forward + backward (no optimizer step)."""
    with flop_counter() as counter:
        F.cross_entropy(model(x), y).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()
