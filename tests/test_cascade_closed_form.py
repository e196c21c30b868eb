"""Closed-form test of the cascade upsampler: sampling entered mid-trajectory from y = down^2(x0).

Gaussian data x0 ~ N(0, Sigma) (power-law spectrum, 1x16x16), three Laplacian levels (16/8/4 px),
and the 4x4 observation y = O x0 with O = down^2 (2x2 average pooling twice). The cascade enters
at stage 2 with `edify.core.cascade.entry_state`: x = A_2(s_e) y + (s_e / 4) n. Since a stage-2 state
of the process is down^2(A x0 + s eps) = y + (s / 4) n' (the coarsest band is never attenuated),
this is an exact draw of p(x_{s_e} | y). With the exact conditional denoisers E[down^j x0 | state, y]
(Gaussian conditioning on z = [state; y]) the sampler is then a linear map of (entry noise, switch
noises, y), and pushing basis vectors through it gives its mean map and conditional covariance with
no sampling error. They must match the exact conditional law

    mean  Sigma O^T (O Sigma O^T)^-1 y,   covariance  Sigma - Sigma O^T (O Sigma O^T)^-1 O Sigma,

and down^2 of every output must be y itself. This proves the entry (noise level, stage, per-band
attenuation), the schedule from the entry and the switches above it, apart from any network.

Two more checks on the same closed form:
- the plain cascade (unconditional exact denoisers, y drawn from its own law) reproduces Sigma: a
  mid-trajectory start from the process's marginal is the data law. This one pins the entry's noise
  level (10% too much or too little noise gives an error of 0.10-0.11, not 0.0014); the conditional
  test does not, since its denoisers read the coarse band from y itself;
- reconstruction guidance (Ho et al. 2022) on those unconditional denoisers is measured against
  the exact conditional law (printed with `pytest -s`): it must bring down^2(output) much closer
  to y than the plain cascade does.
"""

import functools
import math

import pytest
import torch

from edify.core.cascade import entry_sigmas, entry_state
from edify.core.gaussian import ExactDenoiser, band_projectors, block_mean, power_law_cov
from edify.core.laplacian import LaplacianProcess, down
from edify.core.reconstruction import ReconstructionGuidance
from edify.core.samplers import SAMPLERS
from edify.core.schedules import default_stage_weights

f64 = torch.float64
N, K = 16, 2  # 16x16 images; y = down^2(x0) is 4x4, a stage-2 state
PROCESS = LaplacianProcess(3, (0.8, 4.0), ramp="cosine", ramp_width=2.0)

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


class ObservedDenoiser:
    """E[down^j x0 | state, y] for x0 ~ N(0, Sigma), y = O x0 bound per sample in `self.y` [B, |y|]."""

    def __init__(self, Sigma: torch.Tensor, O: torch.Tensor):
        self.Sigma, self.O, self.y = Sigma, O, None
        self.Pi = band_projectors(N, PROCESS.levels)
        self.cache: dict = {}

    def matrices(self, sigma_px: float, stage: int):
        if (sigma_px, stage) not in self.cache:
            a = PROCESS.attenuation(sigma_px * 2**stage).tolist()
            Dj = block_mean(N, stage)
            M = Dj @ sum(a_i * P for a_i, P in zip(a, self.Pi))  # state = M x0 + s_j n  (Eq. 4-5)
            H = torch.cat([M, self.O])  # z = H x0 + [s_j n; 0]
            cov_z = H @ self.Sigma @ H.T
            cov_z[:len(M), :len(M)] += sigma_px**2 * torch.eye(len(M), dtype=f64)
            G = torch.linalg.solve(cov_z, H @ self.Sigma @ Dj.T)  # E[D_j x0 | z] = z G (rows)
            self.cache[(sigma_px, stage)] = (G[:len(M)], G[len(M):])
        return self.cache[(sigma_px, stage)]

    def __call__(self, x, sigma, cond=None, stage=None):
        G_s, G_y = self.matrices(float(torch.as_tensor(sigma).reshape(-1)[0]),
                                 int(torch.as_tensor(stage).reshape(-1)[0]))
        B, C, h, w = x.shape
        return (x.reshape(B, -1) @ G_s + self.y @ G_y).reshape(B, C, h, w)


class Switches:
    """The switches' noise source: unit basis vectors, each draw on its own block of batch rows."""

    def __init__(self, first: int, sizes: list[int], total: int):
        self.start, self.sizes, self.total, self.k = first, sizes, total, 0

    def randn(self, shape, device=None, dtype=None):
        size = self.sizes[self.k]
        e = torch.zeros(self.total, size, dtype=f64)
        e[self.start:self.start + size] = torch.eye(size, dtype=f64)
        self.start, self.k = self.start + size, self.k + 1
        return e.reshape(shape)


def run_linear(denoiser, entry_sigma: float, steps: int, y_law: torch.Tensor | None = None):
    """The cascade as a linear map: rows [entry noise | switch noises | y]. Returns (L_noise, L_y):
    output = e L_noise + y L_y, with y's rows pushed through `y_law` (its Cholesky factor) if given."""
    ny = (N >> K) ** 2
    switch_sizes = [(N >> j) ** 2 for j in range(K - 1, -1, -1)]
    total = ny + sum(switch_sizes) + ny
    noise = torch.zeros(total, ny, dtype=f64)
    noise[:ny] = torch.eye(ny, dtype=f64)
    y = torch.zeros(total, ny, dtype=f64)
    y[-ny:] = torch.eye(ny, dtype=f64) if y_law is None else y_law.T
    if hasattr(denoiser, "y"):
        denoiser.y = y
    shape = (total, 1, N >> K, N >> K)
    x = entry_state(y.reshape(shape), entry_sigma, PROCESS, K, noise=noise.reshape(shape))
    sigmas = entry_sigmas(PROCESS, entry_sigma, steps, default_stage_weights(3), 0.002, 7.0, 0.45)
    switches = Switches(ny, switch_sizes, total)
    out = SAMPLERS["dpmpp_2m"](denoiser, x, sigmas, PROCESS, generator=switches).reshape(total, -1)
    assert switches.k == K, "the sampler did not switch at every level below the entry"
    return out[:-ny], out[-ny:]


def exact_law(Sigma, O):
    B = torch.linalg.solve(O @ Sigma @ O.T, O @ Sigma).T  # Sigma O^T (O Sigma O^T)^-1
    return B, Sigma - B @ O @ Sigma


def rel(A, B) -> float:
    return float(torch.linalg.matrix_norm(A - B) / torch.linalg.matrix_norm(B))


@functools.cache
def conditional_report(entry_sigma: float, steps: int) -> dict:
    Sigma, O = power_law_cov(N), block_mean(N, K)
    L_noise, L_y = run_linear(ObservedDenoiser(Sigma, O), entry_sigma, steps)
    B, Sigma_c = exact_law(Sigma, O)
    C = L_noise.T @ L_noise
    return {"mean_error": rel(L_y.T, B), "covariance_error": rel(C, Sigma_c),
            "coarse_mean_error": float((O @ L_y.T - torch.eye(len(O), dtype=f64)).abs().max()),
            "coarse_variance": float((O @ C @ O.T).abs().max())}


@pytest.mark.parametrize("entry_sigma", [4.0, 10.0])  # at s_2* (no stage-2 step) and above it
def test_entry_from_y_reproduces_the_exact_conditional_law(entry_sigma):
    coarse, fine = conditional_report(entry_sigma, 24), conditional_report(entry_sigma, 96)
    print(f"entry {entry_sigma}: 24 steps {coarse}, 96 steps {fine}")  # pytest -s
    assert fine["mean_error"] < 1e-9  # the mean state is carried exactly by every step
    assert fine["covariance_error"] < 0.01
    assert coarse["covariance_error"] / fine["covariance_error"] > 2.5  # the integrator's order, not a bias
    for r in (coarse, fine):  # down^2(output) = y, with no variance
        assert r["coarse_mean_error"] < 1e-9 and r["coarse_variance"] < 1e-12


def test_entry_state_is_the_process_marginal_at_the_input_stage():
    """entry_state(down^2 x0, s, n) == down^2(A(s) x0 + s eps) for n = 4 down^2(eps), to rounding."""
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 3, 16, 16, generator=g), torch.randn(3, 3, 16, 16, generator=g)
    for stage, sigma in ((2, 4.0), (2, 30.0), (1, 0.8), (1, 2.5)):
        got = entry_state(down(x0, stage), sigma, PROCESS, stage, noise=down(eps, stage) * 2**stage)
        want = PROCESS.noisy_state(x0, sigma, eps, stage)
        assert torch.allclose(got, want, atol=1e-5), (stage, sigma)


def test_plain_cascade_from_the_marginal_reproduces_the_data_law():
    """Unconditional exact denoisers, y drawn from N(0, O Sigma O^T): the output covariance is Sigma."""
    Sigma, O = power_law_cov(N), block_mean(N, K)
    L_noise, L_y = run_linear(ExactDenoiser(PROCESS, Sigma, N), 4.0, 96, torch.linalg.cholesky(O @ Sigma @ O.T))
    C = L_noise.T @ L_noise + L_y.T @ L_y
    print(f"plain cascade, covariance error {rel(C, Sigma):.4f}")
    assert rel(C, Sigma) < 0.01


def test_plain_cascade_detects_a_wrong_entry_noise(monkeypatch):
    """The check above fails when the entry adds 10% too much noise (a plausible units slip)."""
    import test_cascade_closed_form as module

    exact = module.entry_state
    monkeypatch.setattr(module, "entry_state", lambda y, s, p, k, noise=None: exact(y, s, p, k, noise=1.1 * noise))
    Sigma, O = power_law_cov(N), block_mean(N, K)
    L_noise, L_y = run_linear(ExactDenoiser(PROCESS, Sigma, N), 4.0, 96, torch.linalg.cholesky(O @ Sigma @ O.T))
    assert rel(L_noise.T @ L_noise + L_y.T @ L_y, Sigma) > 0.05


def consistency(L_noise, L_y, O, S_y) -> float:
    """E ||down^2(output) - y||^2 / E ||y||^2 with y ~ N(0, S_y)."""
    E = O @ L_y.T - torch.eye(len(O), dtype=f64)
    return float((torch.trace(E @ S_y @ E.T) + torch.trace(O @ L_noise.T @ L_noise @ O.T)) / torch.trace(S_y))


def test_reconstruction_guidance_against_the_exact_conditional_law():
    Sigma, O = power_law_cov(N), block_mean(N, K)
    S_y = O @ Sigma @ O.T
    B, Sigma_c = exact_law(Sigma, O)
    results = {}
    for weight in (0.0, 0.5, 1.0):
        guided = ReconstructionGuidance(ExactDenoiser(PROCESS, Sigma, N), torch.zeros(1, 1, 4, 4, dtype=f64), weight)
        L_noise, L_y = run_linear(BindY(guided), 4.0, 48)
        results[weight] = {"consistency": consistency(L_noise, L_y, O, S_y), "mean_error": rel(L_y.T, B),
                           "covariance_error": rel(L_noise.T @ L_noise, Sigma_c)}
        print(f"reconstruction guidance w={weight}: {results[weight]}")
    assert results[1.0]["consistency"] < 0.2 * results[0.0]["consistency"]
    assert results[1.0]["mean_error"] < results[0.0]["mean_error"]
    assert results[0.5]["consistency"] < results[0.0]["consistency"]


class BindY:
    """Lets `run_linear` bind the per-row y of a ReconstructionGuidance (as a 4x4 image per row)."""

    def __init__(self, guided: ReconstructionGuidance):
        self.guided = guided

    @property
    def y(self):
        return self.guided.y

    @y.setter
    def y(self, rows):
        self.guided.y = rows.reshape(-1, 1, N >> K, N >> K)

    def __call__(self, x, sigma, cond=None, stage=None):
        return self.guided(x, sigma, cond, stage)


def test_the_entry_refuses_states_of_another_stage():
    from edify.errors import EdifyError

    y = torch.zeros(1, 1, 4, 4)
    with pytest.raises(EdifyError, match="stage-1 state, not stage 2"):
        entry_state(y, 2.0, PROCESS, 2)
    assert math.isfinite(float(entry_state(y, 4.0, PROCESS, 2).sum()))
