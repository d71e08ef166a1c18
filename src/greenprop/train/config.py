"""Everything that defines a training run, validated up front so mistakes fail fast."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from greenprop.errors import GreenpropError
from greenprop.train.optimizers import OPTIMIZERS, parse_optimizer

__all__ = ["LR_SCHEDULES", "MAX_SEED", "OPTIMIZERS", "RESUMABLE_CHANGES", "TrainConfig"]
#: The largest seed whose derived streams (seed * 1_000_003 + index, greenprop.seeding) fit in 63 bits.
MAX_SEED = (2**63 - 1) // 1_000_003 - 1
LR_SCHEDULES = ("cosine", "step", "none")

# Fields that may differ between an interrupted run and its resumption.
RESUMABLE_CHANGES = frozenset({"progress", "device"})


@dataclass(frozen=True)
class TrainConfig:
    """A training run. Defaults are a reasonable small-CNN recipe on Fashion-MNIST.

    Attributes:
        model: zoo model name (``greenprop.models.MODELS``).
        dataset: dataset name (``greenprop.data.DATASETS``).
        method: method spec, e.g. ``"baseline"`` or ``"ssprop:keep=0.6"``.
        epochs: number of epochs (> 0).
        batch_size: training batch size (> 0).
        lr: peak learning rate (> 0).
        optimizer: a spec ``name[:key=value,...]`` (:mod:`greenprop.train.optimizers`):
            ``sgd`` (momentum from ``momentum``, Nesterov off), ``adamw``, ``adam``,
            ``adagrad``, ``adadelta``, ``rmsprop``; e.g. ``"sgd:nesterov=true"``.
        momentum: SGD momentum (unless the optimizer spec sets its own).
        weight_decay: L2 / decoupled weight decay.
        lr_schedule: ``"cosine"`` (to 0 over all epochs), ``"step"`` or ``"none"``.
        step_size: epochs between LR drops for ``"step"``.
        gamma: LR multiplier at each drop for ``"step"``.
        label_smoothing: cross-entropy label smoothing in [0, 1).
        seed: seeds model init, data order, dropout and the method's randomness.
        deterministic: ``torch.use_deterministic_algorithms(True)``.
        subset: number of training examples (None = all).
        test_subset: number of test examples (None = all).
        data_dir: folder with the dataset files (None = search the usual places).
        width: model width override (None = the model's default).
        dropout: dropout rate where the model has dropout.
        channels_last: NHWC memory layout for model and inputs.
        compile: ``torch.compile`` the model (after the method is applied).
        tuned: the runtime settings of :mod:`greenprop.train.tuning` (one thread per
            physical core, the glibc malloc tunables through the CLI); implies
            ``channels_last``. Baseline and methods alike; recorded in ``environment``.
        watts: average power draw to *estimate* energy when no counter is readable.
        flops_samples: samples per FLOP count (FLOPs scale per sample).
        eval_batch_size: batch size for evaluation.
        device: ``"cpu"``, ``"cuda"``, ... (``"auto"`` picks CUDA when present).
        progress: show progress bars.
        diffusion_steps: T of the DDPM noise schedule (diffusion models only).
        score_every: diffusion models: score samples (FD, PNG grid) after every this
            many epochs and after the last; None scores the last epoch only, 0 never.
        score_samples: diffusion models: samples drawn per score; 0 scores nothing
            during training but keeps the model of every scored epoch
            (``model_epoch<N>.pt``) for ``greenprop score-diffusion``.
        fd_cache: diffusion models: folder of the FD classifier cache (None: next to
            the run's output, see :mod:`greenprop.diffusion.scoring`).
        trim_padding: text data: cut every batch (training, a method's estimation
            batches, evaluation) to its longest sequence, the largest row sum of its
            attention mask, as a Hugging Face user's dynamic padding does; the dense
            step then skips the padding. A model that honours the mask gives the same
            outputs (tested for ``minilm``); FLOPs are counted per batch length.
        group_by_length: text data: order each epoch's training batches so that a batch
            holds sequences of similar length, as the Hugging Face Trainer's
            ``group_by_length`` does (shuffled from ``(seed, epoch)``, then sorted by length
            within megabatches of up to 50 batches; :mod:`greenprop.data.grouping`). With
            ``trim_padding`` a batch then carries little padding; without it only the order
            changes. Estimation batches and evaluation keep their order.
    """

    model: str = "cnn"
    dataset: str = "fashion-mnist"
    method: str = "baseline"
    epochs: int = 3
    batch_size: int = 128
    lr: float = 0.05
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lr_schedule: str = "cosine"
    step_size: int = 30
    gamma: float = 0.1
    label_smoothing: float = 0.0
    seed: int = 0
    deterministic: bool = False
    subset: int | None = None
    test_subset: int | None = None
    data_dir: str | None = None
    width: int | None = None
    dropout: float = 0.0
    channels_last: bool = False
    compile: bool = False
    tuned: bool = False
    watts: float | None = None
    flops_samples: int = 16
    eval_batch_size: int = 512
    device: str = "auto"
    progress: bool = True
    diffusion_steps: int = 200
    score_every: int | None = None
    score_samples: int = 256
    fd_cache: str | None = None
    trim_padding: bool = False
    group_by_length: bool = False

    def __post_init__(self) -> None:
        if self.tuned and not self.channels_last:  # tuned implies it, so the saved config says so
            object.__setattr__(self, "channels_last", True)
        positive = ("epochs", "batch_size", "step_size", "flops_samples", "eval_batch_size")
        for name in (*positive, "diffusion_steps"):
            _require(
                isinstance(getattr(self, name), int) and getattr(self, name) > 0,
                name,
                getattr(self, name),
                "must be a positive integer",
            )
        for name in ("subset", "test_subset", "width"):
            value = getattr(self, name)
            _require(
                value is None or (isinstance(value, int) and value > 0),
                name,
                value,
                "must be a positive integer",
            )
        _require(
            _int(self.score_samples) and self.score_samples >= 0,
            "score_samples",
            self.score_samples,
            "must be an integer >= 0 (0: keep the models, score later)",
        )
        _require(
            self.score_every is None or (_int(self.score_every) and self.score_every >= 0),
            "score_every",
            self.score_every,
            "must be an integer >= 0 (0: never score)",
        )
        _require(_finite(self.lr) and self.lr > 0, "lr", self.lr, "must be a positive number")
        _require(
            _finite(self.weight_decay) and self.weight_decay >= 0,
            "weight_decay",
            self.weight_decay,
            "must be >= 0",
        )
        _require(
            _finite(self.momentum) and 0 <= self.momentum < 1, "momentum", self.momentum, "must be in [0, 1)"
        )
        _require(_finite(self.gamma) and 0 < self.gamma <= 1, "gamma", self.gamma, "must be in (0, 1]")
        _require(
            _finite(self.label_smoothing) and 0 <= self.label_smoothing < 1,
            "label_smoothing",
            self.label_smoothing,
            "must be in [0, 1)",
        )
        _require(
            _finite(self.dropout) and 0 <= self.dropout < 1, "dropout", self.dropout, "must be in [0, 1)"
        )
        _require(
            self.watts is None or (_finite(self.watts) and self.watts > 0),
            "watts",
            self.watts,
            "must be a positive number of watts",
        )
        for name in ("trim_padding", "group_by_length"):
            _require(
                isinstance(getattr(self, name), bool), name, getattr(self, name), "must be True or False"
            )
        parse_optimizer(self.optimizer)  # names the bad option
        _require(
            self.lr_schedule in LR_SCHEDULES,
            "lr_schedule",
            self.lr_schedule,
            f"must be one of {', '.join(LR_SCHEDULES)}",
        )
        _require(
            isinstance(self.seed, int) and 0 <= self.seed <= MAX_SEED,
            "seed",
            self.seed,
            f"must be an integer in [0, {MAX_SEED}] (derived per-epoch seeds must fit torch's 63 bits)",
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise GreenpropError(f"unknown training option(s): {', '.join(unknown)}")
        return cls(**data)

    def replace(self, **changes: Any) -> TrainConfig:
        return replace(self, **changes)

    def differences(self, other: TrainConfig) -> dict[str, tuple[Any, Any]]:
        """Fields (other than RESUMABLE_CHANGES) whose values differ."""
        mine, theirs = self.to_dict(), other.to_dict()
        return {k: (mine[k], theirs[k]) for k in mine if k not in RESUMABLE_CHANGES and mine[k] != theirs[k]}


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _require(ok: bool, name: str, value: Any, why: str) -> None:
    if not ok:
        raise GreenpropError(f"{name}={value!r} {why}")
