"""Run a baseline and methods on the same model, data and seeds; collect their metrics.

Each run lives in ``OUT/<method>/seed<N>/``. The runs train round-robin by epoch
(:mod:`greenprop.experiments.round_robin`): epoch 1 of every run, then epoch 2, ...,
each slice continuing its run by the trainer's exact resume, so machine load drifting
during the comparison falls on every run alike. A finished run is reused and an
interrupted one is resumed, so re-running the same command after a crash loses
nothing that was saved.
"""

from __future__ import annotations

import gc
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
from greenprop.experiments.round_robin import epoch_slices
from greenprop.methods import MethodSpec, build_method, parse_method
from greenprop.models import task_of
from greenprop.models.loading import keep_loaded
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


@dataclass
class _Run:
    """One configuration (method x seed) while the comparison trains it slice by slice."""

    number: str  # "i/n", its place in the listed order
    label: str  # the method spec, or a frontier budget's "dense@<k>ep"
    seed: int
    config: TrainConfig
    path: Path
    metrics: dict[str, Any] | None = None  # the latest metrics.json
    started: bool = False  # trained by this call: later slices resume

    @property
    def epochs_done(self) -> int:
        return len(self.metrics["epochs"]) if self.metrics else 0

    @property
    def finished(self) -> bool:
        return bool(self.metrics and (self.metrics.get("complete") or self.metrics.get("diverged")))


def _existing_metrics(run_dir: Path, config: TrainConfig, overwrite: bool) -> dict[str, Any] | None:
    """The saved metrics of exactly this config (finished or not), or None to start afresh."""
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
    return metrics


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
        del scratch
        gc.collect()  # free each scratch model (and its method's cycles) before the next


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
    out = ensure_writable_dir(out_dir)
    if task_of(base.model) == "diffusion" and base.fd_cache is None:
        base = base.replace(fd_cache=str(out))  # one FD classifier for every run compared
    runs = [(spec.label, base.replace(method=spec.label)) for spec in specs]
    dense_budgets = frontier_runs(base, frontier)
    if frontier:
        budgets = ", ".join(str(config.epochs) for _, config in dense_budgets) or "none"
        print(f"compare: dense frontier at {budgets} of {base.epochs} epochs, plus the baseline itself")
    runs += dense_budgets
    data = gp_data.load(
        base.dataset, data_dir=base.data_dir, subset=base.subset, test_subset=base.test_subset
    )
    # A pretrained model (SmolLM2) is read once, then copied for every check and epoch slice.
    with keep_loaded():
        _validate_up_front(base, specs, seeds, data)
        sliced = _sliced_runs(runs, seeds, out, overwrite)
        for run, epoch in epoch_slices(
            sliced, base.epochs, done=lambda r: r.epochs_done, finished=lambda r: r.finished
        ):
            where = f"[{run.number} epoch {epoch}/{run.config.epochs}]"
            _train_slice(run, epoch, where, data=data, overwrite=overwrite)
    return [RunResult(run.label, run.seed, run.path, run.metrics or {}) for run in sliced]


def _sliced_runs(
    runs: list[tuple[str, TrainConfig]], seeds: list[int], out: Path, overwrite: bool
) -> list[_Run]:
    """Every (run, seed), seed-major as results are listed, with its saved metrics if any."""
    pairs = [(r, seed) for seed in seeds for r in runs]
    sliced = []
    for i, ((label, run_config), seed) in enumerate(pairs, start=1):
        path = out / run_dir_name(label) / f"seed{seed}"
        sliced.append(_Run(f"{i}/{len(pairs)}", label, seed, run_config.replace(seed=seed), path))
    for run in sliced:
        run.metrics = _existing_metrics(run.path, run.config, overwrite)
        if run.finished:
            print(f"[{run.number}] {run.label} seed {run.seed}: finished earlier, reusing {run.path}")
    return sliced


def _train_slice(run: _Run, epoch: int, where: str, *, data: gp_data.DatasetPair, overwrite: bool) -> None:
    """Train ``run`` up to ``epoch``, resuming it exactly unless this call starts it afresh."""
    fresh = overwrite and not run.started
    resume = not fresh and (run.path / CHECKPOINT).exists()
    verb = "resuming" if resume else "training"
    print(f"{where} {verb} {run.label} seed {run.seed} -> {run.path}", flush=True)
    trainer = Trainer(run.config, run.path, resume=resume, overwrite=fresh, data=data)
    trainer.resume_hint = "run the same compare command again to go on"
    run.started = True
    try:
        run.metrics = trainer.fit(until_epoch=epoch)
    except TrainingDiverged as err:
        print(f"{where} {run.label} seed {run.seed} diverged ({err}); recorded, going on")
        run.metrics = json.loads((run.path / METRICS).read_text())
    finally:
        # The trainer, its model and optimizer hold reference cycles (hooks, methods): free
        # them now, before the next slice builds its model, not at the collector's leisure.
        del trainer
        gc.collect()
