"""Samplers for the Laplacian diffusion process (Edify Image, Appendix B.2, Eq. 18-19).

Every sampler is a pure function `sample_x(denoiser, x, sigmas, process, ...)` built from the same
small steps. Per band i the probability-flow ODE has the exact solution, for D held fixed,

    x_next = (s_next / s) x + (A(s_next) - A(s) s_next / s) D,

a first-order exponential integrator in lambda_i = log(a_i / s) (DPM-Solver++ / DEIS in
data-prediction form, Lu et al. 2022, Zhang & Chen 2022). Higher orders interpolate D linearly in
lambda_i, band by band. Sigmas are full-resolution units; the state lives at stage
`process.stage(sigma)` (resolution R / 2^stage) and denoisers are called with its per-pixel noise
s / 2^stage and the stage. Going below a switch sigma calls `switch_up` once per level crossed,
which also restarts the multistep history.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from edify.conditioning import Cond
from edify.core.laplacian import LaplacianProcess, scale_bands
from edify.core.precond import Denoiser
from edify.core.seeding import Generators, randn
from edify.errors import EdifyError

Callback = Callable[[dict], None]


@dataclass
class _Step:
    """What a step needs: the interval (s -> s_next, full-res), the state's stage and its denoiser."""

    process: LaplacianProcess
    denoise: Callable[[Tensor, float], Tensor]  # (x, s full-res) -> D at the state's stage
    s: float
    s_next: float
    stage: int

    def a(self, sigma: float) -> list[float]:
        """a_i(sigma) for the bands the state carries (stage+1 .. K)."""
        return self.process.attenuation(sigma)[self.stage:].tolist()

    def lambdas(self, sigma: float) -> list[float]:
        """lambda_i = log(a_i / sigma) per band; -inf where a_i = 0, +inf at sigma = 0."""
        return [_log_ratio(a_i, sigma) for a_i in self.a(sigma)]

    def exact_coefs(self) -> list[float]:
        """Per-band weight of D in the exact first-order step: a_i(s_next) - a_i(s) s_next / s."""
        r = self.s_next / self.s
        return [a1 - a0 * r for a0, a1 in zip(self.a(self.s), self.a(self.s_next))]


def _log_ratio(a: float, sigma: float) -> float:
    if a == 0:
        return -math.inf
    return math.inf if sigma == 0 else math.log(a / sigma)


def initial_state(process: LaplacianProcess, sigma_max: float, batch_shape_full_res,
                  generator: Generators = None, device=None, dtype=torch.float32) -> Tensor:
    """Pure noise at sigma_max, at stage process.stage(sigma_max): per-pixel std sigma_max / 2^stage.

    x_T = A x0 + sigma_max eps is approximated by its noise part, as in every EDM sampler.
    """
    B, C, H, W = batch_shape_full_res
    m = 2 ** (process.levels - 1)
    if H % m or W % m:
        raise EdifyError(f"image sides must be multiples of {m} for {process.levels} levels, got {H}x{W}")
    if not sigma_max > 0:
        raise EdifyError(f"sigma_max must be positive, got {sigma_max}")
    j = process.stage(sigma_max)
    return randn((B, C, H >> j, W >> j), generator, device, dtype) * process.pixel_sigma(sigma_max, j)


def first_order_step(x: Tensor, D: Tensor, step: _Step) -> Tensor:
    """The exact step for fixed D (Appendix B.2): (s_next/s) x + (A(s_next) - A(s) s_next/s) D."""
    return step.s_next / step.s * x + scale_bands(D, step.exact_coefs())


def heun_step(x: Tensor, D: Tensor, step: _Step) -> Tensor:
    """Second order, two evaluations: D linear in lambda_i between s and s_next (trapezoid).

    With h_i = lambda_i(s_next) - lambda_i(s), the exact integral of a linear D weights the end
    point by w_i = 1/(1 - e^-h_i) - 1/h_i (-> 1/2 as h_i -> 0, the plain average). The last step
    to sigma 0 stays first order.
    """
    x_pred = first_order_step(x, D, step)
    if step.s_next == 0:
        return x_pred
    D_next = step.denoise(x_pred, step.s_next)
    c = step.exact_coefs()
    h = [l1 - l0 for l0, l1 in zip(step.lambdas(step.s), step.lambdas(step.s_next))]
    w = [_endpoint_weight(h_i) for h_i in h]
    return (step.s_next / step.s * x + scale_bands(D, [c_i * (1 - w_i) for c_i, w_i in zip(c, w)])
            + scale_bands(D_next, [c_i * w_i for c_i, w_i in zip(c, w)]))


def _endpoint_weight(h: float) -> float:
    """w(h) = 1/(1 - e^-h) - 1/h: the end-point weight of a linear-in-lambda integrand."""
    if math.isnan(h):
        return 0.5  # a band dead at both ends: its coefficient is 0 anyway
    if math.isinf(h):
        return 1.0
    if h < 1e-3:
        return 0.5 + h / 12  # series; avoids cancellation
    return 1 / -math.expm1(-h) - 1 / h


def dpmpp_2m_step(x: Tensor, D: Tensor, step: _Step, prev: tuple[Tensor, float] | None) -> Tensor:
    """DPM-Solver++(2M) per band (Lu et al. 2022, data prediction, lambda_i = log(a_i / s)).

    D_eff_i = (1 + 1/(2 r_i)) D_i - 1/(2 r_i) D_prev_i with r_i = h_prev_i / h_i. A band falls back
    to first order where a_i was 0 at the previous or current point (no usable slope), at the
    first step after a switch (prev is None) and on the last step to sigma 0.
    """
    if prev is None or step.s_next == 0:
        return first_order_step(x, D, step)
    D_prev, s_prev = prev
    c = step.exact_coefs()
    l_prev, l_cur, l_next = step.lambdas(s_prev), step.lambdas(step.s), step.lambdas(step.s_next)
    alpha, beta = [], []
    for i, c_i in enumerate(c):
        if math.isinf(l_prev[i]) or math.isinf(l_cur[i]):
            alpha.append(c_i), beta.append(0.0)
            continue
        r = (l_cur[i] - l_prev[i]) / (l_next[i] - l_cur[i])
        alpha.append(c_i * (1 + 1 / (2 * r))), beta.append(-c_i / (2 * r))
    return step.s_next / step.s * x + scale_bands(D, alpha) + scale_bands(D_prev, beta)


def _integrate(denoiser: Denoiser, x: Tensor, sigmas: Tensor, process: LaplacianProcess,
               cond: Cond | None, generator: Generators, callback: Callback | None,
               order: str) -> Tensor:
    """The shared loop: switch resolution where the schedule crosses s_j*, then take one step."""
    sig = _check_sigmas(sigmas)
    stage = process.stage(sig[0])
    prev = None  # (D, s) of the previous step at this resolution, for multistep methods
    for i, (s, s_next) in enumerate(zip(sig[:-1], sig[1:])):
        while stage > process.stage(s_next):
            x = process.up_stage(x, s, stage, generator)  # Eq. 6-10: one level at a time
            stage, prev = stage - 1, None

        def denoise(x_, sigma, stage=stage):
            B = x_.shape[0]
            sigma_px = torch.full((B,), process.pixel_sigma(sigma, stage), dtype=x_.dtype, device=x_.device)
            stage_t = torch.full((B,), stage, dtype=torch.long, device=x_.device)
            return denoiser(x_, sigma_px, cond, stage_t).to(x_.dtype)

        step = _Step(process, denoise, s, s_next, stage)
        D = denoise(x, s)
        if order == "euler":
            x = first_order_step(x, D, step)
        elif order == "heun":
            x = heun_step(x, D, step)
        else:
            x = dpmpp_2m_step(x, D, step, prev)
            prev = (D, s)
        if callback is not None:
            callback({"i": i, "x": x, "sigma": s, "sigma_next": s_next, "denoised": D, "stage": stage})
    return x


def sample_euler(denoiser: Denoiser, x: Tensor, sigmas: Tensor, process: LaplacianProcess,
                 cond: Cond | None = None, generator: Generators = None,
                 callback: Callback | None = None) -> Tensor:
    """First-order exponential integrator (DDIM-like, exact for fixed D), one evaluation per step.

    x: the initial state at stage process.stage(sigmas[0]) (see `initial_state`); sigmas:
    decreasing full-res noise levels ending with 0 (see `laplacian_sigmas`).
    """
    return _integrate(denoiser, x, sigmas, process, cond, generator, callback, "euler")


def sample_heun(denoiser: Denoiser, x: Tensor, sigmas: Tensor, process: LaplacianProcess,
                cond: Cond | None = None, generator: Generators = None,
                callback: Callback | None = None) -> Tensor:
    """Heun-type second order (exponential trapezoid), two evaluations per step, last one."""
    return _integrate(denoiser, x, sigmas, process, cond, generator, callback, "heun")


def sample_dpmpp_2m(denoiser: Denoiser, x: Tensor, sigmas: Tensor, process: LaplacianProcess,
                    cond: Cond | None = None, generator: Generators = None,
                    callback: Callback | None = None) -> Tensor:
    """DPM-Solver++(2M), per band, one evaluation per step; history restarts at each switch."""
    return _integrate(denoiser, x, sigmas, process, cond, generator, callback, "dpmpp_2m")


SAMPLERS = {"euler": sample_euler, "heun": sample_heun, "dpmpp_2m": sample_dpmpp_2m}


def _check_sigmas(sigmas) -> list[float]:
    sig = [float(s) for s in torch.as_tensor(sigmas).flatten()]
    if len(sig) < 2:
        raise EdifyError(f"a schedule needs at least 2 sigmas, got {len(sig)}")
    if sig[-1] < 0 or any(not (a > b) for a, b in zip(sig, sig[1:])):
        raise EdifyError(f"sigmas must be strictly decreasing and >= 0, got {sig[:3]}...{sig[-2:]}")
    if sig[-2] <= 0:
        raise EdifyError(f"only the last sigma may be 0, got {sig[-2]}")
    return sig
