"""What a style finetune learns, what it keeps, and whether the base's ControlNets still work (docs/finetune.md).

    python bench/finetune_quality.py --base weights/emoji-64 --delta weights/emoji-64-openmoji \
        --data data/emoji --style-data data/openmoji --controlnet weights/controlnet-canny-64
    python bench/finetune_quality.py --smoke        # < 1 min: tiny random networks, made-up data

Printed as one JSON line per measurement, each as soon as it is measured (also appended to
--out/finetune_quality.jsonl); `--measures` picks some of cost, style, forgetting, controlnet:

1. cost: the trained share of the base's parameters, the delta's size on disk, and the training's
   CPU and wall minutes and threads, as the delta's finetune.json recorded them.
2. style (`--num` images, default 924): captions and styles drawn from the new style's validation
   split (`edify eval`'s seeded order, image i with seed i); the base with the closest existing
   style (`--closest-style`, default: the base style whose reference images' mean Inception feature
   is nearest the new style's) against the finetune at scale 1 with the new style, same captions and
   seeds. FID and KID against the new style's validation images; `new_style_rate`: the share of the
   images the nearest-neighbour style classifier of bench/recipe.py calls the new style. Its
   reference: --style-ref-per-style training images of every base style (--data) and of the new
   style (--style-data).
3. forgetting (`--num` images on --data's validation captions and styles): the base alone, the
   finetune loaded at scale 0 (`bit_exact`: its images equal the base's bit for bit) and at scale 1;
   FID and KID against --data's validation images and the classifier's accuracy on the requested
   style.
4. ControlNet (`--num-control` validation images of --data, their Canny edges as the control, the
   ControlNet unchanged): the base with the images' own styles against the finetune with the new
   style; edge F1 (edify.data.controls.edge_f1) and the new-style rate of the finetuned arm.
5. loss (seconds, no sampling): the held-out denoising loss, the training objective on images no
   arm trained on: every validation image of the new style (base with the closest style against the
   finetune with the new style) and of --data (own styles; base against the finetune at scale 1),
   for each Laplacian stage at the same sigmas and noise in every arm (`--loss-repeats` draws per
   image and stage, seeded). Lower is a better fit of that split's distribution, whatever the
   sampler makes of it.
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
sys.path.insert(0, str(ROOT / "bench"))

from control_quality import batched, metrics_of  # noqa: E402
from heldout_loss import mean_stage_losses  # noqa: E402
from recipe import knn_styles, style_reference, style_scores  # noqa: E402

from bench._cli import comma_list, run_bench  # noqa: E402
from edify.errors import EdifyError  # noqa: E402
from edify.pipelines.generate_cli import guide_weight_value  # noqa: E402


def generate(pipe, captions, styles, args, control=None) -> torch.Tensor:
    """Images for captions/styles, image i with seed i, in batches of --batch-size."""
    parts = []
    for sl in batched(len(captions), args.batch_size):
        kw = dict(style=styles[sl], seed=list(range(sl.start, sl.stop)), num_steps=args.steps,
                  guidance_scale=args.guidance, style_guidance=args.style_guidance, output_type="tensor")
        if control is not None:
            kw.update(control_image=control[sl], control_weight=args.control_weight,
                      **({"experts": {}} if args.control_no_experts else {}))
        else:
            if args.sigma_min is not None:
                kw.update(sigma_min=args.sigma_min)  # the ControlNet arms keep the ControlNet's own end
            if args.guide_weight is not None:
                kw.update(guide_weight=args.guide_weight)  # the model's own guides (off under a ControlNet)
        parts.append(pipe(captions[sl], **kw).images)
    return torch.cat(parts)


def new_style_rate(images, name: str, extractor, reference) -> float:
    predicted = knn_styles(extractor(images), *reference)
    return round(sum(p == name for p in predicted) / len(predicted), 4)


def closest_style(reference, base_styles, name: str) -> str:
    """The base style whose reference features' mean is nearest the new style's."""
    features, labels = reference
    mean = {s: features[[i for i, x in enumerate(labels) if x == s]].mean(0) for s in set(labels)}
    return min(base_styles, key=lambda s: float((mean[s] - mean[name]).norm()))


def cost_row(delta: Path) -> dict:
    """The main network's share and steps; size and minutes of the whole delta (its experts' parts
    included, each also listed under `parts`)."""
    from edify.pipelines.finetune import INFO_FILE, WEIGHTS_FILE, read_delta, read_parts
    from edify.pipelines.text2image import expert_folder

    info, tensors = read_delta(delta)
    t = info.trained
    total = t.get("network_values")
    trained = t.get("trained_values", sum(v.numel() for v in tensors.values()))
    parts = {expert_folder(stages): {k: part.trained.get(k) for k in ("steps", "images", "trained_values",
                                                                        "cpu_minutes", "wall_minutes")}
             for stages, (part, _) in read_parts(delta, info).items()}
    return {"measure": "cost", "mode": info.mode, "trained_values": trained, "network_values": total,
            "trained_share": round(trained / total, 5) if total else None,
            "delta_bytes": sum(f.stat().st_size for f in Path(delta).rglob("*")  # its files, not a card beside them
                               if f.is_file() and f.name in (INFO_FILE, WEIGHTS_FILE)),
            "steps": t.get("steps"), "images": t.get("images"),
            "cpu_minutes": t.get("total_cpu_minutes", t.get("cpu_minutes")),
            "wall_minutes": t.get("total_wall_minutes", t.get("wall_minutes")), "threads": t.get("threads"),
            **({"parts": parts} if parts else {})}


MEASURES = ("cost", "style", "forgetting", "controlnet", "loss")


def measure(args, base, tuned, cn_base, cn_tuned, real, style_real, real_stats, style_stats, extractor,
            reference, name: str, log):
    """Must-shows 2-4 on loaded pipelines (tuned / cn_tuned carry the finetune at scale 1); yields
    each row as soon as it is measured, so a long run that stops keeps what it measured."""
    measures = getattr(args, "measures", MEASURES)
    if "cost" in measures:
        yield cost_row(Path(args.delta))
    if "style" in measures:
        yield from measure_style(args, base, tuned, style_real, style_stats, extractor, reference, name, log)
    if "forgetting" in measures:
        yield from measure_forgetting(args, base, tuned, real, real_stats, extractor, reference, log)
    if "controlnet" in measures:
        yield from measure_controlnet(args, cn_base, cn_tuned, real, extractor, reference, name, log)
    if "loss" in measures:
        yield from measure_loss(args, base, tuned, real, style_real, reference, name, log)


def measure_style(args, base, tuned, style_real, style_stats, extractor, reference, name, log):
    from edify.eval.evaluate import draw_prompts

    closest = args.closest_style or closest_style(reference, base.config.styles, name)
    picks = draw_prompts(style_real, args.num, args.seed)
    captions = [style_real.captions[j] for j in picks]
    for arm, pipe, style in (("base", base, closest), ("finetune", tuned, name)):
        images = generate(pipe, captions, [style] * len(captions), args)
        yield ({"measure": "style", "arm": arm, "style": style, "num": len(captions),
                **metrics_of(images, style_stats, extractor),
                "new_style_rate": new_style_rate(images, name, extractor, reference)})
        log(f"style: {arm} done")


def measure_forgetting(args, base, tuned, real, real_stats, extractor, reference, log):
    from edify.eval.evaluate import draw_prompts

    picks = draw_prompts(real, args.num, args.seed)
    captions, styles = [real.captions[j] for j in picks], [real.styles[j] for j in picks]
    base_images = generate(base, captions, styles, args)
    for arm, scale in (("base", None), ("scale 0", 0.0), ("scale 1", 1.0)):
        if scale is None:
            images = base_images
        else:
            tuned.unload_finetune().load_finetune(args.delta, scale)
            images = generate(tuned, captions, styles, args)
        predicted = knn_styles(extractor(images), *reference)
        row = {"measure": "forgetting", "arm": arm, "num": len(captions), **metrics_of(images, real_stats, extractor),
               "style_acc": round(style_scores(predicted, styles)["style_acc"], 4)}
        if scale == 0.0:
            row["bit_exact"] = bool(torch.equal(images, base_images))
        yield row
        log(f"forgetting: {arm} done")


def measure_controlnet(args, cn_base, cn_tuned, real, extractor, reference, name, log):
    from edify.data.annotators import canny_edges
    from edify.data.controls import edge_f1

    n = min(args.num_control, real.images.shape[0])
    control = canny_edges(real.images[:n])
    captions, styles = real.captions[:n], real.styles[:n]
    for arm, pipe, arm_styles in (("base", cn_base, styles), ("finetune", cn_tuned, [name] * n)):
        images = generate(pipe, captions, arm_styles, args, control)
        f1 = edge_f1(canny_edges(images), control)
        yield ({"measure": "controlnet", "arm": arm, "num": n, "control_weight": args.control_weight,
                "experts": not args.control_no_experts and pipe.control_experts() is None and pipe.experts_kept(),
                "edge_f1": round(float(f1.mean()), 4), "edge_f1_std": round(float(f1.std()), 4),
                "new_style_rate": new_style_rate(images, name, extractor, reference)})
        log(f"controlnet: {arm} done")


def heldout_loss(pipe, images: torch.Tensor, captions: list[str], styles: list, repeats: int, seed: int,
                 batch: int = 64) -> dict:
    """The mean EDM training loss of `pipe`'s network per Laplacian stage (heldout_loss.py's
    `mean_stage_losses`, from the model's own min_sigma up) and their mean."""
    means = mean_stage_losses(pipe, images, captions, styles, repeats, batch, pipe.config.min_sigma, seed)
    row = {f"loss_stage{stage}": round(v, 4) for stage, v in enumerate(means)}
    row["loss"] = round(sum(row.values()) / len(row), 4)
    return row


def measure_loss(args, base, tuned, real, style_real, reference, name, log):
    closest = args.closest_style or closest_style(reference, base.config.styles, name)
    tuned.unload_finetune().load_finetune(args.delta, 1.0)
    n = style_real.images.shape[0]
    for arm, pipe, style in (("base", base, closest), ("finetune", tuned, name)):
        yield {"measure": "loss", "split": "new style val", "arm": arm, "style": style, "num": n,
               **heldout_loss(pipe, style_real.images, style_real.captions, [style] * n, args.loss_repeats,
                              args.seed)}
    for arm, pipe in (("base", base), ("scale 1", tuned)):
        yield {"measure": "loss", "split": "base val", "arm": arm, "num": real.images.shape[0],
               **heldout_loss(pipe, real.images, real.captions, real.styles, args.loss_repeats, args.seed)}
    log("loss done")


def run(args) -> int:
    from edify.eval.cli import default_cache
    from edify.eval.evaluate import load_split, real_reference
    from edify.eval.features import InceptionFeatures
    from edify.pipelines.control import ControlNetPipeline
    from edify.pipelines.finetune import read_delta
    from edify.pipelines.text2image import TextToImagePipeline

    args.measures = comma_list(args.measures, MEASURES, "--measures")
    if args.smoke:
        return smoke(args)
    needed = ("base", "delta", "style_data") + (("controlnet",) if "controlnet" in args.measures else ())
    for flag in needed:
        if getattr(args, flag) is None:
            raise EdifyError(f"give --{flag.replace('_', '-')} (or --smoke)")
    info, _ = read_delta(args.delta)
    if len(info.styles) != 1:
        raise EdifyError(f"the style bench needs a finetune that adds one style, {args.delta} adds {len(info.styles)}")
    name = info.styles[0].name
    started = time.time()
    log = lambda message: print(f"[{time.time() - started:6.0f} s] {message}", file=sys.stderr)  # noqa: E731
    base = TextToImagePipeline.from_pretrained(args.base)
    tuned = TextToImagePipeline.from_pretrained(args.base, text_encoder=base.text_encoder).load_finetune(args.delta)
    cn_base = cn_tuned = None
    if "controlnet" in args.measures:
        cn_base = ControlNetPipeline.from_pretrained(args.base, controlnets=[args.controlnet],
                                                     text_encoder=base.text_encoder)
        cn_tuned = ControlNetPipeline.from_pretrained(args.base, controlnets=[args.controlnet],
                                                      text_encoder=base.text_encoder).load_finetune(args.delta)
    resolution, cache = base.config.resolution, default_cache()
    extractor = InceptionFeatures()
    real, style_real = load_split(args.data, "val", resolution), load_split(args.style_data, "val", resolution)
    real_stats = real_reference(real, args.data, "val", resolution, extractor, cache)
    style_stats = real_reference(style_real, args.style_data, "val", resolution, extractor, cache)
    args.resolution = resolution
    ref_base = style_reference(args, extractor, cache)
    ref_new = style_reference(argparse.Namespace(**{**vars(args), "data": args.style_data}), extractor, cache)
    reference = (torch.cat([ref_base[0], ref_new[0]]), ref_base[1] + [name] * len(ref_new[1]))
    defaults = base.config.defaults
    args.steps = defaults.num_steps if args.steps is None else args.steps
    args.guidance = defaults.guidance_scale if args.guidance is None else args.guidance
    args.style_guidance = defaults.style_guidance if args.style_guidance is None else args.style_guidance
    rows = measure(args, base, tuned, cn_base, cn_tuned, real, style_real, real_stats, style_stats, extractor,
                   reference, name, log)
    return report(args, rows, started)


def report(args, rows, started: float) -> int:
    """Print and append each row (an iterable, written as it comes) to --out/finetune_quality.jsonl."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for row in rows:
        row = {"bench": "finetune_quality", **row, "guidance": args.guidance, "sigma_min": args.sigma_min,
               "guide_weight": args.guide_weight,
               "wall_s": round(time.time() - started, 1)}
        print(json.dumps(row), flush=True)
        with open(out / "finetune_quality.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
    return 0


def smoke(args) -> int:
    """Every measurement on a tiny random base (32 px), a 3-step finetune and a tiny ControlNet with
    made-up images: the plumbing, and what holds whatever the weights (scale 0 is the base)."""
    import tempfile

    from edify.eval.evaluate import RealSplit
    from edify.eval.fid import FeatureStats
    from edify.networks.controlnet import ControlNet
    from edify.pipelines.control import ControlNetPipeline
    from edify.pipelines.text2image import TextToImagePipeline
    from edify.training import finetune as training

    sys.path.insert(0, str(ROOT / "tests"))
    from test_controlnet import trained_like  # the test suite's tiny models
    from test_finetune import finetune_args, image_folder
    from test_pipeline import HashEncoder, tiny_pipeline

    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tiny_pipeline().save_pretrained(tmp / "base")
        image_folder(tmp / "images")
        delta = tmp / "delta"
        training.run(finetune_args("--base", str(tmp / "base"), "--data", str(tmp / "images"), "--out", str(delta),
                                   "--steps", "3", "--batch-size", "2", "--style", "pixel", "--preset", "tiny-cpu",
                                   "--run", str(tmp / "run"), "--set", "text_cache=false", "--threads", "1"),
                     text_encoder=HashEncoder())
        encoder = HashEncoder()
        base = TextToImagePipeline.from_pretrained(tmp / "base", text_encoder=encoder)
        tuned = TextToImagePipeline.from_pretrained(tmp / "base", text_encoder=encoder).load_finetune(delta)
        net = trained_like(ControlNet.from_base(base.network, control_channels=1, hint_widths=(8,), kind="canny"), 1)
        cn_base = ControlNetPipeline(base.network, base.config, encoder, controlnets=[net])
        cn_tuned = ControlNetPipeline(tuned.network, tuned.config, encoder, controlnets=[net])
        cn_tuned.finetunes, cn_tuned.vocab = tuned.finetunes, tuned.vocab
        n, size = 4, base.config.resolution
        images = torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1
        real = RealSplit(images, ["a red heart"] * n, ["noto", "twemoji"] * (n // 2), tmp, "smoke")

        class Features:  # stands in for Inception: pooled pixels, 12 dimensions
            id, batch_size = "smoke", 8

            def __call__(self, batch):
                return F.adaptive_avg_pool2d(batch.float(), 2).flatten(1).double()

        extractor = Features()
        stats = FeatureStats.from_features(extractor(images))
        reference = (extractor(images).repeat(2, 1), ["noto", "twemoji"] * (n // 2) + ["pixel"] * n)
        args.delta, args.num, args.num_control, args.steps, args.batch_size = str(delta), n, n, 3, 2
        args.guidance, args.out, args.loss_repeats = 2.0, str(tmp / "out"), 1
        rows = list(measure(args, base, tuned, cn_base, cn_tuned, real, real, stats, stats, extractor, reference,
                            "pixel", lambda message: None))
        exact = [r for r in rows if r.get("arm") == "scale 0"]
        if not exact or not exact[0]["bit_exact"]:
            raise EdifyError("smoke: the finetune at scale 0 did not reproduce the base bit for bit")
        report(args, rows, started)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default=None, help="the base model folder")
    p.add_argument("--delta", default=None, help="the finetune delta folder (it adds one style)")
    p.add_argument("--data", default="data/emoji", help="the base's dataset (val/ and train/ splits)")
    p.add_argument("--style-data", default=None, help="the new style's dataset (val/ and train/ splits)")
    p.add_argument("--controlnet", default=None, help="the Canny ControlNet folder trained on the base")
    p.add_argument("--closest-style", default=None, help="the base's style to compare with (default: nearest)")
    p.add_argument("--num", type=int, default=924, help="generated images per arm (default 924)")
    p.add_argument("--num-control", type=int, default=200, help="controlled images per arm (default 200)")
    p.add_argument("--style-ref-per-style", type=int, default=200)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--guidance", type=float, default=None)
    p.add_argument("--sigma-min", type=float, default=None,
                   help="where the uncontrolled arms' schedule ends (default: the base's); the ControlNet "
                        "arms end at the ControlNet's own default")
    p.add_argument("--style-guidance", type=float, default=None,
                   help="extra guidance along the style's direction (default: the base's)")
    p.add_argument("--guide-weight", type=guide_weight_value, default=None,
                   help="the base's own autoguidance weight in the uncontrolled arms (default: the base's; "
                        "0 = off; its guide network sits out while a finetune is loaded at a scale other than 0)")
    p.add_argument("--control-weight", type=float, default=1.0)
    p.add_argument("--control-no-experts", action="store_true",
                   help="the ControlNet arms run the main network at every stage instead of the model's "
                        "stage experts (which carry the finetune's parts for them, if it has any)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--loss-repeats", type=int, default=2,
                   help="loss: sigma and noise draws per image and stage (default 2)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default="runs/finetune-quality")
    p.add_argument("--measures", default=",".join(MEASURES),
                   help="which measurements, a comma list (default: all of cost,style,forgetting,controlnet,loss)")
    p.add_argument("--smoke", action="store_true")
    return run_bench("finetune_quality", p.parse_args(argv), run)


if __name__ == "__main__":
    sys.exit(main())
