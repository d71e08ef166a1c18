"""Energy in joules from hardware counters, or an estimate that says it is one.

Sources, used together when readable:

* CPU: Linux powercap RAPL, ``/sys/class/powercap/intel-rapl:N/energy_uj``, one
  counter per CPU package. Only top-level package domains are summed: subdomains
  (``intel-rapl:0:0`` core, uncore, dram) are parts of a package, ``psys`` contains
  the packages, and ``intel-rapl-mmio`` repeats them, so adding any of them would
  count energy twice. Counters wrap at ``max_energy_range_uj``; wraps are corrected
  when the counter is read at least once per wrap period (minutes to hours), which
  :class:`EnergyMeter` ensures with a polling thread. Since Linux 5.10 (CVE-2020-8694)
  ``energy_uj`` is readable by root only; then RAPL is simply not available.
* GPU: NVIDIA NVML ``nvmlDeviceGetTotalEnergyConsumption`` (millijoules since the
  driver loaded; Volta and newer), through the optional ``nvidia-ml-py`` package,
  imported only when a CUDA device is metered.

Both are machine-level counters: they include other processes on the same package
or GPU, and neither covers DRAM (outside the package), fans or power-supply losses.
"""

from __future__ import annotations

import contextlib
import math
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from greenprop.errors import GreenpropError
from greenprop.metering.quantity import Quantity

DEFAULT_RAPL_ROOT = "/sys/class/powercap"
_PACKAGE_DIR = re.compile(r"^intel-rapl:(\d+)$")


@dataclass
class _Domain:
    path: Path
    name: str
    max_uj: int
    last_uj: int


def _read_int(path: Path) -> int:
    return int(path.read_text().strip())


class RaplReader:
    """Sum of the RAPL package counters under ``root``, wrap-corrected.

    :meth:`read_joules` returns joules accumulated since the reader was created.
    It is safe to call from several threads.
    """

    def __init__(self, root: str | Path = DEFAULT_RAPL_ROOT) -> None:
        self.root = Path(root)
        self.reason = ""
        self._domains: list[_Domain] = []
        self._total_uj = 0
        self._lock = threading.Lock()
        try:
            self._domains = self._probe()
        except PermissionError as exc:
            self.reason = f"RAPL counter not readable ({exc.filename}: permission denied)"
        except (OSError, ValueError) as exc:
            self.reason = f"RAPL counters unreadable: {exc}"
        if not self._domains and not self.reason:
            self.reason = f"no RAPL package domains under {self.root}"

    def _probe(self) -> list[_Domain]:
        if not self.root.is_dir():
            return []
        found = []
        for entry in self.root.iterdir():
            match = _PACKAGE_DIR.match(entry.name)
            if match is None:
                continue
            name_file = entry / "name"
            name = name_file.read_text().strip() if name_file.exists() else entry.name
            if not name.startswith("package") and name_file.exists():
                continue  # psys contains the packages: adding it would double count
            domain = _Domain(
                path=entry / "energy_uj",
                name=name,
                max_uj=_read_int(entry / "max_energy_range_uj"),
                last_uj=_read_int(entry / "energy_uj"),
            )
            found.append((int(match.group(1)), domain))
        return [domain for _, domain in sorted(found, key=lambda item: item[0])]

    def available(self) -> bool:
        return bool(self._domains)

    @property
    def label(self) -> str:
        return "RAPL " + "+".join(d.name for d in self._domains) if self._domains else "RAPL"

    @property
    def source(self) -> str:
        names = ", ".join(d.name for d in self._domains)
        return f"RAPL energy_uj ({names})"

    def read_joules(self) -> float:
        """Joules since this reader was created (all packages together)."""
        if not self._domains:
            raise RuntimeError(f"RAPL is not available: {self.reason}")
        with self._lock:
            for domain in self._domains:
                now = _read_int(domain.path)
                delta = now - domain.last_uj
                if delta < 0:  # the counter wrapped around (once, if polled often enough)
                    delta += domain.max_uj
                self._total_uj += delta
                domain.last_uj = now
            return self._total_uj / 1e6

    def delta(self, since: float) -> float:
        """Joules since an earlier :meth:`read_joules` value."""
        return self.read_joules() - since


def _cuda_uuid(device: torch.device) -> str | None:
    """UUID of a CUDA device as torch sees it, to find the same GPU in NVML."""
    try:
        if not torch.cuda.is_available():
            return None
        index = torch.cuda.current_device() if device.index is None else device.index
        return str(torch.cuda.get_device_properties(index).uuid)
    except Exception:  # any failure only means we cannot narrow down to one GPU
        return None


def _normalise_uuid(uuid: Any) -> str:
    text = uuid.decode() if isinstance(uuid, bytes) else str(uuid)
    return re.sub(r"^(GPU|MIG)-", "", text.strip()).lower()


class NvmlReader:
    """Total energy of NVIDIA GPUs from NVML, in joules since the driver loaded.

    Args:
        device: the CUDA device to meter; the GPU with the same UUID is read. With
            None, or when the GPU cannot be matched, all GPUs NVML sees are summed
            (``label`` says which).
    """

    def __init__(self, device: torch.device | str | None = None) -> None:
        self.reason = ""
        self._nvml: Any = None
        self._handles: list[Any] = []
        self._label = "NVML"
        try:
            import pynvml
        except ImportError:
            self.reason = "pynvml not installed (pip install 'greenprop[energy]')"
            return
        try:
            pynvml.nvmlInit()
        except Exception as exc:  # NVMLError: no driver, no GPU, ...
            self.reason = f"NVML init failed: {exc}"
            return
        self._nvml = pynvml
        try:
            self._select(device)
            for handle in self._handles:  # pre-Volta GPUs raise NotSupported here
                pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)
        except Exception as exc:
            self.reason = f"NVML energy counter not usable: {exc}"
            self._handles = []
            self.close()

    def _select(self, device: torch.device | str | None) -> None:
        pynvml = self._nvml
        count = pynvml.nvmlDeviceGetCount()
        if count == 0:
            self.reason = "NVML sees no GPU"
            return
        handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
        wanted = _cuda_uuid(torch.device(device)) if device is not None else None
        if wanted is not None:
            for index, handle in enumerate(handles):
                if _normalise_uuid(pynvml.nvmlDeviceGetUUID(handle)) == _normalise_uuid(wanted):
                    self._handles = [handle]
                    self._label = f"NVML GPU {index}"
                    return
        self._handles = handles
        self._label = f"NVML all {count} GPUs" if count > 1 else "NVML GPU 0"

    def available(self) -> bool:
        return bool(self._handles)

    @property
    def label(self) -> str:
        return self._label

    @property
    def source(self) -> str:
        return f"NVML nvmlDeviceGetTotalEnergyConsumption ({self._label.removeprefix('NVML ')})"

    def read_joules(self) -> float:
        """Joules since the driver loaded, summed over the selected GPUs."""
        if not self._handles:
            raise RuntimeError(f"NVML is not available: {self.reason}")
        get = self._nvml.nvmlDeviceGetTotalEnergyConsumption
        return sum(get(handle) for handle in self._handles) / 1e3

    def delta(self, since: float) -> float:
        """Joules since an earlier :meth:`read_joules` value."""
        return self.read_joules() - since

    def close(self) -> None:
        """Release NVML (its init is reference counted)."""
        if self._nvml is not None:
            with contextlib.suppress(Exception):  # shutting down is best effort
                self._nvml.nvmlShutdown()
            self._nvml = None
            self._handles = []


def _check_watts(watts: float | None) -> float | None:
    if watts is None:
        return None
    if isinstance(watts, bool) or not isinstance(watts, (int, float)):
        raise GreenpropError(f"watts must be a positive number, got {watts!r}")
    if not math.isfinite(watts) or watts <= 0:
        raise GreenpropError(f"watts must be a positive finite number, got {watts!r}")
    return float(watts)


class EnergyMeter:
    """Joules used between :meth:`start` and :meth:`stop`.

    Every readable counter is used and summed (NVML for a CUDA device, RAPL for the
    CPU packages): the result is ``measured``. With no counter and ``watts`` given,
    the result is ``estimated`` as ``watts x wall seconds``; with neither it is
    ``unavailable`` (value None). A measured source always wins over ``watts``.

    Args:
        device: the device training runs on; NVML is only consulted for CUDA.
        watts: average power draw to assume when nothing can be measured.
        rapl_root: where the powercap tree lives (tests point it elsewhere).
        poll_interval_s: how often a background thread reads RAPL while running, so
            that counter wraps in long runs are not missed; None to disable.
        clock: wall-clock seconds, for the estimate (``time.perf_counter``).
    """

    def __init__(
        self,
        device: torch.device | str = "cpu",
        watts: float | None = None,
        *,
        rapl_root: str | Path = DEFAULT_RAPL_ROOT,
        poll_interval_s: float | None = 30.0,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.watts = _check_watts(watts)
        self.device = torch.device(device)
        if poll_interval_s is not None and not poll_interval_s > 0:
            raise GreenpropError(f"poll_interval_s must be positive, got {poll_interval_s!r}")
        self.poll_interval_s = poll_interval_s
        self._clock = clock
        self.rapl = RaplReader(rapl_root)
        self.nvml = NvmlReader(self.device) if self.device.type == "cuda" else None
        readers: list[Any] = [self.nvml, self.rapl]
        self._readers = [r for r in readers if r is not None and r.available()]
        self._start: tuple[float, list[float]] | None = None
        self._stop_polling = threading.Event()
        self._poller: threading.Thread | None = None

    @property
    def kind(self) -> str:
        """The kind of Quantity :meth:`stop` will return."""
        if self._readers:
            return "measured"
        return "estimated" if self.watts is not None else "unavailable"

    @property
    def source(self) -> str:
        if self._readers:
            return " + ".join(r.source for r in self._readers)
        if self.watts is not None:
            return f"user-supplied {self.watts:g} W x wall time"
        return "no RAPL or NVML counters readable"

    def describe(self) -> str:
        """One line for a run's summary: which source the energy figure comes from."""
        line = f"energy: {self.kind} ({self.source})"
        if not self._readers:
            reasons = [r.reason for r in (self.nvml, self.rapl) if r is not None and r.reason]
            if reasons:
                line += "; " + "; ".join(reasons)
        return line

    def start(self) -> None:
        if self._start is not None:
            raise RuntimeError("EnergyMeter is already running; call stop() first")
        self._start = (self._clock(), [r.read_joules() for r in self._readers])
        if self.rapl in self._readers and self.poll_interval_s is not None:
            self._stop_polling.clear()
            self._poller = threading.Thread(
                target=self._poll, name="greenprop-rapl-poll", daemon=True
            )
            self._poller.start()

    def _poll(self) -> None:
        interval = self.poll_interval_s or 0.0
        while not self._stop_polling.wait(interval):
            try:
                self.rapl.read_joules()
            except (OSError, ValueError):
                return  # stop() will read again and report the failure

    def stop(self) -> Quantity:
        """Joules since :meth:`start`, labelled measured, estimated or unavailable."""
        if self._start is None:
            raise RuntimeError("EnergyMeter.stop() called before start()")
        started, readings = self._start
        self._start = None
        if self._poller is not None:
            self._stop_polling.set()
            self._poller.join()
            self._poller = None
        elapsed = self._clock() - started
        if self._readers:
            try:
                joules = sum(r.delta(then) for r, then in zip(self._readers, readings, strict=True))
            except (OSError, ValueError) as exc:
                return Quantity.unavailable("J", source=f"energy counter read failed: {exc}")
            return Quantity(joules, "J", "measured", self.source)
        if self.watts is not None:
            return Quantity(self.watts * elapsed, "J", "estimated", self.source)
        return Quantity.unavailable("J", source=self.source)
