"""Named comparison presets: a base training config, the methods and the seeds."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from greenprop.errors import GreenpropError


@dataclass(frozen=True)
class Preset:
    description: str
    config: dict[str, Any]
    methods: tuple[str, ...] = ("baseline",)
    seeds: tuple[int, ...] = (0,)
    notes: list[str] = field(default_factory=list)


PRESETS: dict[str, Preset] = {
    "demo": Preset(
        description="small CNN on a 10k/2k Fashion-MNIST subset, 3 epochs, one seed "
        "(a few minutes on a 2-core CPU)",
        config={
            "model": "cnn",
            "dataset": "fashion-mnist",
            "subset": 10_000,
            "test_subset": 2_000,
            "epochs": 3,
            "batch_size": 128,
            "lr": 0.05,
        },
        methods=("baseline",),
        seeds=(0,),
    ),
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise GreenpropError(f"unknown preset {name!r}; choose from {', '.join(sorted(PRESETS))}")
    return PRESETS[name]
