"""Short training runs of each candidate method on a small subset: does it train, what does it keep?

A probe is the reference :class:`~greenprop.train.trainer.Trainer` with nothing
written to disk: a few epochs of a few steps. Its losses are only a sanity check
(too short to rank accuracy); its counted FLOPs and, for VCAS, the ratios the
controller reached are what the recommendation uses.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from greenprop import data as gp_data
from greenprop.errors import GreenpropError
from greenprop.train.config import TrainConfig
from greenprop.train.trainer import Trainer

__all__ = ["ProbeResult", "probe"]


@dataclass
class ProbeResult:
    """One probe run: its spec, what it cost (counted) and where it ended.

    ``refused`` holds the one-line reason when the method does not apply to the model.
    ``vcas_blocks`` / ``vcas_weights`` are the controller's final ratios (VCAS only).
    """

    method: str
    steps: int = 0
    epochs_replaced: int = 0
    train_loss: float | None = None
    acc1: float | None = None
    flops: float | None = None
    train_s: float | None = None
    vcas_blocks: list[float] = field(default_factory=list)
    vcas_weights: dict[str, float] = field(default_factory=dict)
    refused: str | None = None


def _value(quantity: dict[str, Any] | None) -> float | None:
    return None if quantity is None else quantity.get("value")


def probe(config: TrainConfig, method: str, data: gp_data.DatasetPair) -> ProbeResult:
    """Train ``method`` for ``config.epochs`` on ``data`` (no files written)."""
    try:
        trainer = Trainer(config.replace(method=method, progress=False), None, data=data)
    except GreenpropError as err:
        return ProbeResult(method, refused=str(err))
    metrics = trainer.fit()
    summary = metrics["summary"]
    trained = [r for r in metrics["epochs"] if r.get("train_loss") is not None]
    flops = summary["flops"]
    result = ProbeResult(
        method,
        steps=summary["steps"],
        epochs_replaced=summary["epochs_replaced"],
        train_loss=trained[-1]["train_loss"] if trained else None,
        acc1=summary.get("acc1"),
        flops=(_value(flops["forward"]) or 0.0) + (_value(flops["backward"]) or 0.0),
        train_s=_value(summary["time"]["train"]),
    )
    for controller in trainer.controllers:
        handle = getattr(controller, "handle", None)
        if controller.name == "vcas" and handle is not None:
            result.vcas_blocks = [float(s.ratio) for s in handle.samplers]
            result.vcas_weights = {n: float(layer.vcas_weight_ratio) for n, layer in handle.linears.items()}
    return result
