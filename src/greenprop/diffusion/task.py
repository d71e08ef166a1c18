"""The diffusion task: DDPM's noise-prediction objective, its test loss, and scored samples.

Images are mapped from the dataset's normalisation to [-1, 1] and padded to 32x32 with
the background value (Fashion-MNIST 28 -> 32, as in ssProp's diffusion code). A step
draws a timestep and Gaussian noise per image and regresses the noise (MSE). The test
loss uses the same fixed draws at every epoch, so its curve is comparable across epochs
and runs. At scored epochs (``score_every``) the model is kept as ``model_epoch<N>.pt``
and samples ``score_samples`` images with the ancestral sampler from a fixed seed; their
FD to the test split (:mod:`greenprop.diffusion.scoring`), the sample count, the FD of
as many real training images (the floor a perfect generator would get at that count)
and a PNG grid of the first 64 go in the record. With ``score_samples`` 0 only the
model is kept: ``greenprop score-diffusion`` (:mod:`greenprop.diffusion.rescore`)
scores it later, in the same way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from greenprop import data as gp_data
from greenprop.diffusion.frechet import METRIC_NAME, frechet_distance
from greenprop.diffusion.schedule import NoiseSchedule, ancestral_sample
from greenprop.diffusion.scoring import classifier_features, load_or_train_classifier, save_grid
from greenprop.errors import GreenpropError
from greenprop.seeding import stream_seed
from greenprop.train.checkpoint import save_checkpoint
from greenprop.train.config import TrainConfig
from greenprop.train.evaluate import iterate_batches, prepare_inputs
from greenprop.train.tasks import Metric, Task

__all__ = ["SIDE", "DiffusionTask", "model_snapshot"]

#: The side of the images the U-Net sees.
SIDE = 32
#: Seed of the test loss's fixed timesteps and noise (the same for every run).
_EVAL_SEED = 20_200_619
#: Images in a sample grid.
_GRID = 64
#: The record fields a score writes (None at unscored epochs).
SCORE_FIELDS = ("fd", "fd_samples", "fd_floor", "sample_grid")


def model_snapshot(epoch: int) -> str:
    """File name of the model kept after 1-based ``epoch`` (a scored epoch) for later scoring."""
    return f"model_epoch{epoch}.pt"


class DiffusionTask(Task):
    """Noise prediction on 32x32 grey images; FD of ancestral samples at scored epochs."""

    name = "diffusion"
    metrics = (Metric("fd", METRIC_NAME, False), Metric("test_loss", "Test loss (noise MSE)", False))
    sum_keys = ("loss_sum", "total")

    def __init__(self, config: TrainConfig, data: gp_data.DatasetPair, world_size: int = 1) -> None:
        info = data.info
        if info.modality != "image" or info.in_channels != 1 or info.image_size > SIDE:
            raise GreenpropError(
                f"{config.model} generates grey images up to {SIDE}x{SIDE}; dataset {info.name!r} has "
                f"{info.modality} inputs of {info.in_channels} channel(s), side {info.image_size}"
            )
        if (SIDE - info.image_size) % 2:
            raise GreenpropError(
                f"{info.name!r} images of side {info.image_size} cannot be centred in {SIDE}"
            )
        if config.score_samples == 1:
            raise GreenpropError(
                "score_samples=1: FD needs a covariance, give >= 2 (or 0: keep the models, score later)"
            )
        if world_size > 1 and config.score_every != 0:
            raise GreenpropError(
                "scoring diffusion samples runs in one process; pass --score-every 0 under --nproc "
                "(no FD is scored then)"
            )
        self.config = config
        self.data = data
        self.schedule = NoiseSchedule(config.diffusion_steps)
        self.loss_fn = nn.MSELoss()
        self.pad = (SIDE - info.image_size) // 2
        self.mean, self.std = info.mean, info.std
        self._classifier: nn.Module | None = None
        self._real_features: np.ndarray | None = None

    # ------------------------------------------------------------------ images
    def to_model_space(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised dataset images -> [-1, 1], padded to SIDE with the background (-1)."""
        unit = (x * self.std + self.mean) * 2.0 - 1.0
        p = self.pad
        return nn.functional.pad(unit, (p, p, p, p), value=-1.0)

    def to_data_space(self, x: torch.Tensor) -> torch.Tensor:
        """Model-space images -> the dataset's normalisation and size (what the classifier reads)."""
        p = self.pad
        unit = ((x[..., p : SIDE - p, p : SIDE - p] + 1.0) / 2.0).clamp(0.0, 1.0)
        return (unit - self.mean) / self.std

    # ------------------------------------------------------------------ training
    def batch(
        self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[Any, Any]:
        """``((x_t, t), noise)``: a timestep and Gaussian noise per image, drawn on the CPU."""
        x0 = self.to_model_space(x)
        t = torch.randint(0, self.schedule.steps, (len(x0),), generator=generator).to(x0.device)
        noise = torch.randn(x0.shape, generator=generator).to(x0.device, x0.dtype)
        return (self.schedule.add_noise(x0, t, noise), t), noise

    @torch.no_grad()
    def evaluate_sums(
        self,
        model: nn.Module,
        dataset: Dataset,
        *,
        batch_size: int = 512,
        device: torch.device | str = "cpu",
        channels_last: bool = False,
    ) -> dict[str, float]:
        """Summed noise MSE (per image) over ``dataset`` with the fixed evaluation draws."""
        generator = torch.Generator().manual_seed(_EVAL_SEED)
        was_training = model.training
        model.eval()
        loss_sum, total = 0.0, 0
        try:
            for x, y in iterate_batches(dataset, batch_size):
                inputs, noise = self.batch(
                    prepare_inputs(x, torch.device(device), channels_last), y, generator
                )
                loss_sum += float(self.loss_fn(model(*inputs), noise)) * len(noise)
                total += len(noise)
        finally:
            model.train(was_training)
        return {"loss_sum": loss_sum, "total": total}

    def evaluation_means(self, sums: dict[str, float]) -> dict[str, float]:
        if sums["total"] == 0:
            raise ValueError("cannot evaluate on an empty dataset")
        return {"loss": sums["loss_sum"] / sums["total"]}

    # ------------------------------------------------------------------ scoring
    def due(self, epoch: int) -> bool:
        """Whether 0-based ``epoch`` is scored: every ``score_every``-th and the last (None: last only)."""
        every, last = self.config.score_every, epoch + 1 == self.config.epochs
        if every == 0:
            return False
        return last or (every is not None and (epoch + 1) % every == 0)

    def classifier_root(self, out_dir: Path | None) -> Path | None:
        """The FD classifier's cache: ``fd_cache``, else the run folder's parent, else none."""
        if self.config.fd_cache is not None:
            return Path(self.config.fd_cache)
        return out_dir.parent if out_dir is not None else None

    def sample(self, model: nn.Module, count: int) -> torch.Tensor:
        """``count`` model-space samples from the run's fixed sampling seed (the same every epoch);
        ``eval_batch_size`` of them walk the T steps together."""
        device = next(model.parameters()).device
        generator = torch.Generator().manual_seed(stream_seed(self.config.seed, "ddpm-samples"))
        was_training = model.training
        model.eval()
        try:
            chunks = []
            for start in range(0, count, self.config.eval_batch_size):
                n = min(self.config.eval_batch_size, count - start)
                chunks.append(
                    ancestral_sample(model, self.schedule, (n, 1, SIDE, SIDE), generator, device=device)
                )
        finally:
            model.train(was_training)
        return torch.cat(chunks)

    def score(self, model: nn.Module, epoch: int, out_dir: Path | None) -> dict[str, Any]:
        """At a due epoch: keep the model (``out_dir``) and, unless ``score_samples`` is 0, score it."""
        unscored: dict[str, Any] = dict.fromkeys(SCORE_FIELDS)
        if not self.due(epoch):
            return unscored
        if out_dir is not None:
            plain = getattr(model, "_orig_mod", model)  # torch.compile's wrapper prefixes the keys
            save_checkpoint(
                {"epoch": epoch + 1, "model": plain.state_dict()}, out_dir / model_snapshot(epoch + 1)
            )
        if self.config.score_samples == 0:
            return unscored
        return self.score_now(model, epoch, out_dir, self.config.score_samples)

    def score_now(self, model: nn.Module, epoch: int, out_dir: Path | None, count: int) -> dict[str, Any]:
        """FD of ``count`` samples of ``model`` (after 0-based ``epoch``), its floor, and the grid."""
        if count < 2:
            raise GreenpropError(f"samples={count} must be >= 2 (FD needs a covariance)")
        classifier, real = self._reference(out_dir)
        samples = self.sample(model, count)
        features = classifier_features(classifier, self.to_data_space(samples))
        grid = None
        if out_dir is not None:
            grid = f"samples_epoch{epoch + 1}.png"
            save_grid((samples[:_GRID] + 1.0) / 2.0, out_dir / grid)
        return {
            "fd": frechet_distance(features, real),
            "fd_samples": count,
            "fd_floor": self._real_floor(count, classifier, real),
            "sample_grid": grid,
        }

    def _reference(self, out_dir: Path | None) -> tuple[nn.Module, np.ndarray]:
        """The FD classifier (loaded or trained once) and the test split's features."""
        if self._classifier is None or self._real_features is None:
            self._classifier = load_or_train_classifier(self.config, self.classifier_root(out_dir), self.data)
            self._real_features = classifier_features(self._classifier, self.data.test.inputs)
        return self._classifier, self._real_features

    def _real_floor(self, count: int, classifier: nn.Module, real: np.ndarray) -> float | None:
        """FD of ``count`` real training images (a fixed draw) to the test split: what a
        generator equal to the data would score with this many samples (the finite-sample
        bias). None when the training split has fewer images."""
        train = self.data.train.inputs
        if count > len(train):
            return None
        pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(_EVAL_SEED))[:count]
        return frechet_distance(classifier_features(classifier, train[pick]), real)

    # ------------------------------------------------------------------ reporting
    def describe(self, record: dict[str, Any]) -> list[str]:
        parts = [f"test loss {record['loss']:.4f}"]
        if record.get("fd") is not None:
            floor = record.get("fd_floor")
            shown = "n/a" if floor is None else f"{floor:.3f}"
            parts.append(f"FD {record['fd']:.3f} ({record['fd_samples']} samples, real-data floor {shown})")
        return parts

    def summary(self, history: list[dict[str, Any]]) -> dict[str, Any]:
        scored = [r["fd"] for r in history if r.get("fd") is not None]
        last = history[-1]
        return {
            "fd": last.get("fd"),
            "fd_samples": last.get("fd_samples"),
            "fd_floor": last.get("fd_floor"),
            "best_fd": min(scored) if scored else None,
            "test_loss": history[-1]["loss"],
            "best_test_loss": min(r["loss"] for r in history),
        }
