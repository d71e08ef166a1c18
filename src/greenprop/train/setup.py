"""What a run is built from: its device, its zoo model, and preloaded data checked against its config."""

from __future__ import annotations

import torch
from torch import nn

from greenprop import data as gp_data
from greenprop import models as gp_models
from greenprop.errors import GreenpropError
from greenprop.models.loading import load_progress
from greenprop.train.config import TrainConfig

__all__ = ["check_preloaded", "create_model", "resolve_device"]

#: Device types a run can train on (``meta`` has no data, so no loss to print).
TRAINING_DEVICES = ("cpu", "cuda", "mps", "xpu")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise GreenpropError(f"device={name!r} is not a valid torch device") from err
    if device.type not in TRAINING_DEVICES:
        raise GreenpropError(
            f"device={name!r} cannot train a model (it holds no data); "
            f"use one of {', '.join(TRAINING_DEVICES)}"
        )
    if device.type == "cuda" and not torch.cuda.is_available():
        raise GreenpropError(f"device={name!r} requested but CUDA is not available")
    return device


def create_model(config: TrainConfig, info: gp_data.DatasetInfo) -> nn.Module:
    """The zoo model ``config`` names, shaped for the dataset ``info`` describes.

    A pretrained model's loading shows progress only if the run does (``--no-progress``).
    """
    with load_progress(config.progress):
        return gp_models.create(
            config.model,
            num_classes=info.num_classes,
            in_channels=info.in_channels,
            image_size=info.image_size,
            width=config.width,
            dropout=config.dropout,
            modality=info.modality,
        )


def check_preloaded(data: gp_data.DatasetPair, config: TrainConfig) -> None:
    """Preloaded data must be what the config describes, or metrics.json would lie."""
    if data.info.name != config.dataset.lower().replace("_", "-"):
        raise GreenpropError(f"preloaded data is {data.info.name!r} but dataset={config.dataset!r}")
    for name, split, wanted in (
        ("subset", data.train, config.subset),
        ("test_subset", data.test, config.test_subset),
    ):
        if wanted is not None and len(split) != wanted:
            raise GreenpropError(f"preloaded data has {len(split)} examples but {name}={wanted}")
