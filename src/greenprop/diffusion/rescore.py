"""Score a saved diffusion run afterwards: FD and sample grids from its kept models.

Sampling is the costly part of a diffusion run's evaluation (T forward passes per
image), so a run may defer it (``--score-samples 0``) or be scored again with more
samples. :func:`score_saved_run` loads the model of a finished epoch (the last one from
``checkpoint.pt``, an earlier scored epoch from its ``model_epoch<N>.pt``), builds the
run's model and method exactly as training did, and scores it through the same
:meth:`DiffusionTask.score_now` as an in-run score, so the result is the same for the
same seed and sample count. The fields go into the epoch's record in ``metrics.json``
and ``checkpoint.pt`` (a later resume keeps them), so ``compare``'s table shows them.
Each epoch is saved when scored; an epoch already scored with the same count is
skipped, so an interrupted scoring goes on where it stopped.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from greenprop import data as gp_data
from greenprop.diffusion.task import SCORE_FIELDS, DiffusionTask
from greenprop.errors import GreenpropError
from greenprop.methods import build_method, parse_method
from greenprop.models import task_of
from greenprop.train.checkpoint import describe_model_mismatch, load_checkpoint, save_checkpoint, write_json
from greenprop.train.config import TrainConfig
from greenprop.train.lock import OutputLock
from greenprop.train.setup import create_model, resolve_device
from greenprop.train.summary import summarize
from greenprop.train.trainer import CHECKPOINT, METRICS

__all__ = ["describe", "score_saved_run"]


def _read_metrics(run_dir: Path) -> dict[str, Any]:
    path = run_dir / METRICS
    if not path.is_file():
        raise GreenpropError(f"{run_dir} holds no greenprop run (no {METRICS})")
    try:
        metrics = json.loads(path.read_text())
        config = TrainConfig.from_dict(metrics["config"])
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise GreenpropError(f"{path} is unreadable ({type(err).__name__}: {err})") from err
    if task_of(config.model) != "diffusion":
        raise GreenpropError(f"{run_dir} trained {config.model!r}, not a diffusion model: nothing to score")
    return metrics


def _saved_models(run_dir: Path, last: int) -> dict[int, Path]:
    """1-based epoch -> the file holding its model: kept snapshots, and the checkpoint for ``last``."""
    kept = {}
    for path in run_dir.glob("model_epoch*.pt"):
        number = path.stem.removeprefix("model_epoch")
        if number.isdigit():
            kept[int(number)] = path
    if last > 0:
        kept[last] = run_dir / CHECKPOINT
    return kept


def _build_model(config: TrainConfig, data: gp_data.DatasetPair) -> torch.nn.Module:
    """The run's model with its method's surgery, as the trainer builds it (weights loaded later)."""
    torch.manual_seed(config.seed)
    model = create_model(config, data.info)
    steps = -(-len(data.train) // config.batch_size)
    build_method(
        parse_method(config.method), model, epochs=config.epochs, steps_per_epoch=steps, seed=config.seed
    )
    return model.to(resolve_device(config.device))


def score_saved_run(
    run_dir: str | Path,
    *,
    samples: int | None = None,
    epochs: Sequence[int] | None = None,
    fd_cache: str | Path | None = None,
) -> list[dict[str, Any]]:
    """Score the kept models of the diffusion run in ``run_dir``; returns one record per epoch.

    ``samples``: images sampled per score (None: the run's ``score_samples``).
    ``epochs``: 1-based epochs to score (None: the last finished one); each needs a kept
    model. ``fd_cache``: the FD classifier's folder (None: the run's own setting).
    Each returned dict has ``epoch``, the score fields and ``skipped`` (already scored
    with this count).
    """
    run_dir = Path(run_dir)
    metrics = _read_metrics(run_dir)
    config = TrainConfig.from_dict(metrics["config"])
    count = config.score_samples if samples is None else samples
    if isinstance(count, bool) or not isinstance(count, int) or count < 2:
        hint = " (the run deferred scoring: pass --samples)" if samples is None else ""
        raise GreenpropError(f"samples={count!r} must be an integer >= 2{hint}")
    if fd_cache is not None:
        config = config.replace(fd_cache=str(fd_cache))
    lock = OutputLock(run_dir).acquire()  # no training writes this folder meanwhile
    try:
        checkpoint = load_checkpoint(run_dir / CHECKPOINT, required=("model", "epoch", "history"))
        last = int(checkpoint["epoch"])
        kept = _saved_models(run_dir, last)
        wanted = [last] if epochs is None else list(epochs)
        for epoch in wanted:
            if epoch not in kept:
                have = ", ".join(str(e) for e in sorted(kept)) or "none"
                raise GreenpropError(
                    f"epoch {epoch} of {run_dir} has no kept model (epochs with one: {have}; "
                    "a run keeps the last epoch and its scored epochs, see --score-every)"
                )
        data = gp_data.load(
            config.dataset, data_dir=config.data_dir, subset=config.subset, test_subset=config.test_subset
        )
        task = DiffusionTask(config, data)
        model = _build_model(config, data)
        results = []
        for epoch in wanted:
            record = metrics["epochs"][epoch - 1] if epoch <= len(metrics["epochs"]) else None
            if record is None:
                raise GreenpropError(
                    f"{run_dir / METRICS} has no record of epoch {epoch}; resume the run first"
                )
            if record.get("fd") is not None and record.get("fd_samples") == count:
                results.append({"epoch": epoch, **_fields(record), "skipped": True})
                continue
            state = checkpoint if kept[epoch].name == CHECKPOINT else load_checkpoint(kept[epoch])
            if mismatch := describe_model_mismatch(model, state["model"]):
                raise GreenpropError(f"{kept[epoch]} does not hold this run's model ({mismatch})")
            model.load_state_dict(state["model"])
            started = time.perf_counter()
            fields = task.score_now(model, epoch - 1, run_dir, count)
            record.update(fields)
            checkpoint["history"][epoch - 1].update(fields)
            save_checkpoint(checkpoint, run_dir / CHECKPOINT)  # first: a resume then keeps the score
            metrics["summary"] = summarize(metrics["epochs"], task)
            write_json(metrics, run_dir / METRICS)
            results.append(
                {"epoch": epoch, **fields, "skipped": False, "seconds": time.perf_counter() - started}
            )
        return results
    finally:
        lock.release()


def _fields(record: dict[str, Any]) -> dict[str, Any]:
    return {key: record.get(key) for key in SCORE_FIELDS}


def describe(run_dir: str | Path, result: dict[str, Any]) -> str:
    """One line for the CLI."""
    floor = result.get("fd_floor")
    floor_text = "n/a" if floor is None else f"{floor:.3f}"
    head = f"{run_dir} epoch {result['epoch']}: FD {result['fd']:.3f} ({result['fd_samples']} samples; "
    head += f"real-data floor {floor_text}), grid {result['sample_grid']}"
    if result["skipped"]:
        return head + " [scored earlier, kept]"
    return head + f" [{result['seconds']:.1f} s]"
