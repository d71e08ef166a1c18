"""Building blocks shared by the token models (MLP-Mixer, ViT): patches and MLPs."""

from __future__ import annotations

import torch
from torch import nn

from greenprop.errors import GreenpropError


def default_patch_size(image_size: int) -> int:
    """4 for images of 16+ pixels, else 2, reduced to the largest value dividing the size.

    This gives 7x7 tokens for 28x28, 8x8 for 32x32 and 4x4 for 8x8 digits.
    """
    preferred = 4 if image_size >= 16 else 2
    return next(p for p in range(preferred, 0, -1) if image_size % p == 0)


class PatchEmbed(nn.Module):
    """Non-overlapping ``patch x patch`` patches -> ``dim`` features: (B, tokens, dim)."""

    def __init__(self, in_channels: int, image_size: int, patch_size: int, dim: int) -> None:
        super().__init__()
        if patch_size <= 0 or image_size % patch_size:
            raise GreenpropError(
                f"patch_size={patch_size} must be a positive divisor of image_size={image_size}"
            )
        self.num_patches = (image_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Mlp(nn.Module):
    """``fc1`` -> GELU -> ``fc2``, as explicit nn.Linear modules so layer swaps see them."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))
