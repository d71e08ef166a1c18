"""Energy meters against a fake powercap tree and a fake pynvml module."""

from __future__ import annotations

import math
import os
import sys
import time
import types
from pathlib import Path

import pytest
import torch

from greenprop.metering import EnergyMeter, NvmlReader, Quantity, RaplReader
from greenprop.metering import energy as energy_module

MAX_UJ = 1_000_000_000  # 1000 J range, small so a wrap is easy to stage


def add_domain(root: Path, dirname: str, name: str, energy_uj: int, max_uj: int = MAX_UJ) -> Path:
    domain = root / dirname
    domain.mkdir(parents=True)
    (domain / "name").write_text(name + "\n")
    (domain / "energy_uj").write_text(f"{energy_uj}\n")
    (domain / "max_energy_range_uj").write_text(f"{max_uj}\n")
    return domain


def set_energy(domain: Path, energy_uj: int) -> None:
    """Replace the counter atomically, as sysfs would: a reader never sees half a write."""
    tmp = domain / "energy_uj.tmp"
    tmp.write_text(f"{energy_uj}\n")
    os.replace(tmp, domain / "energy_uj")


def wait_until_polled(meter: EnergyMeter, energy_uj: int) -> None:
    deadline = time.monotonic() + 5.0
    while meter.rapl._domains[0].last_uj != energy_uj:
        assert time.monotonic() < deadline, "the poll thread never read the counter"
        time.sleep(0.001)


@pytest.fixture
def powercap(tmp_path: Path) -> dict[str, Path]:
    """Two packages, a core subdomain, a psys domain and an mmio copy: only packages count."""
    root = tmp_path / "powercap"
    (root / "intel-rapl").mkdir(parents=True)  # the control-type directory itself
    return {
        "root": root,
        "pkg0": add_domain(root, "intel-rapl:0", "package-0", 5_000_000),
        "pkg1": add_domain(root, "intel-rapl:1", "package-1", 7_000_000),
        "core": add_domain(root, "intel-rapl:0:0", "core", 1_000_000),
        "psys": add_domain(root, "intel-rapl:2", "psys", 9_000_000),
        "mmio": add_domain(root, "intel-rapl-mmio:0", "package-0", 3_000_000),
    }


def test_rapl_sums_packages_only(powercap: dict[str, Path]) -> None:
    reader = RaplReader(powercap["root"])
    assert reader.available()
    assert reader.label == "RAPL package-0+package-1"
    assert reader.read_joules() == 0.0  # counted from the reader's creation
    set_energy(powercap["pkg0"], 5_000_000 + 2_000_000)
    set_energy(powercap["pkg1"], 7_000_000 + 3_000_000)
    for other in ("core", "psys", "mmio"):
        set_energy(powercap[other], 999_000_000)
    assert reader.read_joules() == pytest.approx(5.0)
    mark = reader.read_joules()
    set_energy(powercap["pkg0"], 5_000_000 + 2_500_000)
    assert reader.delta(mark) == pytest.approx(0.5)


def test_rapl_wraparound(powercap: dict[str, Path]) -> None:
    set_energy(powercap["pkg0"], MAX_UJ - 1_000_000)
    reader = RaplReader(powercap["root"])
    set_energy(powercap["pkg0"], 4_000_000)  # wrapped: 1 J to the top, then 4 J
    assert reader.read_joules() == pytest.approx(5.0)
    set_energy(powercap["pkg0"], 6_000_000)
    assert reader.read_joules() == pytest.approx(7.0)


def test_rapl_missing_root_is_unavailable(tmp_path: Path) -> None:
    reader = RaplReader(tmp_path / "nope")
    assert not reader.available()
    assert "no RAPL package domains" in reader.reason
    with pytest.raises(RuntimeError, match="not available"):
        reader.read_joules()


def test_rapl_permission_denied_is_unavailable(
    powercap: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    locked = powercap["pkg1"] / "energy_uj"
    real_read_text = Path.read_text

    def read_text(self: Path, *args: object, **kwargs: object) -> str:
        if self == locked:
            raise PermissionError(13, "Permission denied", str(self))
        return real_read_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", read_text)
    reader = RaplReader(powercap["root"])
    assert not reader.available()  # one unreadable package would undercount: use none
    assert "permission denied" in reader.reason
    result = EnergyMeter(rapl_root=powercap["root"])
    result.start()
    assert result.stop() == Quantity.unavailable("J", "no RAPL or NVML counters readable")


def test_meter_measures_with_rapl(powercap: dict[str, Path]) -> None:
    meter = EnergyMeter("cpu", watts=100.0, rapl_root=powercap["root"], poll_interval_s=None)
    assert meter.kind == "measured"  # a measured source wins over the wattage
    assert meter.describe() == "energy: measured (RAPL energy_uj (package-0, package-1))"
    meter.start()
    set_energy(powercap["pkg0"], 5_000_000 + 1_250_000)
    result = meter.stop()
    assert result == Quantity(1.25, "J", "measured", "RAPL energy_uj (package-0, package-1)")


def test_meter_poll_thread_catches_wraps(powercap: dict[str, Path]) -> None:
    meter = EnergyMeter(rapl_root=powercap["root"], poll_interval_s=0.001)
    meter.start()
    # A full wrap between start and stop is invisible to two reads alone (the counter
    # ends where it began); the poll thread sees the steps in between.
    for value in (5_000_000 + MAX_UJ // 2, 4_000_000):
        set_energy(powercap["pkg0"], value)
        wait_until_polled(meter, value)
    set_energy(powercap["pkg0"], 5_000_000)
    assert meter.stop().value == pytest.approx(MAX_UJ / 1e6)
    assert meter._poller is None


def test_meter_estimates_from_watts(tmp_path: Path) -> None:
    now = [10.0]
    meter = EnergyMeter(watts=65, rapl_root=tmp_path, clock=lambda: now[0])
    assert meter.kind == "estimated"
    assert meter.describe().startswith("energy: estimated (user-supplied 65 W x wall time)")
    meter.start()
    now[0] += 2.0
    assert meter.stop() == Quantity(130.0, "J", "estimated", "user-supplied 65 W x wall time")


def test_meter_unavailable_without_sources(tmp_path: Path) -> None:
    meter = EnergyMeter(rapl_root=tmp_path)
    meter.start()
    result = meter.stop()
    assert result.kind == "unavailable" and result.value is None
    assert result.source == "no RAPL or NVML counters readable"


@pytest.mark.parametrize("watts", [0, -5.0, math.nan, math.inf, True, "65"])
def test_bad_watts_rejected(watts: object) -> None:
    with pytest.raises(ValueError, match=repr(watts).replace("(", r"\(")):
        EnergyMeter(watts=watts)  # type: ignore[arg-type]


def test_start_stop_misuse(tmp_path: Path) -> None:
    meter = EnergyMeter(rapl_root=tmp_path)
    with pytest.raises(RuntimeError, match="before start"):
        meter.stop()
    meter.start()
    with pytest.raises(RuntimeError, match="already running"):
        meter.start()


def test_real_machine_does_not_crash() -> None:
    meter = EnergyMeter("cpu", poll_interval_s=None)
    meter.start()
    result = meter.stop()
    assert result.kind in ("measured", "unavailable")
    assert (result.value is None) == (result.kind == "unavailable")


# --- NVML ---------------------------------------------------------------------------


class FakeNvmlError(Exception):
    pass


def fake_pynvml(
    energies_mj: list[int], uuids: list[str] | None = None, *, init_fails: bool = False
) -> types.ModuleType:
    module = types.ModuleType("pynvml")
    state = {"shutdown": 0}

    def init() -> None:
        if init_fails:
            raise FakeNvmlError("Driver Not Loaded")

    def total_energy(handle: int) -> int:
        if energies_mj[handle] < 0:
            raise FakeNvmlError("Not Supported")
        return energies_mj[handle]

    module.nvmlInit = init  # type: ignore[attr-defined]
    module.nvmlShutdown = lambda: state.__setitem__("shutdown", state["shutdown"] + 1)  # type: ignore[attr-defined]
    module.nvmlDeviceGetCount = lambda: len(energies_mj)  # type: ignore[attr-defined]
    module.nvmlDeviceGetHandleByIndex = lambda i: i  # type: ignore[attr-defined]
    module.nvmlDeviceGetUUID = lambda h: (uuids or [])[h]  # type: ignore[attr-defined]
    module.nvmlDeviceGetTotalEnergyConsumption = total_energy  # type: ignore[attr-defined]
    module.state = state  # type: ignore[attr-defined]
    return module


def test_nvml_sums_all_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    energies = [1_000, 2_500]
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(energies))
    reader = NvmlReader()
    assert reader.available() and reader.label == "NVML all 2 GPUs"
    start = reader.read_joules()
    assert start == pytest.approx(3.5)
    energies[0] += 4_000
    assert reader.delta(start) == pytest.approx(4.0)


def test_nvml_picks_the_training_gpu_by_uuid(monkeypatch: pytest.MonkeyPatch) -> None:
    energies = [1_000, 2_000]
    uuids = ["GPU-aaaa-0000", "GPU-bbbb-1111"]
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(energies, uuids))
    monkeypatch.setattr(energy_module, "_cuda_uuid", lambda device: "BBBB-1111")
    meter = EnergyMeter("cuda:0", rapl_root="/nonexistent", poll_interval_s=None)
    assert meter.describe() == (
        "energy: measured (NVML nvmlDeviceGetTotalEnergyConsumption (GPU 1))"
    )
    meter.start()
    energies[0] += 50_000  # another GPU's work is not ours
    energies[1] += 20_000
    assert meter.stop() == Quantity(20.0, "J", "measured", meter.source)


def test_nvml_and_rapl_together(monkeypatch: pytest.MonkeyPatch, powercap: dict[str, Path]) -> None:
    energies = [0]
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(energies, ["GPU-x"]))
    meter = EnergyMeter("cuda", rapl_root=powercap["root"], poll_interval_s=None)
    assert meter.source == (
        "NVML nvmlDeviceGetTotalEnergyConsumption (GPU 0) + RAPL energy_uj (package-0, package-1)"
    )
    meter.start()
    energies[0] += 3_000
    set_energy(powercap["pkg1"], 7_000_000 + 1_000_000)
    assert meter.stop().value == pytest.approx(4.0)


def test_cpu_meter_never_imports_nvml(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    module = fake_pynvml([1_000])
    module.nvmlInit = lambda: pytest.fail("NVML must not be used for a CPU run")  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "pynvml", module)
    assert EnergyMeter("cpu", rapl_root=tmp_path).kind == "unavailable"


def test_nvml_missing_package(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes `import pynvml` fail
    reader = NvmlReader()
    assert not reader.available() and "not installed" in reader.reason
    meter = EnergyMeter(torch.device("cuda"), watts=300, rapl_root=tmp_path)
    assert meter.kind == "estimated"
    assert "not installed" in meter.describe()


def test_nvml_init_failure_and_unsupported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml([1], init_fails=True))
    reader = NvmlReader()
    assert not reader.available() and "init failed" in reader.reason

    module = fake_pynvml([-1])  # a pre-Volta GPU: energy counter not supported
    monkeypatch.setitem(sys.modules, "pynvml", module)
    reader = NvmlReader()
    assert not reader.available() and "Not Supported" in reader.reason
    assert module.state["shutdown"] == 1  # type: ignore[attr-defined]


def test_counter_vanishing_mid_run_is_unavailable(powercap: dict[str, Path]) -> None:
    meter = EnergyMeter(rapl_root=powercap["root"], watts=50, poll_interval_s=None)
    meter.start()
    (powercap["pkg1"] / "energy_uj").unlink()
    result = meter.stop()
    assert result.value is None and "read failed" in result.source
