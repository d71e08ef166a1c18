"""CIFAR-style ResNet-18: the standard benchmark network of the SSProp/GradSamp papers.

Unlike the ImageNet version it keeps full resolution at the start (3x3 stride-1 stem,
no max-pool), which suits 28-32 pixel images.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from greenprop.errors import GreenpropError

NORMS: tuple[str, ...] = ("batch", "group")


def norm_layer(kind: str, channels: int) -> nn.Module:
    """BatchNorm2d, or GroupNorm with up to 32 groups (the divisor of ``channels`` nearest 32).

    GroupNorm normalises each sample on its own, which VCAS needs: BatchNorm's backward
    mixes the samples of a batch.
    """
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(math.gcd(32, channels), channels)
    raise GreenpropError(f"norm must be one of {', '.join(NORMS)}, got {kind!r}")


class BasicBlock(nn.Module):
    """Two 3x3 conv-norm layers plus a shortcut (1x1 conv-norm when the shape changes)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, norm: str = "batch") -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, padding=1, bias=False)
        self.bn1 = norm_layer(norm, out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, padding=1, bias=False)
        self.bn2 = norm_layer(norm, out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                norm_layer(norm, out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """Stem conv(w) -> 4 stages of 2 BasicBlocks (w, 2w, 4w, 8w) -> avg pool -> ``head``.

    Stages 2-4 halve the resolution. With ``width=64``, 3 input channels and 10
    classes it has 11,173,962 parameters, the usual CIFAR ResNet-18. ``norm="group"``
    swaps every BatchNorm for GroupNorm (``resnet18-gn``), whose blocks VCAS can sample.
    """

    def __init__(
        self,
        *,
        num_classes: int = 10,
        in_channels: int = 3,
        width: int = 64,
        dropout: float = 0.0,
        norm: str = "batch",
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, padding=1, bias=False)
        self.bn1 = norm_layer(norm, width)
        widths = (width, 2 * width, 4 * width, 8 * width)
        stages = []
        channels = width
        for index, out_channels in enumerate(widths):
            stride = 1 if index == 0 else 2
            stages.append(
                nn.Sequential(
                    BasicBlock(channels, out_channels, stride, norm),
                    BasicBlock(out_channels, out_channels, 1, norm),
                )
            )
            channels = out_channels
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(channels, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.pool(x), 1)
        return self.head(self.dropout(x))
