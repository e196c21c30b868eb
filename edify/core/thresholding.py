"""Thresholding of the denoised estimate (Saharia et al. 2022, Imagen, section 2.3).

Large classifier-free guidance pushes the denoised estimate D(x) far outside the range of real
images ([-1, 1]); the sampler then integrates towards values no image has, which saturates colours
and, at the coarse Laplacian stages, the layout. A stage-j state's D estimates down^j(x0), block
means of pixels in [-1, 1], so [-1, 1] bounds D at every stage.

`ThresholdedDenoiser(denoiser, threshold)` has the `Denoiser` contract of `edify.core.precond` and
wraps the guided denoiser (after `CFGDenoiser`), so every sampler uses the thresholded D for its
step and its multistep history:

- threshold = 1: static thresholding, D clamped to [-1, 1].
- threshold = p in (0, 1): dynamic thresholding. Per sample, s = max(1, the p-quantile of |D|);
  D becomes clamp(D, -s, s) / s. An estimate already inside [-1, 1] at that quantile is unchanged;
  a saturated one is pulled back into range as a whole rather than flattened at the bounds.
- threshold = 0: no thresholding (the wrapper is not built; `maybe_threshold` returns the denoiser).

`shrink_finest_band(images, levels, rule)` is a post-process of the finished image rather than of
D: wavelet shrinkage of its finest Laplacian band. With b = x - up(down(x)) the finest band and
t = levels / 127.5 (`levels` 8-bit levels, the [-1, 1] scale), each band value becomes s = rho(b):

- rule "garrote", the non-negative garrote (Breiman 1995; Gao 1998 for wavelets):
  rho(b) = b max(1 - t^2 / b^2, 0), i.e. 0 for |b| <= t and b - t^2 / b beyond;
- rule "soft" (Donoho and Johnstone 1994): rho(b) = sign(b) max(|b| - t, 0);
- rule "hard": rho(b) = b where |b| > t, else 0.

All three set the values within t of 0, the faint speckle a sampler leaves in flat areas, to 0;
they differ on the larger ones (edges): soft moves every one by t, hard keeps them as they are
(and jumps at t), the garrote is continuous and moves a value of k t by only t / k. The result is
up(down(x)) + s - up(down(s)): s with its own 2x2 block means taken out, so that the result's block
means are x's exactly (down(result) = down(x), every coarser band unchanged) and only the finest
band moves. docs/laplacian.md has what it does to the demo model's figures.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from edify.conditioning import Cond
from edify.core.laplacian import down, up
from edify.core.precond import Denoiser
from edify.errors import EdifyError


def check_threshold(threshold) -> float:
    """The threshold as a float in [0, 1], or a one-line EdifyError."""
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold) \
            or not 0 <= threshold <= 1:
        raise EdifyError(f"threshold must be 0 (off), a quantile in (0, 1) (dynamic) or 1 (static), got {threshold!r}")
    return float(threshold)


def threshold_denoised(D: Tensor, threshold: float) -> Tensor:
    """D thresholded per sample (see the module docstring); threshold in (0, 1]."""
    if threshold == 1:
        return D.clamp(-1, 1)
    s = torch.quantile(D.detach().abs().flatten(1).float(), threshold, dim=1).clamp_min(1.0)
    s = s.to(D.dtype).reshape(-1, *([1] * (D.dim() - 1)))
    return torch.maximum(torch.minimum(D, s), -s) / s


class ThresholdedDenoiser(nn.Module):
    """A denoiser whose estimate is thresholded (static or dynamic, see the module docstring)."""

    def __init__(self, denoiser: Denoiser, threshold: float):
        super().__init__()
        threshold = check_threshold(threshold)
        if threshold == 0:
            raise EdifyError("ThresholdedDenoiser needs a threshold in (0, 1]; 0 means no thresholding")
        self.denoiser, self.threshold = denoiser, threshold

    def forward(self, x: Tensor, sigma: Tensor, cond: Cond | None = None, stage: Tensor | None = None) -> Tensor:
        return threshold_denoised(self.denoiser(x, sigma, cond, stage), self.threshold)


def check_shrink(levels) -> float:
    """A shrink threshold as a float >= 0 (8-bit levels; 0 = off), or a one-line EdifyError."""
    if isinstance(levels, bool) or not isinstance(levels, (int, float)) or not math.isfinite(levels) or levels < 0:
        raise EdifyError(f"shrink must be a finite number of 8-bit levels >= 0 (0 = off), got {levels!r}")
    return float(levels)


SHRINK_RULES = ("garrote", "soft", "hard")


def check_shrink_rule(rule) -> str:
    """A shrink rule name, or a one-line EdifyError listing them."""
    if rule not in SHRINK_RULES:
        raise EdifyError(f"unknown shrink rule {rule!r}; known: {', '.join(SHRINK_RULES)}")
    return rule


def shrink_finest_band(images: Tensor, levels: float, rule: str = "garrote") -> Tensor:
    """[B, C, H, W] images in [-1, 1] (H, W even) with their finest Laplacian band shrunk by `rule`
    at `levels` 8-bit levels, their 2x2 block means kept exactly (see the module docstring); the
    images themselves where levels is 0."""
    check_shrink_rule(rule)
    if check_shrink(levels) == 0:
        return images
    coarse = up(down(images))
    band = images - coarse
    t = levels / 127.5
    if rule == "soft":
        shrunk = band.sign() * (band.abs() - t).clamp(min=0)
    elif rule == "hard":
        shrunk = torch.where(band.abs() > t, band, torch.zeros_like(band))
    else:  # garrote: b (1 - t^2 / b^2)+, written to stay finite at b = 0
        shrunk = torch.where(band.abs() > t, band - t * t / torch.where(band == 0, 1.0, band), 0.0)
    return coarse + shrunk - up(down(shrunk))


def maybe_threshold(denoiser: Denoiser, threshold: float) -> Denoiser:
    """`denoiser` thresholded, or itself where threshold is 0."""
    return denoiser if check_threshold(threshold) == 0 else ThresholdedDenoiser(denoiser, threshold)
