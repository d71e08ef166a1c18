"""A small DDPM U-Net: residual GroupNorm blocks conditioned on a sinusoidal time embedding.

Sized like ssProp's diffusion code (32x32 grey Fashion-MNIST, 16 base channels): three
resolutions (32, 16, 8 pixels) with 16, 32 and 32 channels, one residual block per
resolution on each side and two in the middle. GroupNorm, not BatchNorm, so every block
acts on each sample separately (VCAS can sample its rows). Skip connections are taken
from the blocks' outputs and concatenated outside the blocks: the only way gradient
enters a block's layers is through that block's output.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of integer timesteps ``t`` (B,) -> (B, dim), as in the Transformer/DDPM.

    Frequencies fall geometrically from 1 to 1/10000 over ``dim // 2`` sines and as many
    cosines (a zero column pads an odd ``dim``).
    """
    half = dim // 2
    freqs = torch.exp(-math.log(10_000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = t.to(torch.float32)[:, None] * freqs[None, :]
    emb = torch.cat([angles.sin(), angles.cos()], dim=1)
    return nn.functional.pad(emb, (0, dim % 2))


def _groups(channels: int) -> int:
    """GroupNorm groups: 8 where the channels divide, else the largest divisor below 8."""
    return next(g for g in (8, 4, 2, 1) if channels % g == 0)


class ResBlock(nn.Module):
    """GroupNorm -> SiLU -> conv, plus the projected time embedding, GroupNorm -> SiLU -> conv; residual."""

    def __init__(self, in_channels: int, out_channels: int, time_dim: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(in_channels), in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time = nn.Linear(time_dim, out_channels)
        self.norm2 = nn.GroupNorm(_groups(out_channels), out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.act = nn.SiLU()
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(self.act(self.norm1(x)))
        h = h + self.time(self.act(temb))[:, :, None, None]
        h = self.conv2(self.act(self.norm2(h)))
        return h + self.skip(x)


class DDPMUNet(nn.Module):
    """Predicts the noise in ``x_t`` at timestep ``t``: ``model(x_t, t)`` -> same shape as ``x_t``.

    Args:
        in_channels: image channels (1 for grey).
        width: base channels (16 as in ssProp's code); the levels have
            ``width * m`` for ``m`` in ``channel_mults``.
        channel_mults: one entry per resolution; each level after the first halves the side,
            so the image side must be divisible by ``2 ** (len(channel_mults) - 1)``.
        num_classes, dropout: accepted for the zoo's common signature; unused (the model
            is unconditional and has no dropout).

    ``vcas_block_types`` tells VCAS which modules are the blocks it samples after.
    """

    vcas_block_types: tuple[type[nn.Module], ...] = (ResBlock,)

    def __init__(
        self,
        *,
        in_channels: int = 1,
        width: int = 16,
        channel_mults: tuple[int, ...] = (1, 2, 2),
        num_classes: int = 10,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        del num_classes, dropout
        self.width = width
        self.levels = len(channel_mults)
        time_dim = 4 * width
        self.time_mlp = nn.Sequential(nn.Linear(width, time_dim), nn.SiLU(), nn.Linear(time_dim, time_dim))
        self.stem = nn.Conv2d(in_channels, width, 3, padding=1)
        channels = [width * m for m in channel_mults]
        self.down_blocks = nn.ModuleList()
        self.downsamples = nn.ModuleList()
        previous = width
        for i, ch in enumerate(channels):
            self.down_blocks.append(ResBlock(previous, ch, time_dim))
            if i + 1 < len(channels):
                self.downsamples.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))
            previous = ch
        self.mid_blocks = nn.ModuleList([ResBlock(previous, previous, time_dim) for _ in range(2)])
        self.up_blocks = nn.ModuleList()
        self.upsamples = nn.ModuleList()
        for i, ch in reversed(list(enumerate(channels))):
            self.up_blocks.append(ResBlock(previous + ch, ch, time_dim))
            if i > 0:
                self.upsamples.append(nn.Conv2d(ch, ch, 3, padding=1))  # after nearest 2x upsampling
            previous = ch
        self.out_norm = nn.GroupNorm(_groups(previous), previous)
        self.act = nn.SiLU()
        self.head = nn.Conv2d(previous, in_channels, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        factor = 2 ** (self.levels - 1)
        if x.shape[-1] % factor or x.shape[-2] % factor:
            raise ValueError(f"ddpm-unet needs image sides divisible by {factor}, got {tuple(x.shape[-2:])}")
        temb = self.time_mlp(timestep_embedding(t, self.width))
        h = self.stem(x)
        skips = []
        for i, block in enumerate(self.down_blocks):
            h = block(h, temb)
            skips.append(h)
            if i < len(self.downsamples):
                h = self.downsamples[i](h)
        for block in self.mid_blocks:
            h = block(h, temb)
        for i, block in enumerate(self.up_blocks):
            h = block(torch.cat([h, skips.pop()], dim=1), temb)
            if i < len(self.upsamples):
                h = self.upsamples[i](nn.functional.interpolate(h, scale_factor=2.0, mode="nearest"))
        return self.head(self.act(self.out_norm(h)))
