"""A small CNN: enough convolutions for conv-backward methods to matter, cheap on CPU."""

from __future__ import annotations

import torch
from torch import nn

from greenprop.models.activations import make_activation


def conv_bn_relu(in_channels: int, out_channels: int, activation: str = "relu") -> nn.Sequential:
    """3x3 same-padding conv (no bias, BN follows) -> BatchNorm -> activation (ReLU)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        make_activation(activation),
    )


class SmallCNN(nn.Module):
    """conv(w) -> pool -> conv(2w) -> pool -> Linear(hidden) -> Dropout -> ``head``.

    ``activation`` (relu, sigmoid, tanh, gelu) follows each conv and the hidden Linear;
    ``dropout`` acts on the hidden layer's output.

    Two 2x2 max-pools take 28 -> 7, 32 -> 8 and 8 -> 2 pixels per side; the hidden
    layer's input size follows from ``image_size``, so build the model for the size
    you feed it.
    """

    def __init__(
        self,
        *,
        num_classes: int = 10,
        in_channels: int = 1,
        image_size: int = 28,
        width: int = 32,
        hidden: int = 128,
        dropout: float = 0.0,
        activation: str = "relu",
    ) -> None:
        super().__init__()
        self.features = nn.Sequential(
            conv_bn_relu(in_channels, width, activation),
            nn.MaxPool2d(2),
            conv_bn_relu(width, 2 * width, activation),
            nn.MaxPool2d(2),
            nn.Flatten(),
        )
        side = image_size // 2 // 2
        self.fc = nn.Sequential(
            nn.Linear(2 * width * side * side, hidden),
            make_activation(activation),
            nn.Dropout(dropout),
        )
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.fc(self.features(x)))
