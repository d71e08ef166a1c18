"""``greenprop train --nproc N``: N training processes on this machine, started as torchrun does.

The processes are started by torch's elastic agent (:func:`torch.distributed.launcher.api.
elastic_launch`, the engine of ``torchrun``) with a rendezvous on loopback
(``127.0.0.1``, a free port) and no restarts: one failing process stops the others.
Each process runs ``python -m greenprop train ...`` with the same arguments and finds
its rank in the environment. A worker's GreenpropError is written to a file the
launcher reads, so a bad option or output folder is reported once, as one line.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import sys
import tempfile
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

from greenprop.errors import GreenpropError

__all__ = ["die_with_launcher", "launch", "launched_worker", "report_worker_error"]

#: Set in the workers greenprop's launcher starts (not in torchrun's).
ENV_LAUNCHED = "GREENPROP_LAUNCHED"
#: Folder where a worker leaves its GreenpropError for the launcher to print.
ENV_ERROR_DIR = "GREENPROP_ERROR_DIR"
_PR_SET_PDEATHSIG = 1


def launched_worker() -> bool:
    """Whether this process is a worker that ``greenprop train --nproc`` started."""
    return os.environ.get(ENV_LAUNCHED) == "1" and "RANK" in os.environ


def die_with_launcher() -> None:
    """Let the kernel kill this worker if its launcher dies (even by SIGKILL): no orphans."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() == 1:  # the launcher was already gone before the request took effect
        os._exit(1)


def report_worker_error(message: str) -> bool:
    """Hand a worker's error to the launcher; False when there is none (torchrun): print it."""
    folder = os.environ.get(ENV_ERROR_DIR)
    if not launched_worker() or not folder:
        return False
    with contextlib.suppress(OSError):
        (Path(folder) / f"rank{int(os.environ['RANK']):05d}.txt").write_text(message)
        return True
    return False


@contextlib.contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def launch(argv: Sequence[str], nproc: int) -> int:
    """Run ``greenprop <argv>`` in ``nproc`` processes; returns the exit status for the shell.

    Threads: unless OMP_NUM_THREADS is set, each process gets an equal share of the
    cores (torchrun would give each one thread).
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise GreenpropError(f"--nproc {nproc!r} must be a positive number of processes")
    threads = os.environ.get("OMP_NUM_THREADS") or str(max(1, (os.cpu_count() or 1) // nproc))
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=f"greenprop-{uuid.uuid4().hex}",
        rdzv_backend="c10d",
        rdzv_endpoint="127.0.0.1:0",
        local_addr="127.0.0.1",
        max_restarts=0,
        monitor_interval=0.2,
        start_method="spawn",
    )
    quiet = logging.getLogger("torch.distributed.elastic")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)  # a failure is reported below, once
    with tempfile.TemporaryDirectory(prefix="greenprop-launch-") as errors:
        env = {
            ENV_LAUNCHED: "1",
            ENV_ERROR_DIR: errors,
            "OMP_NUM_THREADS": threads,
            "GLOO_SOCKET_IFNAME": os.environ.get("GLOO_SOCKET_IFNAME", "lo"),
        }
        try:
            with _environment(env):
                elastic_launch(config, sys.executable)("-m", "greenprop", *argv)
        except ChildFailedError as err:
            return _report_failure(err, Path(errors))
        finally:
            quiet.setLevel(level)
    return 0


def _report_failure(err: Exception, errors: Path) -> int:
    messages = sorted(errors.glob("rank*.txt"))
    if messages:
        print(f"greenprop: error: {messages[0].read_text()}", file=sys.stderr)
        return 2
    failures = getattr(err, "failures", {})
    shown = ", ".join(f"rank {rank} exit code {f.exitcode}" for rank, f in sorted(failures.items()))
    print(
        f"greenprop: error: training process(es) failed ({shown or err}); their output is above",
        file=sys.stderr,
    )
    return 1
