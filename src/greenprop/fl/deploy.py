"""The ServerApp that ``flwr run`` starts on a SuperLink (Flower's deployment runtime).

Its settings are the Flower App's run config (``[tool.flwr.app.config]`` in
``flower_app/pyproject.toml``, overridden with ``flwr run --run-config``), named like the
``greenprop fl`` options; ``out`` is the absolute folder that receives ``metrics.json``.
The ClientApp is :data:`greenprop.fl.app.client_app`, the one the simulation runs.
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from greenprop.errors import GreenpropError
from greenprop.fl.app import FLSettings, run_server

__all__ = ["APP_DIR", "server_app", "settings_from_run_config"]

#: The Flower App folder (its pyproject.toml names the two apps and the default run config).
APP_DIR = Path(__file__).with_name("flower_app")


def settings_from_run_config(run_config: dict[str, Any]) -> tuple[FLSettings, Path]:
    """FLSettings and output folder from a run config; unknown keys or a relative ``out`` raise."""
    config = {k.replace("-", "_"): v for k, v in run_config.items()}
    out = str(config.pop("out", ""))
    known = {f.name for f in fields(FLSettings)}
    unknown = sorted(set(config) - known)
    if unknown:
        raise GreenpropError(f"fl run config {unknown[0]!r}: unknown key (known: {', '.join(sorted(known))})")
    if not Path(out).is_absolute():
        raise GreenpropError(f"fl run config out={out!r}: give an absolute folder for metrics.json")
    return FLSettings(**config), Path(out)


server_app = ServerApp()


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    """One federated run on the SuperNodes connected to this SuperLink."""
    settings, out = settings_from_run_config(dict(context.run_config))
    run_server(grid, settings, out)
