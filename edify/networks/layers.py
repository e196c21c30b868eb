"""Building blocks of the U-Net (section 3.1): the 2-level Haar transform, residual blocks, resampling.

The Haar wavelet transform at the network's input and its inverse at the output (section 3.1) turn a
C x H x W image into 16C x (H/4) x (W/4) coefficients. Two Haar levels on a 4x4 pixel block form one
orthonormal 16 x 16 basis (the Kronecker square of the 1-D two-level Haar matrix), so the transform
is a grouped 4x4 convolution with stride 4 and its inverse the matching transposed convolution: a
fixed-weight op that runs under torch.compile, bf16 autocast and channels-last without special cases.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from edify.errors import EdifyError

HAAR_FACTOR = 4  # two Haar levels: each side shrinks by 2**2


def haar_matrix_1d() -> Tensor:
    """Rows of the orthonormal 1-D two-level Haar transform of 4 samples (approximation first)."""
    s = 1.0 / math.sqrt(2.0)
    return torch.tensor([
        [0.5, 0.5, 0.5, 0.5],      # level-2 approximation
        [0.5, 0.5, -0.5, -0.5],    # level-2 detail
        [s, -s, 0.0, 0.0],         # level-1 detail, left pair
        [0.0, 0.0, s, -s],         # level-1 detail, right pair
    ], dtype=torch.float64)


def haar_basis_2d() -> Tensor:
    """The 16 orthonormal 4x4 basis images of the separable 2-D two-level Haar transform: [16, 4, 4]."""
    h = haar_matrix_1d()
    # basis[k=(i,j)][y, x] = h[i, y] * h[j, x]  (outer products of the 1-D rows)
    return torch.einsum("iy,jx->ijyx", h, h).reshape(16, 4, 4)


class HaarDWT(nn.Module):
    """Orthonormal 2-level Haar analysis: [B, C, H, W] -> [B, 16C, H/4, W/4] (section 3.1).

    Output channel c*16 + k holds the coefficient of basis image k for input channel c; channel c*16
    is the (scaled) 4x4 block mean, i.e. the lowest-frequency band.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.channels = channels
        weight = haar_basis_2d().float()[:, None].repeat(channels, 1, 1, 1)  # [16C, 1, 4, 4]
        self.register_buffer("weight", weight, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        check_haar_input(x, self.channels)
        return F.conv2d(x, self.weight.to(x.dtype), stride=HAAR_FACTOR, groups=self.channels)


class HaarIDWT(nn.Module):
    """Inverse of HaarDWT: [B, 16C, h, w] -> [B, C, 4h, 4w]; exact since the basis is orthonormal."""

    def __init__(self, channels: int):
        super().__init__()
        self.channels = channels
        weight = haar_basis_2d().float()[:, None].repeat(channels, 1, 1, 1)
        self.register_buffer("weight", weight, persistent=False)

    def forward(self, y: Tensor) -> Tensor:
        if y.dim() != 4 or y.shape[1] != 16 * self.channels:
            raise EdifyError(f"Haar coefficients must be [B, {16 * self.channels}, h, w], got {list(y.shape)}")
        # The transpose of an orthonormal analysis operator is its inverse.
        return F.conv_transpose2d(y, self.weight.to(y.dtype), stride=HAAR_FACTOR, groups=self.channels)


def check_haar_input(x: Tensor, channels: int) -> None:
    if x.dim() != 4:
        raise EdifyError(f"image batch must be 4-D [B, C, H, W], got shape {list(x.shape)}")
    if x.shape[1] != channels:
        raise EdifyError(f"image must have {channels} channels, got {x.shape[1]}")
    h, w = x.shape[-2:]
    for name, side in (("height", h), ("width", w)):
        if side % HAAR_FACTOR:
            raise EdifyError(f"image {name} must be a multiple of {HAAR_FACTOR} for the Haar transform, got {side}")


class ResBlock(nn.Module):
    """Residual block with scale-shift conditioning (section 3.1; the ADM form of Dhariwal & Nichol 2021).

    h = conv(SiLU(GN(x))); h = conv(SiLU(GN(h) * (1 + scale) + shift)); out = skip(x) + h,
    where (scale, shift) is a linear map of the noise/stage embedding.
    """

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, groups: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * out_ch)
        self.norm2 = nn.GroupNorm(groups, out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
        h = torch.addcmul(shift, self.norm2(h), 1 + scale)
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class Downsample(nn.Module):
    """Halve the grid with a stride-2 3x3 convolution."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Double the grid: nearest-neighbour 2x, then a 3x3 convolution."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
