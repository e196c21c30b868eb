"""The Laplacian diffusion process of Edify Image (arXiv 2411.07126, section 2.2 and Appendix B).

An image is split into a Laplacian pyramid of mutually orthogonal bands (Eq. 3). The forward
process attenuates each band with its own schedule a_i(sigma) while adding white noise (Eq. 4-5);
once a band is fully attenuated its part of the state is pure noise, so the state is kept at a
lower resolution. Sampling goes back up through resolution switches (Eq. 6-10, Appendix B.1).

Units. `sigma` in `LaplacianProcess` is always the noise level in FULL-RESOLUTION units. A state at
stage j (resolution R / 2^j) carries per-pixel noise sigma / 2^j, because 2x2 average pooling halves
the standard deviation of white noise. The module-level `switch_up` / `project_down` work with the
per-pixel noise of the tensor they are given. See docs/laplacian.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from edify.core.seeding import Generators, randn
from edify.errors import EdifyError


def _check_image(x: Tensor, multiple: int = 1) -> None:
    if not isinstance(x, Tensor) or x.dim() < 2:
        raise EdifyError(f"expected an image tensor [..., H, W], got {type(x).__name__} "
                         f"of shape {tuple(getattr(x, 'shape', ()))}")
    h, w = x.shape[-2:]
    if h % multiple or w % multiple or h == 0 or w == 0:
        raise EdifyError(f"image sides must be positive multiples of {multiple}, got {h}x{w}")


def down(x: Tensor, k: int = 1) -> Tensor:
    """2x2 average pooling applied k times (the operator `down` of section 2.2)."""
    _check_image(x, 2**k)
    if k == 0:
        return x
    lead, (h, w) = x.shape[:-2], x.shape[-2:]
    x = F.avg_pool2d(x.reshape(-1, 1, h, w), 2**k)  # a 2^k block mean equals k 2x2 means
    return x.reshape(*lead, h >> k, w >> k)


def up(x: Tensor, k: int = 1) -> Tensor:
    """Nearest-neighbour 2x upsampling applied k times (the operator `up` of section 2.2)."""
    _check_image(x)
    if k == 0:
        return x
    m, (h, w) = 2**k, x.shape[-2:]
    x = x[..., :, None, :, None].expand(*x.shape[:-2], h, m, w, m)
    return x.reshape(*x.shape[:-4], h * m, w * m)


def split(x: Tensor, levels: int) -> list[Tensor]:
    """Laplacian pyramid (Eq. 3): bands from full resolution down, each at its native resolution.

    bands[i] lives at R / 2^i and x == sum_i up^i(bands[i]); the up-sampled bands are orthogonal.
    """
    _check_levels(levels)
    _check_image(x, 2 ** (levels - 1))
    bands = []
    for _ in range(levels - 1):
        low = down(x)
        bands.append(x - up(low))  # x_i = x - up(down(x)), the detail lost by pooling
        x = low
    bands.append(x)  # x_K = down^(K-1)(x), the coarsest band
    return bands


def merge(bands: list[Tensor]) -> Tensor:
    """Inverse of `split` (Eq. 3): x = x_1 + up(x_2 + up(x_3 + ...))."""
    if not bands:
        raise EdifyError("merge needs at least one band, got 0")
    x = bands[-1]
    for band in reversed(bands[:-1]):
        if band.shape[-2:] != tuple(2 * s for s in x.shape[-2:]):
            raise EdifyError(f"band of size {tuple(band.shape[-2:])} does not sit above one of "
                             f"size {tuple(x.shape[-2:])}")
        x = band + up(x)
    return x


def scale_bands(x: Tensor, coefs) -> Tensor:
    """sum_i coefs[i] * Pi_i x: scale band i of x (a state with len(coefs) bands) by coefs[i].

    `coefs` is a sequence of floats, or a tensor [..., n] of per-sample factors over the batch.
    """
    if not isinstance(coefs, Tensor):
        if all(c == coefs[0] for c in coefs):
            return x * coefs[0]  # one factor for all bands: no split needed
        coefs = torch.tensor(list(coefs), dtype=torch.float64)
    coefs = coefs.to(device=x.device, dtype=x.dtype)
    n = coefs.shape[-1]
    shape = coefs.shape[:-1] + (1,) * (x.dim() - coefs.dim() + 1)
    bands = split(x, n)
    return merge([coefs[..., i].reshape(shape) * b for i, b in enumerate(bands)])


def switch_up(y: Tensor, sigma: float, generator: Generators = None) -> tuple[Tensor, float]:
    """Resolution switch from r to 2r (Eq. 6-10, Appendix B.1).

    `sigma` is the per-pixel noise std of `y` at its own resolution. Returns (x_up, 2 * sigma):
    x_up = up(y) + 2 sigma (e - up(down(e))) with e ~ N(0, I) at 2r. If y = down(s) + sigma n, then
    x_up = up(down(s)) + (2 sigma) eps' with eps' = up(n)/2 + (e - up(down(e))) i.i.d. N(0, I):
    up(n)/2 has covariance P = up(down(.)), the added noise fills the complement I - P.
    """
    _check_sigma(sigma)
    e = randn((y.shape[0], *y.shape[1:-2], 2 * y.shape[-2], 2 * y.shape[-1]), generator,
              device=y.device, dtype=y.dtype)
    return up(y) + 2 * sigma * (e - up(down(e))), 2 * sigma  # Eq. 10


def project_down(x: Tensor, sigma: float) -> tuple[Tensor, float]:
    """The projection matching `switch_up`: (down(x), sigma / 2), sigma per pixel of x."""
    _check_sigma(sigma)
    return down(x), sigma / 2


def _check_levels(levels) -> None:
    if not isinstance(levels, int) or levels < 1:
        raise EdifyError(f"levels must be an integer >= 1, got {levels!r}")


def _check_sigma(sigma) -> None:
    values = sigma.flatten().tolist() if isinstance(sigma, Tensor) else [sigma]
    for s in values:
        if not s > 0 or not math.isfinite(s):
            raise EdifyError(f"sigma must be positive and finite, got {s}")


@dataclass(frozen=True)
class LaplacianProcess:
    """The Laplacian forward process x_t = A(sigma) x0 + sigma eps (Eq. 4-5), sigma in full-res units.

    levels:        K, the number of pyramid bands (1 = standard EDM diffusion).
    switch_sigmas: (s_1*, ..., s_{K-1}*), increasing; band i is fully attenuated for sigma >= s_i*.
    ramp:          shape of a_i in log sigma: with t = 1 + log(sigma / s_i*) / log(ramp_width)
                   clamped to [0, 1], "cosine" gives a_i = (1 + cos(pi t)) / 2 and "linear" 1 - t.
                   So a_i = 1 for sigma <= s_i* / ramp_width and a_i = 0 exactly for sigma >= s_i*.
    ramp_width:    the factor (> 1) over which the ramp falls. a_K = 1 always.
    """

    levels: int = 3
    switch_sigmas: tuple[float, ...] = (1.0, 5.0)
    ramp: Literal["cosine", "linear"] = "cosine"
    ramp_width: float = 2.0

    def __post_init__(self):
        _check_levels(self.levels)
        s = tuple(float(v) for v in self.switch_sigmas)
        if len(s) != self.levels - 1:
            raise EdifyError(f"switch_sigmas needs levels - 1 = {self.levels - 1} values, got {len(s)}")
        if any(not v > 0 or not math.isfinite(v) for v in s):
            raise EdifyError(f"switch sigmas must be positive and finite, got {s}")
        if any(a >= b for a, b in zip(s, s[1:])):
            raise EdifyError(f"switch sigmas must be strictly increasing, got {s}")
        if self.ramp not in ("cosine", "linear"):
            raise EdifyError(f"ramp must be 'cosine' or 'linear', got {self.ramp!r}")
        if not self.ramp_width > 1:
            raise EdifyError(f"ramp_width must be > 1, got {self.ramp_width}")
        object.__setattr__(self, "switch_sigmas", s)

    # -- schedules of the process ----------------------------------------------------------------

    def attenuation(self, sigma) -> Tensor:
        """a_i(sigma) for i = 1..K as a tensor [..., K] (float64 for a Python float sigma)."""
        sigma = torch.as_tensor(sigma, dtype=torch.float64)
        if (sigma < 0).any():
            raise EdifyError(f"sigma must be >= 0, got {sigma.min().item()}")
        a = [self._ramp(sigma, s_star) for s_star in self.switch_sigmas]
        a.append(torch.ones_like(sigma))  # a_K = 1: the coarsest band is never attenuated
        return torch.stack(a, dim=-1)

    def _ramp(self, sigma: Tensor, s_star: float) -> Tensor:
        # t = 0 at s*/width, 1 at s* (linear in log sigma); written so that t == 1 exactly at s*
        t = 1 + (torch.log(sigma.clamp_min(1e-300)) - math.log(s_star)) / math.log(self.ramp_width)
        t = t.clamp(0, 1)
        if self.ramp == "cosine":
            return 0.5 * (1 + torch.cos(math.pi * t))
        return 1 - t

    def attenuation_slope(self, sigma) -> Tensor:
        """d a_i / d sigma for i = 1..K as a tensor [..., K] (0 off the ramps; the ramp's one-sided
        value at its ends, where the cosine ramp's slope is 0 anyway)."""
        sigma = torch.as_tensor(sigma, dtype=torch.float64)
        slopes = []
        for s_star in self.switch_sigmas:
            t = 1 + (torch.log(sigma.clamp_min(1e-300)) - math.log(s_star)) / math.log(self.ramp_width)
            on = (t > 0) & (t < 1)
            dt = 1 / (sigma.clamp_min(1e-300) * math.log(self.ramp_width))  # dt / dsigma
            da_dt = -0.5 * math.pi * torch.sin(math.pi * t) if self.ramp == "cosine" else -torch.ones_like(t)
            slopes.append(torch.where(on, da_dt * dt, torch.zeros_like(t)))
        slopes.append(torch.zeros_like(sigma))  # a_K = 1
        return torch.stack(slopes, dim=-1)

    def stage(self, sigma) -> int:
        """The coarsest stage the state may live at: the number of switch sigmas <= sigma."""
        sigma = float(sigma)
        if sigma < 0:
            raise EdifyError(f"sigma must be >= 0, got {sigma}")
        return sum(1 for s_star in self.switch_sigmas if s_star <= sigma)

    def pixel_sigma(self, sigma: float, stage: int) -> float:
        """Per-pixel noise of a stage-`stage` state at full-res noise level sigma: sigma / 2^stage."""
        return sigma / 2**stage

    # -- the process on tensors --------------------------------------------------------------------

    def apply_A(self, x: Tensor, sigma, stage: int = 0) -> Tensor:
        """A(sigma) = sum_i a_i(sigma) Pi_i (Eq. 5) on a state at `stage` (bands stage+1..K).

        `sigma` is a float or a per-sample tensor [B] (full-res units).
        """
        self._check_stage(stage)
        a = self.attenuation(sigma)[..., stage:]
        if a.dim() == 1:
            return scale_bands(x, a.tolist())
        return scale_bands(x, a)

    def forward(self, x0: Tensor, sigma, noise: Tensor) -> Tensor:
        """x_t = A(sigma) x0 + sigma eps at full resolution (Eq. 4-5)."""
        return self.apply_A(x0, sigma) + _per_sample(sigma, noise) * noise

    def noisy_state(self, x0: Tensor, sigma, noise: Tensor, stage: int) -> Tensor:
        """down^stage(x_t): the state a stage-`stage` expert sees; per-pixel noise sigma / 2^stage.

        x0 and noise are at full resolution. Uses down^j(A x0) = A_j(down^j x0): pooling removes
        bands 1..j and maps band i > j of x0 to band i - j of down^j(x0).
        """
        self._check_stage(stage)
        return self.apply_A(down(x0, stage), sigma, stage) + _per_sample(sigma, noise) * down(noise, stage)

    def up_stage(self, y: Tensor, sigma: float, stage: int, generator: Generators = None) -> Tensor:
        """`switch_up` in full-res units: a stage-`stage` state at noise sigma to stage - 1.

        Exact when a_stage(sigma) = 0, i.e. sigma >= s_stage*, which the sampler guarantees.
        """
        if stage < 1 or stage >= self.levels:
            raise EdifyError(f"can switch up only from stages 1..{self.levels - 1}, got {stage}")
        x_up, _ = switch_up(y, self.pixel_sigma(float(sigma), stage), generator)
        return x_up

    def _check_stage(self, stage: int) -> None:
        if not 0 <= stage < self.levels:
            raise EdifyError(f"stage must be in 0..{self.levels - 1}, got {stage}")


def _per_sample(sigma, x: Tensor) -> Tensor:
    """sigma as a tensor broadcastable against x ([B] -> [B, 1, 1, 1])."""
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    _check_sigma(sigma)
    return sigma.reshape(sigma.shape + (1,) * (x.dim() - sigma.dim()))
