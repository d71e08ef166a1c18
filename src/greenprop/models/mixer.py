"""MLP-Mixer (Tolstikhin et al., 2021): all-MLP token model, made small for CPU."""

from __future__ import annotations

import torch
from torch import nn

from greenprop.models.tokens import Mlp, PatchEmbed, default_patch_size


class MixerBlock(nn.Module):
    """Token mixing (an MLP across patches) then channel mixing, each pre-norm residual."""

    def __init__(self, num_patches: int, dim: int, token_hidden: int, channel_hidden: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.token_mlp = Mlp(num_patches, token_hidden)
        self.norm2 = nn.LayerNorm(dim)
        self.channel_mlp = Mlp(dim, channel_hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.token_mlp(self.norm1(x).transpose(1, 2)).transpose(1, 2)
        return x + self.channel_mlp(self.norm2(x))


class MLPMixer(nn.Module):
    """Patch embedding -> ``depth`` MixerBlocks -> LayerNorm -> mean over patches -> ``head``.

    Hidden sizes follow the paper's ratios: tokens ``dim // 2``, channels ``4 * dim``.
    """

    def __init__(
        self,
        *,
        num_classes: int = 10,
        in_channels: int = 1,
        image_size: int = 28,
        dim: int = 128,
        depth: int = 4,
        patch_size: int | None = None,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if patch_size is None:
            patch_size = default_patch_size(image_size)
        self.patch_embed = PatchEmbed(in_channels, image_size, patch_size, dim)
        num_patches = self.patch_embed.num_patches
        self.blocks = nn.Sequential(
            *(MixerBlock(num_patches, dim, max(dim // 2, 1), 4 * dim) for _ in range(depth))
        )
        self.norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.blocks(self.patch_embed(x)))
        return self.head(self.dropout(x.mean(dim=1)))
