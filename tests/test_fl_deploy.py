"""Flower's deployment runtime: ``flwr run`` against a SuperLink and 3 SuperNodes on loopback.

The same ServerApp/ClientApp as the simulation, started the way docs/federated.md shows
(insecure, 127.0.0.1 only, run-local FLWR_HOME, telemetry off). Every process the test
starts runs in its own session and is stopped in ``finally``, also when the run fails.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("flwr")
psutil = pytest.importorskip("psutil")

from greenprop.fl.deploy import APP_DIR  # noqa: E402
from greenprop.fl.offline import OFFLINE_ENV  # noqa: E402

BIN = Path(sys.executable).parent
NODES = 3


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip)
    return (getattr(addr, "ipv4_mapped", None) or addr).is_loopback


def _watch(roots: list[psutil.Process], stop: threading.Event, seen: set, procs: dict, names: set) -> None:
    """Record every process under ``roots`` (and its name) and every address its inet sockets use."""
    while not stop.is_set():
        for root in list(roots):
            try:
                tree = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                continue
            for proc in tree:
                procs.setdefault(proc.pid, proc)
                try:
                    names.add(proc.name())
                    for conn in proc.net_connections(kind="inet"):
                        seen.add((conn.laddr.ip, "local", proc.name()))
                        if conn.raddr:
                            seen.add((conn.raddr.ip, "remote", proc.name()))
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    continue
        time.sleep(0.05)


def _stop(procs: dict[int, psutil.Process], started: list[subprocess.Popen]) -> None:
    """SIGTERM each started session, then SIGKILL whatever of the seen processes is still alive."""
    for p in started:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
    _, alive = psutil.wait_procs([pr for pr in procs.values() if _alive(pr)], timeout=10)
    for pr in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            pr.kill()
    psutil.wait_procs(alive, timeout=5)
    for p in started:
        if p.poll() is None:
            p.kill()
        p.wait(timeout=5)


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _wait_listening(proc: subprocess.Popen, port: int, timeout: float, log: Path) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


@pytest.mark.slow
def test_flwr_run_on_superlink_and_three_supernodes(tmp_path):
    link_port, *node_ports = _free_ports(1 + NODES)
    flwr_home, home = tmp_path / "flwr-home", tmp_path / "home"
    flwr_home.mkdir()
    home.mkdir()
    env = {
        **os.environ,
        **OFFLINE_ENV,
        "FLWR_HOME": str(flwr_home),
        "HOME": str(home),
        "PYTHONPATH": str(Path(__file__).parents[1] / "src"),
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # they start flower-superexec
    }
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "deploy"\n\n[superlink.deploy]\n'
        f'address = "127.0.0.1:{link_port}"\ninsecure = true\n'
    )
    out = tmp_path / "out"
    logs = tmp_path / "logs"
    logs.mkdir()

    def start(name: str, *args: str) -> subprocess.Popen:
        log = open(logs / f"{name}.log", "wb")  # noqa: SIM115  (closed with the test's tmp_path)
        proc = subprocess.Popen(
            [str(BIN / args[0]), *args[1:]],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=tmp_path,
        )
        started.append(proc)
        roots.append(psutil.Process(proc.pid))
        return proc

    started: list[subprocess.Popen] = []
    roots: list[psutil.Process] = []
    stop, seen, procs, names = threading.Event(), set(), {}, set()
    watcher = threading.Thread(target=_watch, args=(roots, stop, seen, procs, names), daemon=True)
    watcher.start()
    try:
        link = start(
            "superlink",
            "flower-superlink",
            "--insecure",
            "--host",
            "127.0.0.1",
            "--port",
            str(link_port),
            "--disable-runtime-dependency-installation",
        )
        _wait_listening(link, link_port, 120, logs / "superlink.log")
        for i, port in enumerate(node_ports):
            start(
                f"supernode{i}",
                "flower-supernode",
                "--insecure",
                "--superlink",
                f"127.0.0.1:{link_port}",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--node-config",
                f"partition-id={i}",
            )
        run = start(
            "flwr-run",
            "flwr",
            "run",
            str(APP_DIR),
            "deploy",
            "--stream",
            "--run-config",
            f"rounds=3 sampling='pe:1' clients={NODES} out='{out}'",
        )
        run.wait(timeout=540)
        assert (out / "metrics.json").exists(), (logs / "flwr-run.log").read_text()[-3000:]
    finally:
        _stop(procs, started)
        stop.set()
        watcher.join()
    result = json.loads((out / "metrics.json").read_text())
    rounds = result["rounds"]
    assert [r["sampled"] for r in rounds] == [False, True, False]
    assert [r["clients"] for r in rounds] == [NODES, 0, NODES]
    assert rounds[1]["client_flops"] == 0 and rounds[1]["bytes_up"] == 0 and rounds[0]["bytes_up"] > 0
    assert result["totals"]["final"]["acc1"] > result["totals"]["initial"]["acc1"]
    assert result["settings"]["dataset"] == "digits"  # the app's run config reached the ServerApp
    assert any(kind == "remote" for _, kind, _ in seen), "the watcher saw no connection at all"
    assert all(_loopback(ip) for ip, _, _ in seen), sorted(seen)
    assert any("clientapp" in n for n in names) and any("serverapp" in n for n in names), names
    assert not [pid for pid, p in procs.items() if _alive(p)], "processes left running"

    # the same apps on the simulation runtime, same settings: the same run
    settings = result["settings"]
    options = [
        "strategy",
        "sampling",
        "clients",
        "fraction",
        "rounds",
        "dataset",
        "model",
        "subset",
        "test_subset",
        "seed",
        "lr",
        "batch_size",
        "local_epochs",
        "partition",
        "mu",
    ]
    args = [x for k in options for x in (f"--{k.replace('_', '-')}", str(settings[k]))]
    sim = subprocess.run(
        [sys.executable, "-m", "greenprop", "fl", *args, "--out", str(tmp_path / "sim")],
        env=env,
        capture_output=True,
        text=True,
        timeout=540,
    )
    assert sim.returncode == 0, sim.stderr[-3000:]
    simulated = json.loads((tmp_path / "sim" / "metrics.json").read_text())
    assert simulated["settings"] == settings
    for dep, simr in zip(rounds, simulated["rounds"], strict=True):
        assert (dep["sampled"], dep["clients"], dep["client_flops"]) == (
            simr["sampled"],
            simr["clients"],
            simr["client_flops"],
        )
        assert dep["acc1"] == simr["acc1"]
        assert dep["loss"] == pytest.approx(simr["loss"], rel=1e-5)  # replies may sum in another order
