"""Run a baseline and methods on the same model, data and seeds; collect their metrics.

Each run lives in ``OUT/<method>/seed<N>/``. A finished run is reused and an
interrupted one is resumed, so re-running the same command after a crash loses
nothing that was saved.
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from greenprop import data as gp_data
from greenprop.errors import GreenpropError, TrainingDiverged
from greenprop.experiments.frontier import frontier_runs
from greenprop.methods import MethodSpec, build_method, parse_method
from greenprop.train.checkpoint import ensure_writable_dir
from greenprop.train.config import TrainConfig
from greenprop.train.setup import create_model
from greenprop.train.trainer import CHECKPOINT, METRICS, Trainer


@dataclass(frozen=True)
class RunResult:
    method: str
    seed: int
    path: Path
    metrics: dict[str, Any]


def run_dir_name(method_label: str) -> str:
    """A filesystem-safe folder name for a method label."""
    return re.sub(r"[^A-Za-z0-9.=_-]+", "_", method_label)


def _existing_metrics(run_dir: Path, config: TrainConfig, overwrite: bool) -> dict[str, Any] | None:
    """Finished metrics for exactly this config, or None if the run must (re)start."""
    path = run_dir / METRICS
    if not path.exists() or overwrite:
        return None
    try:
        metrics = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise GreenpropError(f"{path} is unreadable ({err}); remove it or pass --overwrite") from err
    saved = TrainConfig.from_dict(metrics["config"])
    diff = saved.differences(config)
    if diff:
        raise GreenpropError(
            f"{run_dir} holds a run with other options ({', '.join(diff)}); "
            "use another --out or pass --overwrite"
        )
    return metrics if metrics.get("complete") or metrics.get("diverged") else None


def _validate_up_front(
    base: TrainConfig, specs: list[MethodSpec], seeds: list[int], data: gp_data.DatasetPair
) -> None:
    """Fail on a bad seed or method option now, not hours into the comparison."""
    for seed in seeds:
        base.replace(seed=seed)
    steps = -(-len(data.train) // base.batch_size)
    for spec in specs:
        scratch = create_model(base, data.info)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            build_method(spec, scratch, epochs=base.epochs, steps_per_epoch=steps, seed=seeds[0])


def run_compare(
    base: TrainConfig,
    methods: list[str],
    seeds: list[int],
    out_dir: str | Path,
    *,
    overwrite: bool = False,
    frontier: Sequence[float] = (),
) -> list[RunResult]:
    """Train every method x seed (baseline first) and return their metrics.

    ``frontier``: fractions of the epochs at which the baseline is also trained, each
    with its own full schedule (:mod:`greenprop.experiments.frontier`); () for none.
    """
    if not methods:
        raise GreenpropError("compare needs at least one method")
    if not seeds:
        raise GreenpropError("compare needs at least one seed")
    if len(set(seeds)) != len(seeds):
        raise GreenpropError(f"seeds must be distinct, got {seeds}")
    specs = [parse_method(m) for m in methods]
    if "baseline" not in [s.name for s in specs]:
        print("compare: adding the dense baseline, which every saving is measured against")
        specs.insert(0, parse_method("baseline"))
    labels = [s.label for s in specs]
    if len(set(labels)) != len(labels):
        raise GreenpropError(f"methods must be distinct, got {labels}")
    runs = [(spec.label, base.replace(method=spec.label)) for spec in specs]
    dense_budgets = frontier_runs(base, frontier)
    if frontier:
        budgets = ", ".join(str(config.epochs) for _, config in dense_budgets) or "none"
        print(f"compare: dense frontier at {budgets} of {base.epochs} epochs, plus the baseline itself")
    runs += dense_budgets
    out = ensure_writable_dir(out_dir)
    data = gp_data.load(
        base.dataset, data_dir=base.data_dir, subset=base.subset, test_subset=base.test_subset
    )
    _validate_up_front(base, specs, seeds, data)
    results = []
    total = len(runs) * len(seeds)
    # Seed-major order (baseline, method, ... for seed 0, then seed 1, ...) interleaves the
    # methods in time, so drifting machine load biases their wall-time ratios less.
    for i, ((label, run_config), seed) in enumerate(((r, seed) for seed in seeds for r in runs), start=1):
        config = run_config.replace(seed=seed)
        run_dir = out / run_dir_name(label) / f"seed{seed}"
        metrics = _existing_metrics(run_dir, config, overwrite)
        if metrics is not None:
            print(f"[{i}/{total}] {label} seed {seed}: finished earlier, reusing {run_dir}")
        else:
            resume = (run_dir / CHECKPOINT).exists() and not overwrite
            verb = "resuming" if resume else "training"
            print(f"[{i}/{total}] {verb} {label} seed {seed} -> {run_dir}", flush=True)
            trainer = Trainer(config, run_dir, resume=resume, overwrite=overwrite, data=data)
            try:
                metrics = trainer.fit()
            except TrainingDiverged as err:
                print(f"[{i}/{total}] {label} seed {seed} diverged ({err}); recorded, going on")
                metrics = json.loads((run_dir / METRICS).read_text())
        results.append(RunResult(label, seed, run_dir, metrics))
    return results
