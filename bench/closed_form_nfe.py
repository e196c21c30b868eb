"""Per-band accuracy of every sampler against a closed form, at total NFE 6 to 96.

Gaussian data x0 ~ N(0, Sigma) on 1 x n x n images with a power-law spectrum 1 / (|f|^alpha + 1),
a 3-level Laplacian process (the pipeline's default: switch sigmas 1 and 5, cosine ramp of width
2) and the exact denoiser of every stage (`edify.core.gaussian`). With exact denoisers a sampler
is linear in its Gaussian inputs, so the covariance C of its output is computed exactly, with no
sampling noise. Per band (finest first) it prints the variance ratio tr(Pi_i C) / tr(Pi_i Sigma)
and the whitened error ||S_i^-1/2 C_i S_i^-1/2 - I||_F / sqrt(dim_i), where S_i, C_i are Sigma and
C restricted to the band; and overall the relative error ||C - Sigma||_F / ||Sigma||_F.

Each sampler runs with the pipeline's schedule settings (`edify.core.schedules.SAMPLING`: the
step split across stages and the ramp-aware step placement); `--legacy` uses one Karras ramp per
stage and an equal split, the settings before them.

    python bench/closed_form_nfe.py                     # the table of docs/laplacian.md
    python bench/closed_form_nfe.py --legacy            # the same with the legacy schedule
    python bench/closed_form_nfe.py --json              # one JSON line per cell

Target (docs/benchmarks.md): the default sampler keeps every band's variance ratio within
0.98-1.02 at 24 NFE (0.95-1.05 at 12), with a relative covariance error at 24 NFE at most twice
that of EDM's Heun at 96 NFE.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from edify.core.gaussian import ExactDenoiser, band_report, output_covariance, power_law_cov
from edify.core.laplacian import LaplacianProcess
from edify.core.samplers import SAMPLERS, TWO_EVALUATIONS
from edify.core.schedules import (LEGACY_SAMPLING, SAMPLING, default_stage_weights, laplacian_sigmas,
                                  split_steps)


def steps_for_nfe(sampler: str, nfe: int) -> int:
    """Sampler steps that use at most `nfe` evaluations (2-evaluation methods: 2 n - 1)."""
    return (nfe + 1) // 2 if sampler in TWO_EVALUATIONS else nfe


def run_cell(sampler: str, nfe: int, process: LaplacianProcess, Sigma, denoiser, n: int, plan) -> dict | None:
    steps = steps_for_nfe(sampler, nfe)
    if steps < process.levels:
        return None  # fewer steps than stages
    split = split_steps(steps, plan.stage_weights or default_stage_weights(process.levels))
    sigmas = laplacian_sigmas(process, split, plan.sigma_min, plan.sigma_max, plan.rho, plan.ramp_weight)
    denoiser.calls = 0
    C = output_covariance(SAMPLERS[sampler], process, sigmas, denoiser, Sigma, n)
    r = band_report(C, Sigma, n, process.levels)
    return {"sampler": sampler, "nfe": denoiser.calls, "steps": list(split),
            "variance_ratio": [round(v, 4) for v in r.variance_ratio],
            "whitened_error": [round(v, 4) for v in r.whitened_error],
            "relative_error": round(r.relative_error, 5), "whitened_total": round(r.whitened_total, 4)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=16, help="image side (default 16)")
    parser.add_argument("--alpha", type=float, default=2.0, help="spectrum exponent: 1 / (|f|^alpha + 1)")
    parser.add_argument("--switch-sigmas", default="1,5")
    parser.add_argument("--ramp-width", type=float, default=2.0)
    parser.add_argument("--nfe", default="6,12,24,48,96")
    parser.add_argument("--samplers", default=",".join(SAMPLERS))
    parser.add_argument("--legacy", action="store_true", help="Karras ramp per stage, equal split")
    parser.add_argument("--json", action="store_true", help="one JSON line per cell")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # small float64 solves: one thread is fastest
    switch = tuple(float(v) for v in args.switch_sigmas.split(","))
    process = LaplacianProcess(len(switch) + 1, switch, "cosine", args.ramp_width)
    Sigma = power_law_cov(args.n, args.alpha)
    denoiser = ExactDenoiser(process, Sigma, args.n)
    plan = LEGACY_SAMPLING if args.legacy else SAMPLING
    print(f"# {' '.join(sys.argv)}\n# n={args.n} alpha={args.alpha} switch={switch} "
          f"ramp_width={args.ramp_width} plan={plan}")
    start = time.perf_counter()
    rows = []
    for sampler in args.samplers.split(","):
        for nfe in (int(v) for v in args.nfe.split(",")):
            row = run_cell(sampler, nfe, process, Sigma, denoiser, args.n, plan)
            if row is not None:
                rows.append(row)
                if args.json:
                    print(json.dumps(row))
    if not args.json:
        bands = " | ".join(f"band {i + 1}" for i in range(process.levels))
        print(f"| sampler | NFE | steps (finest first) | variance ratio: {bands} | whitened error: {bands} "
              f"| relative error |")
        print("|---|---|---|" + "---|" * (2 * process.levels) + "---|")
        for r in rows:
            cells = [f"{v:.3f}" for v in r["variance_ratio"]] + [f"{v:.3f}" for v in r["whitened_error"]]
            print(f"| {r['sampler']} | {r['nfe']} | {r['steps']} | {' | '.join(cells)} | {r['relative_error']:.4f} |")
    print(f"# {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
