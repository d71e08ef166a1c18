"""Honest measurement of what a training run costs: FLOPs, wall time, energy, peak memory.

Every figure is a :class:`Quantity` that says whether it was counted, measured,
estimated or is unavailable.
"""

from greenprop.metering.accounting import FlopAccount, flop_accounts
from greenprop.metering.energy import EnergyMeter, NvmlReader, RaplReader
from greenprop.metering.flops import FlopCount, count_flops, count_flops_per_sample
from greenprop.metering.memory import MemoryReading, PeakMemory
from greenprop.metering.quantity import Quantity
from greenprop.metering.timing import PhaseTimer

__all__ = [
    "EnergyMeter",
    "FlopAccount",
    "FlopCount",
    "MemoryReading",
    "NvmlReader",
    "PeakMemory",
    "PhaseTimer",
    "Quantity",
    "RaplReader",
    "count_flops",
    "count_flops_per_sample",
    "flop_accounts",
]
