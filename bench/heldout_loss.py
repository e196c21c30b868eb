"""Held-out against training denoising loss of model folders, per Laplacian stage: where a run overfits.

The training loss a run logs falls as long as it trains; whether a stage still learns something that
carries over to new images shows only on images it never saw. For each model folder this bench
computes the EDM loss (the trainer's own `LaplacianEDMLoss`, the same weighting and expert noise
ranges) of every stage, each on the network that samples it (a folder's stage expert where it has
one), on

- `val`: the dataset's validation split (all of it, or the first `--num`), and
- `train`: as many training images, drawn with a fixed seed,

each image under its own caption and style, at the same noise levels and noise for every model
(`--reps` draws per image and stage, seeded by stage and draw): differences between models are the
models', not the draws'. Every model is scored on the same noise range: each stage's training range
from `--min-sigma` up (default: the highest `min_sigma` any of the models was trained down to).
A stage whose `val` loss rises while its `train` loss falls has begun to
memorise its training images; one whose two losses fall together is still short of compute.

    python bench/heldout_loss.py --data data/emoji MODEL [MODEL ...] --threads 1
    python bench/heldout_loss.py --smoke                  # seconds: a tiny random model, made-up data

One JSON line per model (`val` and `train`: the loss of each stage, `s0` = the finest, and their
mean; `gap`: val - train per stage), then a table. Costs about 2.5 CPU minutes per model for the
demo model (924 + 924 images, 3 stages, 2 draws) on one thread.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._cli import run_bench  # noqa: E402
from edify.errors import EdifyError  # noqa: E402


@torch.no_grad()
def mean_stage_losses(pipe, images: torch.Tensor, captions: list[str], styles: list, repeats: int,
                      batch_size: int = 64, min_sigma: float = 0.0, seed: int = 0) -> list[float]:
    """The mean EDM training loss of `pipe`'s networks per Laplacian stage (finest first; a stage with
    an expert in use scored on the expert, as sampling runs it) on images
    [N, 3, R, R] in [-1, 1]: `repeats` draws of sigma and noise per image and stage, seeded by
    (seed, stage, draw) only so that every pipeline sees the same draws, on the stages' training
    ranges from `min_sigma` up."""
    from edify.core.losses import LaplacianEDMLoss
    from edify.core.precond import EDMPrecond

    c = pipe.config
    loss_fn = LaplacianEDMLoss(pipe.process, sigma_data=c.sigma_data, expert_ranges=c.expert_ranges,
                               min_sigma=min_sigma)
    # each stage's network as sampling uses it: the model's expert of that stage, if it has one in use
    experts = pipe.experts if pipe.experts_kept() else {}
    cond = pipe.encode(captions, styles)
    means = []
    for stage in range(pipe.process.levels):
        denoiser = EDMPrecond(experts.get(stage, pipe.network), c.sigma_data)
        losses = []
        for rep in range(repeats):
            gen = torch.Generator().manual_seed(seed + 1000 * stage + rep)
            for i in range(0, len(captions), batch_size):
                part = slice(i, min(len(captions), i + batch_size))
                losses.append(loss_fn(denoiser, images[part].to(pipe.device), cond.index(part), stage,
                                      generator=gen))
        means.append(float(torch.cat(losses).mean()))
    return means


def stage_losses(pipe, images: torch.Tensor, captions: list[str], styles: list, reps: int,
                 batch_size: int, min_sigma: float = 0.0) -> dict[str, float]:
    """`mean_stage_losses` of the network in eval mode, as {"s0": ..., "mean": ...}."""
    pipe.network.eval()
    out = {f"s{stage}": round(v, 5) for stage, v in enumerate(
        mean_stage_losses(pipe, images, captions, styles, reps, batch_size, min_sigma))}
    out["mean"] = round(sum(out.values()) / len(out), 5)
    return out


def evaluate(args) -> list[dict]:
    from edify.eval.evaluate import load_split
    from edify.pipelines.text2image import TextToImagePipeline

    rows, splits = [], {}
    pipes = [TextToImagePipeline.from_pretrained(model) for model in args.models]
    # one noise range for all: from the highest floor any of them was trained down to, unless given
    floor = max(p.config.min_sigma for p in pipes) if args.min_sigma is None else args.min_sigma
    low = [str(m) for m, p in zip(args.models, pipes) if p.config.min_sigma > floor]
    if low:
        raise EdifyError(f"--min-sigma {floor:g} is below the lowest sigma {', '.join(low)} was trained on")
    for model, pipe in zip(args.models, pipes):
        res = pipe.config.resolution
        if res not in splits:
            val = load_split(args.data, "val", res, max_images=args.num)
            train = load_split(args.data, "train", res)
            if len(train.captions) < len(val.captions):
                raise EdifyError(f"the train split has {len(train.captions)} images, fewer than the "
                                 f"{len(val.captions)} of val")
            pick = random.Random(args.seed).sample(range(len(train.captions)), len(val.captions))
            splits[res] = {"val": (val.images, val.captions, val.styles),
                           "train": (train.images[pick], [train.captions[i] for i in pick],
                                     [train.styles[i] for i in pick])}
        row = {"model": str(model), "images": len(splits[res]["val"][1]), "reps": args.reps, "min_sigma": floor}
        for name, (images, captions, styles) in splits[res].items():
            row[name] = stage_losses(pipe, images, captions, styles, args.reps, args.batch_size, floor)
        row["gap"] = {k: round(row["val"][k] - row["train"][k], 5) for k in row["val"]}
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    stages = [k for k in rows[0]["val"] if k != "mean"]
    head = ["model"] + [f"{s} val / train" for s in stages] + ["mean val / train"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [Path(r["model"]).name] + [f"{r['val'][k]:.4f} / {r['train'][k]:.4f}" for k in stages + ["mean"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def smoke_model(folder: Path) -> Path:
    """A tiny random text-to-image model folder for 16 px images in the smoke data's two styles."""
    from edify.pipelines.text2image import TextToImagePipeline
    from edify.training.config import get_preset
    from edify.training.export import build_net, pipeline_config

    config = get_preset("tiny-cpu").replace(styles=("noto", "twemoji"))
    torch.manual_seed(0)
    net = build_net(config)
    TextToImagePipeline(net, pipeline_config(config, net)).save_pretrained(folder)
    return folder


def run(args) -> int:
    if args.num is not None and args.num < 2:
        raise EdifyError(f"--num must be >= 2, got {args.num}")
    if args.reps < 1 or args.batch_size < 1:
        raise EdifyError(f"--reps and --batch-size must be >= 1, got {args.reps} and {args.batch_size}")
    tmp = None
    if args.smoke:
        from bench.recipe import smoke_dataset

        tmp = tempfile.TemporaryDirectory()
        args.data = str(smoke_dataset(Path(tmp.name) / "data", n=12, resolution=16))
        args.models = [str(smoke_model(Path(tmp.name) / "model"))]
    if not args.models:
        raise EdifyError("give one or more model folders (or --smoke)")
    try:
        rows = evaluate(args)
    finally:
        if tmp is not None:
            tmp.cleanup()
    print(table(rows))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="*", help="model folders")
    parser.add_argument("--data", default="data/emoji", help="dataset folder with train/ and val/")
    parser.add_argument("--num", type=int, default=None, help="the first NUM validation images (default all)")
    parser.add_argument("--reps", type=int, default=2, help="noise draws per image and stage")
    parser.add_argument("--seed", type=int, default=0, help="seed of the training images drawn")
    parser.add_argument("--min-sigma", type=float, default=None,
                        help="score every stage from this sigma up (default: the highest min_sigma of the models)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--smoke", action="store_true", help="a tiny random model on made-up data")
    return run_bench("heldout_loss", parser.parse_args(argv), run)


if __name__ == "__main__":
    sys.exit(main())
