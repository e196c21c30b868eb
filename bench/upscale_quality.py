"""How well the upsamplers upscale real validation images, and whether tiles leave seams (docs/upscale.md).

    python bench/upscale_quality.py quality --model weights/emoji-up-256 \
        [--controlnet weights/controlnet-up-256] --data data/emoji --num 924 --figure docs/upscale_val.png
    python bench/upscale_quality.py tiling --model weights/emoji-up-256 --data data/emoji --num 8
    python bench/upscale_quality.py --smoke        # < 1 min: tiny random networks, made-up data

quality: --num validation images at 256 px, evenly spread over the split (`spread`; image i with
seed i; all 924 by default), pooled
4x (2x2 means twice, the process's `down`) to 64 px inputs, upscaled back to 256 px by each arm:
bicubic (PIL's kernel through torch, a = -0.75), the cascade upsampler, the cascade with
reconstruction guidance (--guidance-weight), and with --controlnet the ControlNet upsampler without
and with guidance (--arms picks some). Each arm gets the image's style and no caption (guidance
scale 1). Printed per arm:
- psnr / ssim against the real 256 px image (images in [0, 1]; SSIM with an 11 px Gaussian window,
  sigma 1.5, averaged over channels);
- consistency_psnr: PSNR of down^2(output) against the 64 px input (the consistency error
  ||down(output) - input|| in dB; 35 dB is an RMS error of 1.8% of the range);
- hf_ratio and hf_lsd: the radially averaged power spectrum of the luminance, over the frequencies
  the 64 px input cannot hold (|f| > 1/8 cycles per px, up to 1/2): hf_ratio = the arm's summed
  energy there / the real images' (1 = as much fine detail as real images, bicubic far below),
  hf_lsd = the mean over those frequency bins of |log10 P_arm(f) - log10 P_real(f)| (0 = the real
  spectrum's shape);
- FID/KID at 256 px against all real validation images.
tiling: --num validation images pooled to 128 px, upscaled 4x to 512 px in tiles (--tile /
--overlap, default 384 / 256: 2 x 2 tiles) and in one 512 px pass, both with reconstruction guidance
--guidance-weight (0 = off; guidance acts on the whole canvas). Printed per arm: seconds per
image, and seam_ratio = the mean squared image gradient on the pixels within 2 px of a tile border
inside the canvas over the same statistic on the other pixels, next to the same ratio of the one-
pass output on the same pixels (a seam shows as a tiled ratio above the one-pass ratio).
One JSON line per arm goes to stdout and to --out/upscale_quality.jsonl.
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

from control_quality import batched, gradient_energy, metrics_of, save_figure  # noqa: E402

from edify.core.laplacian import down, up  # noqa: E402
from bench._cli import comma_list, run_bench  # noqa: E402
from edify.errors import EdifyError  # noqa: E402


CHUNK = 32  # images per chunk in the per-image measures: 924 images at 256 px at once need gigabytes


def per_chunk(measure):
    """A per-image measure of two image batches, run CHUNK images at a time."""
    def chunked(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.cat([measure(a[i:i + CHUNK], b[i:i + CHUNK]) for i in range(0, a.shape[0], CHUNK)])
    chunked.__doc__ = measure.__doc__
    return chunked


@per_chunk
def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per image PSNR in dB of images in [-1, 1], measured on [0, 1]."""
    mse = ((a.float() - b.float()) / 2).square().flatten(1).mean(1)
    return 10 * torch.log10(1 / mse.clamp_min(1e-12))


@per_chunk
def ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per image SSIM (Wang et al. 2004: 11 px Gaussian window, sigma 1.5, K1 0.01, K2 0.03) on [0, 1]."""
    x, y = (a.float() + 1) / 2, (b.float() + 1) / 2
    g = torch.exp(-(torch.arange(11) - 5.0).square() / (2 * 1.5**2))
    g = (g / g.sum())
    w = (g[:, None] * g[None, :]).expand(x.shape[1], 1, 11, 11)

    def blur(t):
        return F.conv2d(t, w, groups=t.shape[1])
    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return s.flatten(1).mean(1)


def radial_spectrum(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(frequencies in cycles per px, mean power per radial bin) of the images' luminance."""
    n = images.shape[-1]
    power = torch.zeros(n, n)
    for i in range(0, images.shape[0], CHUNK):
        x = (images[i:i + CHUNK].float() + 1) / 2
        lum = 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]
        power += torch.fft.fft2(lum - lum.mean((-2, -1), keepdim=True)).abs().square().sum(0)
    power = power / (images.shape[0] * n**2)
    f = torch.fft.fftfreq(n)
    radius = (f[:, None] ** 2 + f[None, :] ** 2).sqrt()
    bins = (radius * n).round().long().clamp(max=n // 2)
    total = torch.zeros(n // 2 + 1).index_add_(0, bins.flatten(), power.flatten())
    count = torch.zeros(n // 2 + 1).index_add_(0, bins.flatten(), torch.ones(n * n))
    return torch.arange(n // 2 + 1) / n, total / count.clamp_min(1)


def high_frequency(out: torch.Tensor, real: torch.Tensor, scale: int) -> dict:
    """hf_ratio and hf_lsd over |f| > 1 / (2 scale) cycles per px (module docstring)."""
    f, p_out = radial_spectrum(out)
    _, p_real = radial_spectrum(real)
    band = f > 1 / (2 * scale)
    ratio = float(p_out[band].sum() / p_real[band].sum())
    lsd = float((p_out[band].clamp_min(1e-20).log10() - p_real[band].clamp_min(1e-20).log10()).abs().mean())
    return {"hf_ratio": round(ratio, 4), "hf_lsd": round(lsd, 4)}


def spread(num: int, total: int) -> list[int]:
    """`num` indices evenly spread over `total` (all of them when num >= total): the split is stored
    style by style, so its first images would all be of one or two styles."""
    if num < 1:
        raise EdifyError(f"--num must be >= 1, got {num}")
    if num >= total:
        return list(range(total))
    return [(i * total) // num for i in range(num)]


def bicubic(y: torch.Tensor, scale: int) -> torch.Tensor:
    return F.interpolate(y, scale_factor=scale, mode="bicubic", align_corners=False).clamp(-1, 1)


ARMS = ("bicubic", "cascade", "cascade+guidance", "controlnet", "controlnet+guidance")


def arms(args, pipe) -> dict:
    """name -> function (y [B, 3, h, w], styles, seeds) -> images [B, 3, 4h, 4w]."""
    def upsampler(weight: float, control: bool):
        def run(y, styles, seeds):
            target = pipe if control else pipe.without_controlnet
            return target(y, style=styles, seed=seeds, num_steps=args.steps, guidance_weight=weight,
                          entry_sigma=args.entry_sigma, output_type="tensor").images
        return run
    out = {"bicubic": lambda y, styles, seeds: bicubic(y, 4),
           "cascade": upsampler(0.0, False), "cascade+guidance": upsampler(args.guidance_weight, False)}
    if pipe.controlnets:
        out.update({"controlnet": upsampler(0.0, True), "controlnet+guidance": upsampler(args.guidance_weight, True)})
    if args.arms:
        names = comma_list(args.arms, ARMS, "--arms")
        missing = [name for name in names if name not in out]
        if missing:
            raise EdifyError(f"--arms {','.join(missing)} need(s) --controlnet")
        out = {name: out[name] for name in names}
    return out


def run_quality(args, pipe, real, real_stats, extractor, log, emit=None) -> tuple[list[dict], list, tuple]:
    """Every arm on the picked images; each arm's row goes to `emit` as soon as it is measured."""
    picks = spread(args.num, real.images.shape[0])
    n = len(picks)
    images, styles = real.images[picks], [real.styles[i] for i in picks]
    y = down(images, 2)
    rows, outs = [], {}
    for name, fn in arms(args, pipe).items():
        started, parts = time.time(), []
        for sl in batched(n, args.batch_size):
            parts.append(fn(y[sl], styles[sl], picks[sl]).cpu())
            log(f"{name}: {sl.stop}/{n} images")
        out = torch.cat(parts)
        outs[name] = out[:8]  # the figure's images; the rest is freed after this arm's measures
        rows.append({"bench": "upscale_quality", "arm": name, "num": n, "steps": args.steps,
                     "entry_sigma": args.entry_sigma, "guidance_weight": args.guidance_weight if "guidance" in name
                     else 0.0, "psnr": round(float(psnr(out, images).mean()), 3),
                     "ssim": round(float(ssim(out, images).mean()), 4),
                     "consistency_psnr": round(float(psnr(down(out, 2), y).mean()), 3),
                     **high_frequency(out, images, 4), **metrics_of(out, real_stats, extractor),
                     "seconds_per_image": round((time.time() - started) / n, 3)})
        if emit is not None:
            emit(rows[-1])
    figure = [(up(y[i], 2), *(outs[a][i] for a in outs), images[i]) for i in range(min(8, n))]
    return rows, figure, ("input (64 px)", *outs, "real 256 px")


def tile_border_band(size: int, tiles, width: int = 2) -> torch.Tensor:
    """[size, size] bool: pixels within `width` px of a tile edge that lies inside the canvas."""
    band = torch.zeros(size, size, dtype=torch.bool)
    for t in tiles:
        for edge in (t.top, t.top + t.height):
            if 0 < edge < size:
                band[max(0, edge - width):edge + width, t.left:t.left + t.width] = True
        for edge in (t.left, t.left + t.width):
            if 0 < edge < size:
                band[t.top:t.top + t.height, max(0, edge - width):edge + width] = True
    return band


def run_tiling(args, pipe, real, log) -> list[dict]:
    from edify.core.tiling import make_tiles

    picks = spread(args.num, real.images.shape[0])
    n = len(picks)
    y = down(real.images[picks], 1)  # 128 px inputs -> 512 px outputs (of a 256 px model)
    styles = [real.styles[i] for i in picks]
    size = 4 * y.shape[-1]
    tiles = make_tiles(size, size, args.tile, args.overlap, pipe.size_multiple, 4 * 2 ** (pipe.process.levels - 1))
    band = tile_border_band(size, tiles)[None, None].expand(n, 1, -1, -1)
    rows, energies = [], {}
    for name, tile in (("tiled", args.tile), ("one pass", size)):
        started, parts = time.time(), []
        for sl in batched(n, args.batch_size):
            parts.append(pipe.without_controlnet(y[sl], style=styles[sl], seed=picks[sl],
                                                 num_steps=args.steps, tile=tile, overlap=args.overlap,
                                                 guidance_weight=args.guidance_weight, output_type="tensor").images)
            log(f"tiling {name}: {sl.stop}/{n}")
        out = torch.cat(parts)
        ratio = gradient_energy(out, band) / gradient_energy(out, ~band)
        energies[name] = float(ratio.mean())
        rows.append({"bench": "upscale_tiling", "arm": name, "num": n, "tiles": len(tiles) if name == "tiled" else 1,
                     "tile": tile, "overlap": args.overlap, "steps": args.steps,
                     "guidance_weight": args.guidance_weight, "seam_ratio": round(energies[name], 4),
                     "seconds_per_image": round((time.time() - started) / n, 2)})
    rows[0]["seam_ratio_over_one_pass"] = round(energies["tiled"] / energies["one pass"], 4)
    return rows


class NoControlNet:
    """The pipeline with its ControlNet set aside for one call (the cascade arms)."""

    def __init__(self, pipe):
        self.pipe = pipe

    def __call__(self, *a, **kw):
        nets, self.pipe.controlnets = self.pipe.controlnets, []
        try:
            return self.pipe(*a, **kw)
        finally:
            self.pipe.controlnets = nets


def write(rows, out: str, started: float) -> None:
    Path(out).mkdir(parents=True, exist_ok=True)
    with open(Path(out) / "upscale_quality.jsonl", "a") as f:
        for row in rows:
            row["wall_s"] = round(time.time() - started, 1)
            print(json.dumps(row))
            f.write(json.dumps(row) + "\n")


def report(args, pipe, real, real_stats, extractor, started) -> int:
    pipe.without_controlnet = NoControlNet(pipe)
    args.steps = pipe.config.defaults.num_steps if args.steps is None else args.steps
    log = lambda message: print(f"[{time.time() - started:6.0f} s] {message}", file=sys.stderr)  # noqa: E731
    if args.bench in ("quality", None):
        _, figure, titles = run_quality(args, pipe, real, real_stats, extractor, log,
                                        emit=lambda row: write([row], args.out, started))
        if args.figure:
            save_figure(args.figure, figure, titles, scale=1)
    if args.bench in ("tiling", None):
        write(run_tiling(args, pipe, real, log), args.out, started)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bench", nargs="?", choices=("quality", "tiling"))
    p.add_argument("--model", default=str(ROOT / "weights" / "emoji-up-256"))
    p.add_argument("--controlnet", default=None, help="an upsample ControlNet folder for the upsampler")
    p.add_argument("--data", default="data/emoji")
    p.add_argument("--num", type=int, default=924)
    p.add_argument("--arms", default=None,
                   help=f"quality: a comma list of {', '.join(ARMS)} (default: all the model has)")
    p.add_argument("--steps", type=int, default=None, help="sampler steps (default: the model's)")
    p.add_argument("--entry-sigma", type=float, default=None, help="default: the model's lowest")
    p.add_argument("--guidance-weight", type=float, default=1.0,
                   help="reconstruction guidance of the +guidance arms and of both tiling arms (default 1)")
    p.add_argument("--tile", type=int, default=384)
    p.add_argument("--overlap", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default="runs/upscale-quality")
    p.add_argument("--figure", default=None, help="write the figure of 8 images here (PNG)")
    p.add_argument("--smoke", action="store_true")
    return run_bench("upscale_quality", p.parse_args(argv), lambda args: smoke(args) if args.smoke else run(args))


def run(args) -> int:
    from edify.eval.cli import default_cache
    from edify.eval.evaluate import load_split, real_reference
    from edify.eval.features import InceptionFeatures
    from edify.pipelines.upscale import UpscalePipeline

    if args.bench is None:
        raise EdifyError("give a bench: quality or tiling (or --smoke)")
    started = time.time()
    pipe = UpscalePipeline.from_pretrained(args.model, controlnet=args.controlnet)
    resolution = pipe.config.resolution
    real = load_split(args.data, "val", resolution)
    extractor = real_stats = None
    if args.bench == "quality":
        extractor = InceptionFeatures()
        real_stats = real_reference(real, args.data, "val", resolution, extractor, default_cache())
    return report(args, pipe, real, real_stats, extractor, started)


def smoke(args) -> int:
    """Both benches on a tiny random upsampler (64 px, ControlNet included) and made-up images."""
    import tempfile

    from edify.eval.evaluate import RealSplit
    from edify.eval.fid import FeatureStats
    from edify.networks.controlnet import ControlNet
    from edify.pipelines.upscale import UpscalePipeline

    sys.path.insert(0, str(ROOT / "tests"))
    from _training_helpers import WordHashEncoder
    from test_upscale import save_tiny_upscaler

    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        pipe = UpscalePipeline.from_pretrained(save_tiny_upscaler(Path(tmp) / "up"), text_encoder=WordHashEncoder())
        pipe.add_controlnet(ControlNet.from_base(pipe.network, control_channels=3, hint_widths=(8,), kind="upsample"))
        n = 4
        images = torch.rand(n, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
        real = RealSplit(images, ["a red heart"] * n, ["flat"] * n, Path(tmp), "smoke")

        class Features:  # stands in for Inception: pooled pixels, 12 dimensions
            id, batch_size = "smoke", 8

            def __call__(self, batch):
                return F.adaptive_avg_pool2d(batch.float(), 2).flatten(1).double()

        extractor = Features()
        args.num, args.steps, args.batch_size, args.out = n, 4, 2, str(Path(tmp) / "out")
        args.tile, args.overlap, args.bench = 64, 32, None
        args.figure = str(Path(tmp) / "figure.png") if args.figure is None else args.figure
        report(args, pipe, real, FeatureStats.from_features(extractor(images)), extractor, started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
