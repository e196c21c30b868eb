"""Self- and cross-attention over the U-Net feature grid (section 3.1), all through fused SDPA.

An attention block treats the H x W grid as a token sequence. Self-attention relates grid positions;
cross-attention lets every position read the conditioning token sequence (text, camera, media-type
tokens, see embedders.py) under a key mask. Both call `F.scaled_dot_product_attention`, which picks
the fused flash / memory-efficient kernel on a GPU.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class Attention(nn.Module):
    """Multi-head scaled dot-product attention softmax(Q K^T / sqrt(d)) V (Vaswani et al. 2017).

    With `context_dim` set it is cross-attention: queries from the grid, keys/values from the context.
    """

    def __init__(self, dim: int, head_dim: int, context_dim: int | None = None):
        super().__init__()
        self.heads = dim // head_dim
        self.head_dim = head_dim
        self.cross = context_dim is not None
        if self.cross:
            self.q = nn.Linear(dim, dim, bias=False)
            self.kv = nn.Linear(context_dim, 2 * dim, bias=False)
        else:
            self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Linear(dim, dim)

    def _split(self, t: Tensor) -> Tensor:
        # [B, N, heads * d] -> [B, heads, N, d]
        return t.unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2)

    def forward(self, x: Tensor, context: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        """x: [B, N, dim]; context: [B, L, context_dim]; mask: [B, L] bool, True = attend."""
        if self.cross:
            q = self._split(self.q(x))
            k, v = (self._split(t) for t in self.kv(context).chunk(2, dim=-1))
            attn_mask = None if mask is None else mask[:, None, None, :]
        else:
            q, k, v = (self._split(t) for t in self.qkv(x).chunk(3, dim=-1))
            attn_mask = None
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.out(o.transpose(1, 2).flatten(2))


class TransformerBlock(nn.Module):
    """Pre-norm transformer block on the feature grid: [self-attn] -> [cross-attn] -> MLP, each residual.

    The grid is flattened to tokens once on entry and restored once on exit; on a channels-last
    tensor (GroupNorm keeps that layout) both reshapes are views, so the block adds no layout copies.
    """

    def __init__(self, dim: int, head_dim: int, context_dim: int | None, self_attention: bool,
                 mlp_ratio: int, groups: int):
        super().__init__()
        self.norm_in = nn.GroupNorm(groups, dim)
        self.proj_in = nn.Linear(dim, dim)
        self.self_attn = Attention(dim, head_dim) if self_attention else None
        self.norm_self = nn.LayerNorm(dim) if self_attention else None
        self.cross_attn = Attention(dim, head_dim, context_dim) if context_dim is not None else None
        self.norm_cross = nn.LayerNorm(dim) if context_dim is not None else None
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(approximate="tanh"),
                                 nn.Linear(mlp_ratio * dim, dim))
        self.proj_out = nn.Linear(dim, dim)

    def forward(self, x: Tensor, context: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        b, c, h, w = x.shape
        t = self.proj_in(self.norm_in(x).flatten(2).transpose(1, 2))  # [B, HW, C]
        if self.self_attn is not None:
            t = t + self.self_attn(self.norm_self(t))
        if self.cross_attn is not None:
            t = t + self.cross_attn(self.norm_cross(t), context, mask)
        t = t + self.mlp(self.norm_mlp(t))
        return x + self.proj_out(t).transpose(1, 2).unflatten(2, (h, w))
