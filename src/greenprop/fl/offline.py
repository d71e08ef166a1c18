"""Keep Flower and Ray offline and on loopback: set their switches before ``flwr`` is imported."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

#: Environment every federated run needs; set at import, before flwr is imported anywhere.
OFFLINE_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_DISABLE_DOCKER_CPU_WARNING": "1",
    # Ray turns a 127.0.0.1 node address into the interface address ("remotely reachable")
    # unless clustering is off, which is what this switch does (it is on by default on Linux).
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    # Ray starts workers at nice 19 by default; our clients are the run's work, not background.
    "RAY_worker_niceness": "0",
}
for _key, _value in OFFLINE_ENV.items():
    os.environ[_key] = _value

#: Ray's usage module reads this cluster config from HOME; without it, it probes cloud
#: metadata addresses (169.254.169.254, metadata.google.internal) to guess the provider.
_BOOTSTRAP = "provider:\n  type: local\n"


def prepare_run_home(folder: str | Path) -> dict[str, str]:
    """Create a run-local FLWR_HOME and HOME (with a local-cluster Ray config); return the env to set."""
    root = Path(folder)
    flwr_home = root / "flwr-home"
    home = root / "home"
    flwr_home.mkdir(parents=True, exist_ok=True)
    home.mkdir(parents=True, exist_ok=True)
    (home / "ray_bootstrap_config.yaml").write_text(_BOOTSTRAP)
    return {"FLWR_HOME": str(flwr_home), "HOME": str(home)}


def ray_init_args(num_cpus: int) -> dict[str, Any]:
    """``ray.init`` arguments: loopback node address, no dashboard, fixed CPU count, Flower's log level."""
    return {
        "_node_ip_address": "127.0.0.1",
        "include_dashboard": False,
        "num_cpus": num_cpus,
        "num_gpus": 0,
        "ignore_reinit_error": True,
        "log_to_driver": False,
        "logging_level": "WARNING",
    }
