"""Frechet Inception Distance and Kernel Inception Distance from features, with cached references.

FID (Heusel et al. 2017, the Frechet distance of their TTUR paper) fits a Gaussian to each feature set:

    FID = |mu_r - mu_g|^2 + tr(Sigma_r + Sigma_g - 2 (Sigma_r Sigma_g)^(1/2))

tr (Sigma_r Sigma_g)^(1/2) is computed without a non-symmetric sqrtm: the eigenvalues of
Sigma_r Sigma_g equal those of the symmetric PSD matrix Sigma_r^(1/2) Sigma_g Sigma_r^(1/2). When
the features are at hand and one set is smaller than the feature dimension (the usual case on small
validation splits, where Sigma is singular), the trace is exact in feature space: with centred
features A_r, A_g, the non-zero eigenvalues of Sigma_r Sigma_g are the squared singular values of
A_r A_g^T / sqrt((n_r - 1)(n_g - 1)), so the trace is that matrix's nuclear norm.

KID (Binkowski et al. 2018, "Demystifying MMD GANs") is the unbiased MMD^2 estimate with the cubic
polynomial kernel k(x, y) = (x.y / d + 1)^3, averaged over random subsets; unbiased, so it is
meaningful with far fewer samples than FID.

Reference statistics (mu, Sigma and the features themselves, for KID and retrieval) are cached as
safetensors under a key naming the dataset, split, resolution and feature extractor.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from edify.errors import EdifyError

# Below this many samples per set the 2048-d covariance is singular and FID is strongly biased
# upward (its bias falls like 1/N, Chong & Forsyth 2020); 2048 = the feature dimension.
FID_MIN_SAMPLES = 2048
# KID is unbiased; its subsets need >= 2 samples, and below ~100 its spread swamps most differences.
KID_MIN_SAMPLES = 100


@dataclass(frozen=True)
class FeatureStats:
    """A feature set and its Gaussian fit: mu [d] and Sigma [d, d] in float64, features [N, d] float32."""

    mu: Tensor
    sigma: Tensor
    features: Tensor

    @staticmethod
    def from_features(features: Tensor) -> FeatureStats:
        f = _check_features(features, "features", min_count=2).float()  # stored as float32: fit what is stored
        f64 = f.double()
        mu = f64.mean(0)
        A = f64 - mu
        return FeatureStats(mu, A.T @ A / (f.shape[0] - 1), f)  # unbiased covariance

    @property
    def count(self) -> int:
        return self.features.shape[0]

    def save(self, path: str | os.PathLike, meta: dict | None = None) -> None:
        """Atomic safetensors write (mu, sigma, features) with `meta` as JSON metadata."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        tensors = {"mu": self.mu.contiguous(), "sigma": self.sigma.contiguous(),
                   "features": self.features.contiguous()}
        save_file(tensors, str(tmp), metadata={"meta": json.dumps(meta or {})})
        os.replace(tmp, path)

    @staticmethod
    def load(path: str | os.PathLike) -> tuple[FeatureStats, dict]:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("meta", "{}"))
        t = load_file(str(path))
        return FeatureStats(t["mu"], t["sigma"], t["features"]), meta


def _check_features(f: Tensor, name: str, min_count: int) -> Tensor:
    if not isinstance(f, Tensor) or f.dim() != 2:
        raise EdifyError(f"{name} must be a tensor [N, d], got shape {tuple(getattr(f, 'shape', ()))}")
    if f.shape[0] < min_count:
        raise EdifyError(f"{name} needs at least {min_count} samples, got {f.shape[0]}")
    if not torch.isfinite(f).all():
        raise EdifyError(f"{name} must be finite, got NaN or inf values")
    return f


def _psd_sqrt(S: np.ndarray) -> np.ndarray:
    w, V = np.linalg.eigh(S)
    return (V * np.sqrt(np.clip(w, 0, None))) @ V.T


def trace_sqrt_product(sigma1: Tensor, sigma2: Tensor) -> float:
    """tr (Sigma_1 Sigma_2)^(1/2) = sum_i sqrt(eig_i(Sigma_1^(1/2) Sigma_2 Sigma_1^(1/2))) (PSD inputs)."""
    S1, S2 = sigma1.double().cpu().numpy(), sigma2.double().cpu().numpy()
    R = _psd_sqrt(S1)
    M = R @ S2 @ R
    eig = np.linalg.eigvalsh((M + M.T) / 2)
    return float(np.sqrt(np.clip(eig, 0, None)).sum())


def frechet_distance(mu1: Tensor, sigma1: Tensor, mu2: Tensor, sigma2: Tensor) -> float:
    """Frechet distance of N(mu1, Sigma1) and N(mu2, Sigma2) (Heusel et al. 2017, FID)."""
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.shape[0],) * 2:
        raise EdifyError(f"Gaussian statistics must agree in dimension, got mu {tuple(mu1.shape)} / "
                         f"{tuple(mu2.shape)} and sigma {tuple(sigma1.shape)} / {tuple(sigma2.shape)}")
    diff = (mu1.double() - mu2.double()).cpu()
    # |mu_1 - mu_2|^2 + tr Sigma_1 + tr Sigma_2 - 2 tr (Sigma_1 Sigma_2)^(1/2)
    value = float(diff @ diff) + float(sigma1.double().trace() + sigma2.double().trace()) \
        - 2 * trace_sqrt_product(sigma1, sigma2)
    return value


def fid(real: FeatureStats | Tensor, fake: FeatureStats | Tensor) -> float:
    """FID of two feature sets (or their FeatureStats); exact low-rank trace when a set is small."""
    r = real if isinstance(real, FeatureStats) else FeatureStats.from_features(real)
    g = fake if isinstance(fake, FeatureStats) else FeatureStats.from_features(fake)
    if r.mu.shape != g.mu.shape:
        raise EdifyError(f"feature sets must have the same dimension, got {r.mu.shape[0]} and {g.mu.shape[0]}")
    d = r.mu.shape[0]
    if min(r.count, g.count) > d:  # full-rank covariances: the symmetric eigenvalue route
        return frechet_distance(r.mu, r.sigma, g.mu, g.sigma)
    A_r = (r.features.double() - r.mu).cpu()
    A_g = (g.features.double() - g.mu).cpu()
    # tr (Sigma_r Sigma_g)^(1/2) = || A_r A_g^T ||_* / sqrt((n_r - 1)(n_g - 1))  (module docstring)
    cross = (A_r @ A_g.T).numpy() / np.sqrt((r.count - 1) * (g.count - 1))
    tr_sqrt = float(np.linalg.svd(cross, compute_uv=False).sum())
    diff = (r.mu - g.mu).double().cpu()
    tr_r = float((A_r * A_r).sum()) / (r.count - 1)
    tr_g = float((A_g * A_g).sum()) / (g.count - 1)
    return float(diff @ diff) + tr_r + tr_g - 2 * tr_sqrt


def polynomial_kernel(x: Tensor, y: Tensor, degree: int = 3, coef0: float = 1.0) -> Tensor:
    """k(x, y) = (x.y / d + coef0)^degree (Binkowski et al. 2018, the KID kernel)."""
    return (x @ y.T / x.shape[1] + coef0) ** degree


def mmd2_unbiased(x: Tensor, y: Tensor, degree: int = 3) -> float:
    """Unbiased MMD^2 (Gretton et al. 2012, Eq. 3): within-set means leave out the diagonal."""
    m, n = x.shape[0], y.shape[0]
    if m < 2 or n < 2:
        raise EdifyError(f"the unbiased MMD needs at least 2 samples per set, got {m} and {n}")
    k_xx, k_yy, k_xy = polynomial_kernel(x, x, degree), polynomial_kernel(y, y, degree), polynomial_kernel(x, y, degree)
    # sum_{i != j} k(x_i, x_j) / (m (m-1)) + sum_{i != j} k(y_i, y_j) / (n (n-1)) - 2 mean k(x_i, y_j)
    return float((k_xx.sum() - k_xx.diagonal().sum()) / (m * (m - 1))
                 + (k_yy.sum() - k_yy.diagonal().sum()) / (n * (n - 1)) - 2 * k_xy.mean())


def kid(real: Tensor, fake: Tensor, subsets: int = 100, subset_size: int = 1000,
        seed: int = 0) -> tuple[float, float]:
    """KID: mean and standard deviation of the unbiased MMD^2 over random subsets (Binkowski 2018).

    Each subset draws min(subset_size, n_real, n_fake) samples without replacement from each set;
    with that size equal to both set sizes every subset is the full set and `subsets` is 1.
    """
    real = _check_features(real, "real features", 2).double()
    fake = _check_features(fake, "fake features", 2).double()
    if real.shape[1] != fake.shape[1]:
        raise EdifyError(f"feature sets must have the same dimension, got {real.shape[1]} and {fake.shape[1]}")
    if subsets < 1 or subset_size < 2:
        raise EdifyError(f"KID needs subsets >= 1 and subset_size >= 2, got {subsets} and {subset_size}")
    size = min(subset_size, real.shape[0], fake.shape[0])
    if size == real.shape[0] == fake.shape[0]:
        subsets = 1
    g = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(subsets):
        x = real[torch.randperm(real.shape[0], generator=g)[:size]]
        y = fake[torch.randperm(fake.shape[0], generator=g)[:size]]
        values.append(mmd2_unbiased(x, y))
    v = torch.tensor(values, dtype=torch.float64)
    return float(v.mean()), float(v.std()) if len(values) > 1 else 0.0


# ---------------------------------------------------------------------------------------------
# Cached reference statistics


def cache_key(dataset: str, split: str, resolution: int, extractor_id: str, fingerprint: str = "") -> str:
    """File name of cached statistics: readable parts plus a hash of everything that defines them."""
    name = Path(str(dataset).rstrip("/")).name or "data"
    digest = hashlib.sha1(json.dumps([str(dataset), split, resolution, extractor_id, fingerprint]).encode())
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in f"{name}-{split}-{resolution}px")
    return f"{safe}-{digest.hexdigest()[:16]}"


def reference_stats(key: str, cache_dir: str | os.PathLike | None,
                    compute: Callable[[], tuple[Tensor, dict]]) -> tuple[FeatureStats, dict]:
    """Statistics under `key` from `cache_dir`, else `compute()` -> (features, meta), saved there.

    `cache_dir=None` disables the cache. A file that fails to read is recomputed and rewritten.
    """
    path = Path(cache_dir) / f"{key}.safetensors" if cache_dir is not None else None
    if path is not None and path.is_file():
        try:
            return FeatureStats.load(path)
        except Exception:  # truncated or foreign file: recompute below
            pass
    features, meta = compute()
    stats = FeatureStats.from_features(features)
    if path is not None:
        stats.save(path, meta)
    return stats, meta
