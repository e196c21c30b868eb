"""`edify upscale IN.png`: a low-resolution image made `--scale` times larger by a cascade upsampler,
and the cascade behind `edify generate --upscale` (base model, then the upsampler).

    edify upscale small.png -o big.png
    edify upscale small.png -o big.png --scale 4 --entry-sigma 1.2 --guidance-weight 1 "red apple"
    edify upscale small.png -o big.png --controlnet weights/controlnet-up-256 --tile 128 --overlap 32

Every input is checked before a model is loaded (the file is an image, the scale, the entry sigma and
the tiles suit the model); bad input is one line and nothing is written. The default upsampler is the
checkout's weights/emoji-up-256 (`edify train --preset emoji-up-64-256-cpu ... --export` makes one).
The upsampler's noise is drawn from seed + UPSCALE_SEED_OFFSET, so in the cascade it is independent
of the base model's noise of the same seed.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from edify.errors import EdifyError

DEFAULT_UPSCALER = "emoji-up-256"
UPSCALE_SEED_OFFSET = 2**32


def default_upscaler() -> Path:
    """The shipped upsampler's folder (checkout or wheel), or a one-line error saying how to make one."""
    from edify import assets

    folder = assets.shipped_path(DEFAULT_UPSCALER)
    if not (folder / "config.json").is_file():
        raise EdifyError(f"no upsampler at {folder}: it is missing; train one with `edify train --preset "
                         f"emoji-up-64-256-cpu --data data/emoji --out runs/up --export {folder}`, or pass a "
                         f"model folder")
    return folder


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from edify.pipelines.generate_cli import guidance_value
    from edify.runtime import add_runtime_arguments

    parser.add_argument("image", metavar="IN.png", help="the low-resolution image")
    parser.add_argument("prompt", nargs="?", default=None, help="optional caption of the image, e.g. 'red apple'")
    parser.add_argument("-o", "--output", default="out.png", help="output PNG")
    parser.add_argument("--model", default=None, help=f"upsampler model folder (default: weights/{DEFAULT_UPSCALER})")
    parser.add_argument("--controlnet", default=None, metavar="FOLDER",
                        help="an upsample ControlNet for the upsampler, reading the clean input (optional)")
    parser.add_argument("--control-weight", type=float, default=1.0, metavar="W", help="ControlNet weight (default 1)")
    add_upscale_arguments(parser)
    parser.add_argument("--style", default=None, help="media type / style label (optional)")
    parser.add_argument("--negative", default=None, help="negative prompt")
    parser.add_argument("--seed", type=int, default=0, help="seed of the upsampler's noise")
    parser.add_argument("--steps", type=int, default=None, help="sampler steps from the entry sigma to 0")
    parser.add_argument("--guidance", type=guidance_value, default=None,
                        help="classifier-free guidance scale (default: the model's with a prompt, 1 without)")
    parser.add_argument("--sampler", default=None, help="dpmpp_2m (default), dpmpp_3m, euler, heun, exp_trapezoid, or the stochastic "
                        "dpmpp_2m_sde and euler_sde (eta 1)")
    add_runtime_arguments(parser)


def add_upscale_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of the upsampler that `edify upscale` and `edify generate --upscale` share."""
    parser.add_argument("--scale", type=int, default=None, help="upscaling factor, 2 or 4 (default: the model's largest)")
    parser.add_argument("--entry-sigma", type=float, default=None, metavar="S",
                        help="full-resolution sigma where sampling enters (default: the model's lowest, which keeps "
                             "the most of the input; higher lets the model repaint)")
    parser.add_argument("--guidance-weight", type=float, default=None, metavar="W",
                        help="reconstruction guidance toward the input (Ho et al. 2022; 0 = off, 1 = a full "
                             "projection where the denoiser is locally the identity; default: the model's)")
    parser.add_argument("--tile", type=int, default=None, metavar="PX",
                        help="tile side in output pixels (default: the model's training size, when the output is larger)")
    parser.add_argument("--overlap", type=int, default=None, metavar="PX",
                        help="tile overlap in output pixels (default: a quarter of the tile, at most 32)")


def check_upscale_args(args: argparse.Namespace) -> None:
    """The checks that need no model."""
    import math

    if args.scale is not None and (args.scale < 2 or args.scale & (args.scale - 1)):
        raise EdifyError(f"--scale must be a power of 2 (2, 4, ...), got {args.scale}")
    if args.entry_sigma is not None and not (math.isfinite(args.entry_sigma) and args.entry_sigma > 0):
        raise EdifyError(f"--entry-sigma must be a positive number, got {args.entry_sigma}")
    if args.guidance_weight is not None and not (math.isfinite(args.guidance_weight) and args.guidance_weight >= 0):
        raise EdifyError(f"--guidance-weight must be finite and >= 0, got {args.guidance_weight}")
    if args.overlap is not None and args.overlap < 0:
        raise EdifyError(f"--overlap must be >= 0 px, got {args.overlap}")
    if args.tile is not None and args.overlap is not None and args.overlap >= args.tile:
        raise EdifyError(f"--overlap ({args.overlap} px) must be smaller than --tile ({args.tile} px)")


def check_with_model(pipe, args: argparse.Namespace, input_size: tuple[int, int]) -> None:
    """The checks that need the upsampler's config: scale, entry sigma, tile size."""
    from edify.core.cascade import check_entry_sigma
    from edify.core.tiling import check_tiling

    scale = args.scale or max(pipe.scales, default=0)
    k = pipe.check_scale(scale)
    if args.entry_sigma is not None:
        check_entry_sigma(pipe.process, k, args.entry_sigma, pipe.max_sigma)
    if args.tile is not None:
        m = pipe.size_multiple
        h, w = (-(-s * scale // m) * m for s in input_size)  # the padded output
        check_tiling(h, w, args.tile, min(32, args.tile // 4) if args.overlap is None else args.overlap, m)


def upscale_kwargs(args: argparse.Namespace) -> dict:
    return dict(scale=args.scale, entry_sigma=args.entry_sigma, guidance_weight=args.guidance_weight,
                tile=args.tile, overlap=args.overlap)


def run(args: argparse.Namespace) -> int:
    from edify import runtime
    from edify.pipelines.control_cli import read_image
    from edify.pipelines.generate_cli import finite_guard, output_paths, save_png

    check_upscale_args(args)
    if args.steps is not None and args.steps < 1:
        raise EdifyError(f"--steps must be >= 1, got {args.steps}")
    if args.prompt is not None and not args.prompt.strip():
        raise EdifyError("the prompt is empty (leave it out to upscale without a caption)")
    path = output_paths(args.output, 1)[0]
    if not path.parent.exists():
        raise EdifyError(f"output folder {str(path.parent)!r} does not exist")
    image = read_image(args.image, "input image")
    model = Path(args.model) if args.model else default_upscaler()
    device = runtime.resolve_device(args.device)
    with runtime.threads(args.threads):
        from edify.pipelines.text2image import to_pil
        from edify.pipelines.upscale import UpscalePipeline

        pipe = UpscalePipeline.from_pretrained(model, controlnet=args.controlnet).to(device)
        check_with_model(pipe, args, (image.height, image.width))
        progress = runtime.Progress(1, "upscaling", runtime.progress_enabled(args.quiet))
        try:
            out = pipe(image, args.prompt, negative_prompt=args.negative, style=args.style, num_steps=args.steps,
                       guidance_scale=args.guidance, control_weight=args.control_weight,
                       seed=args.seed + UPSCALE_SEED_OFFSET, sampler=args.sampler, output_type="tensor",
                       callback=finite_guard([args.seed], progress, args.steps), **upscale_kwargs(args))
            if not runtime.all_finite(out.images):
                raise EdifyError("the upscaled image holds non-finite values: the model is unusable; nothing written")
            progress.update(1)
        finally:
            progress.close()
        result = to_pil(out.images)[0]
        save_png(result, path)
    print(f"{path}  ({image.width}x{image.height} -> {result.width}x{result.height}, entry sigma "
          f"{out.entry_sigma:g}, reconstruction guidance {out.guidance_weight:g}, {out.nfe} steps x {out.tiles} tile(s))")
    return 0


class Cascade:
    """`edify generate --upscale`: the base pipeline, then the upsampler on its images, called the way
    `generate_cli.generate_batch` calls a pipeline."""

    def __init__(self, base, upscaler, args: argparse.Namespace):
        self.base, self.upscaler, self.args, self.config = base, upscaler, args, base.config

    def __call__(self, prompt, *, negative_prompt=None, style=None, seed=None, output_type="tensor", callback=None,
                 **kwargs):
        from edify.pipelines.text2image import TextToImageOutput

        low = self.base(prompt, negative_prompt=negative_prompt, style=style, seed=seed, output_type="tensor",
                        callback=callback, **kwargs)
        seeds = [s + UPSCALE_SEED_OFFSET for s in low.seeds]
        if self.upscaler._text_encoder is None and self.upscaler.config.text_encoder == self.config.text_encoder:
            self.upscaler._text_encoder = self.base._text_encoder  # one encoder in memory, loaded once
        high = self.upscaler(low.images, prompt, negative_prompt=negative_prompt, style=style, seed=seeds,
                             output_type=output_type, callback=callback, **upscale_kwargs(self.args))
        return TextToImageOutput(images=high.images, seeds=low.seeds, nfe=low.nfe + high.nfe * high.tiles)


def cascade_pipeline(base, args: argparse.Namespace, device):
    """The base pipeline followed by the upsampler of --upscale (a folder, or the default one)."""
    from edify.pipelines.upscale import UpscalePipeline

    check_upscale_args(args)
    folder = default_upscaler() if args.upscale == "default" else Path(args.upscale)
    upscaler = UpscalePipeline.from_pretrained(folder).to(device)
    side = args.height or base.config.resolution, args.width or base.config.resolution
    check_with_model(upscaler, args, side)
    return Cascade(base, upscaler, args)
