"""Noise-level schedules for sampling: pure functions returning float64 tensors, high to low.

`karras_sigmas` is the rho-schedule of Karras et al. 2022 (EDM, Eq. 5 of that paper).
`laplacian_sigmas` runs one Karras schedule per resolution stage of a `LaplacianProcess`, so that
each switch sigma s_j* is a schedule point exactly (section 2.2: the state changes resolution
there), and ends with 0. All sigmas are in full-resolution units.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from edify.core.laplacian import LaplacianProcess
from edify.errors import EdifyError


@dataclass(frozen=True)
class SamplingPlan:
    """How a number of steps becomes a schedule: the split across stages and the step placement.

    stage_weights: share of the steps per stage, finest first (`split_steps`); rho and
    ramp_weight: the step placement inside each stage (`ramp_aware_sigmas`).
    """

    sampler: str
    stage_weights: tuple[float, ...]
    rho: float = 7.0
    ramp_weight: float = 0.0
    sigma_min: float = 0.002
    sigma_max: float = 80.0


def split_steps(num_steps: int, stage_weights) -> tuple[int, ...]:
    """num_steps over the stages in proportion to stage_weights (finest first), at least one each.

    Stage j gets the integer part of num_steps * w_j (at least 1), then the steps left go by
    largest remainder, ties to the coarser (cheaper) stage.
    """
    weights = [float(w) for w in stage_weights]
    K = len(weights)
    if not weights or any(not w > 0 or not math.isfinite(w) for w in weights):
        raise EdifyError(f"stage weights must be positive and finite, got {tuple(stage_weights)}")
    if not isinstance(num_steps, int) or num_steps < K:
        raise EdifyError(f"need at least one step per stage: {K} stages, got {num_steps!r} steps")
    share = [num_steps * w / sum(weights) for w in weights]
    steps = [max(1, int(v)) for v in share]
    while sum(steps) > num_steps:  # the floor of 1 overdrew: take from the most over-served stage
        j = max((j for j in range(K) if steps[j] > 1), key=lambda j: steps[j] - share[j])
        steps[j] -= 1
    order = sorted(range(K), key=lambda j: (-(share[j] - steps[j]), -j))
    for j in order[:num_steps - sum(steps)]:
        steps[j] += 1
    return tuple(steps)


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


def ramp_aware_sigmas(n: int, sigma_min: float, sigma_max: float, process: LaplacianProcess,
                      rho: float = 7.0, ramp_weight: float = 0.0) -> Tensor:
    """n levels from sigma_max to sigma_min, uniform in the progress coordinate

        p(sigma) = k(sigma) + ramp_weight * sum_i (a_i(sigma) - a_i(sigma_max)),

    with k the Karras coordinate ((sigma_max^(1/rho) - sigma^(1/rho)) / (sigma_max^(1/rho) -
    sigma_min^(1/rho)), EDM Eq. 5) and a_i the band attenuations of `process`. A band whose ramp
    lies in [sigma_min, sigma_max] thus gets about ramp_weight / (1 + ramp_weight) of the steps
    spread over its ramp, where its signal appears and the denoiser's estimate of it changes
    fastest; the smooth cosine ramp keeps successive step sizes close, which multistep methods
    need. ramp_weight = 0 is `karras_sigmas` exactly. No 0 is appended.
    """
    if not ramp_weight > 0:
        if ramp_weight != 0 or not math.isfinite(ramp_weight):
            raise EdifyError(f"ramp_weight must be finite and >= 0, got {ramp_weight}")
        return karras_sigmas(n, sigma_min, sigma_max, rho, append_zero=False)
    if not isinstance(n, int) or n < 1:
        raise EdifyError(f"number of steps must be an integer >= 1, got {n!r}")
    _check_range(sigma_min, sigma_max)
    if n == 1:
        return torch.tensor([float(sigma_max)], dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    a_top = process.attenuation(float(sigma_max))

    def progress(sigma: Tensor) -> Tensor:
        k = (hi - sigma ** (1 / rho)) / (hi - lo)
        return k + ramp_weight * (process.attenuation(sigma) - a_top).sum(-1)

    target = torch.arange(n, dtype=torch.float64) / (n - 1) * progress(torch.tensor(float(sigma_min), dtype=torch.float64))
    # bisection in log sigma: p is increasing as sigma decreases
    log_lo = torch.full((n,), math.log(sigma_min), dtype=torch.float64)
    log_hi = torch.full((n,), math.log(sigma_max), dtype=torch.float64)
    for _ in range(100):
        mid = (log_lo + log_hi) / 2
        below = progress(mid.exp()) > target  # mid is past the target: the answer is above mid
        log_lo, log_hi = torch.where(below, mid, log_lo), torch.where(below, log_hi, mid)
    sigmas = ((log_lo + log_hi) / 2).exp()
    sigmas[0], sigmas[-1] = sigma_max, sigma_min  # endpoints exactly
    return sigmas


def laplacian_sigmas(process: LaplacianProcess, steps_per_stage: int | tuple[int, ...],
                     sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
                     ramp_weight: float = 0.0, final_stage: int = 0) -> Tensor:
    """A schedule that includes every switch sigma in (sigma_min, sigma_max) exactly, ending with 0.

    steps_per_stage[j] is the number of sampler steps taken at stage j (resolution R / 2^j); an int
    applies to every stage. A step from s to s_next runs at stage `process.stage(s_next)`, so stage j
    covers [s_j*, s_{j+1}*] (with s_K* = sigma_max) and stage 0 covers [sigma_min, s_1*] plus the
    final step to 0. Stages above sigma_max are skipped. Total sampler steps: sum of the used stages.

    ramp_weight > 0 places each stage's steps with `ramp_aware_sigmas` (more of them on the ramp
    of the band born in that stage). final_stage = j ends the schedule at stage j: it covers
    [sigma_min, s_{j+1}*] and the step to 0 there, and steps_per_stage[0..j-1] are ignored.
    """
    _check_range(sigma_min, sigma_max)
    K = process.levels
    steps = (steps_per_stage,) * K if isinstance(steps_per_stage, int) else tuple(steps_per_stage)
    if len(steps) != K:
        raise EdifyError(f"steps_per_stage needs {K} values (one per stage), got {len(steps)}")
    if not isinstance(final_stage, int) or not 0 <= final_stage < K:
        raise EdifyError(f"final stage must be in 0..{K - 1}, got {final_stage!r}")
    if any(not isinstance(n, int) or n < 1 for n in steps[final_stage:]):
        raise EdifyError(f"every stage needs at least one step, got steps per stage {steps[final_stage:]}")
    # stage j spans [edges[j], edges[j+1]]: edges = sigma_min, the switch sigmas inside the range, sigma_max
    inside = [s for s in process.switch_sigmas[final_stage:] if sigma_min < s < sigma_max]
    first_stage = max(process.stage(sigma_min), final_stage)  # switch sigmas below sigma_min never apply
    edges = [float(sigma_min), *inside, float(sigma_max)]
    parts = []
    for k in reversed(range(len(edges) - 1)):
        lo, hi, stage = edges[k], edges[k + 1], first_stage + k
        if k == 0 and first_stage == final_stage:
            # the final step to 0 also runs at the final stage: n points down to sigma_min, then 0
            seg = ramp_aware_sigmas(steps[stage], lo, hi, process, rho, ramp_weight) if steps[stage] > 1 else \
                torch.tensor([hi], dtype=torch.float64)
        else:
            seg = ramp_aware_sigmas(steps[stage] + 1, lo, hi, process, rho, ramp_weight)[:-1]
        parts.append(seg)
    if first_stage > final_stage:
        parts.append(torch.tensor([float(sigma_min)], dtype=torch.float64))  # then one step to 0
    return torch.cat([*parts, torch.zeros(1, dtype=torch.float64)])


def _check_range(sigma_min: float, sigma_max: float) -> None:
    if not (0 < sigma_min < sigma_max) or not math.isfinite(sigma_max):
        raise EdifyError(f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")


# The pipeline's default and the settings before the ramp-aware schedule (bench/closed_form_nfe.py
# measures both: docs/laplacian.md, "Choosing the schedule"). Empty stage weights mean
# `default_stage_weights(levels)`.
SAMPLING = SamplingPlan("dpmpp_2m", stage_weights=(), rho=7.0, ramp_weight=0.45)
LEGACY_SAMPLING = SamplingPlan("dpmpp_2m", stage_weights=(1.0, 1.0, 1.0), rho=7.0, ramp_weight=0.0)


def default_stage_weights(levels: int) -> tuple[float, ...]:
    """The measured split for 3 levels (finest first): most steps at the finest stage, where two
    bands are born and the denoiser changes fastest; equal shares for other level counts."""
    return (0.55, 0.25, 0.2) if levels == 3 else (1.0,) * levels
