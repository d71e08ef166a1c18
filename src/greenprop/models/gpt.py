"""A small GPT-2-style decoder for from-scratch causal-LM runs on a CPU (``gpt2-tiny``).

Token and learned position embeddings, pre-norm decoder blocks (the ViT's
:class:`~greenprop.models.vit.Block` with a causal mask: explicit ``nn.Linear`` layers,
so ssProp and VCAS can swap them), a final LayerNorm and an output ``head`` Linear
whose weight is the token embedding's (tied, as in GPT-2), which keeps a 49,152-token
vocabulary affordable. Attention mixes tokens within a sample only, so VCAS's
per-sample row assumption holds.
"""

from __future__ import annotations

import torch
from torch import nn

from greenprop.errors import GreenpropError
from greenprop.models.vit import Block


class GPT2Tiny(nn.Module):
    """``forward(ids)``: int ``(B, L)`` token ids -> next-token logits ``(B, L, vocab)``.

    Defaults (dim 128, depth 4, 4 heads, MLP ratio 4) with the SmolLM2 vocabulary
    (49,152) give 7.1M parameters, 6.3M of them the tied embedding.

    Args:
        num_classes: the vocabulary size (outputs of ``head``).
        image_size: the longest sequence (positions learned); a text dataset's length.
        in_channels: ignored (the zoo passes the data's; token data has 2 rows).
        dim, depth, heads, mlp_ratio: the decoder's width, blocks, heads, MLP width ratio.
        dropout: dropout on the embeddings and just before ``head``.
    """

    vcas_block_types = (Block,)

    def __init__(
        self,
        *,
        num_classes: int,
        image_size: int,
        in_channels: int = 2,
        dim: int = 128,
        depth: int = 4,
        heads: int = 4,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.max_len = image_size
        self.embed = nn.Embedding(num_classes, dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, image_size, dim))
        self.embed_dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio, causal=True) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(dim, num_classes, bias=False)
        self._init_weights()
        self.head.weight = self.embed.weight  # tied: one (vocab, dim) matrix

    def _init_weights(self) -> None:
        """GPT-2's init: normal (std 0.02) for embeddings and Linears, zero biases."""
        nn.init.normal_(self.embed.weight, std=0.02)
        nn.init.normal_(self.pos_embed, std=0.02)
        for module in self.blocks.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.ndim != 2 or ids.dtype.is_floating_point or ids.dtype.is_complex:
            raise GreenpropError(
                f"gpt2-tiny takes integer token ids (B, L), got {ids.dtype} of shape {tuple(ids.shape)}"
            )
        if ids.shape[1] > self.max_len:
            raise GreenpropError(f"gpt2-tiny was built for {self.max_len} tokens, got {ids.shape[1]}")
        x = self.embed_dropout(self.embed(ids) + self.pos_embed[:, : ids.shape[1]])
        for block in self.blocks:
            x = block(x)
        return self.head(self.dropout(self.norm(x)))
