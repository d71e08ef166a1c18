"""A plain multi-layer perceptron: the cheapest baseline, all nn.Linear."""

from __future__ import annotations

import torch
from torch import nn

from greenprop.models.activations import make_activation


class MLP(nn.Module):
    """Flatten -> [Linear(hidden) -> activation (ReLU)] x depth -> Dropout -> ``head``."""

    def __init__(
        self,
        *,
        num_classes: int = 10,
        in_channels: int = 1,
        image_size: int = 28,
        hidden: int = 256,
        depth: int = 2,
        dropout: float = 0.0,
        activation: str = "relu",
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        features = in_channels * image_size * image_size
        for _ in range(depth):
            layers += [nn.Linear(features, hidden), make_activation(activation)]
            features = hidden
        self.features = nn.Sequential(*layers)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(x)))
