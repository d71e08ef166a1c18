"""The diffusion task: DDPM's noise-prediction objective, its test loss, and scored samples.

Images are mapped from the dataset's normalisation to [-1, 1] and padded to 32x32 with
the background value (Fashion-MNIST 28 -> 32, as in ssProp's diffusion code). A step
draws a timestep and Gaussian noise per image and regresses the noise (MSE). The test
loss uses the same fixed draws at every epoch, so its curve is comparable across epochs
and runs. At scored epochs (``score_every``) the model samples ``score_samples``
images with the ancestral sampler from a fixed seed; their FD to the test split
(:mod:`greenprop.diffusion.scoring`) and a PNG grid of the first 64 go in the record.
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
from greenprop.train.config import TrainConfig
from greenprop.train.evaluate import iterate_batches, prepare_inputs
from greenprop.train.tasks import Metric, Task

__all__ = ["SIDE", "DiffusionTask"]

#: The side of the images the U-Net sees.
SIDE = 32
#: Seed of the test loss's fixed timesteps and noise (the same for every run).
_EVAL_SEED = 20_200_619
#: Images in a sample grid.
_GRID = 64


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
        if config.score_samples < 2:
            raise GreenpropError(f"score_samples={config.score_samples} must be >= 2 (FD needs a covariance)")
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
        """``count`` model-space samples from the run's fixed sampling seed (the same every epoch)."""
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
        if not self.due(epoch):
            return {"fd": None, "sample_grid": None}
        if self._classifier is None:
            self._classifier = load_or_train_classifier(self.config, self.classifier_root(out_dir), self.data)
            self._real_features = classifier_features(self._classifier, self.data.test.inputs)
        samples = self.sample(model, self.config.score_samples)
        features = classifier_features(self._classifier, self.to_data_space(samples))
        fd = frechet_distance(features, self._real_features)
        grid = None
        if out_dir is not None:
            grid = f"samples_epoch{epoch + 1}.png"
            save_grid((samples[:_GRID] + 1.0) / 2.0, out_dir / grid)
        return {"fd": fd, "sample_grid": grid}

    # ------------------------------------------------------------------ reporting
    def describe(self, record: dict[str, Any]) -> list[str]:
        parts = [f"test loss {record['loss']:.4f}"]
        if record.get("fd") is not None:
            parts.append(f"FD {record['fd']:.3f}")
        return parts

    def summary(self, history: list[dict[str, Any]]) -> dict[str, Any]:
        scored = [r["fd"] for r in history if r.get("fd") is not None]
        return {
            "fd": history[-1].get("fd"),
            "best_fd": min(scored) if scored else None,
            "test_loss": history[-1]["loss"],
            "best_test_loss": min(r["loss"] for r in history),
        }
