"""Multi-scale sliced Wasserstein distance (Karras et al. 2018, Progressive GAN, section 5).

Each image is split into a Laplacian pyramid from full resolution down to 16 px; from every level
128 local 7x7 neighbourhoods (3 x 7 x 7 = 147-d descriptors) are drawn per image, each set's
descriptors are normalised per colour channel and level, and the sliced Wasserstein distance
between the real and generated descriptor sets is estimated with random unit projections:

    SWD = E_theta [ W_1(theta . P_real, theta . P_fake) ],   W_1 of 1-d sets = mean |sorted diff|

Small distances at coarse levels mean similar large-scale structure, at fine levels similar
detail. The pyramid uses edify's own operators (2x2 average pooling `down`, nearest `up`), so the
bands are the orthogonal bands of the Laplacian process (section 2.2) rather than the Gaussian
5x5 pyramid of the original. Values are reported x 10^3, as in the original tables.

Patch positions are drawn from a generator seeded by (seed, level, image index), so the same images
always give the same descriptors, whatever the batching: identical sets have SWD exactly 0.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor

from edify.core.laplacian import down, up
from edify.errors import EdifyError
from edify.eval.features import as_batches, check_images

PATCH = 7  # neighbourhood side (7x7, section 5)
PATCHES_PER_IMAGE = 128
MIN_RESOLUTION = 16  # coarsest pyramid level
PROJECTIONS = 512  # directions per repeat
REPEATS = 4
SCALE = 1e3  # reported x 10^3


def pyramid_levels(height: int, width: int) -> int:
    """Levels from full resolution down to a 16 px short side (each level halves both sides)."""
    side = min(height, width)
    if side < MIN_RESOLUTION:
        raise EdifyError(f"SWD needs images of at least {MIN_RESOLUTION} px, got {height}x{width}")
    levels = int(math.floor(math.log2(side / MIN_RESOLUTION))) + 1
    if height % 2 ** (levels - 1) or width % 2 ** (levels - 1):
        raise EdifyError(f"SWD image sides must be multiples of {2 ** (levels - 1)}, got {height}x{width}")
    return levels


def laplacian_pyramid(x: Tensor, levels: int) -> list[Tensor]:
    """Bands x - up(down(x)) from full resolution down, then the coarsest low-pass (Edify Eq. 3)."""
    bands = []
    for _ in range(levels - 1):
        low = down(x)
        bands.append(x - up(low))
        x = low
    bands.append(x)
    return bands


def _patches(band: Tensor, seeds: list[int]) -> Tensor:
    """128 random 7x7 neighbourhoods per image: [B * 128, 3 * 7 * 7]."""
    B, C, H, W = band.shape
    out = []
    for b in range(B):
        g = torch.Generator().manual_seed(seeds[b])
        ys = torch.randint(0, H - PATCH + 1, (PATCHES_PER_IMAGE,), generator=g)
        xs = torch.randint(0, W - PATCH + 1, (PATCHES_PER_IMAGE,), generator=g)
        offs = torch.arange(PATCH)
        rows = (ys[:, None] + offs)[:, :, None].expand(-1, PATCH, PATCH)  # [P, 7, 7]
        cols = (xs[:, None] + offs)[:, None, :].expand(-1, PATCH, PATCH)
        out.append(band[b][:, rows, cols].permute(1, 0, 2, 3).reshape(PATCHES_PER_IMAGE, -1))
    return torch.cat(out)


def _patch_seed(seed: int, level: int, index: int) -> int:
    return ((seed * 1_000_003 + level) * 1_000_003 + index) % (2**63 - 1)


class SWDDescriptors:
    """Accumulates per-level patch descriptors of a stream of image batches."""

    def __init__(self, seed: int = 0):
        self.seed = seed
        self.shape: tuple[int, int] | None = None
        self.levels: list[list[Tensor]] = []
        self.count = 0

    def add(self, images: Tensor) -> None:
        check_images(images)
        x = images.detach().float().cpu()
        if self.shape is None:
            self.shape = tuple(x.shape[-2:])
            self.levels = [[] for _ in range(pyramid_levels(*self.shape))]
        elif tuple(x.shape[-2:]) != self.shape:
            raise EdifyError(f"SWD images must all share one size, got {self.shape} and {tuple(x.shape[-2:])}")
        for level, band in enumerate(laplacian_pyramid(x, len(self.levels))):
            seeds = [_patch_seed(self.seed, level, self.count + b) for b in range(x.shape[0])]
            self.levels[level].append(_patches(band, seeds))
        self.count += x.shape[0]

    def resolutions(self) -> list[int]:
        assert self.shape is not None
        return [min(self.shape) >> level for level in range(len(self.levels))]

    def finish(self) -> list[Tensor]:
        """Per level: descriptors normalised per colour channel (zero mean, unit std), float64."""
        if not self.count:
            raise EdifyError("SWD needs at least one image, got 0")
        out = []
        for chunks in self.levels:
            d = torch.cat(chunks).double().reshape(-1, 3, PATCH * PATCH)
            mean = d.mean(dim=(0, 2), keepdim=True)
            std = d.std(dim=(0, 2), keepdim=True).clamp_min(1e-8)
            out.append(((d - mean) / std).reshape(d.shape[0], -1))
        return out


def sliced_wasserstein(a: Tensor, b: Tensor, projections: int = PROJECTIONS, repeats: int = REPEATS,
                       seed: int = 0) -> float:
    """E_theta W_1(theta.a, theta.b) over random unit directions; sets cut to the same size."""
    if a.shape[1] != b.shape[1]:
        raise EdifyError(f"descriptor dimensions differ: {a.shape[1]} and {b.shape[1]}")
    if projections < 1 or repeats < 1:
        raise EdifyError(f"projections and repeats must be >= 1, got {projections} and {repeats}")
    g = torch.Generator().manual_seed(seed)
    n = min(a.shape[0], b.shape[0])
    if a.shape[0] > n:
        a = a[torch.randperm(a.shape[0], generator=g)[:n]]
    if b.shape[0] > n:
        b = b[torch.randperm(b.shape[0], generator=g)[:n]]
    total = 0.0
    for _ in range(repeats):
        theta = torch.randn(a.shape[1], projections, generator=g, dtype=torch.float64)
        theta = theta / theta.norm(dim=0, keepdim=True)  # unit directions on the sphere
        pa, _ = torch.sort(theta.T @ a.double().T, dim=1)  # [projections, n]: sorting rows is faster
        pb, _ = torch.sort(theta.T @ b.double().T, dim=1)
        total += float((pa - pb).abs().mean())  # W_1 in 1-d: mean gap of the sorted projections
    return total / repeats


def swd_from_descriptors(real: SWDDescriptors, fake: SWDDescriptors, seed: int = 0,
                         projections: int = PROJECTIONS, repeats: int = REPEATS) -> dict[str, float]:
    """{"swd_<res>": x10^3 distance per pyramid level, ..., "swd": their mean}."""
    if real.shape != fake.shape:
        raise EdifyError(f"SWD compares images of one size, got real {real.shape} and fake {fake.shape}")
    result = {}
    for res, a, b in zip(real.resolutions(), real.finish(), fake.finish()):
        result[f"swd_{res}"] = SCALE * sliced_wasserstein(a, b, projections, repeats, seed=seed + res)
    result["swd"] = sum(result.values()) / len(result)
    return result


def swd(real: Tensor | Iterable[Tensor], fake: Tensor | Iterable[Tensor], seed: int = 0,
        batch_size: int = 256, projections: int = PROJECTIONS, repeats: int = REPEATS) -> dict[str, float]:
    """Multi-scale SWD between two image sets in [-1, 1] (tensors [N, 3, H, W] or batch iterables)."""
    descriptors = []
    for images in (real, fake):
        acc = SWDDescriptors(seed)
        for batch in as_batches(images, batch_size):
            acc.add(batch)
        descriptors.append(acc)
    return swd_from_descriptors(*descriptors, seed=seed, projections=projections, repeats=repeats)
