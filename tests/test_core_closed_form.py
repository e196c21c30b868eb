"""The closed-form test of the Laplacian samplers (docs/design.md section 1).

Gaussian data x0 ~ N(0, Sigma) with a power-law spectrum on 1x16x16 images. At every stage j the
exact denoiser is linear (edify.core.gaussian). Its attenuations come from a transcription of the
cosine ramp written here, not from the library, so a wrong ramp in the library cannot hide.
Running each sampler with these denoisers must reproduce Sigma, judged band by band with whitened
statistics (each direction of a band counts alike, so the small finest band is not drowned by the
coarse one):

(1) exactly: the output covariance of the (then linear) sampler, whose per-band whitened variance
    tends to 1 at the method's order;
(2) by sampling: 10k draws from pure noise, whose per-band whitened variance is as far from 1 as
    (1) says plus sampling noise, and whose covariance error is within 1.2x that of exact draws.

`test_mutant_is_caught` shows that plausible bugs (switch noise 5% low, a ramp still 0.05 at the
switch, a late switch, an inverted 2M ratio, a fixed trapezoid weight) make these checks fail.
"""

import math

import pytest
import torch

import edify.core.laplacian as laplacian_module
import edify.core.samplers as samplers_module
from edify.core.gaussian import ExactDenoiser, band_basis, band_report, output_covariance, power_law_cov
from edify.core.laplacian import LaplacianProcess
from edify.core.samplers import SAMPLERS, initial_state
from edify.core.schedules import default_stage_weights, laplacian_sigmas, split_steps

f64 = torch.float64
N_SIDE = 16
SIGMA_MIN, SIGMA_MAX = 0.002, 80.0
SWITCH = (0.8, 4.0)
PROCESSES = {3: LaplacianProcess(3, SWITCH, ramp="cosine", ramp_width=2.0), 1: LaplacianProcess(1, ())}


def cosine_ramp(sigma: float, s_star: float, width: float = 2.0) -> float:
    """a(sigma): 1 below s*/width, 0 from s* up, (1 + cos(pi t)) / 2 between, t linear in log sigma."""
    t = min(max(1 + math.log(max(sigma, 1e-300) / s_star) / math.log(width), 0.0), 1.0)
    return 0.5 * (1 + math.cos(math.pi * t))


def reference_attenuation(levels: int):
    return lambda sigma: [cosine_ramp(sigma, s) for s in SWITCH[:levels - 1]] + [1.0]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def gaussian():
    Sigma = power_law_cov(N_SIDE)
    return Sigma, {K: ExactDenoiser(p, Sigma, N_SIDE, attenuation=reference_attenuation(K))
                   for K, p in PROCESSES.items()}


def schedule(levels: int, total_steps: int) -> torch.Tensor:
    """The pipeline's default schedule (split and ramp-aware placement) for `total_steps`."""
    process = PROCESSES[levels]
    steps = split_steps(total_steps, default_stage_weights(levels))
    return laplacian_sigmas(process, steps, SIGMA_MIN, SIGMA_MAX, 7.0, 0.45)


# total steps (n, 2n) of the exact test; tolerance on |whitened variance - 1| per band at 2n; the
# smallest error ratio per doubling (first order ~2, second ~4, third ~8)
EXACT = {"euler": (96, 0.035, 1.8), "heun": (48, 0.013, 3.0), "exp_trapezoid": (48, 0.004, 3.0),
         "dpmpp_2m": (48, 0.005, 3.0), "dpmpp_3m": (48, 0.004, 3.0),
         # the stochastic samplers draw noise at every step (one basis block per step: fewer steps
         # keep the exact test small); the first-order SDE step is strongly dissipative at few steps
         "euler_sde": (24, 0.25, 1.7), "dpmpp_2m_sde": (24, 0.04, 4.0)}


def exact_report(name: str, levels: int, total_steps: int, gaussian):
    Sigma, denoisers = gaussian
    C = output_covariance(SAMPLERS[name], PROCESSES[levels], schedule(levels, total_steps),
                          denoisers[levels], Sigma, N_SIDE)
    return band_report(C, Sigma, N_SIDE, levels)


def exact_check(name: str, levels: int, gaussian) -> list[str]:
    """What is wrong with the sampler's exact output covariance (empty: nothing)."""
    n, tol, ratio = EXACT[name]
    coarse, fine = (exact_report(name, levels, k, gaussian) for k in (n, 2 * n))
    problems = [f"band {i + 1}: whitened variance {v:.4f} at {2 * n} steps (tolerance {tol})"
                for i, v in enumerate(fine.whitened_variance) if abs(v - 1) > tol]
    if coarse.relative_error / fine.relative_error < ratio:
        problems.append(f"error ratio per doubling {coarse.relative_error / fine.relative_error:.2f} < {ratio}")
    return problems


@pytest.mark.parametrize("levels", [3, 1])
@pytest.mark.parametrize("name", list(SAMPLERS))
def test_sampler_covariance_converges_at_its_order(gaussian, name, levels):
    assert exact_check(name, levels, gaussian) == []


# -- by sampling --------------------------------------------------------------------------------

N_SAMPLES = 10_000


def sampling_check(name: str, levels: int, gaussian, seed: int = 1) -> list[str]:
    """What is wrong with 10k samples from pure noise (empty: nothing)."""
    Sigma, denoisers = gaussian
    process = PROCESSES[levels]
    total = 2 * EXACT[name][0]
    g = torch.Generator().manual_seed(seed)
    x = initial_state(process, SIGMA_MAX, (N_SAMPLES, 1, N_SIDE, N_SIDE), g, dtype=f64)
    out = SAMPLERS[name](denoisers[levels], x, schedule(levels, total), process, generator=g)
    out = out.reshape(N_SAMPLES, -1)
    C = out.T @ out / N_SAMPLES
    sampled = band_report(C, Sigma, N_SIDE, levels)
    exact = exact_report(name, levels, total, gaussian)
    problems = []
    for i, (U, v_s, v_e) in enumerate(zip(band_basis(N_SIDE, levels), sampled.whitened_variance,
                                          exact.whitened_variance)):
        se = math.sqrt(2 / (N_SAMPLES * U.shape[1]))  # std of a whitened variance of N draws
        if abs(v_s - 1) > abs(v_e - 1) + 5 * se + 0.003:
            problems.append(f"band {i + 1}: sampled whitened variance {v_s:.4f}, exact {v_e:.4f}, se {se:.4f}")
    draws = torch.randn(N_SAMPLES, N_SIDE**2, dtype=f64, generator=torch.Generator().manual_seed(2))
    draws = draws @ torch.linalg.cholesky(Sigma).T
    floor = band_report(draws.T @ draws / N_SAMPLES, Sigma, N_SIDE, levels).relative_error
    # the sampling floor, plus the integrator's own (exact) error where that is not negligible
    bound = max(1.2 * floor, floor + exact.relative_error)
    if sampled.relative_error > bound:
        problems.append(f"covariance error {sampled.relative_error:.4f} > {bound:.4f} (floor {floor:.4f}, "
                        f"exact {exact.relative_error:.4f})")
    print(f"{name} levels={levels} steps={total}: whitened variance per band "
          f"{[round(v, 4) for v in sampled.whitened_variance]}, error {sampled.relative_error:.4f}, "
          f"floor {floor:.4f}")  # shown with pytest -s
    return problems


@pytest.mark.parametrize("levels,name", [(3, n) for n in SAMPLERS] + [(1, "dpmpp_2m")])
def test_sampler_reproduces_covariance_by_sampling(gaussian, name, levels):
    assert sampling_check(name, levels, gaussian) == []


# -- exactness of the exponential trapezoid for a D linear in lambda ------------------------------

def trapezoid_check() -> list[str]:
    """One exp_trapezoid step with D(sigma) = D0 + (lambda - lambda0) D1, lambda = -log sigma (one
    level) against the exact solution x_next = (s1/s0) x + s1 * int_{u0}^{u1} D du, u = 1/sigma."""
    from edify.core.samplers import _Step, exp_trapezoid_step

    process = PROCESSES[1]
    g = torch.Generator().manual_seed(3)
    x, D0, D1 = (torch.randn(1, 1, 4, 4, dtype=f64, generator=g) for _ in range(3))
    problems = []
    for s0, s1 in [(2.0, 1.0), (1.0, 0.2), (0.5, 0.45)]:
        lam0 = -math.log(s0)
        D = lambda sigma: D0 + (-math.log(sigma) - lam0) * D1  # noqa: E731
        u0, u1 = 1 / s0, 1 / s1
        F = lambda u: D0 * u + D1 * (u * math.log(u) - u - lam0 * u)  # antiderivative in u  # noqa: E731
        exact = s1 / s0 * x + s1 * (F(u1) - F(u0))
        step = _Step(process, lambda x_, sigma: D(sigma), s0, s1, 0)
        err = (exp_trapezoid_step(x, D(s0), step) - exact).abs().max().item()
        if err > 1e-12:
            problems.append(f"step {s0} -> {s1}: error {err:.2e}")
    return problems


def dpmpp_2m_check() -> list[str]:
    """One level: the 2M step equals DPM-Solver++(2M) as Lu et al. 2022 write it, r = h_prev / h."""
    from edify.core.samplers import _Step, dpmpp_2m_step

    g = torch.Generator().manual_seed(4)
    x, D, D_prev = (torch.randn(1, 1, 4, 4, dtype=f64, generator=g) for _ in range(3))
    problems = []
    for s_prev, s, s_next in [(2.0, 1.0, 0.4), (1.0, 0.9, 0.3), (5.0, 1.0, 0.8)]:
        h, h_prev = math.log(s / s_next), math.log(s_prev / s)
        r = h_prev / h
        expect = (s_next / s) * x - math.expm1(-h) * ((1 + 1 / (2 * r)) * D - 1 / (2 * r) * D_prev)
        got = dpmpp_2m_step(x, D, _Step(PROCESSES[1], None, s, s_next, 0), (D_prev, s_prev))
        err = (got - expect).abs().max().item()
        if err > 1e-12:
            problems.append(f"steps {s_prev} -> {s} -> {s_next}: error {err:.2e}")
    return problems


def test_dpmpp_2m_is_the_textbook_step():
    assert dpmpp_2m_check() == []


def test_exp_trapezoid_is_exact_for_d_linear_in_lambda():
    assert trapezoid_check() == []


# -- mutants: each must make a check fail ---------------------------------------------------------

def _switch_noise_low(monkeypatch):
    original = laplacian_module.switch_up

    def switch_up(y, sigma, generator=None):
        x_up, s = original(y, sigma, generator)
        return laplacian_module.up(y) + 0.95 * (x_up - laplacian_module.up(y)), s  # noise 5% low
    monkeypatch.setattr(laplacian_module, "switch_up", switch_up)


def _ramp_not_zero_at_switch(monkeypatch):
    original = LaplacianProcess._ramp

    def _ramp(self, sigma, s_star):
        a = original(self, sigma, s_star)
        return torch.where(sigma <= s_star, 0.05 + 0.95 * a, a)  # still 0.05 at s*
    monkeypatch.setattr(LaplacianProcess, "_ramp", _ramp)


def _late_switch(monkeypatch):
    def stage(self, sigma):
        return sum(1 for s_star in self.switch_sigmas if s_star <= 1.5 * float(sigma))  # at s*/1.5
    monkeypatch.setattr(LaplacianProcess, "stage", stage)


def _inverted_2m_ratio(monkeypatch):
    original = samplers_module._band_weights

    def _band_weights(c, a_next, l_next, lams, order):
        if len(lams) == 2 and order == 2 and math.isfinite(l_next):
            h = l_next - lams[0]
            r = (lams[0] - lams[1]) / h
            lams = [lams[0], lams[0] - h / r]  # r -> 1 / r
        return original(c, a_next, l_next, lams, order)
    monkeypatch.setattr(samplers_module, "_band_weights", _band_weights)


def _trapezoid_weight_half(monkeypatch):
    monkeypatch.setattr(samplers_module, "_endpoint_weight", lambda h: 0.5)


MUTANTS = {
    "switch noise x0.95": (_switch_noise_low, ["dpmpp_2m", "exp_trapezoid"]),
    "ramp 0.05 at the switch": (_ramp_not_zero_at_switch, ["dpmpp_2m", "exp_trapezoid"]),
    "switch at s*/1.5": (_late_switch, ["dpmpp_2m", "exp_trapezoid"]),
    "inverted 2M ratio": (_inverted_2m_ratio, ["dpmpp_2m"]),
    "trapezoid end-point weight 1/2": (_trapezoid_weight_half, ["exp_trapezoid"]),
}
UNIT_CHECKS = {"exp_trapezoid": trapezoid_check, "dpmpp_2m": dpmpp_2m_check}


@pytest.mark.parametrize("mutant", list(MUTANTS))
def test_mutant_is_caught(gaussian, mutant, monkeypatch):
    apply, names = MUTANTS[mutant]
    apply(monkeypatch)
    caught = {}
    for name in names:
        if name in UNIT_CHECKS:
            caught[name, "unit"] = UNIT_CHECKS[name]()
        caught[name, "exact"] = exact_check(name, 3, gaussian)
        if not caught[name, "exact"]:  # sampling is slow: only when the exact check missed it
            caught[name, "sampling"] = sampling_check(name, 3, gaussian)
    print(f"{mutant}: " + "; ".join(f"{k[0]} {k[1]}: {'FAILS' if v else 'passes'} {v[:1]}"
                                   for k, v in caught.items()))  # shown with pytest -s
    assert all(caught[name, "exact"] or caught.get((name, "sampling")) or caught.get((name, "unit"))
               for name in names), caught
