"""Run federated jobs on Flower's simulation runtime (Ray), offline and on loopback.

Every job of a sweep runs inside one simulation (one Ray start): the ServerApp loops over
the jobs on the same SuperNodes and skips jobs whose ``metrics.json`` exists, so an
interrupted sweep resumes where it stopped. Ray is shut down at the end, also on failure
or interrupt (SIGINT/SIGTERM), and any process Ray started that outlives it is terminated.
"""

from __future__ import annotations

import os
import signal
import tempfile
from pathlib import Path

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
    sigterm = signal.getsignal(signal.SIGTERM)
    with tempfile.TemporaryDirectory(prefix="gp-fl-") as runtime:
        os.environ.update(offline.prepare_run_home(runtime))
        try:
            run_simulation(
                server_app=make_server_app(todo, progress),
                client_app=client_app,
                num_supernodes=clients.pop(),
                backend_config={
                    "init_args": offline.ray_init_args(num_cpus),
                    "client_resources": {"num_cpus": 1, "num_gpus": 0},
                },
            )
        except KeyboardInterrupt as err:
            _stop_server(progress)
            raise RunInterrupted(_interrupted_line(progress, todo), signal_number(err)) from err
        except SystemExit as err:
            if err.code != signal.SIGTERM:
                raise
            # ray.init replaces our SIGTERM handler with one that calls sys.exit(SIGTERM)
            _stop_server(progress)
            raise RunInterrupted(_interrupted_line(progress, todo), signal.SIGTERM) from err
        finally:
            started = [p for p in _descendants() if p.pid not in ours_before]
            if ray.is_initialized():
                ray.shutdown()
            _terminate(started)
            if signal.getsignal(signal.SIGTERM) is not sigterm and sigterm is not None:
                signal.signal(signal.SIGTERM, sigterm)
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
    missing = [str(out) for _, out in todo if not (out / "metrics.json").exists()]
    if missing:
        raise RuntimeError(f"federated run ended without results for: {', '.join(missing)}")


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
