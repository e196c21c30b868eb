"""Seconds per controlled image against the plain text-to-image time, same model, NFE and seeds.

    python bench/control_speed.py --threads 2                   # the shipped base, a Canny ControlNet
    python bench/control_speed.py --controlnet weights/controlnet-canny-64 --threads 2

The ControlNet's weights do not change its cost, so without --controlnet a freshly initialised one
is built from the base (`ControlNet.from_base`). Both pipelines load first (not timed), generate a
warm-up image, then `--repeats` images at batch 1 (text encoding included), with the model's
default sampler, steps and guidance; the control is the Canny map of a drawn disc. Prints the
median seconds of each and their ratio (target, docs/benchmarks.md: controlled / plain <= 1.5).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edify.data.controls import make_control  # noqa: E402
from edify.networks.controlnet import ControlNet  # noqa: E402
from edify.pipelines.control import ControlNetPipeline  # noqa: E402
from edify.pipelines.generate_cli import default_model  # noqa: E402


def disc(size: int) -> torch.Tensor:
    """A red disc on white, [1, 3, size, size] in [-1, 1]."""
    y, x = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    inside = ((x - size / 2) ** 2 + (y - size / 2) ** 2 < (size / 3) ** 2).float()
    image = torch.ones(1, 3, size, size)
    image[0, 1:] -= 2 * inside
    return image


def median_seconds(run, repeats: int) -> float:
    run(0)  # warm-up
    times = []
    for i in range(repeats):
        start = time.perf_counter()
        run(i + 1)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="base model folder (default: the shipped model)")
    parser.add_argument("--controlnet", default=None, help="a Canny ControlNet folder (default: a fresh one)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print("command: python " + " ".join(sys.argv))
    pipe = ControlNetPipeline.from_pretrained(args.model or default_model(),
                                              controlnets=[args.controlnet] if args.controlnet else [])
    if not args.controlnet:
        pipe.add_controlnet(ControlNet.from_base(pipe.network, control_channels=1))
    _ = pipe.text_encoder
    size = pipe.config.resolution
    control = make_control("canny", disc(size), None, None)[0]
    plain = median_seconds(lambda s: pipe("red heart", seed=s, control_weight=0.0, control_image=control), args.repeats)
    controlled = median_seconds(lambda s: pipe("red heart", seed=s, control_image=control), args.repeats)
    d = pipe.config.defaults
    print(f"threads {torch.get_num_threads()}, {size} px, {d.sampler}, {d.num_steps} steps, guidance {d.guidance_scale}")
    print(f"plain seconds_per_image: {plain:.2f}")
    print(f"controlled seconds_per_image: {controlled:.2f}")
    print(f"ratio controlled/plain: {controlled / plain:.2f}")


if __name__ == "__main__":
    main()
