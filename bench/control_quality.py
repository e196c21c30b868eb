"""How well ControlNets steer the base model, on real validation images (docs/controls.md).

    python bench/control_quality.py canny --model weights/emoji-64 \
        --controlnet weights/controlnet-canny-64 --data data/emoji --num 200
    python bench/control_quality.py inpaint --model weights/emoji-64 \
        --controlnet weights/inpaint-64 --data data/emoji --num 200 --tasks replace,inpaint,outpaint
    python bench/control_quality.py --smoke        # ~1 min: tiny random networks, made-up data

canny: for `--num` validation images (the first N in file order from `--first`, default 0, image i
with seed i), the Canny
edges of the real image steer the ControlNet at `--control-weight`; the base model alone gets the
same captions, styles and seeds. Printed per arm: edge F1 (edify.data.controls.edge_f1, 1 px
tolerance) between Canny(output) and the control edges, and FID/KID of the outputs against all
real validation images of the split.

inpaint: per task, a mask per image (replace: the object's alpha mask grown by 2 px, images
whose object covers 5-80% of the frame; inpaint: 1-4 boxes / brush strokes; outpaint: a kept box
or half, both drawn with seed 10,000 + i, never a training draw), then the inpainting ControlNet
and RePaint-style replacement (no ControlNet) at the same sampler steps (equal base-model NFE).
Printed per task and method:
- kept_max_err: the largest |output - input| over the kept pixels, in 1/255 steps (must be <= 1);
- seam_ratio: the mean squared image gradient on the seam band (pixels within 1 px of the mask's
  boundary, both sides) over the same statistic of the real image on the same band: 1 = as smooth
  as real images there, above 1 = a visible edge;
- FID/KID of the whole composite images (kept pixels are the input's, so the methods differ only
  by their fills) against all real validation images.
One JSON line per arm goes to stdout and to `--out`/control_quality.jsonl; `--figure PNG` draws
input, control, output and the comparison arm for 6 images.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._cli import comma_list, run_bench  # noqa: E402
from edify.core.thresholding import SHRINK_RULES  # noqa: E402
from edify.errors import EdifyError  # noqa: E402
from edify.pipelines.generate_cli import add_experts_options  # noqa: E402

SEED_OFFSET = 10_000  # eval masks: generators never used by training draws
METHOD_TITLES = {"controlnet": "ControlNet", "repaint": "RePaint", "controlnet+repaint": "CN+RePaint"}  # figure


def batched(n: int, size: int):
    for i in range(0, n, size):
        yield slice(i, min(n, i + size))


def read_alpha_masks(data: str, resolution: int, count: int) -> torch.Tensor:
    """The val split's alpha masks (`mask<R>.png`) [N, 1, R, R] in [0, 1], in load_split's order."""
    import io

    import numpy as np
    from PIL import Image

    from edify.data.tarstream import iter_tar_groups

    masks = []
    for shard in sorted((Path(data) / "val").glob("*.tar")):
        for _, group in iter_tar_groups(str(shard), lambda reason: None):
            raw = group.get(f"mask{resolution}.png")
            if raw is None:
                raise EdifyError(f"{shard} has a sample without mask{resolution}.png")
            arr = np.asarray(Image.open(io.BytesIO(raw)).convert("L"), dtype=np.float32) / 255
            masks.append(torch.from_numpy(arr.copy())[None])
    if len(masks) != count:
        raise EdifyError(f"read {len(masks)} alpha masks for {count} validation images")
    return torch.stack(masks)


def seam_band(mask: torch.Tensor) -> torch.Tensor:
    """[B, 1, H, W] bool: pixels within 1 px (3x3) of the boundary between kept and generated."""
    m = (mask > 0.5).float()
    grown = F.max_pool2d(m, 3, stride=1, padding=1)
    shrunk = -F.max_pool2d(-m, 3, stride=1, padding=1)
    return (grown - shrunk) > 0.5


def gradient_energy(images: torch.Tensor, band: torch.Tensor) -> torch.Tensor:
    """Per image: mean over `band` of the squared forward-difference gradient (channels summed),
    images in [0, 1]."""
    x = (images.float() + 1) / 2
    gx = F.pad(x[..., :, 1:] - x[..., :, :-1], (0, 1, 0, 0))
    gy = F.pad(x[..., 1:, :] - x[..., :-1, :], (0, 0, 0, 1))
    g = (gx ** 2 + gy ** 2).sum(1, keepdim=True)
    b = band.float()
    return (g * b).flatten(1).sum(1) / b.flatten(1).sum(1).clamp_min(1)


def task_masks(task: str, alphas: torch.Tensor | None, n: int, size: int) -> tuple[list[int], torch.Tensor]:
    """(indices of the images used, masks [n, 1, size, size]) for a task; see the module docstring."""
    from edify.data.masks import MAX_REPLACE, MIN_REPLACE, inpaint_mask, outpaint_mask, replace_mask

    if task == "replace":
        chosen, masks = [], []
        for i in range(alphas.shape[0]):
            m = replace_mask(alphas[i, 0], grow_px=2)
            if MIN_REPLACE <= float(m.mean()) <= MAX_REPLACE:
                chosen.append(i)
                masks.append(m)
            if len(chosen) == n:
                break
        return chosen, torch.stack(masks)[:, None]
    draw = inpaint_mask if task == "inpaint" else outpaint_mask
    masks = [draw(size, size, torch.Generator().manual_seed(SEED_OFFSET + i)) for i in range(n)]
    return list(range(n)), torch.stack(masks)[:, None]


def metrics_of(images: torch.Tensor, real_stats, extractor) -> dict:
    from edify.eval.evaluate import evaluate

    r = evaluate(images, None, ("fid", "kid"), extractor=extractor, real_stats=real_stats, warn=False,
                 kid_subset_size=min(1000, images.shape[0]))
    return {"fid": round(r["fid"], 2), "kid": round(r["kid"], 4), "kid_std": round(r["kid_std"], 4)}


def controlled_experts(args, pipe):
    """The stage experts of the controlled arm: none with --no-experts (the main network at every
    stage), the model's with --experts, else the pipeline's default (the model's, unless the
    ControlNet's defaults say `"experts": false`)."""
    if args.no_experts:
        return {}
    return True if args.experts else pipe.control_experts()


def experts_used(args, pipe) -> list[int]:
    """The stages the controlled arm runs on an expert network (for the JSON rows)."""
    experts = controlled_experts(args, pipe)
    return [] if experts == {} or not pipe.experts_kept() else sorted(pipe.experts)


def run_canny(args, pipe, real, real_stats, extractor, log, emit):
    from edify.data.annotators import canny_edges
    from edify.data.controls import edge_f1
    from edify.pipelines.text2image import TextToImagePipeline

    first = args.first
    if not 0 <= first < real.images.shape[0]:
        raise EdifyError(f"--first must be in [0, {real.images.shape[0]}), got {first}")
    n = min(args.num, real.images.shape[0] - first)
    images = real.images[first:first + n]
    control = canny_edges(images)
    arms = {"controlnet": [], "base": []}
    for sl in batched(n, args.batch_size):
        at = slice(first + sl.start, first + sl.stop)  # validation image i gets seed i
        kw = dict(style=real.styles[at], seed=list(range(at.start, at.stop)), num_steps=args.steps,
                  guidance_scale=args.guidance, sigma_min=args.sigma_min, shrink=args.shrink,
                  shrink_rule=args.shrink_rule, output_type="tensor")
        arms["controlnet"].append(pipe(real.captions[at], control_image=control[sl],
                                       control_weight=args.control_weight, experts=controlled_experts(args, pipe),
                                       **kw).images)
        arms["base"].append(TextToImagePipeline.__call__(pipe, real.captions[at], **kw).images)
        log(f"canny: {sl.stop}/{n} images")
    outs = {}
    for arm, parts in arms.items():
        out = outs[arm] = torch.cat(parts)
        f1 = edge_f1(canny_edges(out), control)
        emit({"bench": "control_quality", "control": "canny", "arm": arm, "num": n, "first": first,
                     "control_weight": args.control_weight if arm == "controlnet" else 0.0,
                     "experts": sorted(pipe.experts) if arm == "base" else experts_used(args, pipe),
                     "steps": args.steps, "guidance": args.guidance, "sigma_min": args.sigma_min,
                     "shrink": args.shrink, "shrink_rule": args.shrink_rule, "edge_f1": round(float(f1.mean()), 4),
                     "edge_f1_std": round(float(f1.std()), 4), **metrics_of(out, real_stats, extractor)})
    figure_rows = [(images[i], control[i].expand(3, -1, -1), outs["controlnet"][i], outs["base"][i])
                   for i in range(min(6, n))]
    return figure_rows, ("input", "Canny edges", "ControlNet", "base alone")


def run_inpaint(args, pipe, real, real_stats, extractor, log, emit):
    from edify.data.masks import MASK_FILL

    size = real.images.shape[-1]
    alphas = read_alpha_masks(args.data, size, real.images.shape[0]) if "replace" in args.tasks else None
    figure_rows = []
    for task in args.tasks:
        chosen, masks = task_masks(task, alphas, min(args.num, real.images.shape[0]), size)
        images = real.images[chosen]
        captions, styles = [real.captions[i] for i in chosen], [real.styles[i] for i in chosen]
        band = seam_band(masks)
        real_energy = gradient_energy(images, band)
        outs = {}
        for method in args.methods:
            parts = []
            for sl in batched(len(chosen), args.batch_size):
                parts.append(pipe(captions[sl], image=images[sl], mask=masks[sl], task=task, method=method,
                                  style=styles[sl], seed=list(range(sl.start, sl.stop)), num_steps=args.steps,
                                  guidance_scale=args.guidance, sigma_min=args.sigma_min, shrink=args.shrink,
                                  shrink_rule=args.shrink_rule, experts=controlled_experts(args, pipe), output_type="tensor").images)
                log(f"{task} {method}: {sl.stop}/{len(chosen)} images")
            out = outs[method] = torch.cat(parts)
            kept = (masks < 0.5).expand_as(out)
            kept_err = float(((out - images).abs() * 127.5)[kept].max()) if kept.any() else 0.0
            energy = gradient_energy(out, band)
            emit({"bench": "control_quality", "control": "inpaint", "task": task, "arm": method,
                         "num": len(chosen), "steps": args.steps, "guidance": args.guidance,
                         "sigma_min": args.sigma_min, "shrink": args.shrink,
                         "shrink_rule": args.shrink_rule, "mask_cover": round(float(masks.mean()), 3),
                         "experts": experts_used(args, pipe),
                         "kept_max_err_255": round(kept_err, 3),
                         "seam_energy": round(float(energy.mean()), 5),
                         "seam_energy_real": round(float(real_energy.mean()), 5),
                         "seam_ratio": round(float(energy.mean() / real_energy.mean()), 3),
                         **metrics_of(out, real_stats, extractor)})
        for k in (0, 1):
            shown = images[k] * (1 - masks[k]) + MASK_FILL * masks[k]
            figure_rows.append((images[k], shown, *(outs[method][k] for method in args.methods)))
    return figure_rows, ("input", "masked input", *(METHOD_TITLES[m] for m in args.methods))


def save_figure(path: str, rows, titles, scale: int = 2) -> None:
    """A grid: one row per example, one column per title (upscaled `scale`x, nearest)."""
    from PIL import Image, ImageDraw

    from edify.pipelines.text2image import to_pil

    size = rows[0][0].shape[-1] * scale
    head = 14
    sheet = Image.new("RGB", (size * len(titles), head + size * len(rows)), "white")
    draw = ImageDraw.Draw(sheet)
    for c, title in enumerate(titles):
        draw.text((c * size + 2, 1), title, fill="black")
    for r, row in enumerate(rows):
        for c, img in enumerate(row):
            pil = to_pil(img[None].float().clamp(-1, 1))[0].resize((size, size), Image.NEAREST)
            sheet.paste(pil, (c * size, head + r * size))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("control", nargs="?", choices=("canny", "inpaint"))
    p.add_argument("--model", default=str(ROOT / "weights" / "emoji-64"))
    p.add_argument("--controlnet", default=None, help="the ControlNet folder")
    p.add_argument("--data", default="data/emoji")
    p.add_argument("--num", type=int, default=200)
    p.add_argument("--first", type=int, default=0,
                   help="canny: start at this validation image (e.g. 200 for a second, held-out set of --num)")
    p.add_argument("--tasks", default="replace,inpaint,outpaint")
    p.add_argument("--methods", default="controlnet,repaint,controlnet+repaint",
                   help="inpainting methods compared (edify.pipelines.control.INPAINT_METHODS)")
    p.add_argument("--steps", type=int, default=None, help="sampler steps (default: the model's)")
    p.add_argument("--guidance", type=float, default=None,
                   help="guidance scale of every arm (default: the ControlNet's, else the model's)")
    p.add_argument("--sigma-min", type=float, default=None,
                   help="where every arm's schedule ends (default: the ControlNet's, else the model's)")
    p.add_argument("--shrink", type=float, default=None, metavar="LEVELS",
                   help="every arm's finished images with their finest band shrunk at this many 8-bit levels "
                        "by --shrink-rule (0: as sampled; default: the model's)")
    p.add_argument("--shrink-rule", choices=SHRINK_RULES, default=None,
                   help="how --shrink treats the band (default: the model's)")
    p.add_argument("--control-weight", type=float, default=1.0)
    add_experts_options(p, "controlled calls run the model's main network at every stage (the one the ControlNet "
                           "was trained on) instead of its stage experts; the base arm always uses them",
                        "controlled calls run the model's stage experts even where the ControlNet's defaults say "
                        "its main network (default: as the ControlNet says)")
    p.add_argument("--batch-size", type=int, default=25)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default="runs/control-quality")
    p.add_argument("--figure", default=None, help="write a figure of 6 examples here (PNG)")
    p.add_argument("--smoke", action="store_true")
    return run_bench("control_quality", p.parse_args(argv), run)


def run(args) -> int:
    from edify.eval.cli import default_cache
    from edify.eval.evaluate import load_split, real_reference
    from edify.eval.features import InceptionFeatures
    from edify.pipelines.control import INPAINT_METHODS, ControlNetPipeline, InpaintPipeline

    args.methods = comma_list(args.methods, INPAINT_METHODS, "--methods")
    if args.smoke:
        return smoke(args)
    if args.control is None or args.controlnet is None:
        raise EdifyError("give a control (canny or inpaint) and --controlnet FOLDER (or --smoke)")
    args.tasks = [t for t in args.tasks.split(",") if t]
    started = time.time()
    cls = ControlNetPipeline if args.control == "canny" else InpaintPipeline
    pipe = (cls.from_pretrained(args.model, controlnets=[args.controlnet]) if args.control == "canny"
            else cls.from_pretrained(args.model, controlnet=args.controlnet))
    real = load_split(args.data, "val", pipe.config.resolution)
    extractor = InceptionFeatures()
    real_stats = real_reference(real, args.data, "val", pipe.config.resolution, extractor,
                                default_cache())
    return report(args, pipe, real, real_stats, extractor, started)


def report(args, pipe, real, real_stats, extractor, started) -> int:
    from edify.core.thresholding import check_shrink

    defaults = pipe.config.defaults
    args.steps = defaults.num_steps if args.steps is None else args.steps
    # the pipeline's own defaults (the ControlNet's, where it carries them, else the model's), for every arm
    guidance, sigma_min, _ = pipe.with_control_defaults(args.guidance, args.sigma_min)
    args.guidance = defaults.guidance_scale if guidance is None else guidance
    args.sigma_min = defaults.sigma_min if sigma_min is None else sigma_min
    args.shrink = check_shrink(defaults.shrink if args.shrink is None else args.shrink)
    args.shrink_rule = defaults.shrink_rule if args.shrink_rule is None else args.shrink_rule
    log = lambda message: print(f"[{time.time() - started:6.0f} s] {message}", file=sys.stderr)  # noqa: E731
    runner = run_canny if args.control == "canny" else run_inpaint
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def emit(row: dict) -> None:  # each row as soon as it is measured
        row["wall_s"] = round(time.time() - started, 1)
        print(json.dumps(row), flush=True)
        with open(out / "control_quality.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")

    figure_rows, titles = runner(args, pipe, real, real_stats, extractor, log, emit)
    if args.figure:
        save_figure(args.figure, figure_rows, titles)
    return 0


def smoke(args) -> int:
    """Both benches on a tiny random base (32 px) and ControlNets with made-up images: the plumbing,
    and the invariants that hold whatever the weights (kept pixels exact, finite metrics)."""
    import tempfile

    from edify.eval.evaluate import RealSplit
    from edify.eval.fid import FeatureStats
    from edify.networks.controlnet import ControlNet
    from edify.pipelines.control import ControlNetPipeline, InpaintPipeline

    sys.path.insert(0, str(ROOT / "tests"))
    from test_controlnet import trained_like  # the test suite's tiny models
    from test_pipeline import tiny_pipeline

    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        base = tiny_pipeline()
        n, size = 4, base.config.resolution
        images = torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1
        real = RealSplit(images, ["a red heart"] * n, ["noto"] * n, Path(tmp), "smoke")

        class Features:  # stands in for Inception: pooled pixels, 12 dimensions
            id, batch_size = "smoke", 8

            def __call__(self, batch):
                return F.adaptive_avg_pool2d(batch.float(), 2).flatten(1).double()

        extractor = Features()
        real_stats = FeatureStats.from_features(extractor(images))
        args.num, args.steps, args.batch_size, args.out = n, 3, 2, str(Path(tmp) / "out")
        for kind, channels, cls in (("canny", 1, ControlNetPipeline), ("inpaint", 7, InpaintPipeline)):
            net = trained_like(ControlNet.from_base(base.network, control_channels=channels, hint_widths=(8,),
                                                    kind=kind), seed=1)
            pipe = cls(base.network, base.config, base.text_encoder, controlnets=[net])
            args.control, args.tasks = kind, ["inpaint", "outpaint"]
            report(args, pipe, real, real_stats, extractor, started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
