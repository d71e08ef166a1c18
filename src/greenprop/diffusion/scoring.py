"""Sample quality without downloads: FD on a greenprop classifier's features, and PNG grids.

No Inception weights ship offline, so the feature extractor is the zoo ``cnn`` trained
on the real training data of the run's dataset (3 epochs, seed 0, the run's training
subset) by greenprop's own trainer. It is trained once and cached in a folder named by
those settings (``fd-classifier-<dataset>-<subset>``), which a comparison shares between
all its runs; a later run loads it. Its penultimate activations (the 128 ReLU units
before ``head``) are the features.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from greenprop import data as gp_data
from greenprop.errors import GreenpropError
from greenprop.train.checkpoint import load_checkpoint, write_bytes
from greenprop.train.config import TrainConfig

__all__ = ["classifier_config", "classifier_features", "load_or_train_classifier", "save_grid"]

CLASSIFIER_EPOCHS = 3
CLASSIFIER_SEED = 0


def classifier_config(config: TrainConfig) -> TrainConfig:
    """The FD classifier's run: zoo ``cnn`` on the real data of ``config``'s dataset and subset."""
    return TrainConfig(
        model="cnn",
        dataset=config.dataset,
        data_dir=config.data_dir,
        subset=config.subset,
        epochs=CLASSIFIER_EPOCHS,
        seed=CLASSIFIER_SEED,
        device=config.device,
        progress=False,
    )


def classifier_dir(config: TrainConfig, root: Path) -> Path:
    """Where the classifier for ``config`` is cached under ``root`` (named by its settings)."""
    return root / f"fd-classifier-{config.dataset}-{config.subset or 'all'}"


def load_or_train_classifier(config: TrainConfig, root: Path | None, data: gp_data.DatasetPair) -> nn.Module:
    """The FD classifier of ``config``'s run: loaded from the cache, else trained and cached.

    ``data`` is the run's (unpadded, normalised) data; the classifier trains on its
    training split. An interrupted training resumes; a cache written with other
    settings is an error naming the folder. ``root`` None trains without caching.
    """
    from greenprop.train.trainer import CHECKPOINT, METRICS, Trainer

    wanted = classifier_config(config)
    if root is None:
        trainer = Trainer(wanted, None, data=data)
        trainer.fit()
        return trainer.model.eval()
    folder = classifier_dir(config, root)
    metrics_path = folder / METRICS
    finished = False
    if metrics_path.exists():
        try:
            saved = json.loads(metrics_path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise GreenpropError(f"{metrics_path} is unreadable ({err}); remove {folder}") from err
        if TrainConfig.from_dict(saved["config"]).differences(wanted):
            raise GreenpropError(
                f"{folder} holds another FD classifier; remove it or pass another --fd-cache"
            )
        finished = bool(saved.get("complete"))
    if not finished:
        resume = (folder / CHECKPOINT).exists()
        trainer = Trainer(wanted, folder, resume=resume, overwrite=not resume, data=data)
        trainer.fit()
        model = trainer.model
    else:
        from greenprop.train.setup import create_model

        torch.manual_seed(wanted.seed)
        model = create_model(wanted, data.info)
        model.load_state_dict(load_checkpoint(folder / CHECKPOINT, required=("model",))["model"])
    return model.eval()


@torch.no_grad()
def classifier_features(classifier: nn.Module, images: torch.Tensor, batch_size: int = 512) -> np.ndarray:
    """Penultimate activations of the zoo ``cnn`` (``fc``'s output) for normalised images, float64."""
    device = next(classifier.parameters()).device
    parts = []
    for start in range(0, len(images), batch_size):
        x = images[start : start + batch_size].to(device)
        parts.append(classifier.fc(classifier.features(x)).double().cpu())
    return torch.cat(parts).numpy()


def save_grid(images: torch.Tensor, path: Path, columns: int = 8) -> None:
    """Grey images ``(N, 1, H, W)`` in [0, 1] as one PNG grid, written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n, _, h, w = images.shape
    rows = -(-n // columns)
    grid = np.ones((rows * (h + 2), columns * (w + 2)), dtype=np.float32)
    for i, image in enumerate(images[:, 0].clamp(0, 1).cpu().numpy()):
        r, c = divmod(i, columns)
        grid[r * (h + 2) + 1 : r * (h + 2) + 1 + h, c * (w + 2) + 1 : c * (w + 2) + 1 + w] = image
    buffer = io.BytesIO()
    plt.imsave(buffer, grid, cmap="gray", vmin=0.0, vmax=1.0, format="png")
    write_bytes(buffer.getvalue(), path)
