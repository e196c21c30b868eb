"""Embedders of the U-Net's inputs other than the image (section 3.1).

- `NoiseStageEmbedding`: Fourier features of the preconditioned noise level c_noise plus a learned
  embedding of the Laplacian stage (resolution) index, mapped to one vector per sample that drives
  every residual block's scale and shift.
- `ConditionEmbedder`: the cross-attention token sequence = projected text tokens, one camera pitch
  token, one depth-of-field token and one media-type token. Index -1 (null) selects a learned null
  embedding for that field, so the key sequence always holds the three always-valid camera/media
  tokens and is never fully masked.
- `PositionEncoding`: a learnable spatial encoding on the 1:1 token grid at the reference resolution,
  resized by interpolation to the grid of any aspect-ratio bucket or lower Laplacian stage.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from edify.conditioning import DOF_NAMES, PITCH_NAMES, Cond
from edify.errors import EdifyError


class FourierFeatures(nn.Module):
    """Random Fourier features sqrt(2) cos(2 pi (f c + phi)) of a scalar per sample (Tancik et al. 2020).

    Frequencies f ~ N(0, 1) and phases phi ~ U(0, 1) are fixed at construction from a fixed seed and
    stored as buffers, so a checkpoint reproduces them exactly.
    """

    def __init__(self, channels: int, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("freqs", torch.randn(channels, generator=g))
        self.register_buffer("phases", torch.rand(channels, generator=g))

    def forward(self, c: Tensor) -> Tensor:
        arg = c.float()[:, None] * self.freqs[None] + self.phases[None]
        return math.sqrt(2.0) * torch.cos(2 * math.pi * arg)


class NoiseStageEmbedding(nn.Module):
    """emb = MLP(Fourier(c_noise)) + E_stage[stage]: the per-sample vector of noise level and stage."""

    def __init__(self, fourier_dim: int, emb_dim: int, num_stages: int):
        super().__init__()
        self.fourier = FourierFeatures(fourier_dim)
        self.mlp = nn.Sequential(nn.Linear(fourier_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.stage = nn.Embedding(num_stages, emb_dim)

    def forward(self, c_noise: Tensor, stage: Tensor) -> Tensor:
        return self.mlp(self.fourier(c_noise)) + self.stage(stage)


class CategoricalToken(nn.Module):
    """One token per sample from a categorical field with `num` classes; index -1 = learned null."""

    def __init__(self, num: int, dim: int):
        super().__init__()
        self.num = num
        self.table = nn.Embedding(num + 1, dim)  # row `num` is the null embedding

    def forward(self, idx: Tensor | None, batch: int, device: torch.device) -> Tensor:
        if idx is None:
            idx = torch.full((batch,), self.num, dtype=torch.long, device=device)
        else:
            idx = torch.where(idx < 0, self.num, idx)
        return self.table(idx)[:, None]  # [B, 1, dim]


EXTRA_TOKENS = 3  # pitch, depth of field, media type: always present, after the text tokens
POOLED_TOKENS = 1 + EXTRA_TOKENS  # the pooled vector: mean text token, then the three extra tokens


class ConditionEmbedder(nn.Module):
    """Cond -> (tokens [B, L + 3, context_dim], mask [B, L + 3] bool) for cross-attention (section 3.1).

    Token order: text tokens (L of them, masked by Cond.text_mask), pitch, depth of field, media type.
    A Cond with no text gives L = 0; a null text row (all-False mask) attends only to the last three.

    With `emb_dim` set, `pooled(tokens, mask)` also maps the condition to one [B, emb_dim] vector for
    the noise embedding: the masked mean of the text tokens (zero for a null text) and the three
    extra tokens, concatenated, through a zero-initialised linear map.
    """

    def __init__(self, text_dim: int, context_dim: int, num_media_types: int, emb_dim: int | None = None):
        super().__init__()
        self.text_dim = text_dim
        self.text_proj = nn.Linear(text_dim, context_dim)
        self.pitch = CategoricalToken(len(PITCH_NAMES), context_dim)
        self.dof = CategoricalToken(len(DOF_NAMES), context_dim)
        self.media = CategoricalToken(num_media_types, context_dim)
        self.norm = nn.LayerNorm(context_dim)
        self.to_emb = None
        if emb_dim is not None:
            self.to_emb = nn.Linear(POOLED_TOKENS * context_dim, emb_dim)
            nn.init.zeros_(self.to_emb.weight)
            nn.init.zeros_(self.to_emb.bias)

    def pooled(self, tokens: Tensor, mask: Tensor) -> Tensor:
        """[B, emb_dim]: the vector of the condition (tokens and mask as `forward` returns them)."""
        text, extra = tokens[:, :-EXTRA_TOKENS], tokens[:, -EXTRA_TOKENS:]
        keep = mask[:, :-EXTRA_TOKENS, None].to(tokens.dtype)
        mean = (text * keep).sum(1) / keep.sum(1).clamp(min=1.0)
        return self.to_emb(torch.cat([mean, extra.flatten(1)], dim=1))

    def forward(self, cond: Cond | None, batch: int, device: torch.device) -> tuple[Tensor, Tensor]:
        cond = Cond() if cond is None else cond
        if cond.batch_size is not None and cond.batch_size != batch:
            raise EdifyError(f"condition batch size must match the image batch {batch}, got {cond.batch_size}")
        extra = [self.pitch(cond.pitch, batch, device), self.dof(cond.dof, batch, device),
                 self.media(cond.media, batch, device)]
        parts, masks = [], []
        if cond.text is not None:
            if cond.text.dim() != 3 or cond.text.shape[-1] != self.text_dim:
                raise EdifyError(f"text states must be [B, L, {self.text_dim}], got {list(cond.text.shape)}")
            if cond.text_mask.shape != cond.text.shape[:2]:
                raise EdifyError(f"text mask must be [B, L] = {list(cond.text.shape[:2])}, "
                                 f"got {list(cond.text_mask.shape)}")
            parts.append(self.text_proj(cond.text))
            masks.append(cond.text_mask.to(device=device, dtype=torch.bool))
        tokens = torch.cat(parts + [e.to(parts[0].dtype) if parts else e for e in extra], dim=1)
        masks.append(torch.ones(batch, len(extra), dtype=torch.bool, device=device))
        return self.norm(tokens), torch.cat(masks, dim=1)


def embed_inputs(embed: NoiseStageEmbedding, cond_embed: ConditionEmbedder, c_noise: Tensor, stage: Tensor,
                 cond: Cond | None, batch: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """(emb [B, emb_dim], tokens, mask): the noise/stage embedding, plus the pooled condition where the
    network has that path, and the cross-attention tokens. The U-Net and its ControlNet copy share it."""
    emb = embed(c_noise, stage)
    ctx, mask = cond_embed(cond, batch, device)
    if cond_embed.to_emb is not None:
        emb = emb + cond_embed.pooled(ctx, mask).to(emb.dtype)
    return emb, ctx, mask


class PositionEncoding(nn.Module):
    """Learnable position encoding on the 1:1 grid, bicubically resized to any grid (section 3.1).

    The parameter lives on the reference grid (reference resolution / 4 after the Haar transform);
    at that grid it is returned as is, elsewhere it is interpolated. Resized copies are cached per
    (size, device, dtype) while gradients are off and the parameter is unchanged (inference).
    """

    def __init__(self, channels: int, grid: int):
        super().__init__()
        self.grid = grid
        self.weight = nn.Parameter(torch.randn(1, channels, grid, grid) * 0.02)
        self._cache: dict = {}

    def resized(self, height: int, width: int) -> Tensor:
        if (height, width) == (self.grid, self.grid):
            return self.weight
        return F.interpolate(self.weight, size=(height, width), mode="bicubic", align_corners=False)

    def forward(self, height: int, width: int) -> Tensor:
        """[1, C, height, width] encoding for a grid of that size."""
        if torch.is_grad_enabled() or torch.compiler.is_compiling():
            return self.resized(height, width)
        tag = (self.weight.device, self.weight.dtype, self.weight._version)
        if self._cache.get("tag") != tag:  # the parameter was moved or updated: drop stale copies
            self._cache = {"tag": tag}
        if (height, width) not in self._cache:
            self._cache[(height, width)] = self.resized(height, width).detach()
        return self._cache[(height, width)]
