"""``greenprop advise``: measure on this machine, probe each method, recommend (see docs/advise.md)."""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch

from greenprop import data as gp_data
from greenprop.advise.measure import VCASTiming, dense_step, time_ssprop_layers, time_vcas, vcas_refusal
from greenprop.advise.probe import ProbeResult, probe
from greenprop.advise.recommend import (
    VCAS_FAST,
    Advice,
    Measurements,
    choose_ssprop,
    recommend,
    vcas_update_every,
)
from greenprop.errors import GreenpropError
from greenprop.models import task_of
from greenprop.models.loading import keep_loaded
from greenprop.train.config import TrainConfig
from greenprop.train.setup import create_model
from greenprop.train.tasks import make_task

__all__ = ["DEFAULT_KEEPS", "AdviseOptions", "measure_and_probe", "run_advise"]

DEFAULT_KEEPS = (0.8, 0.6, 0.4, 0.2)


@dataclass(frozen=True)
class AdviseOptions:
    """How much ``advise`` measures: keeps to time, side-by-side rounds, the probe's size."""

    keeps: tuple[float, ...] = DEFAULT_KEEPS
    repeats: int = 10
    warmup: int = 2
    probe_subset: int = 512
    probe_epochs: int = 3
    max_drop: float = 0.4

    def __post_init__(self) -> None:
        if not self.keeps or any(not (0.0 < k < 1.0) or not math.isfinite(k) for k in self.keeps):
            raise GreenpropError(f"keeps must be numbers in (0, 1), got {list(self.keeps)}")
        for name in ("repeats", "probe_subset", "probe_epochs"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise GreenpropError(f"{name.replace('_', '-')} must be a positive integer, got {value!r}")
        if isinstance(self.warmup, bool) or not isinstance(self.warmup, int) or self.warmup < 0:
            raise GreenpropError(f"warmup must be an integer >= 0, got {self.warmup!r}")
        if not 0.0 <= self.max_drop < 1.0:
            raise GreenpropError(f"max-drop must be in [0, 1), got {self.max_drop!r}")


def stderr_progress(message: str) -> None:
    print(f"advise: {message}", file=sys.stderr, flush=True)


def measure_and_probe(
    config: TrainConfig, options: AdviseOptions, progress: Callable[[str], None] | None = stderr_progress
) -> Measurements:
    """Time the dense step and each ssProp layer, probe each method, time VCAS at the probe's ratios."""
    say = progress or (lambda _message: None)
    if config.device not in ("auto", "cpu"):
        raise GreenpropError(f"advise times and probes on the CPU; --device {config.device} is not supported")
    config = config.replace(device="cpu")  # the timings are the CPU's, so the probes run there too
    if task_of(config.model) != "classification":
        raise GreenpropError(f"advise supports classification models; {config.model!r} is not one")
    pair = gp_data.load(config.dataset, data_dir=config.data_dir, subset=config.subset, test_subset=1)
    if len(pair.train) < config.batch_size:
        raise GreenpropError(
            f"batch-size {config.batch_size} is larger than the {len(pair.train)} training examples"
        )
    task = make_task(config, pair)
    torch.manual_seed(config.seed)
    model = create_model(config, pair.info).train()
    x, y = pair.train[torch.arange(config.batch_size)]
    inputs, targets = task.batch(x, y)
    loss_fn = task.loss_fn
    say(f"timing the dense step ({options.repeats} rounds)")
    step = dense_step(model, inputs, targets, loss_fn, repeats=options.repeats, warmup=options.warmup)
    say("timing each ssProp layer's backward, dense and at each keep")
    layers = time_ssprop_layers(
        model, inputs, options.keeps, repeats=options.repeats, warmup=options.warmup, progress=say
    )
    steps_per_epoch = math.ceil(len(pair.train) / config.batch_size)
    measurements = Measurements(config.epochs, steps_per_epoch, step, layers)
    refusal = vcas_refusal(model)
    measurements.probes = _probes(config, options, measurements, refusal is None, say)
    vcas_probe = measurements.probes.get("vcas")
    if refusal is not None:
        measurements.vcas = VCASTiming(refused=refusal)
    elif vcas_probe is not None and vcas_probe.refused:
        measurements.vcas = VCASTiming(refused=vcas_probe.refused)
    elif vcas_probe is not None:
        say("timing VCAS at the probe's final ratios, side by side with dense")
        measurements.vcas = time_vcas(
            model,
            inputs,
            targets,
            loss_fn,
            block_ratios=vcas_probe.vcas_blocks,
            weight_ratios=vcas_probe.vcas_weights,
            repeats=options.repeats,
            warmup=options.warmup,
        )
    return measurements


def _probes(
    config: TrainConfig,
    options: AdviseOptions,
    m: Measurements,
    vcas_applies: bool,
    say: Callable[[str], None],
) -> dict[str, ProbeResult]:
    """Probe runs: dense, the ssProp choice, VCAS (a fast controller), GradSamp (Pe=1)."""
    probe_config = config.replace(
        subset=options.probe_subset,
        test_subset=min(options.probe_subset, 512),
        epochs=options.probe_epochs,
        progress=False,
    )
    probe_data = gp_data.load(
        config.dataset,
        data_dir=config.data_dir,
        subset=probe_config.subset,
        test_subset=probe_config.test_subset,
    )
    probe_steps = options.probe_epochs * math.ceil(len(probe_data.train) / config.batch_size)
    methods = {"baseline": "baseline", "gradsamp": "gradsamp:strategy=pe:1"}
    choice = choose_ssprop(m.layers, options.keeps, max_drop=options.max_drop)
    if choice is not None:
        methods["ssprop"] = choice.spec()
    if vcas_applies:  # as many controller updates as the real run would make (at most one a step)
        updates = max(1, m.total_steps // vcas_update_every(m.total_steps))
        methods["vcas"] = f"vcas:update_every={max(1, probe_steps // updates)},{VCAS_FAST}"
    results = {}
    for index, (key, method) in enumerate(methods.items()):
        say(
            f"probe {index + 1}/{len(methods)}: {method} "
            f"({options.probe_epochs} epochs of {len(probe_data.train)} examples)"
        )
        results[key] = probe(probe_config, method, probe_data)
    return results


def run_advise(
    config: TrainConfig, options: AdviseOptions, progress: Callable[[str], None] | None = stderr_progress
) -> tuple[Measurements, Advice]:
    """Measure, probe, and recommend for ``config``'s model, data, batch size and epochs."""
    with keep_loaded():  # a pretrained model is read once for the timings and every probe
        measurements = measure_and_probe(config, options, progress)
    return measurements, recommend(measurements, options.keeps, max_drop=options.max_drop)


def environment_line(config: TrainConfig) -> str:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (
        f"{torch.get_num_threads()} torch threads, {os.cpu_count()} logical CPUs, "
        f"load average {load:.1f} (timings side by side on this machine)"
    )
