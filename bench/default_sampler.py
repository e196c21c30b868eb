"""The default sampling schedule against the legacy one on a real model, at equal NFE.

    python bench/default_sampler.py --data data/emoji --num-samples 924        # the shipped model
    python bench/default_sampler.py --data data/emoji --plans default --sigma-min 0.002,0.15,0.4
    python bench/default_sampler.py --smoke                                    # CPU, tiny random model

Both rows use the same sampler (DPM-Solver++(2M)), guidance, NFE, captions, styles and seeds
(`edify eval`'s rule); only the schedule differs:

- legacy: steps split equally across the stages, one Karras ramp (rho 7) per stage;
- default: `edify.core.schedules.SAMPLING`, the split and the ramp-aware step placement chosen
  on the closed-form benchmark (bench/closed_form_nfe.py, docs/laplacian.md).

Prints one JSON line per schedule: FID, KID, sliced Wasserstein per scale, prompt retrieval and
seconds per image (generation only, this machine, the threads given).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.sampler_nfe import smoke_data, tiny_model  # noqa: E402
from edify.core.schedules import LEGACY_SAMPLING, SAMPLING, default_stage_weights  # noqa: E402
from edify.eval.cli import default_cache  # noqa: E402
from edify.eval.evaluate import evaluate_pipeline, load_split, real_reference  # noqa: E402
from edify.eval.features import InceptionFeatures  # noqa: E402
from edify.pipelines.generate_cli import default_model  # noqa: E402
from edify.pipelines.text2image import TextToImagePipeline  # noqa: E402


def with_plan(pipe: TextToImagePipeline, plan, levels: int, sigma_min: float | None = None) -> None:
    """Make the pipeline's defaults follow a SamplingPlan (split, rho, ramp weight), and end the
    schedule at `sigma_min` when given (the last sigma before the final step to 0)."""
    defaults = dataclasses.replace(pipe.config.defaults, rho=plan.rho, ramp_weight=plan.ramp_weight,
                                   stage_weights=plan.stage_weights or default_stage_weights(levels))
    if sigma_min is not None:
        defaults = dataclasses.replace(defaults, sigma_min=sigma_min)
    pipe.config = dataclasses.replace(pipe.config, defaults=defaults)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="model folder (default: the shipped demo model)")
    parser.add_argument("--data", default=None, help="dataset folder with a val/ split")
    parser.add_argument("--split", default="val")
    parser.add_argument("--num-samples", type=int, default=924)
    parser.add_argument("--nfe", type=int, default=24)
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cache", default=None, help="Inception feature cache folder")
    parser.add_argument("--plans", default="legacy,default")
    parser.add_argument("--sigma-min", default=None,
                        help="comma-separated last sigmas before the final step to 0 (default: the model's): "
                             "each plan runs once per value")
    parser.add_argument("--smoke", action="store_true", help="tiny random model and data, seconds")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"# {' '.join(sys.argv)}  (threads: {torch.get_num_threads()})", flush=True)
    tmp = tempfile.TemporaryDirectory()
    if args.smoke:
        model, data = tiny_model(Path(tmp.name) / "model"), smoke_data(Path(tmp.name) / "data")
        args.num_samples, args.nfe, args.batch = 8, 6, 8
    else:
        model = Path(args.model) if args.model else default_model()
        if args.data is None:
            parser.error("--data is required (or --smoke)")
        data = Path(args.data)
    pipe = TextToImagePipeline.from_pretrained(model).to(args.device)
    real = load_split(data, args.split, pipe.config.resolution)
    extractor = InceptionFeatures(args.device, batch_size=args.batch)
    cache = Path(tmp.name) / "cache" if args.smoke else (Path(args.cache) if args.cache else default_cache())
    real_stats = real_reference(real, data, args.split, pipe.config.resolution, extractor, cache)
    plans = {"legacy": LEGACY_SAMPLING, "default": SAMPLING}
    sigma_mins = [float(v) for v in args.sigma_min.split(",")] if args.sigma_min else [None]
    for name, sigma_min in ((n, v) for n in args.plans.split(",") for v in sigma_mins):
        with_plan(pipe, plans[name], pipe.process.levels, sigma_min)
        start = time.perf_counter()
        result = evaluate_pipeline(pipe, real, args.num_samples, sampler="dpmpp_2m", steps=args.nfe,
                                   guidance=args.guidance, batch_size=args.batch, extractor=extractor,
                                   real_stats=real_stats, warn=False)
        seconds = time.perf_counter() - start
        steps = pipe.stage_steps(args.nfe)
        print(json.dumps({"schedule": name, "steps_per_stage": list(steps), "ramp_weight": plans[name].ramp_weight,
                          "sigma_min": pipe.config.defaults.sigma_min, "guidance": args.guidance,
                          **result, "seconds_total": round(seconds, 1),
                          "seconds_per_image_with_metrics": round(seconds / args.num_samples, 3)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
