"""Figures of a trained model: a sample grid on validation captions and the training curves.

    python docs/model_figures.py grid --model weights/emoji-64 --data data/emoji --out docs/emoji64_val_grid.png
    python docs/model_figures.py sheet --model weights/emoji-64 --out docs/emoji64_prompts.png
    python docs/model_figures.py concept --model weights/emoji-64 --delta DELTA --images DIR --prompt bicycle --out docs/finetune_concept.png
    python docs/model_figures.py style --model weights/emoji-64 --delta weights/emoji-64-openmoji --data data/openmoji --style openmoji --base-style fluent-emoji-flat --out weights/emoji-64-openmoji/samples.png
    python docs/model_figures.py curves --run runs/emoji-64 --out docs/emoji64_curves.png   # needs matplotlib

grid: `--captions` distinct captions of the validation split (seeded draw, captions the model never
saw in training) in `--styles` styles, one row per caption and one column per style, each image
with its own seed; the real validation image of the caption (first style found) is in the first
column for reference.
sheet: a contact sheet of everyday prompts, one row per prompt and one column per style x seed
(`--prompts` separated by ";", CLDR names that are captions of the training split).
concept: a concept finetune: its training images, then the base and the finetuned model on the
same prompt, styles and seeds.
style: a style finetune: validation images of the new style (`--data`, captions drawn with `--seed`),
then the base in its closest style and the finetuned model in the new style on the same captions,
one seed per caption; `--starts` adds rows of the base and the finetune started from the real images
at those noise levels (image to image), to see which stages draw what.
curves: loss (per optimizer step, smoothed) and img/s against images seen, from the run's
scalars.jsonl.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CELL = 64
LABEL_WIDTH = 220


def grid(args) -> None:
    from edify.eval.evaluate import load_split
    from edify.pipelines.text2image import TextToImagePipeline, to_pil

    pipe = TextToImagePipeline.from_pretrained(args.model)
    real = load_split(args.data, "val", pipe.config.resolution)
    first = {}
    for i, caption in enumerate(real.captions):
        first.setdefault(caption, i)
    captions = sorted(first)
    random.Random(args.seed).shuffle(captions)
    captions = captions[: args.captions]
    styles = [s for s in args.styles.split(",") if s]
    prompts = [c for c in captions for _ in styles]
    out = pipe(prompts, style=[s for _ in captions for s in styles], seed=list(range(len(prompts))),
               num_steps=args.steps, guidance_scale=args.guidance)
    cols = len(styles) + 1
    sheet = Image.new("RGB", (LABEL_WIDTH + cols * CELL, 14 + len(captions) * CELL), "white")
    draw = ImageDraw.Draw(sheet)
    for j, name in enumerate(["real (val)"] + styles):
        draw.text((LABEL_WIDTH + j * CELL + 2, 1), name[:10], fill="black")
    for r, caption in enumerate(captions):
        y = 14 + r * CELL
        draw.text((2, y + CELL // 2 - 6), caption[:34], fill="black")
        sheet.paste(to_pil(real.images[first[caption]][None])[0].resize((CELL, CELL)), (LABEL_WIDTH, y))
        for j in range(len(styles)):
            sheet.paste(out.images[r * len(styles) + j].resize((CELL, CELL)), (LABEL_WIDTH + (j + 1) * CELL, y))
    sheet.save(args.out)
    print(f"{args.out}: {len(captions)} validation captions x {len(styles)} styles, "
          f"{out.nfe} network evaluations per image, guidance {args.guidance or pipe.config.defaults.guidance_scale}")


EVERYDAY = ("red apple;rocket;cat face;pizza;thumbs up;automobile;red heart;grinning face;banana;sun;"
            "soccer ball;flag: Japan")


def sheet(args) -> None:
    from edify.pipelines.text2image import TextToImagePipeline

    pipe = TextToImagePipeline.from_pretrained(args.model)
    prompts = [p.strip() for p in args.prompts.split(";") if p.strip()]
    styles = [s for s in args.styles.split(",") if s]
    seeds = [int(s) for s in args.seeds.split(",")]
    cells = [(p, st, sd) for p in prompts for st in styles for sd in seeds]
    out = pipe([c[0] for c in cells], style=[c[1] for c in cells], seed=[c[2] for c in cells],
               num_steps=args.steps, guidance_scale=args.guidance)
    cols = len(styles) * len(seeds)
    page = Image.new("RGB", (LABEL_WIDTH // 2 + cols * CELL, 14 + len(prompts) * CELL), "white")
    draw = ImageDraw.Draw(page)
    for j, (st, sd) in enumerate((st, sd) for st in styles for sd in seeds):
        draw.text((LABEL_WIDTH // 2 + j * CELL + 2, 1), f"{st[:7]} {sd}", fill="black")
    for r, prompt in enumerate(prompts):
        y = 14 + r * CELL
        draw.text((2, y + CELL // 2 - 6), prompt[:18], fill="black")
        for j in range(cols):
            page.paste(out.images[r * cols + j].resize((CELL, CELL)), (LABEL_WIDTH // 2 + j * CELL, y))
    page.save(args.out)
    print(f"{args.out}: {len(prompts)} prompts x {len(styles)} styles x {len(seeds)} seeds, "
          f"{out.nfe} network evaluations per image, guidance {args.guidance or pipe.config.defaults.guidance_scale}")


def labelled_rows(rows) -> Image.Image:
    """A page of (label, images) rows, one CELL tile per image, transparency over white."""
    cols = max(len(r[1]) for r in rows)
    page = Image.new("RGB", (LABEL_WIDTH // 2 + cols * CELL, len(rows) * CELL), "white")
    draw = ImageDraw.Draw(page)
    for r, (label, images) in enumerate(rows):
        draw.text((2, r * CELL + CELL // 2 - 6), label, fill="black")
        for j, im in enumerate(images):
            tile = Image.new("RGBA", im.size, "white")
            tile.alpha_composite(im.convert("RGBA"))
            page.paste(tile.convert("RGB").resize((CELL, CELL)), (LABEL_WIDTH // 2 + j * CELL, r * CELL))
    return page


def concept(args) -> None:
    from edify.pipelines.text2image import TextToImagePipeline

    pipe = TextToImagePipeline.from_pretrained(args.model)
    files = sorted(p for p in Path(args.images).iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    styles = [s for s in args.styles.split(",") if s]
    seeds = [int(s) for s in args.seeds.split(",")]
    cells = [(st, sd) for st in styles for sd in seeds]
    kwargs = dict(style=[c[0] for c in cells], seed=[c[1] for c in cells], num_steps=args.steps)
    before = pipe([args.prompt] * len(cells), **kwargs).images
    pipe.load_finetune(args.delta)
    after = pipe([args.prompt] * len(cells), **kwargs).images
    rows = [("training images", [Image.open(f).convert("RGBA") for f in files]), ("base", before),
            ("finetuned", after)]
    labelled_rows(rows).save(args.out)
    print(f"{args.out}: {len(files)} training images; {args.prompt!r} in {len(styles)} styles x {len(seeds)} seeds, "
          f"base and finetuned")


def style(args) -> None:
    from edify.eval.evaluate import load_split
    from edify.pipelines.text2image import TextToImagePipeline, to_pil

    pipe = TextToImagePipeline.from_pretrained(args.model)
    real = load_split(args.data, "val", pipe.config.resolution)
    order = list(range(len(real.captions)))
    random.Random(args.seed).shuffle(order)
    order = order[: args.num]
    captions = [real.captions[i] for i in order]
    seeds = list(range(len(captions)))
    kw = dict(seed=seeds, num_steps=args.steps, guidance_scale=args.guidance, sigma_min=args.sigma_min)
    before = pipe(captions, style=args.base_style, **kw)
    rows = [(f"{args.style} (real, val)", [to_pil(real.images[i][None])[0] for i in order]),
            (f"base, {args.base_style}", before.images)]
    # image to image from the real images (--starts): which stages draw what, base and finetune
    x0 = real.images[order]  # floats in [-1, 1]
    for start in args.starts:
        rows.append((f"base, real@{start:g}",
                     pipe(captions, style=args.base_style, image=x0, start_sigma=start, **kw).images))
    scales = args.scales
    for scale in scales:
        pipe.unload_finetune()  # the previous scale's, if any (a no-op before the first)
        pipe.load_finetune(args.delta, scale)
        label = f"finetuned, {args.style}" if scales == [1.0] else f"{args.style} x {scale:g}"
        rows.append((label, pipe(captions, style=args.style, **kw).images))
    for start in args.starts:
        rows.append((f"finetune, real@{start:g}",
                     pipe(captions, style=args.style, image=x0, start_sigma=start, **kw).images))
    labelled_rows([(label[:18], images) for label, images in rows]).save(args.out)
    print(f"{args.out}: {len(captions)} validation captions of {args.data}: real, base ({args.base_style}), "
          f"finetuned ({args.style}) at scale {', '.join(f'{v:g}' for v in scales)}; captions: {'; '.join(captions)}")


def scales_value(text: str) -> list[float]:
    """--scales: comma-separated numbers (argparse turns the ValueError into a one-line error)."""
    return [float(v) for v in text.split(",")]


def curves(args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in (Path(args.run) / "scalars.jsonl").read_text().splitlines() if line]
    by_images = {r["images"]: r for r in rows if "loss" in r}  # a resumed run logs again: keep the last
    rows = [by_images[k] for k in sorted(by_images) if not args.max_images or k <= args.max_images]
    images = [r["images"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.5))
    ax1.plot(images, [r["loss"] for r in rows], lw=0.8, label="all stages")
    for stage in range(3):
        key = f"loss/stage{stage}"
        pts = [(r["images"], r[key]) for r in rows if key in r]
        if pts:
            ax1.plot(*zip(*pts), lw=0.6, alpha=0.7, label=f"stage {stage}")
    ax1.set_xlabel("images seen")
    ax1.set_ylabel("weighted EDM loss (interval mean)")
    ax1.legend(fontsize=7)
    ax2.plot(images, [r.get("img_per_s", float("nan")) for r in rows], lw=0.8)
    ax2.set_xlabel("images seen")
    ax2.set_ylabel("training img/s (interval)")
    thousands = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v / 1e6:g}M" if v >= 1e6 else f"{v / 1e3:g}k")
    for ax in (ax1, ax2):
        ax.xaxis.set_major_formatter(thousands)
    fig.suptitle(args.title or str(args.run), fontsize=9)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"{args.out}: {len(rows)} log points up to {images[-1] if images else 0} images")


def main() -> None:
    from edify.pipelines.generate_cli import guidance_value

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    g = sub.add_parser("grid")
    g.add_argument("--model", required=True)
    g.add_argument("--data", required=True)
    g.add_argument("--captions", type=int, default=32)
    g.add_argument("--styles", default="twemoji,noto,fluent-emoji-flat,emojione")
    g.add_argument("--steps", type=int, default=None)
    g.add_argument("--guidance", type=guidance_value, default=None)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--out", required=True)
    s = sub.add_parser("sheet")
    s.add_argument("--model", required=True)
    s.add_argument("--prompts", default=EVERYDAY)
    s.add_argument("--styles", default="twemoji,noto,fluent-emoji-flat,emojione")
    s.add_argument("--seeds", default="0,1")
    s.add_argument("--steps", type=int, default=None)
    s.add_argument("--guidance", type=guidance_value, default=None)
    s.add_argument("--out", required=True)
    k = sub.add_parser("concept")
    k.add_argument("--model", required=True)
    k.add_argument("--delta", required=True)
    k.add_argument("--images", required=True)
    k.add_argument("--prompt", required=True)
    k.add_argument("--styles", default="twemoji,noto,fluent-emoji-flat,emojione")
    k.add_argument("--seeds", default="0,1")
    k.add_argument("--steps", type=int, default=None)
    k.add_argument("--out", required=True)
    t = sub.add_parser("style")
    t.add_argument("--model", required=True)
    t.add_argument("--delta", required=True)
    t.add_argument("--data", required=True, help="the new style's dataset (its val split)")
    t.add_argument("--style", required=True, help="the new style's name in the delta")
    t.add_argument("--base-style", required=True, help="the base's closest style")
    t.add_argument("--num", type=int, default=10)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--steps", type=int, default=None)
    t.add_argument("--guidance", type=guidance_value, default=None)
    t.add_argument("--sigma-min", type=float, default=None, help="where the schedule ends (default: the model's)")
    t.add_argument("--scales", type=scales_value, default=[1.0], help="finetune scales, one row each (e.g. 0.6,0.8,1)")
    t.add_argument("--starts", type=scales_value, default=[],
                   help="rows of the base (closest style) and, after the scales' rows, of the finetune at the last "
                        "scale, sampling from the real images put through the forward process to each of these "
                        "noise levels (image to image)")
    t.add_argument("--out", required=True)
    c = sub.add_parser("curves")
    c.add_argument("--run", required=True)
    c.add_argument("--title", default=None)
    c.add_argument("--max-images", type=int, default=0, help="plot log points up to this many images (0: all)")
    c.add_argument("--out", required=True)
    args = parser.parse_args()
    print("command: python " + " ".join(sys.argv))
    {"grid": grid, "sheet": sheet, "concept": concept, "style": style, "curves": curves}[args.what](args)


if __name__ == "__main__":
    main()
