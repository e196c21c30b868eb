"""Closed-form reference for the Laplacian samplers: Gaussian data and its exact denoisers.

For x0 ~ N(0, Sigma) every denoiser of the Laplacian process is linear. A stage-j state is
y = M x0 + s_j n with M = down^j A(sigma) and s_j = sigma / 2^j its per-pixel noise, so

    E[down^j x0 | y] = down^j Sigma M^T (M Sigma M^T + s_j^2 I)^-1 y        (Gaussian conditioning)

(docs/laplacian.md, "How it is tested"). With these denoisers a sampler is a linear map of its
Gaussian inputs (the initial state and one white-noise draw per resolution switch), so the
covariance of its output can be computed exactly, with no sampling error, by pushing unit basis
vectors through it (`output_covariance`). `band_report` compares it with Sigma band by band.

Images are 1 x n x n, flattened row-major; everything is float64.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from edify.core.laplacian import LaplacianProcess
from edify.errors import EdifyError

f64 = torch.float64


def block_mean(n: int, k: int) -> Tensor:
    """down^k as an (n/2^k)^2 x n^2 matrix on row-major n x n images."""
    m = 2**k
    if n % m:
        raise EdifyError(f"image side {n} is not a multiple of {m}")
    d1 = torch.kron(torch.eye(n // m, dtype=f64), torch.ones(1, m, dtype=f64) / m)
    return torch.kron(d1, d1)


def power_law_cov(n: int, alpha: float = 2.0) -> Tensor:
    """Stationary periodic field with spectrum 1 / (|f|^alpha + 1), unit per-pixel variance."""
    f = torch.fft.fftfreq(n, dtype=f64) * n
    c = torch.fft.ifft2(1 / ((f[:, None] ** 2 + f[None, :] ** 2) ** (alpha / 2) + 1)).real
    c = c / c[0, 0]
    i = torch.arange(n)
    dy = (i[:, None, None, None] - i[None, None, :, None]) % n
    dx = (i[None, :, None, None] - i[None, None, None, :]) % n
    return c[dy, dx].reshape(n * n, n * n)


def band_projectors(n: int, levels: int) -> list[Tensor]:
    """Pi_i (n^2 x n^2) for i = 1..K: orthogonal projectors onto the bands, summing to I (Eq. 3)."""
    P = [block_mean(n, k).T @ block_mean(n, k) * 4**k for k in range(levels)]  # up^k down^k
    return [P[i] - P[i + 1] for i in range(levels - 1)] + [P[levels - 1]]


class ExactDenoiser:
    """E[down^j x0 | y] for x0 ~ N(0, Sigma), per stage and per-pixel sigma (matrices cached).

    With M = sum_i a_i D_j Pi_i, both M Sigma M^T and D_j Sigma M^T are combinations of per-stage
    blocks D_j Pi_i Sigma Pi_k D_j^T computed once; each sigma then costs one solve. Follows the
    `Denoiser` contract: called with a batch [B, 1, h, w], per-pixel sigma [B] and stage [B].
    """

    def __init__(self, process: LaplacianProcess, Sigma: Tensor, n: int,
                 attenuation: Callable[[float], list[float]] | None = None):
        """attenuation: sigma -> [a_1, ..., a_K]; default the process's own (a test may pass an
        independent transcription of the ramp, so that the reference does not share its code)."""
        self.process, self.n, K = process, n, process.levels
        self.attenuation = attenuation or (lambda sigma: process.attenuation(sigma).tolist())
        Pi = band_projectors(n, K)
        self.blocks = []
        for j in range(K):
            Dj = block_mean(n, j)
            DPi = [Dj @ Pi_i for Pi_i in Pi]
            SD = [Sigma @ DPi_k.T for DPi_k in DPi]
            self.blocks.append(([[DPi[i] @ SD[k] for k in range(K)] for i in range(K)],
                                [Dj @ SD[k] for k in range(K)]))
        self.cache: dict[tuple[float, int], Tensor] = {}
        self.calls = 0

    def matrix(self, sigma_px: float, stage: int) -> Tensor:
        """G^T with E[down^j x0 | y] = y G^T for row vectors y."""
        key = (sigma_px, stage)
        if key not in self.cache:
            a = list(self.attenuation(sigma_px * 2**stage))
            MSM, DSM = self.blocks[stage]
            cov_y = sum(a[i] * a[k] * MSM[i][k] for i in range(len(a)) for k in range(len(a)))
            cov_y = cov_y + sigma_px**2 * torch.eye(len(cov_y), dtype=f64)
            cross = sum(a_k * DSM_k for a_k, DSM_k in zip(a, DSM))  # D_j Sigma M^T
            self.cache[key] = torch.linalg.solve(cov_y, cross.T)
        return self.cache[key]

    def __call__(self, x: Tensor, sigma, cond=None, stage=None) -> Tensor:
        self.calls += 1
        sigma = torch.as_tensor(sigma).reshape(-1)
        stage = torch.as_tensor(0 if stage is None else stage).reshape(-1)
        G = self.matrix(float(sigma[0]), int(stage[0]))
        B, C, h, w = x.shape
        return (x.reshape(B * C, h * w) @ G.to(x.dtype)).reshape(B, C, h, w)


class BasisNoise:
    """A noise source (see `edify.core.seeding.randn`) that returns unit basis vectors.

    Row r of the batch is input number r of a linear sampler. Draw k (k = 1, 2, ...: the
    switches, and a stochastic sampler's steps) is the identity on its own block of rows and zero
    elsewhere.
    """

    def __init__(self, sizes: list[int]):
        self.sizes, self.total, self.k = sizes, sum(sizes), 0

    def randn(self, shape, device=None, dtype=None) -> Tensor:
        self.k += 1
        if self.k >= len(self.sizes):
            raise EdifyError(f"the sampler drew more noise than the {len(self.sizes) - 1} draws expected")
        start, size = sum(self.sizes[:self.k]), self.sizes[self.k]
        e = torch.zeros(self.total, size, dtype=dtype or f64, device=device)
        e[start:start + size] = torch.eye(size, dtype=e.dtype, device=device)
        return e.reshape(shape)


Sampler = Callable[..., Tensor]


def output_covariance(sampler: Sampler, process: LaplacianProcess, sigmas: Tensor,
                      denoiser: ExactDenoiser, Sigma: Tensor, n: int, **kwargs) -> Tensor:
    """Exact covariance of `sampler`'s output with the exact (linear) denoisers.

    The initial state is drawn from its exact law N(0, D Sigma D^T + s^2 I) at the stage of
    sigmas[0] (rather than pure noise), so that only the integrator's error remains. Inputs: that
    state and every white-noise draw of the sampler (one per switch, and one per step for a
    stochastic sampler; a first pass on one zero state records their sizes); the output is
    L (inputs -> image), Cov = L^T L.
    """
    top = process.stage(float(sigmas[0]))
    final = kwargs.get("final_stage", 0)
    recorder = _DrawRecorder()
    sampler(denoiser, torch.zeros(1, 1, n >> top, n >> top, dtype=f64), sigmas, process,
            generator=recorder, **kwargs)
    switches = top - final
    if sum(1 for size in recorder.sizes if size > 0) < switches:
        raise EdifyError(f"the sampler drew noise {len(recorder.sizes)} times, fewer than its {switches} switches")
    sizes = [(n >> top) ** 2] + recorder.sizes
    noise = BasisNoise(sizes)
    D_top = block_mean(n, top)
    s_top = process.pixel_sigma(float(sigmas[0]), top)
    cov_T = D_top @ Sigma @ D_top.T + s_top**2 * torch.eye(sizes[0], dtype=f64)
    x = torch.zeros(noise.total, sizes[0], dtype=f64)
    x[:sizes[0]] = torch.linalg.cholesky(cov_T).T
    x = x.reshape(noise.total, 1, n >> top, n >> top)
    L = sampler(denoiser, x, sigmas, process, generator=noise, **kwargs).reshape(noise.total, -1)
    if noise.k != len(sizes) - 1:
        raise EdifyError(f"the sampler drew noise {noise.k} times, expected {len(sizes) - 1}")
    return L.T @ L


class _DrawRecorder:
    """A noise source that returns zeros and records the per-row size of every draw."""

    def __init__(self):
        self.sizes: list[int] = []

    def randn(self, shape, device=None, dtype=None) -> Tensor:
        self.sizes.append(math.prod(shape[1:]))
        return torch.zeros(shape, dtype=dtype or f64, device=device)


@dataclass(frozen=True)
class BandReport:
    """Output covariance C against the data's Sigma, overall and per band (finest first)."""

    variance_ratio: tuple[float, ...]  # tr(Pi_i C) / tr(Pi_i Sigma) per band
    whitened_variance: tuple[float, ...]  # tr(S_i^-1 C_i) / dim_i per band: every direction counts alike
    whitened_error: tuple[float, ...]  # ||S_i^-1/2 C_i S_i^-1/2 - I||_F / sqrt(dim_i) per band
    relative_error: float  # ||C - Sigma||_F / ||Sigma||_F
    whitened_total: float  # ||Sigma^-1/2 C Sigma^-1/2 - I||_F / sqrt(n^2)


def _inv_sqrt(S: Tensor) -> Tensor:
    w, V = torch.linalg.eigh(S)
    return V @ torch.diag(w.clamp_min(1e-300).rsqrt()) @ V.T


def _whitened(C: Tensor, S: Tensor) -> float:
    W = _inv_sqrt(S)
    E = W @ C @ W - torch.eye(len(S), dtype=f64)
    return float(torch.linalg.matrix_norm(E) / math.sqrt(len(S)))


def band_basis(n: int, levels: int) -> list[Tensor]:
    """Orthonormal bases U_i (n^2 x dim_i) of the bands: Pi_i = U_i U_i^T."""
    bases = []
    for Pi in band_projectors(n, levels):
        w, V = torch.linalg.eigh(Pi)
        bases.append(V[:, w > 0.5])
    return bases


def band_report(C: Tensor, Sigma: Tensor, n: int, levels: int) -> BandReport:
    """How far C is from Sigma in each band of a `levels`-band pyramid of n x n images."""
    ratios, wvar, errs = [], [], []
    for U in band_basis(n, levels):
        C_i, S_i = U.T @ C @ U, U.T @ Sigma @ U
        ratios.append(float(torch.trace(C_i) / torch.trace(S_i)))
        wvar.append(float(torch.trace(torch.linalg.solve(S_i, C_i)) / len(S_i)))
        errs.append(_whitened(C_i, S_i))
    rel = float(torch.linalg.matrix_norm(C - Sigma) / torch.linalg.matrix_norm(Sigma))
    return BandReport(tuple(ratios), tuple(wvar), tuple(errs), rel, _whitened(C, Sigma))

