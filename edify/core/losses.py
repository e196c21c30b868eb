"""The EDM training loss on the Laplacian process (Edify Image, Eq. 1; Karras et al. 2022).

For a stage-j expert (resolution R / 2^j) a training example is
    sigma_j = sigma / 2^j ~ log-normal(P_mean, P_std), truncated to the stage's range
            (sec. 2.2.2, `stage_sigma_ranges`: the paper's nested [0, s_{j+1}*], or
            [s_j*, s_{j+1}*] where a full-resolution sampler uses the expert), capped at
            max_sigma for a cascade upsampler (sec. 2.3), and raised to min_sigma for a model
            whose sampling always ends at sigma_min >= min_sigma (no evaluation below it),
    x     = down^j(A(sigma) x0 + sigma eps)        (per-pixel noise sigma_j = sigma / 2^j),
    loss  = lambda(sigma_j) * mean ||D(x, sigma_j) - down^j(x0)||^2,
    lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2   (Eq. 1, EDM weighting),
evaluated at the per-pixel sigma_j the denoiser sees, so that lambda * c_out^2 = 1.

With a fine-band weight w != 1 the squared error e = D - down^j(x0) is split into the stage's own
finest band, e - up(down(e)), and the rest, up(down(e)) (orthogonal, docs/laplacian.md: the
2x2 block mean and the detail it loses), and the finest band's part is weighted by w:
    loss = lambda * (w mean (e - up(down e))^2 + mean (up(down e))^2),
equal to the plain loss at w = 1. An option of this project (not in the paper): it moves the
network's effort towards the band that drawing a flat fill or a thin edge exactly needs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from edify.conditioning import Cond
from edify.core.laplacian import LaplacianProcess, down, up
from edify.core.precond import Denoiser, stage_sigma_ranges
from edify.core.seeding import Generators, randn
from edify.errors import EdifyError


def edm_weight(sigma: Tensor, sigma_data: float = 0.5) -> Tensor:
    """lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2 (Eq. 1; EDM Table 1)."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


def sample_lognormal_sigma(batch: int, P_mean: float, P_std: float, high: float = math.inf,
                           generator: Generators = None, device=None, low: float = 0.0) -> Tensor:
    """log sigma ~ N(P_mean, P_std^2), truncated to low <= sigma <= high by inverse-CDF sampling.

    u ~ U(Phi(z_low), Phi(z_high)), log sigma = P_mean + P_std Phi^-1(u): the exact truncated
    log-normal, no rejection, one uniform per sample (so per-sample generators work).
    """
    if not P_std > 0:
        raise EdifyError(f"P_std must be positive, got {P_std}")
    if not high > 0:
        raise EdifyError(f"the sigma range must have a positive upper end, got {high}")
    if not 0 <= low < high:
        raise EdifyError(f"the sigma range needs 0 <= low < high, got low={low}, high={high}")

    def cdf(s: float) -> float:
        if s <= 0:
            return 0.0
        if math.isinf(s):
            return 1.0
        return torch.special.ndtr(torch.tensor((math.log(s) - P_mean) / P_std, dtype=torch.float64)).item()

    u_low, u_high = cdf(low), cdf(high)
    if not u_high > u_low:
        raise EdifyError(f"the log-normal(P_mean={P_mean}, P_std={P_std}) has no mass in [{low}, {high}]")
    u = u_low + _uniform(batch, generator, device) * (u_high - u_low)
    u = u.clamp(max(u_low, 1e-300), min(u_high, 1 - 1e-16))
    sigma = (P_mean + P_std * torch.special.ndtri(u)).exp()
    return sigma.clamp(low, high).to(torch.float32)


def _uniform(batch: int, generator: Generators, device) -> Tensor:
    if generator is None or isinstance(generator, torch.Generator):
        return torch.rand(batch, generator=generator, dtype=torch.float64).to(device)
    gens = list(generator)
    if len(gens) != batch:
        raise EdifyError(f"need one generator per sample: batch {batch}, got {len(gens)} generators")
    return torch.cat([torch.rand(1, generator=g, dtype=torch.float64) for g in gens]).to(device)


@dataclass(frozen=True)
class LaplacianEDMLoss:
    """Per-sample EDM loss of one resolution stage of a `LaplacianProcess` (Eq. 1, sec. 2.2.2).

    Call with full-resolution clean images x0 [B, C, H, W]; returns the weighted per-sample loss
    [B] (the trainer reduces it, applies weights, bins it by sigma). With return_sigma=True it
    returns (loss, sigma) with sigma the full-res noise levels used.
    """

    process: LaplacianProcess
    P_mean: float = -1.2
    P_std: float = 1.2
    sigma_data: float = 0.5
    expert_ranges: str = "truncated"  # or "nested" (the paper's): see stage_sigma_ranges
    max_sigma: float = math.inf  # a cascade upsampler's cap (section 2.3): every range ends there
    # The lowest sigma trained (full-res units): every range starts there at the lowest. A sampler
    # that ends at sigma_min never evaluates the denoiser below sigma_min, so training below it is
    # compute the samples never use (with the EDM log-normal, most of the finest stage's).
    min_sigma: float = 0.0
    # Weight of the stage's finest band in the squared error (1 = the plain EDM loss; see above).
    fine_band_weight: float = 1.0

    def __post_init__(self):
        if not self.P_std > 0 or not self.sigma_data > 0:
            raise EdifyError(f"P_std and sigma_data must be positive, got {self.P_std}, {self.sigma_data}")
        if not (math.isfinite(self.fine_band_weight) and self.fine_band_weight > 0):
            raise EdifyError(f"fine_band_weight must be finite and positive, got {self.fine_band_weight}")
        if not (math.isfinite(self.min_sigma) and 0 <= self.min_sigma < self.max_sigma):
            raise EdifyError(f"min_sigma must be finite, >= 0 and below max_sigma, got {self.min_sigma}")
        stage_sigma_ranges(self.process, self.expert_ranges)  # validates the mode

    def sample_sigma(self, batch: int, stage: int, generator: Generators = None, device=None) -> Tensor:
        """Full-res training sigmas for stage `stage`: the EDM log-normal of the PER-PIXEL sigma the
        stage-j expert sees (sigma / 2^j), truncated to the stage's range (`stage_sigma_ranges`),
        returned in full-res units. Each expert is thus an EDM denoiser in its own pixel units,
        trained on the range its mode gives it."""
        stage = self._check_stage(stage)
        low, high = stage_sigma_ranges(self.process, self.expert_ranges)[stage]
        low, high = max(low, self.min_sigma), min(high, self.max_sigma)
        if not low < high:
            raise EdifyError(f"stage {stage} has no sigma to train: its range [{low:g}, {high:g}] is empty "
                             f"(min_sigma {self.min_sigma:g}, max_sigma {self.max_sigma:g})")
        scale = 2**stage
        sigma_px = sample_lognormal_sigma(batch, self.P_mean, self.P_std, high / scale, generator, device,
                                          low=low / scale)
        return sigma_px * scale

    def __call__(self, denoiser: Denoiser, x0: Tensor, cond: Cond | None, stage: int,
                 generator: Generators = None, weight: Tensor | None = None,
                 sigma: Tensor | None = None, return_sigma: bool = False):
        stage = self._check_stage(stage)
        if x0.dim() != 4:
            raise EdifyError(f"x0 must be [B, C, H, W], got shape {tuple(x0.shape)}")
        B = x0.shape[0]
        if sigma is None:
            sigma = self.sample_sigma(B, stage, generator, x0.device)
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x0.device).reshape(-1).expand(B)
        noise = randn(x0.shape, generator, x0.device, x0.dtype)
        x = self.process.noisy_state(x0, sigma, noise, stage)  # down^j(A x0 + sigma eps), Eq. 4-5
        target = down(x0, stage)
        sigma_px = sigma / 2**stage  # the per-pixel noise the stage-j denoiser sees
        D_x = denoiser(x, sigma_px, cond, torch.full((B,), stage, dtype=torch.long, device=x0.device))
        loss = edm_weight(sigma_px, self.sigma_data) * self.squared_error(D_x.float() - target.float())
        if weight is not None:
            loss = loss * weight
        return (loss, sigma) if return_sigma else loss

    def squared_error(self, e: Tensor) -> Tensor:
        """Per-sample mean squared error [B] of e [B, C, h, w], its finest band weighted by
        fine_band_weight (the plain mean at 1; an image too small to split is not weighted)."""
        if self.fine_band_weight == 1 or e.shape[-1] % 2 or e.shape[-2] % 2:
            return e.square().mean(dim=(1, 2, 3))
        coarse = up(down(e))
        fine = (e - coarse).square().mean(dim=(1, 2, 3))
        return self.fine_band_weight * fine + coarse.square().mean(dim=(1, 2, 3))

    def _check_stage(self, stage) -> int:
        stage = int(stage)
        if not 0 <= stage < self.process.levels:
            raise EdifyError(f"stage must be in 0..{self.process.levels - 1}, got {stage}")
        return stage
