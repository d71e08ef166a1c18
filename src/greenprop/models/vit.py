"""A tiny Vision Transformer with explicit nn.Linear layers.

Attention is written out (``qkv`` and ``proj`` Linears, then
``scaled_dot_product_attention``) instead of using nn.MultiheadAttention, whose fused
forward never calls its Linear submodules: methods such as VCAS swap the nn.Linear
modules inside each :class:`Block` and need those forwards to run.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from greenprop.errors import GreenpropError
from greenprop.models.tokens import Mlp, PatchEmbed, default_patch_size


class Attention(nn.Module):
    """Multi-head self-attention: ``qkv`` Linear -> SDPA -> ``proj`` Linear.

    ``causal``: each token attends only to itself and earlier tokens (a decoder's mask).
    Either way attention mixes tokens within a sample, never across samples.
    """

    def __init__(self, dim: int, heads: int, causal: bool = False) -> None:
        super().__init__()
        if heads <= 0 or dim % heads:
            raise GreenpropError(f"heads={heads} must be a positive divisor of dim={dim}")
        self.heads = heads
        self.causal = causal
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.heads, dim // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, tokens, head_dim)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, dim))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))`` then ``x + mlp(norm2(x))``."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 2.0, causal: bool = False) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, causal)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """Patch embedding + cls token + learned positions -> Blocks -> LayerNorm -> ``head``.

    The cls token's final state feeds the classifier. Defaults (dim 128, depth 6,
    4 heads, MLP ratio 2) give about 0.8M parameters, trainable on a CPU.
    """

    def __init__(
        self,
        *,
        num_classes: int = 10,
        in_channels: int = 1,
        image_size: int = 28,
        dim: int = 128,
        depth: int = 6,
        heads: int = 4,
        mlp_ratio: float = 2.0,
        patch_size: int | None = None,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if patch_size is None:
            patch_size = default_patch_size(image_size)
        self.patch_embed = PatchEmbed(in_channels, image_size, patch_size, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + 1, dim))
        self.blocks = nn.Sequential(*(Block(dim, heads, mlp_ratio) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(dim, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        """The usual ViT init: truncated normal (std 0.02) for positions and Linears."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(self.dropout(x[:, 0]))
