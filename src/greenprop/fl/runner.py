"""Run federated jobs on Flower's simulation runtime (Ray), offline and on loopback.

Every job of a sweep runs inside one simulation (one Ray start): the ServerApp loops over
the jobs on the same SuperNodes and skips jobs whose ``metrics.json`` exists, so an
interrupted sweep resumes where it stopped. Ray is shut down at the end, also on failure
or interrupt (SIGINT/SIGTERM), and any process Ray started that outlives it is terminated.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import tempfile
import threading
from pathlib import Path
from types import FrameType
from typing import Any

import psutil

from greenprop.fl import offline
from greenprop.fl.app import FLSettings, Progress, client_app, make_server_app
from greenprop.train.signals import RunInterrupted, signal_number

__all__ = ["run_jobs"]


def run_jobs(jobs: list[tuple[FLSettings, Path]], *, num_cpus: int = 1) -> None:
    """Run ``jobs`` (settings, output folder) in one simulation; all need the same client count."""
    import ray
    from flwr.simulation import run_simulation

    todo = [(s, out) for s, out in jobs if not (out / "metrics.json").exists()]
    if not todo:
        return
    clients = {s.clients for s, _ in todo}
    if len(clients) != 1:
        raise ValueError(f"one simulation runs one client count, got {sorted(clients)}")
    saved = {k: os.environ.get(k) for k in ("HOME", "FLWR_HOME")}
    progress = Progress()
    ours_before = _descendants()
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    flwr_log = logging.getLogger("flwr")
    flwr_level = flwr_log.level
    with tempfile.TemporaryDirectory(prefix="gp-fl-") as runtime:
        os.environ.update(offline.prepare_run_home(runtime))
        try:
            # Started here, not by Flower, so that our handlers can follow ray.init's SIGTERM one.
            ray.init(
                runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(sys.path)}},
                **offline.ray_init_args(num_cpus),
            )
            _set_handlers(dict.fromkeys(handlers, _interrupt))
            run_simulation(
                server_app=make_server_app(todo, progress),
                client_app=client_app,
                num_supernodes=clients.pop(),
                backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0}},
            )
        except KeyboardInterrupt as err:
            _stop_server(progress)
            raise RunInterrupted(_interrupted_line(progress, todo), signal_number(err)) from err
        finally:
            started = [p for p in _descendants() if p.pid not in ours_before]
            if ray.is_initialized():
                ray.shutdown()
            _terminate(started)
            flwr_log.setLevel(flwr_level)
            _set_handlers(handlers)
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
    missing = [str(out) for _, out in todo if not (out / "metrics.json").exists()]
    if missing:
        raise RuntimeError(f"federated run ended without results for: {', '.join(missing)}")


def _interrupt(signum: int, frame: FrameType | None) -> None:
    """SIGINT/SIGTERM during a run: stop it (``RunInterrupted`` knows the signal).

    Flower's threads then report the client actors being stopped as errors with
    tracebacks: its log is muted until the runtime is down (the run's one line says why).
    """
    logging.getLogger("flwr").setLevel(logging.CRITICAL)
    raise RunInterrupted("interrupted", signum)


def _set_handlers(handlers: dict[int, Any]) -> None:
    """Install signal handlers (only the main thread may; elsewhere leave them alone)."""
    if threading.current_thread() is threading.main_thread():
        for signum, handler in handlers.items():
            if handler is not None:
                signal.signal(signum, handler)


def _stop_server(progress: Progress) -> None:
    """Ask Flower's ServerApp thread (not a daemon) to stop, and wait for it to end."""
    progress.stop.set()
    if progress.started.is_set():
        progress.ended.wait(timeout=30)


def _interrupted_line(progress: Progress, todo: list[tuple[FLSettings, Path]]) -> str:
    """Where the run stopped and what it kept."""
    where = "before the first round"
    if progress.job:
        out = todo[progress.job - 1][1]
        where = f"in round {progress.round + 1}/{progress.rounds} of job {progress.job}/{len(todo)} ({out})"
    return (
        f"federated run interrupted {where}; {progress.finished} of {len(todo)} jobs finished "
        "and their metrics.json kept (a rerun skips them); Ray stopped"
    )


def _descendants() -> list[psutil.Process]:
    return psutil.Process().children(recursive=True)


def _terminate(procs: list[psutil.Process], grace: float = 5.0) -> None:
    """Last resort after ``ray.shutdown()``: end the processes this run started that are still alive.

    Only processes that were our descendants during the run (Ray's raylet, gcs_server,
    workers, agents) are touched; psutil refuses to signal a reused pid.
    """
    alive = []
    for proc in procs:
        try:
            proc.terminate()
            alive.append(proc)
        except psutil.NoSuchProcess:
            continue
    _, left = psutil.wait_procs(alive, timeout=grace)
    for proc in left:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            continue
    psutil.wait_procs(left, timeout=grace)
