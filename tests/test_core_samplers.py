"""Schedules, sampler steps, switches inside the loop, and per-sample seeds."""

import math

import pytest
import torch

from edify.core.laplacian import LaplacianProcess, down, up
from edify.core.samplers import (SAMPLERS, STOCHASTIC, _Step, dpmpp_2m_step, exp_trapezoid_step,
                                 first_order_step, initial_state, multistep_step, ode_velocity,
                                 sampler_nfe, sde_step)
from edify.core.schedules import karras_sigmas, laplacian_sigmas
from edify.core.seeding import generators, randn
from edify.errors import EdifyError

f64 = torch.float64
PROC = LaplacianProcess(3, (1.0, 4.0))


def test_karras_sigmas_closed_form():
    s = karras_sigmas(5, 0.002, 80.0, rho=7.0)
    i = torch.arange(5, dtype=f64) / 4
    expect = (80 ** (1 / 7) + i * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    assert torch.allclose(s[:-1], expect, rtol=1e-12) and s[-1] == 0
    assert s[0] == 80.0 and s[4] == 0.002


def test_laplacian_sigmas_hit_switches_and_count_steps():
    s = laplacian_sigmas(PROC, (3, 4, 5), 0.002, 80.0)
    assert s[0] == 80.0 and s[-1] == 0 and s[-2] == 0.002
    assert (s[1:] < s[:-1]).all()
    vals = s.tolist()
    assert 1.0 in vals and 4.0 in vals
    # a step s -> s_next runs at stage(s_next): count steps per stage
    counts = [0, 0, 0]
    for s_next in vals[1:]:
        counts[PROC.stage(s_next)] += 1
    assert counts == [3, 4, 5]
    # sigma_max below the top switch: the top stage is skipped
    t = laplacian_sigmas(PROC, 4, 0.002, 3.0)
    assert t[0] == 3.0 and 1.0 in t.tolist() and len(t) == 4 + 4 + 1


def test_first_order_step_exact_when_D_is_x0():
    """x = A(s) x0 + s eps -> A(s_next) x0 + s_next eps, for every stage and across ramps."""
    g = torch.Generator().manual_seed(0)
    x0_full = torch.randn(2, 3, 16, 16, dtype=f64, generator=g)
    eps_full = torch.randn(2, 3, 16, 16, dtype=f64, generator=g)
    for s, s_next in [(0.9, 0.6), (3.0, 1.5), (1.0, 0.45), (10.0, 4.0), (0.5, 0.0)]:
        stage = PROC.stage(s_next)
        x0, eps = down(x0_full, stage), down(eps_full, stage) * 2**stage  # eps white at that stage
        x = PROC.apply_A(x0, s, stage) + s / 2**stage * eps
        step = _Step(PROC, None, s, s_next, stage)
        x_next = first_order_step(x, x0, step)
        expect = PROC.apply_A(x0, s_next, stage) + s_next / 2**stage * eps
        assert (x_next - expect).abs().max() < 1e-13, (s, s_next)


def test_higher_order_steps_exact_when_D_is_x0():
    """With the ideal constant D, Heun and 2M add only zero-weight corrections."""
    x0 = torch.randn(2, 1, 8, 8, dtype=f64)
    eps = torch.randn(2, 1, 8, 8, dtype=f64)
    s, s_next, s_prev = 0.9, 0.6, 1.0
    x = PROC.apply_A(x0, s, 0) + s * eps
    step = _Step(PROC, lambda x_, sig: x0, s, s_next, 0)
    expect = PROC.apply_A(x0, s_next, 0) + s_next * eps
    assert (exp_trapezoid_step(x, x0, step) - expect).abs().max() < 1e-13
    assert (dpmpp_2m_step(x, x0, step, (x0, s_prev)) - expect).abs().max() < 1e-13
    hist = [(x0, 1.4), (x0, s_prev)]
    assert (multistep_step(x, x0, step, hist, order=3) - expect).abs().max() < 1e-13


def test_sde_step_keeps_the_forward_marginal_when_D_is_x0():
    """x = A(s) x0 + s e -> A(s_next) x0 + s_next e' with e' white again (per band, every stage,
    across ramps, with and without the order-2 history), for eta 1 and 0.5."""
    g = torch.Generator().manual_seed(0)
    N = 20_000
    x0_full = torch.randn(1, 1, 8, 8, dtype=f64, generator=g).expand(N, 1, 8, 8)
    for s, s_next, s_prev in [(0.9, 0.6, 1.0), (3.0, 1.5, 3.5), (1.0, 0.45, 1.2), (10.0, 4.0, 14.0)]:
        stage = PROC.stage(s_next)
        x0 = down(x0_full, stage)
        px = s / 2**stage
        x = PROC.apply_A(x0, s, stage) + px * torch.randn(x0.shape, dtype=f64, generator=g)
        step = _Step(PROC, None, s, s_next, stage)
        for eta in (1.0, 0.5):
            for hist in ([], [(x0, s_prev)]):
                out = sde_step(x, x0, step, hist, 2, eta, g)
                e = (out - PROC.apply_A(x0, s_next, stage)) / (s_next / 2**stage)
                assert e.mean(0).abs().max() < 0.05, (s, s_next, eta)
                cov = e.reshape(N, -1).T @ e.reshape(N, -1) / N
                err = (cov - torch.eye(cov.shape[0], dtype=f64)).abs().max()
                assert err < 0.06, (s, s_next, eta, err)


@pytest.mark.parametrize("sde,ode", [("euler_sde", "euler"), ("dpmpp_2m_sde", "dpmpp_2m")])
def test_sde_samplers_at_eta_0_are_their_ode_samplers(sde, ode):
    net = torch.nn.Conv2d(1, 1, 3, padding=1, dtype=f64)
    D = lambda x, sigma, cond=None, stage=None: net(x) / (1 + sigma.reshape(-1, 1, 1, 1) ** 2)
    sig = laplacian_sigmas(PROC, 3, 0.01, 20.0)
    x = initial_state(PROC, 20.0, (2, 1, 8, 8), torch.Generator().manual_seed(0), dtype=f64)
    with torch.no_grad():
        a = SAMPLERS[sde](D, x, sig, PROC, generator=torch.Generator().manual_seed(1), eta=0.0)
        b = SAMPLERS[ode](D, x, sig, PROC, generator=torch.Generator().manual_seed(1))
        c = SAMPLERS[sde](D, x, sig, PROC, generator=torch.Generator().manual_seed(1))
    assert (a - b).abs().max() < 1e-12
    assert (c - b).abs().max() > 1e-3  # eta 1 adds noise


def test_eta_per_stage_adds_noise_only_where_it_is_not_0():
    net = torch.nn.Conv2d(1, 1, 3, padding=1, dtype=f64)
    D = lambda x, sigma, cond=None, stage=None: net(x) / (1 + sigma.reshape(-1, 1, 1, 1) ** 2)
    sig = laplacian_sigmas(PROC, 3, 0.01, 20.0)
    x = initial_state(PROC, 20.0, (2, 1, 8, 8), torch.Generator().manual_seed(0), dtype=f64)

    def run(name, **kw):
        states = []
        with torch.no_grad():
            SAMPLERS[name](D, x, sig, PROC, generator=torch.Generator().manual_seed(1),
                           callback=lambda info: states.append((info["stage"], info["x"])), **kw)
        return states

    ode, fine = run("dpmpp_2m"), run("dpmpp_2m_sde", eta=(1.0, 0.0, 0.0))
    for (stage, a), (_, b) in zip(ode, fine):
        if stage > 0:
            assert (a - b).abs().max() < 1e-12  # the coarse stages stay deterministic
    assert (ode[-1][1] - fine[-1][1]).abs().max() > 1e-3
    with pytest.raises(EdifyError, match="eta per stage needs one value per stage \\(3, finest first\\), got 2"):
        SAMPLERS["dpmpp_2m_sde"](D, x, sig, PROC, eta=(1.0, 0.0))


def test_eta_checked():
    sig = laplacian_sigmas(PROC, 2, 0.01, 20.0)
    x = torch.zeros(1, 1, 4, 4)
    D = lambda x, sigma, cond=None, stage=None: torch.zeros_like(x)
    assert STOCHASTIC == {"euler_sde", "dpmpp_2m_sde"}
    for eta in (-0.5, float("nan"), float("inf"), "1", (1.0, -1.0, 0.0), True, ()):
        with pytest.raises(EdifyError, match="eta must be a finite number >= 0"):
            SAMPLERS["dpmpp_2m_sde"](D, x, sig, PROC, eta=eta)
    with pytest.raises(EdifyError, match="eta applies only to the stochastic samplers"):
        SAMPLERS["dpmpp_2m"](D, x, sig, PROC, eta=0.5)


def test_heun_is_second_order_on_linear_ode():
    """EDM ODE with D(x, s) = c x (Gaussian data, levels=1): error falls ~4x per halving of h."""
    p = LaplacianProcess(1, ())
    v = 2.0  # data variance: D = v / (v + s^2) x, exact solution x(s) = x_T sqrt((v + s^2)/(v + T^2))
    D = lambda x, sig, cond=None, stage=None: v / (v + sig.reshape(-1, 1, 1, 1) ** 2) * x
    x_T = torch.ones(1, 1, 2, 2, dtype=f64)
    errs = {}
    for name in ("heun", "exp_trapezoid", "euler"):
        errs[name] = []
        for n in (8, 16, 32):
            sig = karras_sigmas(n, 0.05, 10.0, append_zero=False)
            out = SAMPLERS[name](D, x_T.clone(), sig, p)
            exact = math.sqrt((v + 0.05**2) / (v + 10.0**2))
            errs[name].append(abs(out[0, 0, 0, 0].item() - exact))
    for name in ("heun", "exp_trapezoid"):
        assert errs[name][1] / errs[name][2] > 3.3 and errs[name][0] / errs[name][1] > 3.3, (name, errs[name])
    assert 1.6 < errs["euler"][1] / errs["euler"][2] < 2.6


def edm_algorithm_1(D, x, t):
    """Karras et al. 2022, Algorithm 1 (deterministic, S_churn = 0), transcribed line by line."""
    for i in range(len(t) - 1):
        t_i, t_next = t[i], t[i + 1]
        d_i = (x - D(x, t_i)) / t_i  # evaluate dx/dt at t_i
        x_next = x + (t_next - t_i) * d_i  # Euler step from t_i to t_next
        if t_next != 0:  # apply 2nd order correction
            d_prime = (x_next - D(x_next, t_next)) / t_next
            x_next = x + (t_next - t_i) * (0.5 * d_i + 0.5 * d_prime)
        x = x_next
    return x


@pytest.mark.parametrize("steps", [8, 16, 32])
def test_edm_heun_equals_algorithm_1_for_one_level(steps):
    """With one level, sample_heun is EDM's Heun (and so k-diffusion's sample_heun, churn 0)."""
    p = LaplacianProcess(1, ())
    w = torch.randn(4, 4, dtype=f64, generator=torch.Generator().manual_seed(0)) / 4

    def D(x, sigma, cond=None, stage=None):  # a nonlinear denoiser
        s = torch.as_tensor(sigma, dtype=f64).reshape(-1, 1, 1, 1)
        return torch.tanh(x @ w) / (1 + s**2) + x / (1 + s)

    sig = karras_sigmas(steps, 0.002, 80.0)
    x = torch.randn(2, 1, 4, 4, dtype=f64, generator=torch.Generator().manual_seed(1)) * 80
    ours = SAMPLERS["heun"](D, x.clone(), sig, p)
    ref = edm_algorithm_1(lambda x_, t: D(x_, torch.full((2,), t, dtype=f64)), x.clone(), sig.tolist())
    diff = (ours - ref).abs().max().item()
    print(f"EDM Heun vs Algorithm 1, {steps} steps: max abs difference {diff:.2e}")  # pytest -s
    assert diff < 1e-10


def test_ode_velocity_matches_the_exact_step():
    """(x_next - x) / (s_next - s) of the exact fixed-D step tends to dx/dsigma."""
    x, D = torch.randn(2, 1, 16, 16, dtype=f64), torch.randn(2, 1, 16, 16, dtype=f64)
    for s, stage in [(0.7, 0), (0.5, 0), (3.0, 1), (0.1, 0)]:
        h = 1e-6 * s
        step = _Step(PROC, None, s, s - h, stage)
        xs = down(x, stage)
        fd = (first_order_step(xs, down(D, stage), step) - xs) / -h
        v = ode_velocity(xs, down(D, stage), s, PROC, stage)
        assert (fd - v).abs().max() < 1e-5 * (1 + v.abs().max()), s


def test_sampler_nfe():
    assert sampler_nfe("heun", 8) == 15 and sampler_nfe("exp_trapezoid", 8) == 15
    assert sampler_nfe("dpmpp_3m", 8) == 8 and sampler_nfe("euler", 8) == 8
    with pytest.raises(EdifyError, match="unknown sampler 'ddim'"):
        sampler_nfe("ddim", 8)


def test_samplers_switch_resolution_and_call_with_pixel_sigma():
    calls = []

    def D(x, sigma, cond=None, stage=None):
        calls.append((x.shape[-1], float(sigma[0]), int(stage[0])))
        return torch.zeros_like(x)

    sig = laplacian_sigmas(PROC, 2, 0.01, 20.0)
    x = initial_state(PROC, 20.0, (1, 1, 16, 16), torch.Generator().manual_seed(0))
    assert x.shape == (1, 1, 4, 4)
    for name, sampler in SAMPLERS.items():
        calls.clear()
        out = sampler(D, x, sig, PROC, generator=torch.Generator().manual_seed(0))
        assert out.shape == (1, 1, 16, 16)
        for width, sigma_px, stage in calls:
            assert width == 16 >> stage
            full = sigma_px * 2**stage
            assert any(abs(full - s) < 1e-5 * s for s in sig.tolist())
        assert {c[2] for c in calls} == {0, 1, 2}
        first = calls[0]
        assert first[2] == 2 and first[1] == pytest.approx(20.0 / 4)


def test_per_sample_seeds_independent_of_batch():
    net = torch.nn.Conv2d(1, 1, 3, padding=1, dtype=f64)
    D = lambda x, sigma, cond=None, stage=None: net(x) / (1 + sigma.reshape(-1, 1, 1, 1) ** 2)
    seeds = [5, 6, 7, 8]
    sig = laplacian_sigmas(PROC, 2, 0.01, 20.0)
    for name, sampler in SAMPLERS.items():
        with torch.no_grad():
            g4 = generators(seeds)
            batch = sampler(D, initial_state(PROC, 20.0, (4, 1, 8, 8), g4, dtype=f64), sig, PROC, generator=g4)
            g1 = generators(seeds[2:3])
            single = sampler(D, initial_state(PROC, 20.0, (1, 1, 8, 8), g1, dtype=f64), sig, PROC, generator=g1)
        assert torch.allclose(batch[2:3], single, atol=1e-12), name
        assert not torch.allclose(batch[1:2], single, atol=1e-3)


def test_randn_per_sample():
    a = randn((3, 2, 2), generators([1, 2, 3]))
    b = randn((1, 2, 2), generators([2]))
    assert torch.equal(a[1:2], b)
    with pytest.raises(EdifyError, match="one generator per sample"):
        randn((3, 2), generators([1, 2]))


@pytest.mark.parametrize("bad", [
    lambda: karras_sigmas(0, 0.1, 1.0),
    lambda: karras_sigmas(4, 1.0, 0.1),
    lambda: laplacian_sigmas(PROC, (2, 2), 0.01, 10.0),
    lambda: laplacian_sigmas(PROC, 0, 0.01, 10.0),
    lambda: initial_state(PROC, 10.0, (1, 1, 6, 8)),
    lambda: initial_state(PROC, 0.0, (1, 1, 8, 8)),
    lambda: SAMPLERS["euler"](None, torch.zeros(1, 1, 8, 8), torch.tensor([1.0, 2.0, 0.0]), PROC),
    lambda: SAMPLERS["euler"](None, torch.zeros(1, 1, 8, 8), torch.tensor([1.0, 0.0, 0.0]), PROC),
    lambda: SAMPLERS["euler"](None, torch.zeros(1, 1, 8, 8), torch.tensor([1.0, 0.0]), PROC, final_stage=3),
    lambda: laplacian_sigmas(PROC, (2, 0, 2), 0.01, 10.0),
    lambda: laplacian_sigmas(PROC, 2, 0.01, 10.0, final_stage=3),
    lambda: laplacian_sigmas(PROC, 2, 0.01, 10.0, ramp_weight=-1.0),
])
def test_bad_schedule_input(bad):
    with pytest.raises(EdifyError):
        bad()


def test_initial_state_scale():
    x = initial_state(PROC, 80.0, (64, 1, 16, 16), torch.Generator().manual_seed(0))
    assert x.shape == (64, 1, 4, 4)
    assert x.std().item() == pytest.approx(20.0, rel=0.1)
    assert up(x, 2).shape == (64, 1, 16, 16)
