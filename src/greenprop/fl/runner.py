"""Run federated jobs on Flower's simulation runtime (Ray), offline and on loopback.

Every job of a sweep runs inside one simulation (one Ray start): the ServerApp loops over
the jobs on the same SuperNodes and skips jobs whose ``metrics.json`` exists, so an
interrupted sweep resumes where it stopped. Ray is shut down at the end, also on failure.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from greenprop.fl import offline
from greenprop.fl.app import FLSettings, client_app, make_server_app

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
    with tempfile.TemporaryDirectory(prefix="gp-fl-") as runtime:
        os.environ.update(offline.prepare_run_home(runtime))
        try:
            run_simulation(
                server_app=make_server_app(todo),
                client_app=client_app,
                num_supernodes=clients.pop(),
                backend_config={
                    "init_args": offline.ray_init_args(num_cpus),
                    "client_resources": {"num_cpus": 1, "num_gpus": 0},
                },
            )
        finally:
            if ray.is_initialized():
                ray.shutdown()
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
    missing = [str(out) for _, out in todo if not (out / "metrics.json").exists()]
    if missing:
        raise RuntimeError(f"federated run ended without results for: {', '.join(missing)}")
