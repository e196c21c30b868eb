"""Seconds per 64px image on the CPU with the shipped demo model, after loading.

    python bench/cpu_generate.py                       # the shipped model, its default steps
    python bench/cpu_generate.py --model PATH --steps 24 --threads 2
    python bench/cpu_generate.py --random-preset emoji-64   # same network, random weights
    python bench/cpu_generate.py --guide-weight 0            # the model's autoguidance off

The model (and the text encoder) load first and are not timed; one warm-up image runs, then each
repetition generates one image at batch 1 (text encoding included). The last line printed is
`seconds_per_image: X`, the median over the repetitions.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edify.pipelines.generate_cli import default_model, guidance_value, guide_weight_value  # noqa: E402
from edify.pipelines.text2image import PipelineConfig, TextToImagePipeline  # noqa: E402


def load(args) -> TextToImagePipeline:
    if args.random_preset:
        from edify.networks.presets import build_network
        net = build_network(args.random_preset)
        return TextToImagePipeline(net, PipelineConfig(network=net.config.to_dict()))
    return TextToImagePipeline.from_pretrained(args.model or default_model())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model folder (default: the shipped model)")
    parser.add_argument("--random-preset", default=None, help="time a random network of this preset instead")
    parser.add_argument("--steps", type=int, default=None, help="sampler steps (default: the model's)")
    parser.add_argument("--sampler", default=None)
    parser.add_argument("--steps-per-stage", default=None, help="e.g. 8,8,8 (finest first) instead of the model's split")
    parser.add_argument("--guidance", type=guidance_value, default=None)
    parser.add_argument("--guide-weight", type=guide_weight_value, default=None,
                        help="the model's own autoguidance weight (default: the model's; 0 = off)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print("command: python " + " ".join(sys.argv))

    t0 = time.perf_counter()
    pipe = load(args).to("cpu")
    _ = pipe.text_encoder
    print(f"load: {time.perf_counter() - t0:.2f} s   threads: {torch.get_num_threads()}")
    split = tuple(int(v) for v in args.steps_per_stage.split(",")) if args.steps_per_stage else None
    kwargs = dict(num_steps=args.steps, sampler=args.sampler, guidance_scale=args.guidance, steps_per_stage=split,
                  guide_weight=args.guide_weight)
    out = pipe("red apple", seed=0, **kwargs)  # warm-up
    times = []
    for i in range(args.repeats):
        t = time.perf_counter()
        pipe("grinning face with big eyes", seed=i + 1, **kwargs)
        times.append(time.perf_counter() - t)
    d = pipe.config.defaults
    steps = split or pipe.stage_steps(args.steps or d.num_steps)
    print(f"sampler: {args.sampler or d.sampler}  steps per stage: {list(steps)}  nfe: {out.nfe}  "
          f"guidance: {d.guidance_scale if args.guidance is None else args.guidance}  "
          f"guide weight: {d.guide_weight if args.guide_weight is None else args.guide_weight}  "
          f"size: {pipe.config.resolution}px")
    print("per-image seconds: " + ", ".join(f"{t:.2f}" for t in times))
    print(f"seconds_per_image: {statistics.median(times):.2f}")


if __name__ == "__main__":
    main()
