"""Where the finest band's SWD comes from: the generated images' finest Laplacian band against the
real images', under several sampler settings.

The multi-scale SWD (`edify.eval.swd`) normalises each set's descriptors, so its finest-band figure
compares the *shape* of the band's distribution (bench/swd_noise.py). For flat-shaded drawings that
shape is mostly one number: the share of the band that is flat. This bench prints it beside the SWD:
`flat` is the fraction of the finest band's values (x - up(down(x)), per pixel and colour, on the
8-bit images) under half an 8-bit level in magnitude, `faint` the fraction from half a level to 3
levels (a speckle too faint to see at a glance), for the real validation images and for each sampler setting's images. If a
setting changes `flat` little, the speckle is the network's, not the sampler's.

    python bench/fine_band.py --model weights/emoji-64 --data data/emoji --num 200 \
        --setting default: --setting no-experts:experts=none --setting eta0:eta=0/0/0 \
        --setting end0.3:sigma_min=0.3 --setting g3:guidance=3
    python bench/fine_band.py --smoke        # seconds: a tiny random model, made-up images

A setting is NAME:KEY=VALUE,... with keys guidance and eta (one value, or one per stage, finest
first, '/'-separated), sigma_min, steps, experts=none (the main network at every stage); the rest are the model's
defaults. Images are drawn as `edify eval` draws them (the validation captions and styles, image i
with seed + i), `--num` per setting, and compared with every validation image. One JSON line per set.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _cli import run_bench  # noqa: E402

KEYS = ("guidance", "sigma_min", "eta", "steps", "experts")


def setting_value(text: str) -> tuple[str, dict]:
    """An argparse type: 'name:guidance=3,eta=1/0/0' -> ('name', {'guidance_scale': 3.0, 'eta': [1, 0, 0]})."""
    name, sep, rest = text.partition(":")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"NAME:KEY=VALUE,... (keys {', '.join(KEYS)}), got {text!r}")
    kw = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        try:
            if not eq or key not in KEYS:
                raise ValueError
            if key == "experts":
                if value != "none":
                    raise ValueError
                kw["experts"] = {}
            elif key in ("eta", "guidance") and "/" in value:  # one per stage, finest first
                kw["guidance_scale" if key == "guidance" else key] = [float(v) for v in value.split("/")]
            elif key == "eta":
                kw["eta"] = [float(value)]
            elif key == "steps":
                kw["num_steps"] = int(value)
            else:
                kw["guidance_scale" if key == "guidance" else key] = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"bad {item!r} in setting {text!r}: keys {', '.join(KEYS)} "
                                             f"(experts=none, eta=A or A/B/C)") from None
    return name, kw


def band_shares(images) -> dict:
    """`flat` and `faint` shares of the finest band of [-1, 1] images, taken as 8-bit."""
    from edify.core.laplacian import down, up

    levels = ((images.float().clamp(-1, 1) + 1) * 127.5).round()  # 8-bit levels, 0..255
    band = (levels - up(down(levels))).abs()
    return {"flat": round(float((band < 0.5).float().mean()), 4),
            "faint": round(float(((band >= 0.5) & (band < 3)).float().mean()), 4)}


def run(args) -> int:
    import torch

    from edify.eval.evaluate import draw_prompts, generate_for_prompts, load_split
    from edify.eval.swd import swd
    from edify.pipelines.text2image import TextToImagePipeline

    settings = args.setting or [("default", {})]
    if args.smoke:
        import tempfile

        from heldout_loss import smoke_model
        from recipe import smoke_dataset

        with tempfile.TemporaryDirectory() as tmp:
            args.data, args.num = smoke_dataset(Path(tmp) / "data", n=12, resolution=16), 8
            args.model, args.smoke = smoke_model(Path(tmp) / "model"), False
            args.setting = [("default", {"num_steps": 3}), ("g1.5", {"num_steps": 3, "guidance_scale": 1.5})]
            return run(args)
    pipe = TextToImagePipeline.from_pretrained(args.model)
    real = load_split(args.data, "val", pipe.config.resolution)
    reference = real.images.float() / 127.5 - 1 if not real.images.is_floating_point() else real.images
    indices = draw_prompts(real, args.num, args.seed)
    rows = [{"set": "real (validation)", "num": len(reference), **band_shares(reference)}]
    print(json.dumps({"bench": "fine_band", **rows[0]}), flush=True)
    for name, kw in settings:
        images = torch.cat([out.images for out in generate_for_prompts(pipe, real, indices, args.batch, args.seed,
                                                                        **kw)])
        row = {"set": name, "num": len(images), **band_shares(images),
               **{k: round(v, 1) for k, v in swd(reference, images).items()}}
        rows.append(row)
        print(json.dumps({"bench": "fine_band", **row}), flush=True)
    scales = [k for k in rows[-1] if k.startswith("swd_")]
    print("| images | flat | faint | SWD " + " / ".join(k[4:] for k in scales) + " |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['set']} | {r['flat']:.3f} | {r['faint']:.3f} | "
              + (" / ".join(f"{r[k]:.1f}" for k in scales) if scales[0] in r else "-") + " |")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="weights/emoji-64")
    p.add_argument("--data", default="data/emoji", help="a dataset with a val/ split")
    p.add_argument("--num", type=int, default=200, help="generated images per setting (default 200)")
    p.add_argument("--setting", type=setting_value, action="append", default=[], metavar="NAME:KEY=VALUE,...",
                   help="a sampler setting (repeatable; default: the model's defaults)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--smoke", action="store_true", help="a tiny random model on made-up images")
    return run_bench("fine_band", p.parse_args(argv), run)


if __name__ == "__main__":
    sys.exit(main())
