"""The closed-form test of the Laplacian samplers (DESIGN.md section 1).

Gaussian data x0 ~ N(0, Sigma) with a power-law spectrum on 1x16x16 images. At every stage j the
exact denoiser is linear: E[down^j x0 | y] = D_j Sigma M^T (M Sigma M^T + s_j^2 I)^-1 y with
M = D_j A(s), s_j = s / 2^j. Running each sampler with these denoisers must reproduce Sigma:
(1) by sampling, within 1.2x the error of as many exact draws; (2) exactly, by pushing unit
basis vectors through the (then linear) sampler, with the error shrinking at the method's order.
"""

import pytest
import torch

import edify.core.laplacian as laplacian_module
from edify.core.laplacian import LaplacianProcess
from edify.core.samplers import SAMPLERS, initial_state
from edify.core.schedules import laplacian_sigmas

f64 = torch.float64
N_SIDE = 16
SIGMA_MIN, SIGMA_MAX = 0.002, 80.0
PROCESSES = {3: LaplacianProcess(3, (0.8, 4.0), ramp="cosine", ramp_width=2.0), 1: LaplacianProcess(1, ())}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # small float64 solves run far faster on one thread on a shared 2-core machine
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def block_mean(n: int, k: int) -> torch.Tensor:
    """down^k as an (n/2^k)^2 x n^2 matrix on row-major n x n images (built independently)."""
    m = 2**k
    d1 = torch.kron(torch.eye(n // m, dtype=f64), torch.ones(1, m, dtype=f64) / m)
    return torch.kron(d1, d1)


def power_law_cov(n: int) -> torch.Tensor:
    """Stationary periodic field with spectrum 1 / (|f|^2 + 1), unit per-pixel variance."""
    f = torch.fft.fftfreq(n, dtype=f64) * n
    c = torch.fft.ifft2(1 / (f[:, None] ** 2 + f[None, :] ** 2 + 1)).real
    c = c / c[0, 0]
    i = torch.arange(n)
    dy = (i[:, None, None, None] - i[None, None, :, None]) % n
    dx = (i[None, :, None, None] - i[None, None, None, :]) % n
    return c[dy, dx].reshape(n * n, n * n)


class ExactDenoiser:
    """E[down^j x0 | y] for Gaussian x0, per stage and per sigma (float64 matrices, cached).

    With M = sum_i a_i D_j Pi_i, both M Sigma M^T and D_j Sigma M^T are combinations of per-stage
    blocks D_j Pi_i Sigma Pi_k D_j^T computed once; each sigma then costs one solve.
    """

    def __init__(self, process: LaplacianProcess, Sigma: torch.Tensor, n: int):
        self.process, K = process, process.levels
        P = [block_mean(n, k).T @ block_mean(n, k) * 4**k for k in range(K)]  # up^k down^k
        Pi = [P[i] - P[i + 1] for i in range(K - 1)] + [P[K - 1]]  # band projectors, sum = I
        self.blocks = []
        for j in range(K):
            DPi = [block_mean(n, j) @ Pi_i for Pi_i in Pi]
            SD = [Sigma @ DPi_k.T for DPi_k in DPi]
            self.blocks.append(([[DPi[i] @ SD[k] for k in range(K)] for i in range(K)],
                                [block_mean(n, j) @ SD[k] for k in range(K)]))
        self.cache = {}

    def matrix(self, sigma_px: float, stage: int) -> torch.Tensor:
        """G^T with E[down^j x0 | y] = y G^T for row vectors y."""
        key = (sigma_px, stage)
        if key not in self.cache:
            a = self.process.attenuation(sigma_px * 2**stage).tolist()
            MSM, DSM = self.blocks[stage]
            cov_y = sum(a[i] * a[k] * MSM[i][k] for i in range(len(a)) for k in range(len(a)))
            cov_y = cov_y + sigma_px**2 * torch.eye(len(cov_y), dtype=f64)
            cross = sum(a_k * DSM_k for a_k, DSM_k in zip(a, DSM))  # D_j Sigma M^T
            self.cache[key] = torch.linalg.solve(cov_y, cross.T)
        return self.cache[key]

    def __call__(self, x, sigma, cond=None, stage=None):
        G = self.matrix(float(sigma[0]), int(stage[0]))
        B, C, h, w = x.shape
        return (x.reshape(B, h * w) @ G.to(x.dtype)).reshape(B, C, h, w)


def rel_err(C: torch.Tensor, Sigma: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(C - Sigma) / torch.linalg.matrix_norm(Sigma))


@pytest.fixture(scope="module")
def gaussian():
    Sigma = power_law_cov(N_SIDE)
    return Sigma, {K: ExactDenoiser(p, Sigma, N_SIDE) for K, p in PROCESSES.items()}


# -- (1) by sampling ---------------------------------------------------------------------------

N_SAMPLES = 10_000
# steps per stage; with levels = 1 (plain EDM) the first-order method needs more of them
SAMPLING_STEPS = {("euler", 3): 64, ("heun", 3): 16, ("dpmpp_2m", 3): 32,
                  ("euler", 1): 128, ("heun", 1): 32, ("dpmpp_2m", 1): 48}


@pytest.mark.parametrize("levels", [3, 1])
@pytest.mark.parametrize("name", list(SAMPLERS))
def test_sampler_reproduces_covariance_by_sampling(gaussian, name, levels):
    Sigma, denoisers = gaussian
    process = PROCESSES[levels]
    g = torch.Generator().manual_seed(1)
    x = initial_state(process, SIGMA_MAX, (N_SAMPLES, 1, N_SIDE, N_SIDE), g)
    sigmas = laplacian_sigmas(process, SAMPLING_STEPS[name, levels], SIGMA_MIN, SIGMA_MAX)
    out = SAMPLERS[name](denoisers[levels], x, sigmas, process, generator=g).reshape(N_SAMPLES, -1).double()
    exact = torch.randn(N_SAMPLES, N_SIDE**2, dtype=f64, generator=torch.Generator().manual_seed(2))
    exact = exact @ torch.linalg.cholesky(Sigma).T
    floor = rel_err(exact.T @ exact / N_SAMPLES, Sigma)
    err = rel_err(out.T @ out / N_SAMPLES, Sigma)
    print(f"{name} levels={levels} steps/stage={SAMPLING_STEPS[name, levels]}: "
          f"covariance error {err:.4f}, floor {floor:.4f}")  # shown with pytest -s
    assert err < 1.2 * floor, (err, floor)


# -- (2) exactly: the covariance of the sampler's output distribution ---------------------------

def exact_output_covariance(name: str, levels: int, steps: int, denoiser: ExactDenoiser,
                            Sigma: torch.Tensor, monkeypatch) -> torch.Tensor:
    """Cov of the sampler's output: with linear denoisers it is linear in its Gaussian inputs.

    The inputs are the initial state (whose exact law N(0, D Sigma D^T + s^2 I) we use here, so
    that only the integrator's error remains) and one white-noise draw per switch. Feeding unit
    basis vectors as those inputs, one per batch row, gives the linear map L; Cov = L^T L.
    """
    process = PROCESSES[levels]
    top = levels - 1
    sizes = [(N_SIDE >> j) ** 2 for j in reversed(range(levels))]  # initial, then each switch
    total = sum(sizes)
    offsets = [sum(sizes[:k]) for k in range(levels)]
    switch = iter(range(1, levels))

    def basis_noise(shape, generator=None, device=None, dtype=None):
        k = next(switch)
        e = torch.zeros(total, sizes[k], dtype=dtype)
        e[offsets[k]:offsets[k] + sizes[k]] = torch.eye(sizes[k], dtype=dtype)
        return e.reshape(shape)

    monkeypatch.setattr(laplacian_module, "randn", basis_noise)
    D_top = block_mean(N_SIDE, top)
    s_top = process.pixel_sigma(SIGMA_MAX, top)
    cov_T = D_top @ Sigma @ D_top.T + s_top**2 * torch.eye(sizes[0], dtype=f64)  # law of x_T
    x = torch.zeros(total, sizes[0], dtype=f64)
    x[:sizes[0]] = torch.linalg.cholesky(cov_T).T
    x = x.reshape(total, 1, N_SIDE >> top, N_SIDE >> top)
    sigmas = laplacian_sigmas(process, steps, SIGMA_MIN, SIGMA_MAX)
    L = SAMPLERS[name](denoiser, x, sigmas, process).reshape(total, -1)
    monkeypatch.undo()
    return L.T @ L


# (steps, error bound at 2*steps, minimum error ratio per doubling of the steps)
CONVERGENCE = {"euler": (32, 0.08, 1.7), "heun": (32, 0.005, 3.0), "dpmpp_2m": (32, 0.01, 3.0)}


@pytest.mark.parametrize("levels", [3, 1])
@pytest.mark.parametrize("name", list(SAMPLERS))
def test_sampler_covariance_converges_at_its_order(gaussian, name, levels, monkeypatch):
    Sigma, denoisers = gaussian
    steps, bound, ratio = CONVERGENCE[name]
    errs = [rel_err(exact_output_covariance(name, levels, n, denoisers[levels], Sigma, monkeypatch), Sigma)
            for n in (steps, 2 * steps)]
    assert errs[1] < bound, errs
    assert errs[0] / errs[1] > ratio, errs
