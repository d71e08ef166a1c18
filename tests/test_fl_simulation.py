"""A short real run on Flower's simulation runtime (Ray): 3 clients, 4 rounds, loopback only."""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

pytest.importorskip("flwr")
pytest.importorskip("ray")


def _loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip)
    mapped = getattr(addr, "ipv4_mapped", None)
    return (mapped or addr).is_loopback


def _watch(root: psutil.Process, stop: threading.Event, seen: set, pids: set[int]) -> None:
    while not stop.is_set():
        try:
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            procs = []
        for proc in procs:
            pids.add(proc.pid)
            try:
                for conn in proc.net_connections(kind="inet"):
                    if conn.raddr:
                        seen.add((conn.raddr.ip, proc.name()))
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
        time.sleep(0.05)


_SCRIPT = """
import sys
from pathlib import Path
from greenprop.fl.app import FLSettings
from greenprop.fl.runner import run_jobs
out = Path(sys.argv[1])
common = dict(clients=3, fraction=1.0, rounds=4, subset=300, test_subset=200, seed=1)
run_jobs([
    (FLSettings(strategy="fedavg", sampling="pe:1", **common), out / "gs"),
    (FLSettings(strategy="fedavg", sampling="none", **common), out / "plain"),
    (FLSettings(strategy="fedprox", sampling="pe:1", mu=0.1, **common), out / "prox"),
])
"""


def test_simulation_sampled_round_loopback_and_cleanup(tmp_path):
    """The run is its own process tree (the CLI's situation), watched from outside."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    child = subprocess.Popen([sys.executable, "-c", _SCRIPT, str(tmp_path)], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    stop, seen, pids = threading.Event(), set(), set()
    watcher = threading.Thread(target=_watch, args=(psutil.Process(child.pid), stop, seen, pids), daemon=True)
    watcher.start()
    try:
        _, err = child.communicate(timeout=240)
    finally:
        stop.set()
        watcher.join()
        if child.poll() is None:
            child.kill()
    assert child.returncode == 0, err.decode()[-2000:]
    assert seen, "the watcher saw no connection at all (Ray talks over sockets)"
    assert all(_loopback(ip) for ip, _ in seen), seen
    gs = json.loads((tmp_path / "gs" / "metrics.json").read_text())
    plain = json.loads((tmp_path / "plain" / "metrics.json").read_text())
    rounds = gs["rounds"]
    assert [r["sampled"] for r in rounds] == [False, True, False, False]
    sampled = rounds[1]
    assert sampled["clients"] == 0 and sampled["bytes_up"] == 0 and sampled["bytes_down"] == 0
    assert sampled["client_flops"] == 0 and rounds[0]["client_flops"] > 0
    assert sampled["loss"] != rounds[0]["loss"]  # the global model moved by a GGD draw
    # round 1 is real in both: identical to plain FedAvg with the same seed
    assert rounds[0]["acc1"] == plain["rounds"][0]["acc1"] and rounds[0]["loss"] == plain["rounds"][0]["loss"]
    assert gs["totals"]["client_flops"] == pytest.approx(0.75 * plain["totals"]["client_flops"])
    assert gs["rounds"][0]["energy"]["kind"] == "unavailable"
    prox = json.loads((tmp_path / "prox" / "metrics.json").read_text())
    assert prox["rounds"][0]["loss"] != rounds[0]["loss"]  # the prox term changed local training
    left = _left_alive(pids - {child.pid})
    assert not left, [p.name() for p in left]


def _left_alive(pids: set[int], wait: float = 20) -> list[psutil.Process]:
    """Those of ``pids`` still running (not zombies) after up to ``wait`` seconds."""
    deadline = time.time() + wait
    left: list[psutil.Process] = []
    while time.time() < deadline:
        left = []
        for pid in pids:
            try:
                proc = psutil.Process(pid)
                if proc.status() != psutil.STATUS_ZOMBIE:
                    left.append(proc)
            except psutil.NoSuchProcess:
                continue
        if not left:
            break
        time.sleep(0.5)
    return left


def _default_sigint() -> None:
    # a background shell job starts with SIGINT ignored: give the child Ctrl-C's meaning
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupted_run_stops_cleanly(tmp_path, signum):
    """Ctrl-C/SIGTERM once the first round began: one line, 130/143, no process of the run left."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    cmd = [sys.executable, "-m", "greenprop", "fl", "--clients", "2", "--fraction", "1",
           "--rounds", "50", "--subset", "200", "--test-subset", "100", "--out", str(tmp_path / "run")]
    child = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             text=True, preexec_fn=_default_sigint)
    stop, seen, pids = threading.Event(), set(), set()
    root = psutil.Process(child.pid)
    watcher = threading.Thread(target=_watch, args=(root, stop, seen, pids), daemon=True)
    watcher.start()
    lines: list[str] = []
    try:
        for line in child.stderr:
            lines.append(line)
            if "[ROUND 1/50]" in line:
                break
        actors = []
        deadline = time.time() + 60
        while not actors and time.time() < deadline:
            actors = [p for p in root.children(recursive=True) if "ClientAppActor" in p.name()]
            time.sleep(0.2)
        assert actors, "no ClientAppActor started"
        assert all(p.nice() == 0 for p in actors), [p.nice() for p in actors]  # not Ray's nice 19
        child.send_signal(signum)
        lines += child.stderr.readlines()
        child.wait(timeout=60)
    finally:
        stop.set()
        watcher.join()
        if child.poll() is None:
            child.kill()
    assert child.returncode == 128 + signum, "".join(lines)[-2000:]
    ours = [line for line in lines if line.startswith("greenprop: ")]
    assert len(ours) == 1 and ours[0].startswith("greenprop: federated run interrupted in round "), ours
    assert "0 of 1 jobs finished" in ours[0] and "Traceback" not in "".join(lines), "".join(lines)[-4000:]
    assert not (tmp_path / "run" / "metrics.json").exists()
    assert len(pids) > 3, pids  # the watcher saw Ray's processes
    left = _left_alive(pids - {child.pid})
    assert not left, [p.name() for p in left]
