"""Tiled denoising for canvases larger than a model's training size (MultiDiffusion-style; Bar-Tal et
al. 2023), as a denoiser wrapper over the whole canvas.

The canvas is covered by overlapping tiles. At every call (every sampler step, every stage) the
state is cut into its tiles, the tiles run through the denoiser as one batch (or chunks of
`max_tiles`), and each canvas pixel gets the weighted mean of the estimates of the tiles that
cover it:

    D(x) = sum_t W_t * paste_t(D(crop_t(x))) / sum_t W_t

This is the least-squares fusion of MultiDiffusion (its Eq. 5 with the per-tile weights as the
W_i), applied to the denoiser's x0-prediction rather than to the next state: every sampler of
`edify.core.samplers` is affine in D per step, so fusing D fuses the step. Because the tiles are
reconciled at every step, the sampler integrates one canvas; no seam is fixed into the state.

Laplacian stages: tiles are laid out once in full-resolution pixels (sizes multiples of `multiple`,
which must make every stage's tile fit the network; starts multiples of `align`, at least 2^(K-1) so
that every stage's tile starts on a pixel); a stage-j state uses the same tiles divided by 2^j, and
the overlap / 2^j. Weights W_t are 1 (`feather=False`) or linear ramps across
the overlap on every side that borders another tile (`feather=True`: a tile's unreliable border,
where its network saw no context, counts least); sides on the canvas edge keep weight 1.

With one tile covering the canvas the wrapper calls the denoiser itself (bit for bit); tiles that
cover the canvas once (no overlap) with a pointwise denoiser also reproduce it exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from edify.conditioning import Cond
from edify.core.precond import Denoiser
from edify.core.repaint import _one_stage
from edify.errors import EdifyError


@dataclass(frozen=True)
class Tile:
    """A window of the canvas, in pixels of the resolution it is given at."""

    top: int
    left: int
    height: int
    width: int

    def at(self, stage: int) -> Tile:
        """The same window on a stage-j state (every field / 2^j)."""
        return Tile(self.top >> stage, self.left >> stage, self.height >> stage, self.width >> stage)

    def crop(self, x: Tensor) -> Tensor:
        return x[..., self.top:self.top + self.height, self.left:self.left + self.width]


TileDenoisers = Callable[[list[Tile], int], Denoiser]


def tile_starts(size: int, tile: int, overlap: int, align: int = 1) -> list[int]:
    """Starts of the fewest tiles of side `tile` overlapping by at least about `overlap` that cover
    0..size, spread evenly, each a multiple of `align` (the overlap can shrink by < align)."""
    if tile >= size:
        return [0]
    n = math.ceil((size - overlap) / (tile - overlap))
    span = (size - tile) // align  # in units of `align`; size - tile is a multiple of it
    return [i * span // (n - 1) * align for i in range(n)]


def check_tiling(height: int, width: int, tile: int, overlap: int, multiple: int = 1) -> None:
    """One-line EdifyError for a tiling that cannot run."""
    if not isinstance(tile, int) or tile <= 0 or tile % multiple:
        raise EdifyError(f"the tile size must be a positive multiple of {multiple} px for this model, got {tile}")
    if not isinstance(overlap, int) or overlap < 0:
        raise EdifyError(f"the tile overlap must be an integer >= 0 px, got {overlap}")
    if overlap >= tile:
        raise EdifyError(f"the tile overlap ({overlap} px) must be smaller than the tile ({tile} px)")
    if height % multiple or width % multiple:
        raise EdifyError(f"the canvas is {height}x{width}; tiling needs sides that are multiples of {multiple}")


def make_tiles(height: int, width: int, tile: int, overlap: int, multiple: int = 1, align: int = 1) -> list[Tile]:
    """Row-major tiles of at most tile x tile covering a height x width canvas (full resolution)."""
    check_tiling(height, width, tile, overlap, multiple)
    th, tw = min(tile, height), min(tile, width)
    return [Tile(top, left, th, tw) for top in tile_starts(height, tile, overlap, align)
            for left in tile_starts(width, tile, overlap, align)]


def tile_weight(t: Tile, height: int, width: int, overlap: int, feather: bool) -> Tensor:
    """W_t [h, w]: 1, or linear ramps (i + 1/2) / overlap across the overlap on interior sides."""
    def profile(start: int, length: int, size: int) -> Tensor:
        w = torch.ones(length)
        if feather and overlap > 0:
            i = torch.arange(length, dtype=torch.float32) + 0.5
            if start > 0:
                w = torch.minimum(w, i / overlap)
            if start + length < size:
                w = torch.minimum(w, i.flip(0) / overlap)
        return w
    return profile(t.top, t.height, height)[:, None] * profile(t.left, t.width, width)[None, :]


class TiledDenoiser(nn.Module):
    """A denoiser over a (height x width, full resolution) canvas that runs another on its tiles.

    denoiser: the denoiser every tile batch goes through; or `tile_denoisers(tiles, rows)`, which
    builds the denoiser of one batch from its full-resolution tiles (in batch order, each holding
    `rows` consecutive samples), for denoisers that carry per-pixel inputs such as a ControlNet's
    control image, which must be cropped like the state. max_tiles: tiles per batched call
    (None = all).
    """

    def __init__(self, denoiser: Denoiser | None, height: int, width: int, tile: int, overlap: int,
                 multiple: int = 1, align: int = 1, feather: bool = True, max_tiles: int | None = None,
                 tile_denoisers: TileDenoisers | None = None):
        super().__init__()
        if (denoiser is None) == (tile_denoisers is None):
            raise EdifyError("a tiled denoiser takes a denoiser or tile_denoisers, exactly one")
        if max_tiles is not None and max_tiles < 1:
            raise EdifyError(f"max_tiles must be >= 1, got {max_tiles}")
        if multiple % align:
            raise EdifyError(f"the tile alignment {align} must divide the size multiple {multiple}")
        self.tiles = make_tiles(height, width, tile, overlap, multiple, align)
        self.denoiser, self.tile_denoisers = denoiser, tile_denoisers
        self.size, self.overlap, self.feather, self.max_tiles = (height, width), overlap, feather, max_tiles
        self._weights: dict = {}

    def denoiser_for(self, tiles: list[Tile], rows: int) -> Denoiser:
        return self.denoiser if self.tile_denoisers is None else self.tile_denoisers(tiles, rows)

    def weights(self, stage: int, device) -> list[Tensor]:
        key = (stage, device)
        if key not in self._weights:
            H, W = (s >> stage for s in self.size)
            self._weights[key] = [tile_weight(t.at(stage), H, W, self.overlap >> stage, self.feather).to(device)
                                  for t in self.tiles]
        return self._weights[key]

    def forward(self, x: Tensor, sigma: Tensor | float, cond: Cond | None = None,
                stage: Tensor | int | None = None) -> Tensor:
        j = _one_stage(stage, x)
        H, W = (s >> j for s in self.size)
        if tuple(x.shape[-2:]) != (H, W):
            raise EdifyError(f"a stage-{j} state of this {self.size[0]}x{self.size[1]} canvas is {H}x{W}, "
                             f"got {tuple(x.shape[-2:])}")
        if len(self.tiles) == 1:
            return self.denoiser_for(self.tiles, x.shape[0])(x, sigma, cond, stage)
        B = x.shape[0]
        sigma = torch.as_tensor(sigma, device=x.device).reshape(-1).expand(B)
        stage_t = torch.as_tensor(j if stage is None else stage, device=x.device).reshape(-1).expand(B)
        out, total = torch.zeros_like(x, dtype=torch.float32), torch.zeros(H, W, device=x.device)
        chunk = self.max_tiles or len(self.tiles)
        weights = self.weights(j, x.device)
        for first in range(0, len(self.tiles), chunk):
            tiles = self.tiles[first:first + chunk]
            n = len(tiles)
            crops = torch.cat([t.at(j).crop(x) for t in tiles])  # tile-major: rows of tile i together
            D = self.denoiser_for(tiles, B)(crops, sigma.repeat(n), None if cond is None else Cond.cat([cond] * n),
                                            stage_t.repeat(n))
            for i, t in enumerate(tiles):
                w, s = weights[first + i], t.at(j)
                s.crop(out).add_(w * D[i * B:(i + 1) * B].float())  # paste_t(W_t D_t)
                s.crop(total).add_(w)
        return out / total
