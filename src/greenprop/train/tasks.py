"""What a run learns: how a data batch becomes model inputs and targets, the loss, the metrics.

The trainer is task-agnostic: it asks its :class:`Task` for the step's ``(inputs,
targets)``, calls ``loss_fn(model(*inputs), targets)``, and lets the task evaluate and
describe the epoch. The task follows from the model (:func:`greenprop.models.task_of`):
classifiers learn :class:`ClassificationTask`, ``ddpm-unet`` learns noise prediction
(:class:`greenprop.diffusion.task.DiffusionTask`), causal language models learn next-token
prediction (:class:`greenprop.lm.task.CausalLMTask`) on causal-LM data, or write the label
as the next token (:class:`greenprop.lm.task.LMClassificationTask`) on LM sentiment data.

Each task names its metrics (:class:`Metric`) in ``metrics.json``, so reports know which
columns to show and whether lower is better without knowing the task.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from greenprop import data as gp_data
from greenprop.errors import GreenpropError
from greenprop.train.config import TrainConfig
from greenprop.train.evaluate import evaluate_sums, evaluation_means

__all__ = ["ClassificationTask", "Metric", "Task", "call_model", "make_task"]


@dataclass(frozen=True)
class Metric:
    """A summary metric: its key in ``metrics.json``'s summary, its column label, its direction."""

    key: str
    label: str
    higher_is_better: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def call_model(model: nn.Module, inputs: Any) -> Any:
    """``model(inputs)``, or ``model(*inputs)`` for a tuple of inputs (``(x_t, t)`` for DDPM)."""
    return model(*inputs) if isinstance(inputs, tuple) else model(inputs)


class Task:
    """The interface; :class:`ClassificationTask` documents the classification defaults."""

    name: str
    #: The summary metrics a comparison shows, the one it ranks by first.
    metrics: tuple[Metric, ...]
    #: Keys of :meth:`evaluate_sums` (what ranks add up under DDP).
    sum_keys: tuple[str, ...]
    loss_fn: nn.Module

    def batch(
        self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[Any, Any]:
        """The step's ``(inputs, targets)`` from a data batch; random draws use ``generator``
        (the global torch RNG when None, which the trainer seeds per epoch)."""
        raise NotImplementedError

    def trimmed(self, batch: tuple[Any, Any]) -> tuple[Any, Any]:
        """A step's batch cut to its longest sequence (``trim_padding``), for a part of a trimmed
        batch; unchanged where the task knows no exact cut (the language tasks' batches)."""
        return batch

    def train_sums(self, outputs: torch.Tensor, targets: Any) -> dict[str, float]:
        """Per-batch counts summed over the epoch for the train fields (e.g. correct answers)."""
        return {}

    def train_fields(self, sums: dict[str, float], samples: int) -> dict[str, Any]:
        """Train-set fields of the epoch record from the summed :meth:`train_sums`."""
        return {}

    def evaluate_sums(self, model: nn.Module, dataset: Dataset, **kwargs: Any) -> dict[str, float]:
        raise NotImplementedError

    def evaluation_means(self, sums: dict[str, float]) -> dict[str, float]:
        raise NotImplementedError

    def score(self, model: nn.Module, epoch: int, out_dir: Path | None) -> dict[str, Any]:
        """Extra evaluation after the epoch (the diffusion samples' FD); fields for the record."""
        return {}

    def describe(self, record: dict[str, Any]) -> list[str]:
        """The evaluation part of the epoch's progress line."""
        raise NotImplementedError

    def summary(self, history: list[dict[str, Any]]) -> dict[str, Any]:
        """The run summary's metric fields (every :attr:`metrics` key) from the epoch records."""
        raise NotImplementedError

    def describe_summary(self, summary: dict[str, Any]) -> str:
        """The metrics of a finished run's summary, as the CLI's closing line shows them."""
        parts = []
        for metric in self.metrics:
            value = summary.get(metric.key)
            parts.append(f"{metric.label} {'n/a' if value is None else format(value, '.4g')}")
        return "  ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "metrics": [m.to_dict() for m in self.metrics]}


class ClassificationTask(Task):
    """Cross-entropy on labels (with the run's label smoothing); top-1/top-5 accuracy and the
    test loss (plain cross-entropy, as before tasks existed)."""

    name = "classification"
    metrics = (Metric("acc1", "Acc@1 (%)", True), Metric("acc5", "Acc@5 (%)", True))
    sum_keys = ("loss_sum", "top1", "top5", "total")

    def __init__(self, label_smoothing: float = 0.0) -> None:
        self.loss_fn = nn.CrossEntropyLoss(label_smoothing=label_smoothing)

    def batch(
        self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[Any, Any]:
        return x, y

    def trimmed(self, batch: tuple[Any, Any]) -> tuple[Any, Any]:
        """Token inputs ``(B, 2, L)`` cut to their longest sequence (``greenprop.data.trim_to_longest``)."""
        inputs, targets = batch
        return gp_data.trim_to_longest(inputs), targets

    def train_sums(self, outputs: torch.Tensor, targets: Any) -> dict[str, float]:
        return {"correct": float((outputs.argmax(1) == targets).sum())}

    def train_fields(self, sums: dict[str, float], samples: int) -> dict[str, Any]:
        return {"train_acc": 100.0 * sums["correct"] / samples}

    def evaluate_sums(self, model: nn.Module, dataset: Dataset, **kwargs: Any) -> dict[str, float]:
        return evaluate_sums(model, dataset, **kwargs)  # plain cross-entropy: no label smoothing

    def evaluation_means(self, sums: dict[str, float]) -> dict[str, float]:
        return evaluation_means(sums)

    def describe(self, record: dict[str, Any]) -> list[str]:
        return [
            f"test loss {record['loss']:.4f}",
            f"acc@1 {record['acc1']:.2f}%",
            f"acc@5 {record['acc5']:.2f}%",
        ]

    def describe_summary(self, summary: dict[str, Any]) -> str:
        return f"acc@1 {summary['acc1']:.2f}%  acc@5 {summary['acc5']:.2f}%"

    def summary(self, history: list[dict[str, Any]]) -> dict[str, Any]:
        last = history[-1]
        return {
            "acc1": last["acc1"],
            "acc5": last["acc5"],
            "test_loss": last["loss"],
            "best_acc1": max(r["acc1"] for r in history),
        }


#: Data tasks a causal language model learns (:attr:`greenprop.data.DatasetInfo.task`).
LM_DATA_TASKS = ("causal-lm", "lm-classification")


def make_task(config: TrainConfig, data: gp_data.DatasetPair, world_size: int = 1) -> Task:
    """The task ``config.model`` learns, with its options checked against the data."""
    from greenprop.models import task_of

    kind = task_of(config.model)
    _check_model_fits_data(config.model, kind, data.info)
    if kind == "diffusion":
        from greenprop.diffusion.task import DiffusionTask

        return DiffusionTask(config, data, world_size)
    diffusion_only = {
        name: value
        for name, value in (("score_every", config.score_every), ("fd_cache", config.fd_cache))
        if value is not None
    }
    if diffusion_only:
        shown = ", ".join(f"{k}={v!r}" for k, v in diffusion_only.items())
        raise GreenpropError(f"{shown} only apply to a diffusion model (ddpm-unet), not to {config.model!r}")
    if kind == "causal-lm":
        from greenprop.lm.task import CausalLMTask, LMClassificationTask

        if data.info.task == "lm-classification":
            return LMClassificationTask(data.info.num_classes, data.info.label_tokens)
        return CausalLMTask(data.info.num_classes)
    return ClassificationTask(config.label_smoothing)


def _check_model_fits_data(model: str, kind: str, info: gp_data.DatasetInfo) -> None:
    """Language-model data (next tokens, labels as next tokens) is for causal language models only."""
    from greenprop.models import LM_MODELS

    lm_data = info.task in LM_DATA_TASKS
    if kind == "causal-lm" and not lm_data:
        raise GreenpropError(
            f"model {model!r} is a causal language model (next-token prediction) but dataset "
            f"{info.name!r} is for {info.task}; use rotten-tomatoes-lm or rotten-tomatoes-lm-sentiment"
        )
    if kind != "causal-lm" and lm_data:
        raise GreenpropError(
            f"dataset {info.name!r} is for a language model ({info.task}), which model {model!r} "
            f"({kind}) is not; use a causal language model: {', '.join(LM_MODELS)}"
        )
