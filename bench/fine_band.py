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
    python bench/fine_band.py --model weights/emoji-64 --data data/emoji --denoise 0.3,0.4,0.6
    python bench/fine_band.py --smoke        # seconds: a tiny random model, made-up images

`--denoise SIGMAS` asks where the speckle is made, with no sampler at all: the 64 px stage's network
(its expert, where the model has one) denoises the real validation images noised to each sigma, one
step, D(x0 + sigma n; sigma), and the bench prints, over the values whose real finest band is flat,
the share the estimate keeps flat (`flat_kept`), the estimate's band there in 8-bit levels
(`rms_levels`), and both again for the values more than --far pixels from any non-flat value of the
real image (`flat_kept_far`, `rms_levels_far`: away from every edge, where the right answer is
exactly flat and no uncertainty about an edge's place excuses a level). A perfect denoiser keeps
all of them flat at every sigma; a sampler's output is such an estimate at its last sigma.

A setting is NAME:KEY=VALUE,... with keys guidance and eta (one value, or one per stage, finest
first, '/'-separated), sigma_min, steps, experts=none (the main network at every stage), and
shrink=T and shrink_rule=garrote|soft|hard, the pipelines' post-process of the finished image: its
finest band shrunk at T 8-bit levels (`edify.core.thresholding.shrink_finest_band`: the band values
within T of 0 set to 0, the larger ones moved towards 0 by the rule, the 2x2 block means kept;
shrink=0 shows the images as sampled); the rest are the model's defaults. Images are drawn as `edify eval` draws them (the validation captions and styles, image i
with seed + i), `--num` per setting, and compared with every validation image. One JSON line per set.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _cli import run_bench  # noqa: E402

KEYS = ("guidance", "sigma_min", "eta", "steps", "experts", "shrink", "shrink_rule")


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
            elif key in ("shrink", "shrink_rule"):
                try:
                    kw[key] = (levels_value if key == "shrink" else rule_value)(value)
                except argparse.ArgumentTypeError:
                    raise ValueError from None
            else:
                kw["guidance_scale" if key == "guidance" else key] = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"bad {item!r} in setting {text!r}: keys {', '.join(KEYS)} "
                                             f"(experts=none, eta=A or A/B/C)") from None
    return name, kw


def sigma_list(text: str) -> list[float]:
    """An argparse type: '0.3,0.4' -> [0.3, 0.4], every value finite and positive."""
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if not values or not all(0 < v < float("inf") for v in values):
        raise argparse.ArgumentTypeError(f"positive sigmas separated by commas, got {text!r}")
    return values


def levels_value(text: str) -> float:
    """An argparse type: a finite number of 8-bit levels >= 0 (a shrink threshold, checked by
    edify.core.thresholding.check_shrink)."""
    from edify.core.thresholding import check_shrink
    from edify.errors import EdifyError

    try:
        return check_shrink(float(text))
    except (ValueError, EdifyError):
        raise argparse.ArgumentTypeError(f"a number of 8-bit levels >= 0, got {text!r}") from None


def rule_value(text: str) -> str:
    """An argparse type: a shrink rule (edify.core.thresholding.check_shrink_rule)."""
    from edify.core.thresholding import SHRINK_RULES, check_shrink_rule
    from edify.errors import EdifyError

    try:
        return check_shrink_rule(text)
    except EdifyError:
        raise argparse.ArgumentTypeError(f"a shrink rule ({', '.join(SHRINK_RULES)}), got {text!r}") from None


def band_shares(images) -> dict:
    """`flat` and `faint` shares of the finest band of [-1, 1] images, taken as 8-bit."""
    from edify.core.laplacian import down, up

    levels = ((images.float().clamp(-1, 1) + 1) * 127.5).round()  # 8-bit levels, 0..255
    band = (levels - up(down(levels))).abs()
    return {"flat": round(float((band < 0.5).float().mean()), 4),
            "faint": round(float(((band >= 0.5) & (band < 3)).float().mean()), 4)}


def denoise_rows(pipe, real, sigmas: list[float], num: int, seed: int, batch: int, far: int) -> list[dict]:
    """One-step estimates of the first `num` real images at each sigma (see the docstring)."""
    import torch

    from edify.core.precond import EDMPrecond

    images = real.images[:num]
    x0 = images.float() / 127.5 - 1 if not images.is_floating_point() else images.float()
    net = (pipe.experts if pipe.experts_kept() else {}).get(0, pipe.network)
    denoiser = EDMPrecond(net, pipe.config.sigma_data)
    net.eval()
    known = set(pipe.vocab.names)
    cond = pipe.encode(real.captions[:num], [s if s in known else None for s in real.styles[:num]])
    rows = []
    for sigma in sigmas:
        gen = torch.Generator().manual_seed(seed)
        estimates = []
        with torch.no_grad():
            for i in range(0, len(x0), batch):
                part = slice(i, min(len(x0), i + batch))
                b = x0[part].shape[0]
                s = torch.full((b,), sigma)
                x = pipe.process.noisy_state(x0[part], s, torch.randn(x0[part].shape, generator=gen), 0)
                estimates.append(denoiser(x, s, cond.index(part), torch.zeros(b, dtype=torch.long)))
        rows.append({"set": f"denoise sigma {sigma:g}", "num": len(x0), "sigma": sigma,
                     **flat_stats(x0, torch.cat(estimates), far)})
    return rows


def flat_stats(real, estimate, far: int) -> dict:
    """Over the values of [N, 3, H, W] images in [-1, 1] whose real finest band (8-bit) is flat: the
    real share of them, the share the estimate keeps flat and its band's RMS in levels; the same over
    those more than `far` pixels (Chebyshev) from any non-flat value of the real image."""
    import torch.nn.functional as F

    from edify.core.laplacian import down, up

    def band(x):
        levels = ((x.float().clamp(-1, 1) + 1) * 127.5).round()
        return (levels - up(down(levels))).abs()

    flat = band(real) < 0.5
    edge = (~flat).any(1, keepdim=True).float()
    away = (F.max_pool2d(edge, 2 * far + 1, stride=1, padding=far) == 0).expand_as(flat) & flat
    est = band(estimate)

    def kept(mask):
        return round(float((est[mask] < 0.5).float().mean()), 4) if mask.any() else float("nan")

    def rms(mask):
        return round(float(est[mask].square().mean().sqrt()), 3) if mask.any() else float("nan")

    return {"flat_real": round(float(flat.float().mean()), 4), "flat_kept": kept(flat), "rms_levels": rms(flat),
            "far_share": round(float(away.float().mean()), 4), "flat_kept_far": kept(away),
            "rms_levels_far": rms(away)}


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
    if args.denoise:
        rows = denoise_rows(pipe, real, args.denoise, args.num, args.seed, args.batch, args.far)
        print("| sigma | flat (real) | flat kept | RMS (levels) | flat kept, > " f"{args.far} px from an edge | RMS there |"
              "\n|---|---|---|---|---|---|")
        for r in rows:
            print(json.dumps({"bench": "fine_band", "model": str(args.model), **r}), flush=True)
        for r in rows:
            print(f"| {r['sigma']:g} | {r['flat_real']:.3f} | {r['flat_kept']:.3f} | {r['rms_levels']:.2f} | "
                  f"{r['flat_kept_far']:.3f} | {r['rms_levels_far']:.2f} |")
        return 0
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
    p.add_argument("--denoise", type=sigma_list, default=None, metavar="S1,S2,...",
                   help="one-step estimates of the real images at these sigmas instead of sampling (see above)")
    p.add_argument("--far", type=int, default=2, help="--denoise: pixels from an edge that count as far (default 2)")
    p.add_argument("--smoke", action="store_true", help="a tiny random model on made-up images")
    return run_bench("fine_band", p.parse_args(argv), run)


if __name__ == "__main__":
    sys.exit(main())
