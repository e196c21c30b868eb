"""Noise-level schedules for sampling: pure functions returning float64 tensors, high to low.

`karras_sigmas` is the rho-schedule of Karras et al. 2022 (EDM, Eq. 5 of that paper).
`laplacian_sigmas` runs one Karras schedule per resolution stage of a `LaplacianProcess`, so that
each switch sigma s_j* is a schedule point exactly (section 2.2: the state changes resolution
there), and ends with 0. All sigmas are in full-resolution units.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from edify.core.laplacian import LaplacianProcess
from edify.errors import EdifyError


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0,
                  append_zero: bool = True) -> Tensor:
    """n levels from sigma_max to sigma_min, uniform in sigma^(1/rho) (EDM Eq. 5), then 0."""
    if not isinstance(n, int) or n < 1:
        raise EdifyError(f"number of steps must be an integer >= 1, got {n!r}")
    _check_range(sigma_min, sigma_max)
    if n == 1:
        sigmas = torch.tensor([float(sigma_max)], dtype=torch.float64)
    else:
        i = torch.arange(n, dtype=torch.float64) / (n - 1)
        lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
        sigmas = (hi + i * (lo - hi)) ** rho
        sigmas[0], sigmas[-1] = sigma_max, sigma_min  # endpoints exactly
    if append_zero:
        sigmas = torch.cat([sigmas, sigmas.new_zeros(1)])
    return sigmas


def laplacian_sigmas(process: LaplacianProcess, steps_per_stage: int | tuple[int, ...],
                     sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> Tensor:
    """A schedule that includes every switch sigma in (sigma_min, sigma_max) exactly, ending with 0.

    steps_per_stage[j] is the number of sampler steps taken at stage j (resolution R / 2^j); an int
    applies to every stage. A step from s to s_next runs at stage `process.stage(s_next)`, so stage j
    covers [s_j*, s_{j+1}*] (with s_K* = sigma_max) and stage 0 covers [sigma_min, s_1*] plus the
    final step to 0. Stages above sigma_max are skipped. Total sampler steps: sum of the used stages.
    """
    _check_range(sigma_min, sigma_max)
    K = process.levels
    steps = (steps_per_stage,) * K if isinstance(steps_per_stage, int) else tuple(steps_per_stage)
    if len(steps) != K:
        raise EdifyError(f"steps_per_stage needs {K} values (one per stage), got {len(steps)}")
    if any(not isinstance(n, int) or n < 1 for n in steps):
        raise EdifyError(f"steps per stage must be integers >= 1, got {steps}")
    # stage j spans [edges[j], edges[j+1]]: edges = sigma_min, the switch sigmas inside the range, sigma_max
    inside = [s for s in process.switch_sigmas if sigma_min < s < sigma_max]
    first_stage = process.stage(sigma_min)  # switch sigmas below sigma_min never apply
    edges = [float(sigma_min), *inside, float(sigma_max)]
    parts = []
    for k in reversed(range(len(edges) - 1)):
        lo, hi, stage = edges[k], edges[k + 1], first_stage + k
        if stage == 0:
            # the final step to 0 also runs at stage 0: n points down to sigma_min, then 0
            seg = karras_sigmas(steps[0], lo, hi, rho, append_zero=False) if steps[0] > 1 else \
                torch.tensor([hi], dtype=torch.float64)
        else:
            seg = karras_sigmas(steps[stage] + 1, lo, hi, rho, append_zero=False)[:-1]
        parts.append(seg)
    if first_stage > 0:
        parts.append(torch.tensor([float(sigma_min)], dtype=torch.float64))  # then one step to 0
    return torch.cat([*parts, torch.zeros(1, dtype=torch.float64)])


def _check_range(sigma_min: float, sigma_max: float) -> None:
    if not (0 < sigma_min < sigma_max) or not math.isfinite(sigma_max):
        raise EdifyError(f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")
