"""Ablation: Laplacian diffusion (3 levels) vs standard pixel-space EDM (1 level), same network.

    python bench/ablation_laplacian.py --data data/emoji --images 2000000 --num-samples 924   # GPU
    python bench/ablation_laplacian.py --data data/emoji --set batch_size=128 --set lr=5e-4
    python bench/ablation_laplacian.py --smoke --data data/emoji                               # CPU check

Both runs start from the same training preset (default `emoji-64`) and the same seed, train the same
network on the same data for the same number of images with `edify.training.Trainer`; they differ
only in the forward process: levels=3 with the preset's switch sigmas (Edify Image section 2.2, the
one network serving the 16/32/64 px stages) against levels=1 (Karras et al. 2022: every step at full
resolution). Each run is exported (EMA weights) and evaluated like `edify eval`: the same captions,
seeds, sampler and number of steps, hence equal NFE, against the real images of `--split`.
Prints one JSON line per run, then a table and the command line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edify.eval.cli import default_cache  # noqa: E402
from edify.eval.evaluate import evaluate_pipeline, load_split, real_reference  # noqa: E402
from edify.eval.features import InceptionFeatures  # noqa: E402
from edify.networks.presets import get_config  # noqa: E402
from edify.training.config import apply_overrides, get_preset  # noqa: E402

# What --smoke changes: the tiny network (with room for the emoji styles), a few images, fp32, nothing periodic.
SMOKE = dict(model=dataclasses.replace(get_config("tiny"), num_media_types=8).to_dict(),
             batch_size=4, total_images=16, precision="fp32", compile=False, num_workers=0,
             warmup_images=0, lr_decay_images=0, sample_images=0, checkpoint_images=0, log_images=8,
             text_cache=False, ema_halflife_images=16.0)


def run_configs(args) -> list[tuple[str, object]]:
    """(name, TrainConfig) of the two runs: the preset with levels=3 and with levels=1."""
    base = get_preset(args.preset).replace(data=args.data, sample_images=0, stages=(), stage_weights=())
    if args.images:
        base = base.replace(total_images=args.images)
    if args.smoke:
        base = base.replace(**SMOKE)
    base = apply_overrides(base, args.overrides)
    laplacian = base if base.levels == 3 else base.replace(levels=3, switch_sigmas=(1.0, 5.0))
    edm = base.replace(levels=1, switch_sigmas=())
    return [("laplacian-3", laplacian), ("edm-1", edm)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="emoji-64", help="training preset shared by both runs")
    parser.add_argument("--data", default="data/emoji", help="dataset folder: train/ for training, --split for FID")
    parser.add_argument("--split", default="val")
    parser.add_argument("--images", type=int, default=None, help="training images per run (default: the preset's)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="training config override for both runs, e.g. --set batch_size=128")
    parser.add_argument("--out", default=None, help="run folder (default: runs/ablation-laplacian-<preset>)")
    parser.add_argument("--sampler", default="dpmpp_2m")
    parser.add_argument("--steps", type=int, default=24, help="sampler steps for both (equal NFE)")
    parser.add_argument("--guidance", type=float, default=2.0)
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--max-real", type=int, default=None, help="first N real images only (default: all)")
    parser.add_argument("--seed", type=int, default=0, help="caption draw and sampling seed")
    parser.add_argument("--batch", type=int, default=64, help="generation / feature batch")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--cache", default=None, help=f"real-feature cache (default: {default_cache()})")
    parser.add_argument("--smoke", action="store_true",
                        help="CPU check: tiny network, 16 training images per run, 8 samples vs 16 real images")
    args = parser.parse_args()
    print("command: python " + " ".join(sys.argv))
    tmp = tempfile.TemporaryDirectory(prefix="edify-ablation-")
    if args.smoke:
        if not (Path(args.data) / args.split).is_dir():
            sys.path.insert(0, str(Path(__file__).resolve().parent))
            from sampler_nfe import smoke_data

            args.data = str(smoke_data(Path(tmp.name) / "data", n=16))
            (Path(args.data) / "train").mkdir(exist_ok=True)
            (Path(args.data) / "train" / "smoke-0000.tar").write_bytes(
                (Path(args.data) / args.split / "smoke-0000.tar").read_bytes())
        args.out = args.out or str(Path(tmp.name) / "runs")
        args.num_samples, args.max_real, args.steps, args.batch = 8, 16, 6, 8
        args.cache = args.cache or str(Path(tmp.name) / "cache")
    from edify.pipelines.text2image import TextToImagePipeline
    from edify.training.export import export_pipeline
    from edify.training.loop import Trainer

    from edify.training.checkpoint import latest_checkpoint

    configs = run_configs(args)
    out_root = Path(args.out or f"runs/ablation-laplacian-{args.preset}")
    for name, _ in configs:
        if latest_checkpoint(out_root / name) is not None:
            raise SystemExit(f"{out_root / name} already holds checkpoints; choose another --out")
    resolution = configs[0][1].resolution
    real = load_split(args.data, args.split, resolution, max_images=args.max_real)
    extractor = InceptionFeatures(args.device, batch_size=args.batch)
    real_stats = real_reference(real, args.data, args.split, resolution, extractor,
                                Path(args.cache) if args.cache else default_cache())

    rows = []
    for name, config in configs:
        run_dir = out_root / name
        started = time.perf_counter()
        trainer = Trainer(config, run_dir, device=torch.device(args.device))
        result = trainer.run()
        train_seconds = time.perf_counter() - started  # wall clock: data loading, training and checkpoints
        model_dir = export_pipeline(run_dir, run_dir / "model")
        pipe = TextToImagePipeline.from_pretrained(model_dir).to(args.device)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            metrics = evaluate_pipeline(pipe, real, args.num_samples, sampler=args.sampler, steps=args.steps,
                                        guidance=args.guidance, seed=args.seed, metrics=("fid", "kid", "swd"),
                                        batch_size=args.batch, extractor=extractor, real_stats=real_stats)
        for w in {str(w.message) for w in caught}:
            print(f"warning: {w}", file=sys.stderr)
        row = {"run": name, "levels": config.levels, "switch_sigmas": list(config.switch_sigmas),
               "images": result.images, "steps": result.step, "wall_seconds": round(train_seconds, 1),
               "final_loss": result.losses[-1] if result.losses else None, "sampler": args.sampler,
               "sample_steps": args.steps, "guidance": args.guidance, **metrics, "model": str(model_dir)}
        print(json.dumps(row))
        rows.append(row)

    if rows[0]["nfe"] != rows[1]["nfe"] or rows[0]["images"] != rows[1]["images"]:
        print(f"warning: runs differ in NFE ({rows[0]['nfe']} vs {rows[1]['nfe']}) or images "
              f"({rows[0]['images']} vs {rows[1]['images']})", file=sys.stderr)
    print(f"\npreset {args.preset} ({resolution}px), {args.num_samples} samples vs {real_stats.count} real "
          f"({args.data}/{args.split}), {args.sampler} {args.steps} steps, guidance {args.guidance}")
    print(f"{'run':<12} {'levels':>6} {'images':>10} {'wall s':>9} {'NFE':>4} {'FID':>9} {'KID':>8} {'SWD':>8}")
    for r in rows:
        print(f"{r['run']:<12} {r['levels']:>6} {r['images']:>10} {r['wall_seconds']:>9.1f} {r['nfe']:>4} "
              f"{r['fid']:>9.2f} {r['kid']:>8.4f} {r['swd']:>8.2f}")
    print("FID ratio laplacian-3 / edm-1: " f"{rows[0]['fid'] / rows[1]['fid']:.3f}")
    print("reproduce: python " + " ".join(sys.argv))
    tmp.cleanup()


if __name__ == "__main__":
    main()
