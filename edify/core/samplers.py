"""Samplers for the Laplacian diffusion process (Edify Image, Appendix B.2, Eq. 18-19).

Every sampler is a pure function `sample_x(denoiser, x, sigmas, process, ...)` built from the same
small steps. Per band i the probability-flow ODE has the exact solution, for D held fixed,

    x_next = (s_next / s) x + (A(s_next) - A(s) s_next / s) D,

a first-order exponential integrator in lambda_i = log(a_i / s) (DPM-Solver++ / DEIS in
data-prediction form, Lu et al. 2022, Zhang & Chen 2022). Higher orders interpolate D linearly in
lambda_i, band by band. Sigmas are full-resolution units; the state lives at stage
`process.stage(sigma)` (resolution R / 2^stage) and denoisers are called with its per-pixel noise
s / 2^stage and the stage. Going below a switch sigma calls `switch_up` once per level crossed;
multistep history is projected through it like the state.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from edify.conditioning import Cond
from edify.core.laplacian import LaplacianProcess, scale_bands, up
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


def exp_trapezoid_step(x: Tensor, D: Tensor, step: _Step) -> Tensor:
    """Exponential trapezoidal rule: two evaluations, D linear in lambda_i between s and s_next.

    A Heun-type predictor-corrector in the exponential-integrator variables (not EDM's Heun, which
    is `edm_heun_step`). With h_i = lambda_i(s_next) - lambda_i(s), the exact integral of a linear
    D weights the end point by w_i = 1/(1 - e^-h_i) - 1/h_i (-> 1/2 as h_i -> 0). The last step
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


def ode_velocity(x: Tensor, D: Tensor, sigma: float, process: LaplacianProcess, stage: int) -> Tensor:
    """dx/dsigma of the probability-flow ODE (Appendix B.2), all bands at once:

        dx/dsigma = (x - A(sigma) D) / sigma + A'(sigma) D,

    from d(x_i / sigma) = D_i d(a_i / sigma) per band. With one level (a = 1) it is EDM's
    (x - D) / sigma (Karras et al. 2022, Eq. 3 with sigma(t) = t).
    """
    a = process.attenuation(sigma)[stage:].tolist()
    da = process.attenuation_slope(sigma)[stage:].tolist()
    return (x - scale_bands(D, a)) / sigma + scale_bands(D, da)


def edm_heun_step(x: Tensor, D: Tensor, step: _Step) -> Tensor:
    """EDM's deterministic Heun step (Karras et al. 2022, Algorithm 1, S_churn = 0), linear in sigma.

    Euler predictor x' = x + (s_next - s) d(x, s); where s_next > 0 the trapezoidal corrector
    x + (s_next - s) (d(x, s) + d(x', s_next)) / 2. The last step to sigma 0 is Euler.
    """
    d = ode_velocity(x, D, step.s, step.process, step.stage)
    x_pred = x + (step.s_next - step.s) * d
    if step.s_next == 0:
        return x_pred
    D_next = step.denoise(x_pred, step.s_next)
    d_next = ode_velocity(x_pred, D_next, step.s_next, step.process, step.stage)
    return x + (step.s_next - step.s) * 0.5 * (d + d_next)


def dpmpp_2m_step(x: Tensor, D: Tensor, step: _Step, prev: tuple[Tensor, float] | None) -> Tensor:
    """DPM-Solver++(2M) per band (Lu et al. 2022, data prediction, lambda_i = log(a_i / s)).

    D_eff_i = (1 + 1/(2 r_i)) D_i - 1/(2 r_i) D_prev_i with r_i = h_prev_i / h_i. A band falls back
    to first order where a_i was 0 at the previous or current point (no usable slope), at the
    first step (prev is None) and on the last step to sigma 0.
    """
    return multistep_step(x, D, step, [] if prev is None else [prev], order=2)


def multistep_step(x: Tensor, D: Tensor, step: _Step, history: list[tuple[Tensor, float]],
                   order: int) -> Tensor:
    """One step of DPM-Solver++(2M) (order 2) or (3M) (order 3), band by band.

    history: earlier (D, s) at this resolution, newest last. Per band i the order drops to what
    its history supports: a point where a_i = 0 has lambda_i = -inf and gives no slope. The last
    step to sigma 0 is first order. Order 2 is the form of Lu et al. 2022 (Algorithm 2);
    order 3 follows their third-order multistep update (phi_2, phi_3 terms).
    """
    if step.s_next == 0 or not history or order == 1:
        return first_order_step(x, D, step)
    c = step.exact_coefs()
    a_next = step.a(step.s_next)
    l_cur, l_next = step.lambdas(step.s), step.lambdas(step.s_next)
    l_hist = [step.lambdas(s_h) for _, s_h in history[-(order - 1):]][::-1]  # newest first
    coefs = [[0.0] * len(c) for _ in range(1 + len(l_hist))]  # weights of D, D_-1, D_-2
    for i, c_i in enumerate(c):
        lams = [l_cur[i]] + [lh[i] for lh in l_hist]
        k = 1
        while k < len(lams) and math.isfinite(lams[k]) and math.isfinite(lams[k - 1]):
            k += 1  # usable points: current + consecutive finite history
        k = min(k, order)
        for j, w in enumerate(_band_weights(c_i, a_next[i], l_next[i], lams[:k], order)):
            coefs[j][i] = w
    out = step.s_next / step.s * x + scale_bands(D, coefs[0])
    for (D_h, _), w in zip(reversed(history[-(order - 1):]), coefs[1:]):
        if any(w):
            out = out + scale_bands(D_h, w)
    return out


def sde_step(x: Tensor, D: Tensor, step: _Step, history: list[tuple[Tensor, float]], order: int,
             eta: float, generator: Generators) -> Tensor:
    """One step of the stochastic DPM-Solver++ (Lu et al. 2022, SDE form; k-diffusion's
    `sample_dpmpp_2m_sde`, midpoint), band by band. With h_i = lambda_i(s_next) - lambda_i(s):

        x_next_i = (s_next / s) e^{-eta h_i} x_i + a_i(s_next) (1 - e^{-(1 + eta) h_i}) D_i
                   + s_next sqrt(1 - e^{-2 eta h_i}) z_i,        z ~ N(0, I) afresh every step.

    It is the exact solution of the reverse SDE for fixed D; eta = 1 is the posterior
    q(x_next | x, x0 = D) of the per-band chain x_i(s) = a_i(s) x0_i + s eps_i, eta = 0 the
    probability-flow step of `first_order_step`. If x = A(s) x0 + s e and D = x0, the result is
    A(s_next) x0 + s_next e' with e' white again, so the state keeps its forward marginal (the
    replacement in `edify.core.repaint` stays exact). A band with a_i = 0 at s restarts from
    a_i(s_next) D plus fresh noise; one with a_i = 0 at both ends keeps the deterministic step.
    Order 2 adds the multistep correction of `multistep_step` to the D weight; the last step to
    sigma 0 is the deterministic first-order step. Noise is drawn only where some band gets any.
    """
    if step.s_next == 0:
        return first_order_step(x, D, step)
    r = step.s_next / step.s
    a_next = step.a(step.s_next)
    l_cur, l_next = step.lambdas(step.s), step.lambdas(step.s_next)
    l_prev = step.lambdas(history[-1][1]) if history and order >= 2 else None
    x_coef, noise_coef = [], []
    d_coefs = [[0.0] * len(a_next), [0.0] * len(a_next)]  # weights of D and D_-1
    for i, c_exact in enumerate(step.exact_coefs()):
        h = l_next[i] - l_cur[i]
        if math.isnan(h):  # pure noise at both ends: nothing to denoise, keep the ODE step
            x_coef.append(r)
            noise_coef.append(0.0)
            d_coefs[0][i] = c_exact
            continue
        eta_h = eta * h if eta else 0.0  # eta = 0 with h = inf (a band born at s): no noise
        x_coef.append(r * math.exp(-eta_h))
        noise_coef.append(step.process.pixel_sigma(step.s_next, step.stage) * math.sqrt(-math.expm1(-2 * eta_h)))
        c = -a_next[i] * math.expm1(-(1 + eta) * h)
        lams = [l_cur[i]] + ([l_prev[i]] if l_prev is not None else [])
        usable = 2 if len(lams) == 2 and all(math.isfinite(v) for v in lams) else 1
        for j, w in enumerate(_band_weights(c, a_next[i], l_next[i], lams[:usable], 2)):
            d_coefs[j][i] = w
    out = scale_bands(x, x_coef) + scale_bands(D, d_coefs[0])
    if any(d_coefs[1]):
        out = out + scale_bands(history[-1][0], d_coefs[1])
    if any(noise_coef):
        z = randn(x.shape, generator, device=x.device, dtype=x.dtype)
        out = out + scale_bands(z, noise_coef)
    return out


def _band_weights(c: float, a_next: float, l_next: float, lams: list[float], order: int) -> list[float]:
    """Weights of D_0, D_-1, D_-2 in one band's multistep update (lams newest first)."""
    if len(lams) == 1 or not math.isfinite(l_next):
        return [c]
    h = l_next - lams[0]
    r0 = (lams[0] - lams[1]) / h
    if len(lams) == 2 and order == 2:
        # k-diffusion / Lu et al. form: D_eff = (1 + 1/(2 r)) D - 1/(2 r) D_-1, times c
        return [c * (1 + 1 / (2 * r0)), -c / (2 * r0)]
    phi1 = math.expm1(-h)
    phi2 = phi1 / h + 1
    c1 = a_next * phi2  # weight of the first divided difference D1
    if len(lams) == 2:
        return [c + c1 / r0, -c1 / r0]
    r1 = (lams[1] - lams[2]) / h
    phi3 = phi2 / h - 0.5
    c2 = -a_next * phi3  # weight of the second divided difference D2
    # D1 = D1_0 + r0/(r0+r1) (D1_0 - D1_1), D2 = (D1_0 - D1_1)/(r0+r1),
    # D1_0 = (D0 - D_-1)/r0, D1_1 = (D_-1 - D_-2)/r1
    A = c1 * (1 + r0 / (r0 + r1)) + c2 / (r0 + r1)  # weight of D1_0
    B = -c1 * r0 / (r0 + r1) - c2 / (r0 + r1)  # weight of D1_1
    return [c + A / r0, -A / r0 + B / r1, -B / r1]


def _integrate(denoiser: Denoiser, x: Tensor, sigmas: Tensor, process: LaplacianProcess,
               cond: Cond | None, generator: Generators, callback: Callback | None,
               method: str, final_stage: int = 0, eta: float | tuple[float, ...] = 1.0) -> Tensor:
    """The shared loop: switch resolution where the schedule crosses s_j*, then take one step.

    The state never goes finer than `final_stage`: with final_stage = j the result is the
    finished image at resolution R / 2^j (section 2.2.3), valid for experts trained on sigma
    below s_j* (nested ranges, `edify.core.precond.stage_sigma_ranges`).
    """
    sig = _check_sigmas(sigmas)
    if not isinstance(final_stage, int) or not 0 <= final_stage < process.levels:
        raise EdifyError(f"final stage must be in 0..{process.levels - 1}, got {final_stage!r}")
    stage = max(process.stage(sig[0]), final_stage)
    _check_state(x)
    history: list[tuple[Tensor, float]] = []  # (D, s) of earlier steps, for multistep methods
    etas = stage_etas(eta, process.levels)
    order = {"dpmpp_2m": 2, "dpmpp_3m": 3, "dpmpp_2m_sde": 2}.get(method, 1)
    for i, (s, s_next) in enumerate(zip(sig[:-1], sig[1:])):
        while stage > max(process.stage(s_next), final_stage):
            x = process.up_stage(x, s, stage, generator)  # Eq. 6-10: one level at a time
            stage -= 1
            # the history is projected like the state: up(D) estimates x0 with the new band at 0,
            # and that band's lambda is -inf at those points, so it gets no slope from them
            history = [(up(D_h), s_h) for D_h, s_h in history]

        def denoise(x_, sigma, stage=stage):
            B = x_.shape[0]
            sigma_px = torch.full((B,), process.pixel_sigma(sigma, stage), dtype=x_.dtype, device=x_.device)
            stage_t = torch.full((B,), stage, dtype=torch.long, device=x_.device)
            return denoiser(x_, sigma_px, cond, stage_t).to(x_.dtype)

        step = _Step(process, denoise, s, s_next, stage)
        D = denoise(x, s)
        if method == "euler":
            x = first_order_step(x, D, step)
        elif method == "heun":
            x = edm_heun_step(x, D, step)
        elif method == "exp_trapezoid":
            x = exp_trapezoid_step(x, D, step)
        elif method in STOCHASTIC:
            x = sde_step(x, D, step, history, order, etas[stage], generator)
            history = (history + [(D, s)])[-1:]
        else:
            x = multistep_step(x, D, step, history, order)
            history = (history + [(D, s)])[-(order - 1):]
        if callback is not None:
            callback({"i": i, "x": x, "sigma": s, "sigma_next": s_next, "denoised": D, "stage": stage})
    return x


def stage_etas(eta, levels: int) -> tuple[float, ...]:
    """eta (one number, or one per stage, finest first) as one finite value >= 0 per stage."""
    values = (eta,) if isinstance(eta, (int, float)) else tuple(eta) if isinstance(eta, (tuple, list)) else ()
    if not values or any(isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0
                         for v in values):
        raise EdifyError(f"eta must be a finite number >= 0, or one per stage (finest first), got {eta!r}")
    if len(values) == 1:
        return (float(values[0]),) * levels
    if len(values) != levels:
        raise EdifyError(f"eta per stage needs one value per stage ({levels}, finest first), got {len(values)}")
    return tuple(float(v) for v in values)


def _check_state(x: Tensor) -> None:
    if not isinstance(x, Tensor) or x.dim() != 4:
        raise EdifyError(f"the initial state must be a [B, C, H, W] tensor, got {tuple(getattr(x, 'shape', ()))}")


def _make_sampler(method: str, doc: str):
    def sampler(denoiser: Denoiser, x: Tensor, sigmas: Tensor, process: LaplacianProcess,
                cond: Cond | None = None, generator: Generators = None,
                callback: Callback | None = None, final_stage: int = 0,
                eta: float | tuple[float, ...] = 1.0) -> Tensor:
        if method not in STOCHASTIC and eta != 1.0:
            raise EdifyError(f"eta applies only to the stochastic samplers ({', '.join(sorted(STOCHASTIC))}), "
                             f"not {method!r}")
        return _integrate(denoiser, x, sigmas, process, cond, generator, callback, method, final_stage, eta)
    sampler.__name__ = sampler.__qualname__ = f"sample_{method}"
    sampler.__doc__ = doc + """

    x: the initial state at stage process.stage(sigmas[0]) (see `initial_state`); sigmas:
    decreasing full-res noise levels ending with 0 (see `laplacian_sigmas`); final_stage: stop
    at resolution R / 2^final_stage (see `_integrate`); eta: the stochastic samplers' noise
    (0 = their deterministic counterpart, 1 = the reverse SDE; see `sde_step`), one number or one
    per stage, finest first (e.g. (1, 0, 0): fresh noise only at full resolution)."""
    return sampler


sample_euler = _make_sampler(
    "euler", "First-order exponential integrator (DDIM-like, exact for fixed D), one evaluation per step.")
sample_heun = _make_sampler(
    "heun", "EDM's Heun (Karras et al. 2022, Algorithm 1, deterministic): 2 evaluations per step, last one.")
sample_exp_trapezoid = _make_sampler(
    "exp_trapezoid", "Exponential trapezoidal rule per band: 2 evaluations per step, last one.")
sample_dpmpp_2m = _make_sampler(
    "dpmpp_2m", "DPM-Solver++(2M) per band, one evaluation per step; history projected through switches.")
sample_dpmpp_3m = _make_sampler(
    "dpmpp_3m", "DPM-Solver++(3M) per band, one evaluation per step; history projected through switches.")

sample_euler_sde = _make_sampler(
    "euler_sde", "Stochastic first-order exponential integrator (DDPM-like ancestral step per band), "
    "one evaluation and one fresh noise draw per step.")
sample_dpmpp_2m_sde = _make_sampler(
    "dpmpp_2m_sde", "Stochastic DPM-Solver++(2M) per band (k-diffusion's midpoint form), one evaluation "
    "and one fresh noise draw per step.")

SAMPLERS = {"euler": sample_euler, "heun": sample_heun, "exp_trapezoid": sample_exp_trapezoid,
            "dpmpp_2m": sample_dpmpp_2m, "dpmpp_3m": sample_dpmpp_3m,
            "euler_sde": sample_euler_sde, "dpmpp_2m_sde": sample_dpmpp_2m_sde}
TWO_EVALUATIONS = frozenset({"heun", "exp_trapezoid"})
STOCHASTIC = frozenset({"euler_sde", "dpmpp_2m_sde"})


def sampler_nfe(name: str, num_steps: int) -> int:
    """Network evaluations per image for `num_steps` steps (the last step of a 2-evaluation
    method is first order). Classifier-free guidance doubles the batch, not this count."""
    if name not in SAMPLERS:
        raise EdifyError(f"unknown sampler {name!r}; known: {', '.join(SAMPLERS)}")
    return 2 * num_steps - 1 if name in TWO_EVALUATIONS else num_steps


def _check_sigmas(sigmas) -> list[float]:
    sig = [float(s) for s in torch.as_tensor(sigmas).flatten()]
    if len(sig) < 2:
        raise EdifyError(f"a schedule needs at least 2 sigmas, got {len(sig)}")
    if sig[-1] < 0 or any(not (a > b) for a, b in zip(sig, sig[1:])):
        raise EdifyError(f"sigmas must be strictly decreasing and >= 0, got {sig[:3]}...{sig[-2:]}")
    if sig[-2] <= 0:
        raise EdifyError(f"only the last sigma may be 0, got {sig[-2]}")
    return sig
