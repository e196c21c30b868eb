"""Where the requested style is read, and where sampling loses it (bench/recipe.md, "Where the style is read").

bench/recipe.py's style separation asks a nearest-neighbour classifier on Inception features which
style a generated image is in. This bench asks the same classifier (the same reference: real
training images, --style-ref-per-style per style, seed 0) about images whose origin is known:

- `real`: --num validation images (seeded draw) as they are: the classifier's ceiling.
- `real, finest band removed` and `real, coarsest band only`: the same images with their Laplacian
  bands above the coarsest (or the finest one) set to zero (edify.core.laplacian: the 2x2 block
  means, upsampled), i.e. what is left when sampling draws a stage's band without the style in it.
- `from real at sigma S` (one row per --starts value): the model's images sampled from those real
  images put through the forward process to the full-resolution noise level S (image to image,
  `TextToImagePipeline(..., image=, start_sigma=)`), under their own captions and styles, at the
  model's defaults (guides and experts included): the stages below S redraw the bands the noise
  covered. With --no-style, the same again without the style: how much of what comes back is read
  off the token rather than off the coarse image.

A style the real images keep without their finest band, and that the rows from real at sigma 0.99
(the top of the demo model's 64 px stage) bring back, is drawn by the finest stage; what is lost
from higher starts is lost in the coarser stages.

    python bench/style_bands.py --data data/emoji --model weights/emoji-64 --starts 0.99,4.9 --threads 1
    python bench/style_bands.py --smoke        # seconds: a tiny random model, made-up images

One JSON line per row (with how many images the classifier gave each style), then a table (style
accuracy, its chance level as in bench/recipe.py, and their ratio).
"""

from __future__ import annotations

import argparse
import json
import sys
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _cli import run_bench  # noqa: E402
from fine_band import sigma_list  # noqa: E402

from edify.errors import EdifyError  # noqa: E402


def without_bands(images, levels: int, keep: int):
    """`images` with every Laplacian band finer than the `keep` coarsest of `levels` set to zero:
    the block means of the coarsest kept level, upsampled."""
    from edify.core import laplacian

    return laplacian.up(laplacian.down(images, levels - keep), levels - keep)


def score(rows: list[dict], name: str, features, styles: list[str], reference) -> None:
    """Classify `features` against `reference` (features, labels); append and print the row."""
    from recipe import knn_styles, style_scores

    predicted = knn_styles(features, *reference)
    s = style_scores(predicted, styles)
    row = {"set": name, "num": s["style_n"], "style_acc": round(s["style_acc"], 4),
           "style_chance": round(s["style_chance"], 4), "ratio": round(s["style_acc"] / s["style_chance"], 3),
           "predicted": {k: predicted.count(k) for k in sorted(set(predicted))}}
    rows.append(row)
    print(json.dumps({"bench": "style_bands", **row}), flush=True)


def run(args) -> int:
    import torch

    from edify.eval.cli import default_cache
    from edify.eval.evaluate import load_split
    from edify.eval.features import InceptionFeatures
    from edify.pipelines.text2image import TextToImagePipeline
    from recipe import style_reference

    if args.smoke:
        import tempfile

        from heldout_loss import smoke_model
        from recipe import smoke_dataset

        with tempfile.TemporaryDirectory() as tmp:
            args.data = str(smoke_dataset(Path(tmp) / "data", n=12, resolution=16))
            args.model, args.smoke, args.num, args.steps = str(smoke_model(Path(tmp) / "model")), False, 8, 3
            args.style_ref_per_style, args.cache = 4, Path(tmp) / "cache"
            args.starts, args.no_style = args.starts or [2.0], True
            return run(args)
    if args.num < 2:
        raise EdifyError(f"--num must be >= 2, got {args.num}")
    pipe = TextToImagePipeline.from_pretrained(args.model) if args.model else None
    resolution = pipe.config.resolution if pipe else args.resolution
    levels = pipe.process.levels if pipe else args.levels
    real = load_split(args.data, "val", resolution)
    if any(s is None for s in real.styles):
        raise EdifyError(f"every validation image of {args.data} needs a style")
    pick = torch.randperm(len(real.captions), generator=torch.Generator().manual_seed(args.seed))[:args.num].tolist()
    images = real.images[pick]  # float, [-1, 1]
    captions, styles = [real.captions[i] for i in pick], [real.styles[i] for i in pick]
    extractor = InceptionFeatures("cpu", batch_size=args.batch)
    ref_args = types.SimpleNamespace(data=args.data, resolution=resolution, style_ref_per_style=args.style_ref_per_style)
    reference = style_reference(ref_args, extractor, args.cache or default_cache())

    rows: list[dict] = []
    score(rows, "real", extractor(images), styles, reference)
    score(rows, "real, finest band removed", extractor(without_bands(images, levels, levels - 1)), styles, reference)
    score(rows, "real, coarsest band only", extractor(without_bands(images, levels, 1)), styles, reference)
    for start in args.starts or []:
        for own_style in (True, False) if args.no_style else (True,):
            out = []
            for i in range(0, len(pick), args.batch):
                part = slice(i, i + args.batch)
                out.append(pipe(captions[part], style=styles[part] if own_style else None,
                                seed=list(range(args.seed + i, args.seed + i + len(captions[part]))),
                                output_type="tensor", image=images[part], start_sigma=start,
                                num_steps=args.steps).images)
            name = f"from real at sigma {start:g}" + ("" if own_style else ", no style")
            score(rows, name, extractor(torch.cat(out)), styles, reference)
    print("| images | n | style acc | chance | ratio |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['set']} | {r['num']} | {r['style_acc']:.3f} | {r['style_chance']:.3f} | {r['ratio']:.2f}x |")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="data/emoji", help="a dataset with train/ and val/ splits and styles")
    p.add_argument("--model", default=None, help="a model folder (needed for --starts)")
    p.add_argument("--starts", type=sigma_list, default=None, metavar="S1,S2,...",
                   help="sample from the real images at these full-resolution noise levels")
    p.add_argument("--no-style", action="store_true", help="--starts: also without the style")
    p.add_argument("--steps", type=int, default=None, help="sampler steps over the stages crossed (default: the "
                   "model's split of its default steps)")
    p.add_argument("--num", type=int, default=448, help="validation images (default 448)")
    p.add_argument("--resolution", type=int, default=64, help="without --model: the images' size")
    p.add_argument("--levels", type=int, default=3, help="without --model: Laplacian levels")
    p.add_argument("--style-ref-per-style", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--cache", type=Path, default=None, help="feature cache (default: edify eval's)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--smoke", action="store_true", help="a tiny random model on made-up images")
    args = p.parse_args(argv)
    if args.starts and not (args.model or args.smoke):
        p.error("--starts needs --model")
    return run_bench("style_bands", args, run)


if __name__ == "__main__":
    sys.exit(main())
