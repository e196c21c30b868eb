"""Unit tests of the cascade's pieces: the entry's checks and schedule, tiled denoising, reconstruction
guidance (the closed-form law is tests/test_cascade_closed_form.py)."""

import pytest
import torch
import torch.nn.functional as F

from edify.conditioning import Cond
from edify.core.cascade import check_entry_sigma, entry_range, entry_sigmas, input_stage
from edify.core.laplacian import LaplacianProcess, down, up
from edify.core.reconstruction import ReconstructionGuidance
from edify.core.schedules import split_steps
from edify.core.tiling import TiledDenoiser, make_tiles, tile_starts
from edify.errors import EdifyError

PROCESS = LaplacianProcess(3, (0.5, 1.0))
pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# ---- entry ---------------------------------------------------------------------------------------

def test_input_stage_and_entry_range():
    assert input_stage(PROCESS, 256, 64) == 2 and input_stage(PROCESS, 256, 128) == 1
    for side in (256, 32, 100):
        with pytest.raises(EdifyError, match="upsamples 2x from 128 px, 4x from 64 px"):
            input_stage(PROCESS, 256, side)
    assert entry_range(PROCESS, 2, 3.0) == (1.0, 3.0) and entry_range(PROCESS, 1) == (0.5, 1.0)
    assert check_entry_sigma(PROCESS, 2, 1.0, 3.0) == 1.0 and check_entry_sigma(PROCESS, 1, 0.7) == 0.7
    for stage, sigma in ((2, 0.9), (2, 3.5), (1, 1.0), (1, 0.4), (2, float("nan"))):
        with pytest.raises(EdifyError, match="outside the range"):
            check_entry_sigma(PROCESS, stage, sigma, 3.0)


@pytest.mark.parametrize("entry", [1.0, 2.5])
def test_entry_schedule(entry):
    sigmas = entry_sigmas(PROCESS, entry, 12, (0.55, 0.25, 0.2))
    assert float(sigmas[0]) == entry and float(sigmas[-1]) == 0 and len(sigmas) == 13
    assert all(a > b for a, b in zip(sigmas, sigmas[1:]))
    for s_star in PROCESS.switch_sigmas:  # every switch at or below the entry is a schedule point
        assert any(abs(float(s) - s_star) < 1e-12 for s in sigmas)
    steps_at_stage_2 = sum(1 for s in sigmas[1:] if PROCESS.stage(float(s)) == 2)
    assert steps_at_stage_2 == (0 if entry == 1.0 else split_steps(12, (0.55, 0.25, 0.2))[2])


# ---- tiling --------------------------------------------------------------------------------------

def pointwise(x, sigma, cond=None, stage=None):
    """A translation-equivariant, pointwise toy denoiser (depends on sigma and the condition)."""
    s = torch.as_tensor(sigma).reshape(-1, 1, 1, 1)
    out = torch.tanh(x) / (1 + s**2)
    if cond is not None and cond.media is not None:
        out = out + cond.media.reshape(-1, 1, 1, 1).float()
    return out


def blur(x, sigma, cond=None, stage=None):
    """A translation-equivariant 3x3 box blur (zero padding: a tile's border sees no context)."""
    k = torch.full((x.shape[1], 1, 3, 3), 1 / 9)
    return F.conv2d(x, k, padding=1, groups=x.shape[1])


def test_tile_layout_covers_the_canvas():
    assert tile_starts(256, 256, 32) == [0] and tile_starts(512, 384, 256, 16) == [0, 128]
    assert tile_starts(512, 256, 0, 16) == [0, 256]  # tiles covering the canvas once
    starts = tile_starts(512, 256, 32, 16)
    assert starts == [0, 128, 256] and all(s % 16 == 0 for s in starts)
    for size, tile, overlap in ((512, 128, 32), (384, 256, 32), (200, 64, 8)):
        tiles = make_tiles(size, size, tile, overlap, 8, 4)
        cover = torch.zeros(size, size)
        for t in tiles:
            t.crop(cover).add_(1)
        assert cover.min() >= 1


@pytest.mark.parametrize("overlap,feather", [(0, False), (32, True), (32, False)])
def test_tiles_reproduce_a_pointwise_denoiser(overlap, feather):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 64, 96, generator=g)  # a stage-1 state of a 128x192 canvas
    cond = Cond(media=torch.tensor([1, 3]))
    tiled = TiledDenoiser(pointwise, 128, 192, 64, overlap, multiple=16, align=4, feather=feather, max_tiles=2)
    assert len(tiled.tiles) > 1
    sigma = torch.tensor([0.3, 0.7])
    assert torch.allclose(tiled(x, sigma, cond, torch.tensor([1, 1])), pointwise(x, sigma, cond), atol=1e-6)


def test_one_tile_is_the_denoiser_itself():
    x = torch.randn(1, 3, 64, 64)
    tiled = TiledDenoiser(blur, 64, 64, 64, 16)
    assert torch.equal(tiled(x, 1.0, None, 0), blur(x, 1.0))


def test_feathering_shrinks_the_seam_of_a_local_denoiser():
    """A blur sees no context at a tile's border: averaging it uniformly leaves a seam, feathering
    weights the border least. Both agree with the untiled blur away from the overlaps."""
    x = torch.randn(1, 1, 128, 128, generator=torch.Generator().manual_seed(1))
    want = blur(x, 1.0)
    errors = {}
    for feather in (False, True):
        tiled = TiledDenoiser(blur, 128, 128, 80, 32, multiple=16, feather=feather)
        errors[feather] = float((tiled(x, 1.0, None, 0) - want).abs().max())
    assert errors[True] < 0.5 * errors[False]


def test_tile_denoisers_get_their_crops_at_every_stage():
    """A per-tile denoiser built from the full-resolution tiles (as a ControlNet's cropped control)."""
    image = torch.randn(2, 3, 128, 128)

    def tile_denoisers(tiles, rows):
        def denoise(x, sigma, cond=None, stage=None):
            j = int(torch.as_tensor(stage).reshape(-1)[0])
            crops = torch.cat([t.crop(image) for t in tiles])  # full-resolution crops, tile-major
            assert crops.shape[0] == len(tiles) * rows and x.shape[0] == crops.shape[0]
            return down(crops, j)
        return denoise

    for j in (0, 1, 2):
        tiled = TiledDenoiser(None, 128, 128, 64, 32, multiple=16, tile_denoisers=tile_denoisers)
        x = torch.zeros(2, 3, 128 >> j, 128 >> j)
        assert torch.allclose(tiled(x, 1.0, None, torch.full((2,), j)), down(image, j), atol=1e-6)


def test_tiling_bad_input():
    for tile, overlap, match in ((64, 64, "smaller than the tile"), (60, 8, "multiple of 16"),
                                 (64, -1, "overlap must be")):
        with pytest.raises(EdifyError, match=match):
            TiledDenoiser(blur, 128, 128, tile, overlap, multiple=16)
    with pytest.raises(EdifyError, match="multiples of 16"):
        TiledDenoiser(blur, 120, 128, 64, 16, multiple=16)
    with pytest.raises(EdifyError, match="stage-1 state"):
        TiledDenoiser(blur, 128, 128, 64, 16)(torch.zeros(1, 1, 128, 128), 1.0, None, 1)


# ---- reconstruction guidance ---------------------------------------------------------------------

def smooth_denoiser(x, sigma, cond=None, stage=None):
    """A differentiable, non-linear toy denoiser that ignores the observation."""
    return torch.tanh(blur(x, sigma)) * 0.9


@torch.no_grad()
def test_reconstruction_guidance_pulls_the_estimate_toward_y():
    g = torch.Generator().manual_seed(2)
    y = torch.rand(2, 3, 16, 16, generator=g) * 2 - 1
    x = up(y, 2) + 0.3 * torch.randn(2, 3, 64, 64, generator=g)  # a stage-0 state of a 4x upscale
    base = smooth_denoiser(x, 0.3)
    error = [float((down(base, 2) - y).norm())]
    for w in (0.5, 1.0, 2.0):
        D = ReconstructionGuidance(smooth_denoiser, y, w)(x, torch.full((2,), 0.3), None, torch.zeros(2))
        error.append(float((down(D, 2) - y).norm()))
    assert error[1] < error[0] and error[2] < 0.7 * error[0]
    assert torch.equal(ReconstructionGuidance(smooth_denoiser, y, 0.0)(x, 0.3, None, 0), base)
    # at stage 1 (a 32 px state) one pooling reaches y; a doubled batch ([cond; uncond]) stacks y
    x1 = torch.cat([down(x)] * 2)
    D1 = ReconstructionGuidance(smooth_denoiser, y, 1.0)(x1, 0.6, None, torch.ones(4))
    assert float((down(D1) - torch.cat([y, y])).norm()) < float((down(smooth_denoiser(x1, 0.6)) - torch.cat([y, y])).norm())


def test_linear_identity_denoiser_is_projected_exactly():
    """With D = identity, w = 1 is the orthogonal projection onto {down^m D = y} (docs: the 4^m factor)."""
    y = torch.randn(1, 3, 8, 8)
    x = torch.randn(1, 3, 32, 32)
    D = ReconstructionGuidance(lambda x, *a: x, y, 1.0)(x, 0.1, None, 0)
    assert torch.allclose(down(D, 2), y, atol=1e-5)
    assert torch.allclose(D - x, up(y - down(x, 2), 2), atol=1e-5)  # the change lies in the coarse band only


def test_reconstruction_guidance_bad_input():
    with pytest.raises(EdifyError, match="weight must be finite"):
        ReconstructionGuidance(smooth_denoiser, torch.zeros(1, 3, 8, 8), -1.0)
    with pytest.raises(EdifyError, match="does not pool"):
        ReconstructionGuidance(smooth_denoiser, torch.zeros(1, 3, 8, 8), 1.0)(torch.zeros(1, 3, 20, 20), 1.0, None, 0)
