"""``--tuned``: runtime settings that make dense training itself cheaper on this machine.

They apply to the baseline and every method alike, and each run records what it saw
(``metrics.json``'s ``environment``), so a method's saving is never confused with a
setting's. The settings: channels_last (``TrainConfig.tuned`` implies it), one intra-op
thread per physical core (shared among this machine's DDP processes), and on Linux the
glibc malloc tunables of the Makefile's ``BENCH_ENV`` (docs/benchmarks.md: fewer page
faults per step). glibc reads those only when a process starts, so the CLI re-executes
itself once with them set (:func:`reexec_tuned`).

``torch.compile`` is not among them: greenprop cannot show here that it pays (no timing
benchmarks on the shared 2-core machine), its compile time is paid again in every slice
of a round-robin ``compare``, and how the methods' autograd hooks fare under it is unchecked.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

import psutil
import torch

__all__ = ["MALLOC_TUNABLES", "REEXEC_MARKER", "apply_threads", "reexec_tuned", "tuned_threads"]

#: Large mmap and trim thresholds: freed heap pages stay mapped and are reused next step.
MALLOC_TUNABLES = "glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=17179869184"
#: Set in the re-executed process, so it never re-executes again.
REEXEC_MARKER = "GREENPROP_TUNED_REEXEC"


def tuned_threads(processes: int | None = None) -> int:
    """Physical cores this process may use, shared among ``processes`` (at least 1;
    default: the DDP processes on this machine, torch's ``LOCAL_WORLD_SIZE``)."""
    if processes is None:
        processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    physical = psutil.cpu_count(logical=False) or os.cpu_count() or 1
    allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else physical
    return max(1, min(physical, allowed) // max(1, processes))


def apply_threads(processes: int | None = None) -> int:
    """``torch.set_num_threads`` to :func:`tuned_threads`; returns the count set."""
    threads = tuned_threads(processes)
    torch.set_num_threads(threads)
    return threads


def _needs_reexec() -> bool:
    if not sys.platform.startswith("linux") or os.environ.get(REEXEC_MARKER):
        return False
    return MALLOC_TUNABLES not in os.environ.get("GLIBC_TUNABLES", "")


def reexec_tuned(argv: Sequence[str]) -> None:
    """Replace this process by ``python -m greenprop ARGV`` with the malloc tunables set.

    ``os.execve`` keeps the process id, so the exit code (and a launcher's or shell's
    view of the process) is the re-executed one's. Returns without doing anything off
    Linux, when the tunables are already set, or when this process is the re-executed
    one (the marker guards against a loop should glibc drop the variable).
    """
    if not _needs_reexec():
        return
    env = dict(os.environ)
    present = env.get("GLIBC_TUNABLES")
    env["GLIBC_TUNABLES"] = f"{present}:{MALLOC_TUNABLES}" if present else MALLOC_TUNABLES
    env[REEXEC_MARKER] = "1"
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", "greenprop", *argv], env)
