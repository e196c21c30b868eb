"""`edify eval`: FID, KID, SWD and prompt retrieval of a model against a real data split.

    edify eval --model weights/emoji-64 --data data/emoji --split val --num-samples 924 \\
        --sampler dpmpp_2m --steps 24 --guidance 3 --seed 0 --metrics fid,kid,swd,retrieval

Captions and styles are drawn deterministically (by --seed) from the split, one image is generated
per drawn caption (image i with seed --seed + i), and the metrics compare the generated images to
all real images of the split. The real images' Inception features are cached under --cache, keyed
by data, split, resolution and feature extractor. Prints one JSON line.

The reference set must be the whole split: when images of it cannot be read (a truncated shard, a
corrupt image), the command stops and says how many were lost, unless --allow-missing N accepts
up to N lost images (default 0); the JSON line then reports them as "real_missing".
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

from edify.errors import EdifyError


def default_cache() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "edify" / "eval"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from edify.pipelines.generate_cli import guidance_value
    from edify.runtime import add_runtime_arguments

    parser.add_argument("--model", default=None,
                        help="model folder (default: $EDIFY_MODEL, else the shipped demo model)")
    parser.add_argument("--data", required=True, help="dataset folder holding split subfolders (e.g. data/emoji)")
    parser.add_argument("--split", default="val", help="split subfolder: webdataset .tar shards or an image folder")
    parser.add_argument("--num-samples", type=int, default=1000, help="images to generate")
    parser.add_argument("--sampler", default=None, help="euler, heun or dpmpp_2m (default: the model's)")
    parser.add_argument("--steps", type=int, default=None, help="sampler steps over all stages (default: the model's)")
    parser.add_argument("--guidance", type=guidance_value, default=None,
                        help="guidance scale, or one per stage finest first (default: the model's)")
    parser.add_argument("--style-guidance", type=float, default=None,
                        help="extra guidance along the style's direction (default: the model's)")
    parser.add_argument("--seed", type=int, default=0, help="caption draw and first image seed")
    parser.add_argument("--metrics", default="fid,kid,swd,retrieval", help="comma-separated subset of "
                        "fid,kid,swd,retrieval")
    parser.add_argument("--cache", default=None, help=f"reference feature cache folder (default: {default_cache()})")
    parser.add_argument("--no-cache", action="store_true", help="recompute the real features, write nothing")
    parser.add_argument("--max-real", type=int, default=None,
                        help="use only the first N real images of the split (quick checks; default: all)")
    parser.add_argument("--allow-missing", type=int, default=0, metavar="N",
                        help="evaluate even if up to N real images of the split cannot be read (corrupt "
                             "images, truncated shards); default 0: any loss is an error")
    parser.add_argument("--batch", type=int, default=32, help="generation and feature batch size")
    add_runtime_arguments(parser)


def cache_folder(args: argparse.Namespace) -> Path | None:
    """The feature cache folder, created now so that a bad path fails before any work."""
    if args.no_cache:
        return None
    path = Path(args.cache) if args.cache else default_cache()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise EdifyError(f"--cache must be a folder, but {str(path)!r} (or a folder above it) is a file") from None
    return path


def check_args(args: argparse.Namespace) -> None:
    if args.num_samples < 1:
        raise EdifyError(f"--num-samples must be >= 1, got {args.num_samples}")
    if args.batch < 1:
        raise EdifyError(f"--batch must be >= 1, got {args.batch}")
    if args.allow_missing < 0:
        raise EdifyError(f"--allow-missing must be >= 0, got {args.allow_missing}")


def run(args: argparse.Namespace) -> int:
    from edify import runtime

    start = time.perf_counter()
    check_args(args)
    device = runtime.resolve_device(args.device)
    with runtime.threads(args.threads), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        record = evaluate_command(args, device, runtime.progress_enabled(args.quiet))
    for w in caught:
        print(f"edify eval: warning: {w.message}", file=sys.stderr)
    record["seconds"] = round(time.perf_counter() - start, 3)
    print(json.dumps(record))
    return 0


def evaluate_command(args: argparse.Namespace, device, show_progress: bool) -> dict:
    """The JSON record of `edify eval` (without "seconds")."""
    from edify.eval.evaluate import FEATURE_METRICS, evaluate_pipeline, load_split, parse_metrics, real_reference
    from edify.eval.features import InceptionFeatures
    from edify.pipelines.generate_cli import load_pipeline, resolve_model
    from edify.runtime import Progress

    metrics = parse_metrics(args.metrics)
    cache = cache_folder(args) if FEATURE_METRICS & set(metrics) else None
    model = resolve_model(args.model)
    pipe = load_pipeline(model, device)
    d = pipe.config.defaults
    steps = d.num_steps if args.steps is None else args.steps
    guidance = d.guidance_scale if args.guidance is None else args.guidance
    style_guidance = d.style_guidance if args.style_guidance is None else args.style_guidance
    sampler = d.sampler if args.sampler is None else args.sampler
    resolution = pipe.config.resolution
    pipe.check_inputs(["x"], None, resolution, resolution, steps, guidance, sampler)  # fail before any work

    real = load_split(args.data, args.split, resolution, max_images=args.max_real, allow_missing=args.allow_missing)
    extractor, real_stats = None, None
    if FEATURE_METRICS & set(metrics):
        extractor = InceptionFeatures(device, batch_size=args.batch)
        bar = Progress(len(real.captions), "real features", show_progress)
        try:
            real_stats = real_reference(real, args.data, args.split, resolution, extractor, cache, progress=bar.update)
        finally:
            bar.close()
    bar = Progress(args.num_samples, "generating", show_progress)
    try:
        result = evaluate_pipeline(pipe, real, args.num_samples, sampler=sampler, steps=steps, guidance=guidance,
                                   style_guidance=style_guidance, seed=args.seed, metrics=metrics, batch_size=args.batch, extractor=extractor,
                                   real_stats=real_stats, progress=bar.update,
                                   callback=lambda info: bar.note(f"step {info['i'] + 1}/{steps}"))
    finally:
        bar.close()
    return {
        **result, "num_samples": result["num_fake"], "real_missing": real.lost, "sampler": sampler, "steps": steps,
        "guidance": guidance, "style_guidance": style_guidance, "seed": args.seed, "model": str(model), "data": str(args.data),
        "split": args.split, "resolution": resolution, "metrics": list(metrics),
        "feature_extractor": extractor.id if extractor else None, "device": str(device),
    }
