"""The cascade upsampler: sampling entered mid-trajectory from a low-resolution image (Edify Image
section 2.3; docs/upscale.md).

A stage-k state of the Laplacian process (section 2.2, Eq. 4-5) is the image pooled k times,
band-attenuated, plus per-pixel noise sigma / 2^k:

    x_k = down^k(A(sigma) x0 + sigma eps) = A_k(sigma) down^k(x0) + (sigma / 2^k) n,   n ~ N(0, I)

So a low-resolution image y of side R / 2^k IS the clean content of a stage-k state: forward-
diffusing it with the process's own attenuation of the bands it holds and the stage's per-pixel
noise,

    x_entry = A_k(s_e) y + (s_e / 2^k) n                                    (`entry_state`)

gives, for y = down^k(x0), exactly the state the process defines at stage k and level s_e, i.e. a
draw from p(x_{s_e} | y) (the bands finer than y are pure noise there). From it the usual samplers
run down to sigma 0; each resolution switch (Eq. 6-10) adds the noise of the band it reveals, and
the finer experts draw that band. This holds for any image, generated or not.

The entry sigma s_e must keep the state at stage k: s_k* <= s_e, and below s_{k+1}* (the next
switch, if any), and within the noise range the model was trained on (its `max_sigma`). At
s_e = s_k* the input is kept as much as the process allows (the stage-k expert is never called:
the first step switches up); a larger s_e lets the stage-k expert repaint the input first.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from edify.core.laplacian import LaplacianProcess
from edify.core.schedules import laplacian_sigmas, split_steps
from edify.core.seeding import Generators, randn
from edify.errors import EdifyError


def input_stage(process: LaplacianProcess, resolution: int, side: int) -> int:
    """k such that an image of `side` px is a stage-k state of a `resolution` px model (R / 2^k);
    one-line EdifyError naming the supported input sides otherwise."""
    sides = {resolution >> k: k for k in range(1, process.levels)}
    if side not in sides:
        scales = ", ".join(f"{2**k}x from {s} px" for s, k in sorted(sides.items(), key=lambda item: item[1]))
        raise EdifyError(f"a {resolution} px model with {process.levels} levels upsamples "
                         f"{scales or 'nothing (it has one level)'}; got an input of {side} px")
    return sides[side]


def entry_range(process: LaplacianProcess, stage: int, max_sigma: float = math.inf) -> tuple[float, float]:
    """[low, high] of the entry sigmas at `stage`: from the stage's switch s_k* to the next switch
    (excluded: there the state would be one stage coarser) or the model's trained maximum."""
    if not 1 <= stage < process.levels:
        raise EdifyError(f"the entry stage must be in 1..{process.levels - 1}, got {stage}")
    low = process.switch_sigmas[stage - 1]
    high = process.switch_sigmas[stage] if stage < process.levels - 1 else math.inf
    return low, min(high, max_sigma)


def check_entry_sigma(process: LaplacianProcess, stage: int, sigma: float, max_sigma: float = math.inf) -> float:
    """sigma as a float if a stage-`stage` state may enter there; one-line EdifyError otherwise."""
    low, high = entry_range(process, stage, max_sigma)
    try:
        sigma = float(sigma)
    except (TypeError, ValueError):
        raise EdifyError(f"the entry sigma must be a number, got {sigma!r}") from None
    if not (low <= sigma <= high and process.stage(sigma) == stage):
        upper = f"{high:g}" + (" (excluded: the next switch)" if process.stage(high) != stage else "")
        raise EdifyError(f"entry sigma {sigma:g} is outside the range this model can enter at "
                         f"{2**stage}x: [{low:g}, {upper}] (full-resolution units; the model was trained "
                         f"up to sigma {max_sigma:g})")
    return sigma


def entry_state(y: Tensor, sigma: float, process: LaplacianProcess, stage: int, noise: Tensor | None = None,
                generator: Generators = None) -> Tensor:
    """x_entry = A_k(sigma) y + (sigma / 2^k) n: the stage-k state at full-res level sigma whose
    clean content is y (Eq. 4-5 pooled k times). `noise` (standard normal, y's shape) or drawn."""
    if not isinstance(y, Tensor) or y.dim() != 4 or not y.is_floating_point():
        raise EdifyError(f"the low-resolution image must be a float [B, C, h, w] tensor, got "
                         f"{tuple(getattr(y, 'shape', ()))}")
    if process.stage(sigma) != stage:
        raise EdifyError(f"sigma {sigma:g} holds a stage-{process.stage(sigma)} state, not stage {stage}")
    if noise is None:
        noise = randn(y.shape, generator, y.device, y.dtype)
    if noise.shape != y.shape:
        raise EdifyError(f"the entry noise must have the image's shape {tuple(y.shape)}, got {tuple(noise.shape)}")
    return process.apply_A(y, sigma, stage) + process.pixel_sigma(sigma, stage) * noise


def entry_sigmas(process: LaplacianProcess, entry_sigma: float, num_steps: int, stage_weights,
                 sigma_min: float = 0.002, rho: float = 7.0, ramp_weight: float = 0.0) -> Tensor:
    """The schedule from the entry sigma to 0 (`laplacian_sigmas`), num_steps split over the stages it
    crosses by stage_weights (finest first): stages 0..k-1, plus stage k when entry > s_k*."""
    stage = process.stage(entry_sigma)
    used = stage + (1 if stage == 0 or entry_sigma > process.switch_sigmas[stage - 1] else 0)
    weights = tuple(stage_weights)[:used]
    if len(weights) < used:
        raise EdifyError(f"stage weights need {used} values for this entry, got {len(weights)}")
    steps = split_steps(num_steps, weights) + (1,) * (process.levels - used)
    return laplacian_sigmas(process, steps, sigma_min, entry_sigma, rho, ramp_weight)


def upsample(sampler, denoiser, y: Tensor, entry_sigma: float, process: LaplacianProcess, sigmas: Tensor,
             cond=None, generator: Generators = None, callback=None, **sampler_kwargs) -> Tensor:
    """Sample from the entry state of y down to sigma 0 with `sampler` (any of
    `edify.core.samplers.SAMPLERS`, given `sampler_kwargs` such as a stochastic sampler's eta);
    sigmas start at entry_sigma (see `entry_sigmas`)."""
    stage = process.stage(entry_sigma)
    if abs(float(sigmas[0]) - entry_sigma) > 1e-9 * entry_sigma:
        raise EdifyError(f"the schedule starts at {float(sigmas[0]):g}, not at the entry sigma {entry_sigma:g}")
    x = entry_state(y, entry_sigma, process, stage, generator=generator)
    return sampler(denoiser, x, torch.as_tensor(sigmas), process, cond, generator, callback, **sampler_kwargs)
