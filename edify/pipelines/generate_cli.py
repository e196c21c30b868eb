"""`edify generate PROMPT`: text to image with a model folder (the shipped demo model by default).

Images are generated in batches of --batch-size and each batch's PNGs are written as soon as it
finishes, so a run of any length starts writing at once, holds one batch in memory and, when
interrupted (Ctrl-C), keeps every image already written (exit status 130). Values are checked
at every sampler step: a model that produces NaN or infinity stops the run with an error
instead of writing black images.

Reproducibility (what is bit-identical): image i of a run uses seed --seed + i, whatever batch it
lands in. Its pixels are bit-identical whenever it is computed with the same prompt, model and
options in a batch of the same size, on the same device with the same --threads and torch build;
its position in the batch does not matter. Batches hold --batch-size images and the last one the
remainder, so rerunning a command reproduces every file byte for byte, and `--seed S --num N`
reproduces the images of a longer run from seed S when its batches have the same sizes. Computed
in a batch of another size, the same seed gives the same picture up to floating-point rounding
(about 1e-6), which can move a pixel value by 1/255. (Tested on the CPU; on GPUs torch does not
promise bit-identical kernels.)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

from edify.errors import EdifyError
from edify.pipelines.finetune_cli import add_finetune_arguments, apply_finetunes, finetune_scales

MODEL_ENV = "EDIFY_MODEL"

EPILOG = """\
reproducibility:
  Image i uses seed --seed + i, whatever batch it lands in. It is bit-identical
  whenever it is computed with the same prompt, model and options in a batch of
  the same size, on the same device with the same --threads and torch build;
  its position in the batch does not matter. Batches hold --batch-size images
  and the last one the remainder, so rerunning a command reproduces every file
  byte for byte. In a batch of another size the same seed gives the same
  picture up to floating-point rounding, which can move a pixel value by 1/255.
  (Tested on the CPU; on GPUs torch does not promise bit-identical kernels.)"""


def resolve_model(model: str | None) -> Path:
    """The model folder: --model, else $EDIFY_MODEL (which must exist), else the shipped demo model."""
    if model:
        return Path(model)
    env = os.environ.get(MODEL_ENV, "").strip()
    if env:
        path = Path(env).expanduser()
        if not path.is_dir():
            what = "is not a folder" if path.exists() else "does not exist"
            raise EdifyError(f"{MODEL_ENV}={env} {what}: point it at a model folder, or unset it to use "
                             f"the shipped demo model")
        return path
    from edify.assets import demo_model_path

    return demo_model_path()


def default_model() -> Path:
    """The model used without --model: $EDIFY_MODEL, else the shipped demo model."""
    return resolve_model(None)


def __getattr__(name: str):
    if name == "DEFAULT_MODEL":  # the shipped demo model's folder, found on first use
        from edify.assets import demo_model_path

        return demo_model_path()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def model_styles(folder: Path) -> list[str]:
    """The style labels a model folder's config.json declares (plain JSON: no torch)."""
    return [str(s) for s in json.loads((Path(folder) / "config.json").read_text()).get("styles", [])]


def _style_help() -> str:
    try:
        folder = default_model()
        styles = model_styles(folder)
    except (EdifyError, OSError, ValueError, AttributeError):
        return "media type / style label; the model folder's config.json lists its styles"
    known = ", ".join(styles) if styles else "none (the model takes no style)"
    return f"media type / style label; the default model ({folder}) knows: {known}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from edify.runtime import add_runtime_arguments

    parser.add_argument("prompt", help="what to draw, e.g. 'red apple'")
    add_image_arguments(parser)
    parser.add_argument("--steps-per-stage", default=None, metavar="N0,N1,...",
                        help="sampler steps per stage, finest first (instead of --steps and the model's split)")
    parser.add_argument("--final-stage", type=int, default=0, metavar="J",
                        help="stop at stage J: a finished image at 1/2^J of the size, in a fraction of the "
                             "time (models trained with nested expert ranges; default 0, full size)")
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--image", default=None, metavar="PATH",
                        help="image to image: start from this image (its size unless --height/--width) put through "
                             "the forward process to --start-sigma")
    parser.add_argument("--start-sigma", type=float, default=None, metavar="S",
                        help="with --image: the noise level sampling starts from (full-resolution units; the lower, "
                             "the more of the image is kept; the demo model's 32 px stage spans 1 to 5)")
    parser.add_argument("--upscale", nargs="?", const="default", default=None, metavar="FOLDER",
                        help="then upscale with a cascade upsampler (default: weights/emoji-up-256), e.g. 64 -> 256 px")
    from edify.pipelines.upscale_cli import add_upscale_arguments

    add_upscale_arguments(parser)
    add_runtime_arguments(parser)


def add_image_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every image-making command shares: output, model, prompt conditions, sampling."""
    parser.add_argument("-o", "--output", default="out.png",
                        help="output PNG; with --num N > 1, files NAME-0.png ... NAME-(N-1).png")
    parser.add_argument("--model", default=None,
                        help=f"model folder (default: ${MODEL_ENV}, else the shipped demo model)")
    parser.add_argument("--style", default=None, help=_style_help())
    parser.add_argument("--negative", default=None, help="negative prompt")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first image (image i uses seed+i)")
    parser.add_argument("--steps", type=int, default=None, help="sampler steps over all stages")
    parser.add_argument("--guidance", type=guidance_value, default=None, metavar="G",
                        help="classifier-free guidance scale, or one per stage finest first (e.g. 1,7,7: "
                             "none at the finest stage, which then costs half)")
    parser.add_argument("--style-guidance", type=float, default=None, metavar="W",
                        help="extra guidance along the style's own direction, with --style (one more "
                             "network branch per step; default: the model's)")
    parser.add_argument("--sampler", default=None,
                        help="dpmpp_2m, dpmpp_3m, euler, heun (EDM's), exp_trapezoid, or the stochastic "
                             "dpmpp_2m_sde and euler_sde (default: the model's; the demo model's is "
                             "dpmpp_2m_sde with --eta 1,0,0)")
    parser.add_argument("--eta", type=eta_value, default=None, metavar="E",
                        help="fresh noise per step of a stochastic sampler (0 = deterministic, 1 = the "
                             "reverse SDE), or one per stage finest first (e.g. 1,0,0); default: the model's")
    parser.add_argument("--threshold", type=float, default=None, metavar="P",
                        help="thresholding of the guided estimate: 0 off, a quantile in (0, 1) for dynamic "
                             "thresholding (e.g. 0.995), 1 for static clamping (default: the model's)")
    parser.add_argument("--shrink", type=float, default=None, metavar="LEVELS",
                        help="shrink the finished image's finest band at this many 8-bit levels, its 2x2 "
                             "block means kept: clears faint speckle (0 = as sampled; default: the model's)")
    parser.add_argument("--shrink-rule", default=None, metavar="RULE",
                        help="how --shrink treats the band: garrote, soft or hard (default: the model's)")
    parser.add_argument("--sigma-min", type=float, default=None, metavar="S",
                        help="the noise level where the schedule ends (default: the model's, or a "
                             "ControlNet's measured one)")
    parser.add_argument("--guide-weight", type=guide_weight_value, default=None, metavar="A",
                        help="autoguidance by the model's own guides (its config's stage_guides: the main "
                             "network against a stage expert, a weaker network against the main one): "
                             "weight A, or one per stage finest first; 0 = off (default: the model's; off "
                             "under a ControlNet)")
    add_experts_options(parser)
    parser.add_argument("--num", type=int, default=1, help="number of images")
    parser.add_argument("--batch-size", type=int, default=None, metavar="B",
                        help="images generated together; each batch is written as it finishes "
                             "(default: 16 on a CPU, 64 on a GPU)")
    add_finetune_arguments(parser)


def add_experts_options(parser: argparse.ArgumentParser,
                        no_experts_help: str = "run the model's main network at every stage instead of its stage "
                                               "experts (`edify expert MODEL` lists them; for a controlled call, "
                                               "the network its ControlNet was trained on)",
                        experts_help: str = "run the model's stage experts under a ControlNet whose measured "
                                            "defaults say the main network (the inpainting ControlNet's do)") -> None:
    """--no-experts and --experts, one or neither (`sampling_kwargs` turns them into `experts`)."""
    experts = parser.add_mutually_exclusive_group()
    experts.add_argument("--no-experts", action="store_true", help=no_experts_help)
    experts.add_argument("--experts", action="store_true", help=experts_help)


def output_paths(output: str, n: int) -> list[Path]:
    out = Path(output)
    if out.suffix.lower() != ".png":
        raise EdifyError(f"output must be a .png file, got {output!r}")
    if n == 1:
        return [out]
    return [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(n)]


def load_pipeline(model: Path, device):
    """The pipeline of a model folder, on `device`."""
    from edify.pipelines.text2image import TextToImagePipeline

    return TextToImagePipeline.from_pretrained(model).to(device)


def finite_guard(seeds: list[int], progress=None, steps: int | None = None):
    """A sampler callback: shows the step (of `steps`) on `progress` and stops on NaN or infinity."""
    from edify.runtime import all_finite

    def on_step(info: dict) -> None:
        if progress is not None:
            progress.note(f"step {info['i'] + 1}" + (f"/{steps}" if steps else ""))
        if not all_finite(info["x"]):
            raise EdifyError(f"sampling produced non-finite values (NaN or infinity) at step {info['i'] + 1} "
                             f"for seeds {seeds[0]}..{seeds[-1]}: the model's weights are corrupt or unusable; "
                             f"no image of this batch was written")
    return on_step


def sampling_kwargs(args: argparse.Namespace) -> dict:
    """`style_guidance`, `sigma_min`, `eta`, `threshold`, `shrink`, `shrink_rule` and `guide_weight` for the pipeline
    call, those of them the command was given, and `experts={}` with --no-experts, `experts=True`
    with --experts."""
    given = {k: getattr(args, k, None) for k in ("style_guidance", "sigma_min", "eta", "threshold", "shrink",
                                                  "shrink_rule", "guide_weight")}
    given["experts"] = {} if getattr(args, "no_experts", False) else True if getattr(args, "experts", False) else None
    return {k: v for k, v in given.items() if v is not None}


def start_kwargs(args: argparse.Namespace) -> dict:
    """`image` and `start_sigma` for image to image (the image read by `read_start_image`), else none."""
    image = getattr(args, "start_image", None)
    return {} if image is None else {"image": image, "start_sigma": args.start_sigma}


def read_start_image(args: argparse.Namespace) -> None:
    """`edify generate --image`: read into args.start_image (--height/--width default to its
    size), after its options are checked."""
    from edify.pipelines.control_cli import read_image

    args.start_image = None
    if args.image is None:
        if args.start_sigma is not None:
            raise EdifyError("--start-sigma needs --image, the image to start from")
        return
    if args.start_sigma is None:
        raise EdifyError("--image needs --start-sigma, the noise level sampling starts from")
    if args.upscale is not None:
        raise EdifyError("--image and --upscale do not go together; upscale the result with `edify upscale`")
    image = read_image(args.image, "--image")
    args.height = image.height if args.height is None else args.height
    args.width = image.width if args.width is None else args.width
    if (image.height, image.width) != (args.height, args.width):
        raise EdifyError(f"--image {args.image} is {image.height}x{image.width} but --height/--width ask for "
                         f"{args.height}x{args.width}")
    args.start_image = image


def generate_batch(pipe, args: argparse.Namespace, seeds: list[int], progress=None):
    """(PIL images, network evaluations per image) for one batch of seeds; EdifyError instead of
    images when any value is NaN or infinite (they would be written as black pixels)."""
    from edify.pipelines.text2image import to_pil
    from edify.runtime import all_finite

    guard = finite_guard(seeds, progress, args.steps or pipe.config.defaults.num_steps)
    out = pipe(args.prompt, negative_prompt=args.negative, style=args.style, num_steps=args.steps,
               guidance_scale=args.guidance, seed=seeds, height=args.height, width=args.width,
               sampler=args.sampler, num_images_per_prompt=len(seeds), output_type="tensor", callback=guard,
               final_stage=args.final_stage, steps_per_stage=parse_stage_steps(args.steps_per_stage),
               **sampling_kwargs(args), **start_kwargs(args))
    if not all_finite(out.images):
        raise EdifyError(f"the images of seeds {seeds[0]}..{seeds[-1]} hold non-finite values (NaN or infinity): "
                         f"the model is unusable; no image of this batch was written")
    return to_pil(out.images), out.nfe


def save_png(image, path: Path) -> None:
    """Write a PNG under a temporary name and rename it: a file at `path` is always complete."""
    part = path.with_name(f".{path.name}.part")
    try:
        image.save(part, format="PNG")
        os.replace(part, path)
    finally:
        part.unlink(missing_ok=True)


def per_stage_value(what: str, example: str):
    """An argparse type for a number >= 0 or one per stage: '7' -> 7.0, '1,7,7' -> (1.0, 7.0, 7.0)."""
    def parse(text: str) -> float | tuple[float, ...]:
        try:
            values = tuple(float(v) for v in text.split(","))
        except ValueError:
            raise argparse.ArgumentTypeError(f"a number or numbers separated by commas (one per stage, finest "
                                             f"first), e.g. {example}; got {text!r}") from None
        if any(not math.isfinite(v) or v < 0 for v in values):
            raise argparse.ArgumentTypeError(f"{what} must be finite and >= 0, got {text!r}")
        return values[0] if len(values) == 1 else values
    parse.__name__ = what  # argparse names the type in its message
    return parse


guidance_value = per_stage_value("guidance", "7 or 1,7,7")
guide_weight_value = per_stage_value("guide weight", "1 or 1,0.5,0.5")
eta_value = per_stage_value("eta", "1 or 1,0,0")


def parse_stage_steps(text: str | None) -> tuple[int, ...] | None:
    """'14,6,4' -> (14, 6, 4); None stays None."""
    if text is None:
        return None
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise EdifyError(f"--steps-per-stage must be integers separated by commas, e.g. 14,6,4; got {text!r}") from None


def check_args(args: argparse.Namespace) -> None:
    from edify.core.thresholding import check_shrink, check_shrink_rule, check_threshold

    parse_stage_steps(args.steps_per_stage)
    for name, check in (("threshold", check_threshold), ("shrink", check_shrink), ("shrink_rule", check_shrink_rule)):
        if getattr(args, name, None) is not None:
            check(getattr(args, name))
    finetune_scales(args)
    if args.num < 1:
        raise EdifyError(f"--num must be >= 1, got {args.num}")
    if args.batch_size is not None and args.batch_size < 1:
        raise EdifyError(f"--batch-size must be >= 1, got {args.batch_size}")


def run(args: argparse.Namespace) -> int:
    from edify import runtime

    check_args(args)
    paths = output_paths(args.output, args.num)
    if not paths[0].parent.exists():
        raise EdifyError(f"output folder {str(paths[0].parent)!r} does not exist")
    model = resolve_model(args.model)
    device = runtime.resolve_device(args.device)
    read_start_image(args)
    with runtime.threads(args.threads):
        pipe = load_pipeline(model, device)
        apply_finetunes(pipe, args)
        if args.upscale is not None:
            from edify.pipelines.upscale_cli import cascade_pipeline

            pipe = cascade_pipeline(pipe, args, device)
        batch_size = args.batch_size or runtime.default_batch_size(device)
        progress = runtime.Progress(len(paths), "generating", runtime.progress_enabled(args.quiet))
        try:
            generate_all(pipe, args, paths, batch_size, progress)
        finally:
            progress.close()
    return 0


def generate_all(pipe, args: argparse.Namespace, paths: list[Path], batch_size: int, progress) -> None:
    """Every image, batch by batch, each written as its batch finishes; Ctrl-C keeps those written."""
    start, written, nfe = time.perf_counter(), 0, 0
    try:
        for first in range(0, len(paths), batch_size):
            batch = paths[first:first + batch_size]
            seeds = [args.seed + first + k for k in range(len(batch))]
            images, nfe = generate_batch(pipe, args, seeds, progress)
            for image, path, seed in zip(images, batch, seeds):
                save_png(image, path)
                written += 1
                progress.write(f"{path}  (seed {seed})")
            progress.update(len(batch))
    except KeyboardInterrupt:
        progress.close()
        raise KeyboardInterrupt(f"{written} of {len(paths)} images written") from None
    progress.close()
    print(f"{len(paths)} image(s), {nfe} network evaluations each, {time.perf_counter() - start:.1f} s")
