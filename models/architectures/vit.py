"""A tiny Vision Transformer (Dosovitskiy et al., 2021) for 32x32 inputs: patch 4, 4 blocks.

Attention is written out (separate q/k/v/proj Linears, matmul, softmax) rather than
with nn.MultiheadAttention, so that the ONNX graph holds what a quantizer meets in
exported transformers: MatMuls with constant weights and MatMuls of two activations.
"""

from __future__ import annotations

import torch
import torch.nn as nn

_PATCH = 4
_DIM = 96
_HEADS = 4
_DEPTH = 4
_MLP_RATIO = 4


class Attention(nn.Module):
    """Multi-head self-attention: softmax(q k^T / sqrt(d)) v per head, then a projection."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.size(0), x.size(1), x.size(2)

        def split(t: torch.Tensor) -> torch.Tensor:
            """(batch, tokens, dim) -> (batch, heads, tokens, dim / heads)."""
            return t.reshape(b, n, self.heads, d // self.heads).transpose(1, 2)

        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        attn = torch.softmax(torch.matmul(q, k.transpose(-2, -1)) * self.scale, dim=-1)
        return self.proj(torch.matmul(attn, v).transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(LN(x)), then x + MLP(LN(x)) with GELU."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, dim * mlp_ratio), nn.GELU(), nn.Linear(dim * mlp_ratio, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViTTiny(nn.Module):
    """ViT with a class token and learned position embeddings; `width` scales the embedding size.

    Raises:
        ValueError: `image_size` is not a multiple of the patch size (4).
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 10, width: float = 1.0,
                 image_size: int = 32) -> None:
        super().__init__()
        if image_size % _PATCH:
            raise ValueError(f"vit_tiny needs an image size divisible by {_PATCH}, got {image_size}")
        dim = max(_HEADS, round(_DIM * width / _HEADS) * _HEADS)  # whole heads
        tokens = (image_size // _PATCH) ** 2
        self.patch_embed = nn.Conv2d(in_channels, dim, _PATCH, _PATCH)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, tokens + 1, dim))
        self.blocks = nn.Sequential(*(Block(dim, _HEADS, _MLP_RATIO) for _ in range(_DEPTH)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # (batch, tokens, dim)
        x = torch.cat([self.cls_token.expand(x.size(0), -1, -1), x], dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])
