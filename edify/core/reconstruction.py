"""Reconstruction guidance (Ho et al. 2022, "Video Diffusion Models", section 3.1) as a denoiser wrapper.

Given a low-resolution observation y = down^k(x0) of the image being sampled (the input of an
upsampler), the denoiser's estimate is moved along the gradient that makes its pooled version agree
with y. Ho et al. write, for an x-prediction model and a state z_t = alpha_t x + sigma_t eps,

    x~(z_t) = x^(z_t) - (w_r alpha_t / 2) grad_{z_t} || x^a - x^a(z_t) ||^2            (their Eq. 7)

(x^a: the observed part, here y; x^a(z_t): the model's prediction of it, here down^m D). In the
EDM parametrization of edify, alpha_t = 1 for the bands y holds: y is the coarsest part of the
image, whose attenuation is 1 wherever a cascade runs (below s_{k+1}* / ramp_width; always for the
coarsest stage). For a stage-j state x (resolution R / 2^j, m = k - j further poolings to y's size):

    D'(x) = D(x) - lambda(sigma) grad_x || down^m(D(x)) - y ||^2,   lambda(sigma) = w(sigma) 4^m / 2

computed by autograd through the denoiser (one backward pass per call). The factor 4^m makes the
weight dimensionless: down^T = up / 4 per level, so where dD/dx = I the update is
D - w up^m(down^m D - y), and w = 1 is then the orthogonal projection onto {down^m D = y}. Ho et
al.'s w_r is w 4^m. w(sigma) = weight * schedule(sigma) per full-resolution sigma; the default
schedule is constant (alpha_t = 1 above). Where dD/dx is small (high noise) the correction is small
by itself: the gradient passes through the denoiser's Jacobian.

Classifier-free guidance outside this wrapper stacks [cond; uncond]: y is stacked the same way.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from edify.conditioning import Cond
from edify.core.laplacian import down
from edify.core.precond import Denoiser
from edify.core.repaint import _batch, _one_stage
from edify.errors import EdifyError


class ReconstructionGuidance(nn.Module):
    """D'(x) = D(x) - w(sigma) 4^m / 2 grad_x ||down^m D(x) - y||^2 (Ho et al. 2022, Eq. 7).

    denoiser: any `Denoiser`. y: the low-resolution image [1 or B, C, h, w] (same range as the
    images, [-1, 1]), whose side is the full resolution / 2^k. weight: w (0 = the denoiser itself).
    schedule: optional sigma_full [B] -> multiplier [B] (default 1: alpha_t = 1).
    """

    def __init__(self, denoiser: Denoiser, y: Tensor, weight: float = 1.0,
                 schedule: Callable[[Tensor], Tensor] | None = None):
        super().__init__()
        if not isinstance(y, Tensor) or y.dim() != 4 or not y.is_floating_point():
            raise EdifyError(f"the low-resolution image must be a float [B, C, h, w] tensor, got "
                             f"{tuple(getattr(y, 'shape', ()))}")
        weight = float(weight)
        if not weight >= 0 or weight == float("inf"):
            raise EdifyError(f"the reconstruction guidance weight must be finite and >= 0, got {weight}")
        self.denoiser, self.y, self.weight, self.schedule = denoiser, y, weight, schedule

    def pooling(self, x: Tensor) -> int:
        """m: the poolings that take a state of x's size to y's size."""
        (h, w), (yh, yw) = x.shape[-2:], self.y.shape[-2:]
        m = max(h // yh, 1).bit_length() - 1
        if h != yh << m or w != yw << m:
            raise EdifyError(f"a {h}x{w} state does not pool to the {yh}x{yw} low-resolution image")
        return m

    def residual(self, D: Tensor) -> Tensor:
        """down^m(D) - y, y stacked to D's batch."""
        return down(D, self.pooling(D)) - _batch(self.y.to(D.device, D.dtype), D.shape[0], "low-resolution image")

    def forward(self, x: Tensor, sigma: Tensor | float, cond: Cond | None = None,
                stage: Tensor | int | None = None) -> Tensor:
        if self.weight == 0:
            return self.denoiser(x, sigma, cond, stage)
        B, j = x.shape[0], _one_stage(stage, x)
        m = self.pooling(x)
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            D = self.denoiser(x_in, sigma, cond, stage)
            (grad,) = torch.autograd.grad(self.residual(D).square().sum(), x_in)
        sigma_full = torch.as_tensor(sigma, dtype=D.dtype, device=x.device).reshape(-1).expand(B) * 2.0**j
        scale = torch.full_like(sigma_full, self.weight * 4.0**m / 2)
        if self.schedule is not None:
            scale = scale * torch.as_tensor(self.schedule(sigma_full), dtype=D.dtype, device=x.device)
        return D.detach() - scale.reshape(B, 1, 1, 1) * grad  # Ho et al. 2022, Eq. 7 (alpha_t = 1)
