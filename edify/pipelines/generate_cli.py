"""`edify generate PROMPT`: text to image with a model folder (the shipped demo model by default)."""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from edify.errors import EdifyError

# The demo model ships in the repository's weights/ folder; EDIFY_MODEL overrides it.
DEFAULT_MODEL = Path(__file__).resolve().parents[2] / "weights" / "emoji-64"


def default_model() -> Path:
    return Path(os.environ.get("EDIFY_MODEL", DEFAULT_MODEL))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", help="what to draw, e.g. 'red apple'")
    parser.add_argument("-o", "--output", default="out.png",
                        help="output PNG; with --num N > 1, files NAME-0.png ... NAME-(N-1).png")
    parser.add_argument("--model", default=None, help=f"model folder (default: {DEFAULT_MODEL})")
    parser.add_argument("--style", default=None, help="media type / style label, e.g. twemoji")
    parser.add_argument("--negative", default=None, help="negative prompt")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first image (image i uses seed+i)")
    parser.add_argument("--steps", type=int, default=None, help="sampler steps over all stages")
    parser.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale")
    parser.add_argument("--sampler", default=None, help="euler, heun or dpmpp_2m")
    parser.add_argument("--num", type=int, default=1, help="number of images")
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, ...")


def output_paths(output: str, n: int) -> list[Path]:
    out = Path(output)
    if out.suffix.lower() != ".png":
        raise EdifyError(f"output must be a .png file, got {output!r}")
    if n == 1:
        return [out]
    return [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(n)]


def run(args: argparse.Namespace) -> int:
    from edify.pipelines.text2image import TextToImagePipeline

    if args.num < 1:
        raise EdifyError(f"--num must be >= 1, got {args.num}")
    paths = output_paths(args.output, args.num)
    if not paths[0].parent.exists():
        raise EdifyError(f"output folder {str(paths[0].parent)!r} does not exist")
    model = Path(args.model) if args.model else default_model()
    if not args.model and not model.is_dir():
        raise EdifyError(f"no model folder at {str(model)!r}: the demo model is not in this checkout; "
                         f"pass --model PATH or set EDIFY_MODEL (train one with `edify train --export`)")
    pipe = TextToImagePipeline.from_pretrained(model).to(args.device)
    start = time.perf_counter()
    result = pipe(args.prompt, negative_prompt=args.negative, style=args.style, num_steps=args.steps,
                  guidance_scale=args.guidance, seed=args.seed, height=args.height, width=args.width,
                  sampler=args.sampler, num_images_per_prompt=args.num)
    seconds = time.perf_counter() - start
    for image, path, seed in zip(result.images, paths, result.seeds):
        image.save(path)
        print(f"{path}  (seed {seed})")
    print(f"{len(paths)} image(s), {result.nfe} network evaluations each, {seconds:.1f} s")
    return 0
