"""A short real run on Flower's simulation runtime (Ray): 3 clients, 4 rounds, loopback only."""

from __future__ import annotations

import ipaddress
import json
import threading
import time

import psutil
import pytest

pytest.importorskip("flwr")
pytest.importorskip("ray")

from greenprop.fl.app import FLSettings  # noqa: E402
from greenprop.fl.runner import run_jobs  # noqa: E402


def _loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip)
    mapped = getattr(addr, "ipv4_mapped", None)
    return (mapped or addr).is_loopback


def _remote_addresses(stop: threading.Event, seen: set[str]) -> None:
    me = psutil.Process()
    while not stop.is_set():
        for proc in [me, *me.children(recursive=True)]:
            try:
                for conn in proc.net_connections(kind="inet"):
                    if conn.raddr:
                        seen.add((conn.raddr.ip, proc.name(), conn.laddr.port, conn.raddr.port))
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
        time.sleep(0.05)


def test_simulation_sampled_round_loopback_and_cleanup(tmp_path):
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    common = {"clients": 3, "fraction": 1.0, "rounds": 4, "subset": 300, "test_subset": 200, "seed": 1}
    jobs = [
        (FLSettings(strategy="fedavg", sampling="pe:1", **common), tmp_path / "gs"),
        (FLSettings(strategy="fedavg", sampling="none", **common), tmp_path / "plain"),
        (FLSettings(strategy="fedprox", sampling="pe:1", mu=0.1, **common), tmp_path / "prox"),
    ]
    stop, seen = threading.Event(), set()
    watcher = threading.Thread(target=_remote_addresses, args=(stop, seen), daemon=True)
    watcher.start()
    try:
        run_jobs(jobs)
    finally:
        stop.set()
        watcher.join()
    assert seen, "the watcher saw no connection at all (Ray talks over sockets)"
    assert all(_loopback(s[0]) for s in seen), seen
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
    deadline = time.time() + 20
    while time.time() < deadline:
        left = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
        left = [p for p in left if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        if not left:
            break
        time.sleep(0.5)
    assert not left, [p.name() for p in left]
