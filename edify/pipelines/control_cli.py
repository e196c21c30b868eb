"""`edify control` and `edify inpaint`: generation steered by a ControlNet, and inpainting.

    edify control --type canny --image photo.png "red apple" -o apple.png
    edify control --type canny --image photo.png --annotate-only -o edges.png
    edify inpaint --image photo.png --mask mask.png --task inpaint "green apple" -o out.png
    edify inpaint --image photo.png --task outpaint --pad 16,0,16,0 "green apple" -o wide.png
    edify inpaint --image photo.png --mask mask.png --method repaint "green apple" -o out.png

Both commands write their PNGs as `edify generate` does (batches written as they finish, image i
with seed --seed + i, non-finite values stopped, Ctrl-C keeps what was written), and every input
is checked before the models are loaded: bad input is one line and nothing is written. One module
serves both commands; the parser's name tells which (`edify.cli` names it after the command).

Default ControlNets live in the checkout's weights/ folder (controlnet-<type>-64, inpaint-64);
`edify train-controlnet ... --export FOLDER` makes one.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from edify.errors import EdifyError
from edify.pipelines.finetune_cli import apply_finetunes

CONTROL_TYPES = ("canny", "softedge", "depth")
TASKS = ("replace", "inpaint", "outpaint")
METHODS = ("controlnet", "repaint", "controlnet+repaint")


def default_controlnet(kind: str) -> Path:
    """The shipped ControlNet folder for a control type (inpaint: the inpainting model)."""
    from edify import assets

    return assets.shipped_path("inpaint-64" if kind == "inpaint" else f"controlnet-{kind}-64")


def _is_inpaint(parser: argparse.ArgumentParser) -> bool:
    return parser.prog.split()[-1] == "inpaint"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from edify.pipelines.generate_cli import add_image_arguments
    from edify.runtime import add_runtime_arguments

    inpaint = _is_inpaint(parser)
    parser.set_defaults(command="inpaint" if inpaint else "control")
    parser.add_argument("prompt", nargs="?", default=None, help="what to draw, e.g. 'red apple'")
    parser.add_argument("--image", required=True, metavar="IN.png",
                        help="the image to inpaint" if inpaint else "the image whose edges or depth steer the drawing")
    if inpaint:
        parser.add_argument("--mask", default=None, metavar="MASK.png",
                            help="white = generate, black = keep (same size as the image)")
        parser.add_argument("--task", default="inpaint", metavar="TASK",
                            help="inpaint (fill the masked region, default), replace (a new object where the "
                                 "mask covers the old one) or outpaint (extend the image by --pad)")
        parser.add_argument("--pad", default=None, metavar="L,T,R,B",
                            help="outpaint: pixels added on the left, top, right and bottom (instead of --mask)")
        parser.add_argument("--method", default="controlnet+repaint", metavar="METHOD",
                            help="controlnet+repaint (default: the inpainting ControlNet, the known pixels put "
                                 "back at every step), controlnet (the ControlNet alone) or repaint (no "
                                 "ControlNet: the known pixels replace the model's estimate at every step); "
                                 "all at the same cost")
        parser.add_argument("--feather", type=float, default=2.0, metavar="PX",
                            help="blend width in px on the generated side of the seam (default 2; 0 = hard)")
    else:
        parser.add_argument("--type", required=True, metavar="TYPE", help=f"control type: {', '.join(CONTROL_TYPES)}")
        parser.add_argument("--annotate-only", action="store_true",
                            help="write the control map of --image (e.g. its Canny edges) to -o and exit")
        parser.add_argument("--annotator", default=None, metavar="FOLDER",
                            help="annotator model folder: an HED network for softedge (default: the classical "
                                 "operator), a depth-estimation model for depth (required unless --map)")
        parser.add_argument("--map", action="store_true",
                            help="--image already is the control map (edges white on black, depth white = near)")
    which = "inpaint-64" if inpaint else "controlnet-TYPE-64"
    parser.add_argument("--controlnet", default=None, metavar="FOLDER",
                        help=f"ControlNet folder (default: weights/{which} in the checkout)")
    parser.add_argument("--control-weight", type=float, default=1.0, metavar="W",
                        help="strength of the control (default 1; 0 = none)")
    parser.add_argument("--control-start", type=float, default=float("inf"), metavar="S",
                        help="full-resolution sigma from which the control acts (default inf: from the start)")
    parser.add_argument("--control-end", type=float, default=0.0, metavar="E",
                        help="full-resolution sigma below which it stops (default 0: to the end)")
    parser.add_argument("--resize", action="store_true",
                        help="resize a mask of another size to the image" if inpaint else
                        "resize an image of another size to the size being generated")
    add_image_arguments(parser)
    if not inpaint:
        parser.add_argument("--height", type=int, default=None, help="default: the model's resolution")
        parser.add_argument("--width", type=int, default=None, help="default: the model's resolution")
    parser.set_defaults(steps_per_stage=None, final_stage=0, **({"height": None, "width": None} if inpaint else {}))
    add_runtime_arguments(parser)


# ---- inputs --------------------------------------------------------------------------------------

def read_image(path: str, what: str):
    """A PIL image from a file, fully read; a file that is not an image is one line."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.load()
            return image.copy()
    except UnidentifiedImageError:
        raise EdifyError(f"{what} {path!r} is not an image file (PNG, JPEG, ...)") from None
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        if isinstance(err, FileNotFoundError):
            raise EdifyError(f"{what} {path!r} does not exist") from None
        raise EdifyError(f"{what} {path!r} is not a readable image: {err}") from None


def parse_pad(text: str | None) -> tuple[int, int, int, int] | None:
    if text is None:
        return None
    try:
        pad = tuple(int(v) for v in text.split(","))
    except ValueError:
        pad = ()
    if len(pad) != 4 or min(pad) < 0 or sum(pad) == 0:
        raise EdifyError(f"--pad must be four integers >= 0, not all 0 (left,top,right,bottom), e.g. 16,0,16,0; "
                         f"got {text!r}")
    return pad


def check_args(args: argparse.Namespace) -> None:
    from edify.pipelines.generate_cli import check_args as check_generate_args

    check_generate_args(args)
    if args.command == "control" and args.type not in CONTROL_TYPES:
        raise EdifyError(f"unknown control type {args.type!r}; known: {', '.join(CONTROL_TYPES)}")
    if args.command == "inpaint":
        if args.task not in TASKS:
            raise EdifyError(f"unknown inpainting task {args.task!r}; known: {', '.join(TASKS)}")
        if args.method not in METHODS:
            raise EdifyError(f"unknown --method {args.method!r}; known: {', '.join(METHODS)}")
        pad = parse_pad(args.pad)
        if pad is not None and args.task != "outpaint":
            raise EdifyError(f"--pad is for --task outpaint, not {args.task}")
        if pad is not None and args.mask is not None:
            raise EdifyError("outpainting takes --pad or --mask, not both")
        if pad is None and args.mask is None:
            raise EdifyError("inpainting needs --mask MASK.png (white = generate)"
                             + (", or --pad L,T,R,B to outpaint" if args.task == "outpaint" else ""))
        if args.feather < 0:
            raise EdifyError(f"--feather must be >= 0, got {args.feather}")
        if args.method == "repaint" and args.controlnet is not None:
            raise EdifyError("--method repaint uses no ControlNet; drop --controlnet or use another --method")
    if not 0 <= args.control_end <= args.control_start:
        raise EdifyError(f"the control acts from --control-start down to --control-end (full-resolution sigmas, "
                         f"start >= end >= 0), got start {args.control_start} and end {args.control_end}")
    if args.prompt is None and not getattr(args, "annotate_only", False):
        raise EdifyError("a prompt is required" + ("" if args.command == "inpaint" else " (or --annotate-only)"))
    if args.prompt is not None and not args.prompt.strip():
        raise EdifyError("the prompt is empty")


def controlnet_folder(args: argparse.Namespace) -> Path:
    """--controlnet, else the checkout's default; a missing default says how to make one."""
    kind = "inpaint" if args.command == "inpaint" else args.type
    if args.controlnet is not None:
        return Path(args.controlnet)
    folder = default_controlnet(kind)
    if not (folder / "config.json").is_file():
        raise EdifyError(f"no {kind} ControlNet at {folder}: train one with `edify train-controlnet --base MODEL "
                         f"--control {kind} --data DATA --out runs/{kind} --export {folder}`, or pass "
                         f"--controlnet FOLDER" + (" (or use --method repaint, which needs none)"
                                                   if kind == "inpaint" else ""))
    return folder


def model_resolution(model: Path) -> int:
    from edify.pipelines.model_io import CONFIG_NAME, read_json
    from edify.pipelines.text2image import PipelineConfig

    path = Path(model) / CONFIG_NAME
    if not path.is_file():
        raise EdifyError(f"model folder {str(model)!r} has no {CONFIG_NAME}")
    return PipelineConfig.from_dict(read_json(path)).resolution


def fit_image(image, size: tuple[int, int], resize: bool, what: str, path: str, nearest: bool = False):
    """The PIL image at size (H, W): refused with both sizes, or resized (and said so) with --resize."""
    from PIL import Image

    have = (image.height, image.width)
    if have == tuple(size):
        return image
    if not resize:
        raise EdifyError(f"{what} {path} is {have[0]}x{have[1]} but {size[0]}x{size[1]} is needed; "
                         f"pass --resize to resize it")
    print(f"resized {what} {path} from {have[0]}x{have[1]} to {size[0]}x{size[1]}")
    return image.resize((size[1], size[0]), Image.NEAREST if nearest else Image.BICUBIC)


# ---- commands ------------------------------------------------------------------------------------

class BoundPipeline:
    """A pipeline with its image inputs bound, called the way `edify generate` calls a pipeline
    (`generate_cli.generate_batch`), so that its batching, checks and writing are reused."""

    def __init__(self, pipe, drop: tuple[str, ...] = (), **inputs):
        self.pipe, self.config, self.drop, self.inputs = pipe, pipe.config, drop, inputs

    def __call__(self, *args, **kwargs):
        for name in self.drop:
            kwargs.pop(name, None)
        return self.pipe(*args, **kwargs, **self.inputs)


def annotate(args: argparse.Namespace, image, annotator):
    """The control map [1, 1, H, W] in [-1, 1] of a PIL image (or the image read as a map with --map)."""
    from edify.data.controls import control_from_image, make_control
    from edify.pipelines.control import image_tensor, map_tensor

    size = (image.height, image.width)
    if args.map:
        return control_from_image(args.type, map_tensor(image, f"{args.type} map"), size)
    return make_control(args.type, image_tensor(image), annotator=annotator)[0]


def load_annotator(args: argparse.Namespace, device):
    from edify.data.controls import load_annotator as load

    if args.annotator is None:
        if args.type == "depth" and not args.map:
            raise EdifyError("the depth control needs --annotator FOLDER (a local depth-estimation model), "
                             "or --map when --image already is a depth map")
        return None
    if args.type == "canny" or args.map:
        raise EdifyError(f"--annotator is for softedge and depth maps made from an image; "
                         f"{'--map' if args.map else 'canny'} uses none")
    return load(args.type, args.annotator, device)


def run(args: argparse.Namespace) -> int:
    from edify import runtime
    from edify.pipelines.generate_cli import output_paths, resolve_model

    check_args(args)
    paths = output_paths(args.output, 1 if getattr(args, "annotate_only", False) else args.num)
    if not paths[0].parent.exists():
        raise EdifyError(f"output folder {str(paths[0].parent)!r} does not exist")
    image = read_image(args.image, "image")
    device = runtime.resolve_device(args.device)
    with runtime.threads(args.threads):
        if args.command == "inpaint":
            return run_inpaint(args, image, paths, device)
        annotator = load_annotator(args, device)
        if args.annotate_only:
            if args.resize:  # to the size a generation would use
                side = None if args.height and args.width else model_resolution(resolve_model(args.model))
                image = fit_image(image, (args.height or side, args.width or side), True, "image", args.image)
            return write_map(annotate(args, image, annotator), paths[0])
        from edify.networks.controlnet import load_controlnet_config
        from edify.pipelines.control import ControlNetPipeline

        # every check of the inputs before the weights are read
        folder, model = controlnet_folder(args), resolve_model(args.model)
        kind = load_controlnet_config(folder).kind
        if kind != args.type and kind != "custom":
            raise EdifyError(f"the ControlNet in {folder} was trained on {kind} controls, not {args.type}")
        side = None if args.height and args.width else model_resolution(model)
        size = (args.height or side, args.width or side)
        control = annotate(args, fit_image(image, size, args.resize, "image", args.image), annotator)
        pipe = ControlNetPipeline.from_pretrained(model, controlnets=[folder]).to(device)
        apply_finetunes(pipe, args)
        bound = BoundPipeline(pipe, control_image=control, control_weight=args.control_weight,
                              control_start=args.control_start, control_end=args.control_end)
        generate(bound, args, paths, device)
    return 0


def run_inpaint(args: argparse.Namespace, image, paths, device) -> int:
    from edify.data.controls import outpaint_canvas, prepare_inpaint
    from edify.pipelines.control import InpaintPipeline, image_tensor, map_tensor
    from edify.pipelines.generate_cli import resolve_model

    pad = parse_pad(args.pad)
    mask = None
    if args.mask is not None:
        mask = fit_image(read_image(args.mask, "mask"), (image.height, image.width), args.resize, "mask",
                         args.mask, nearest=True)
    # every check of the image and mask (empty, full) before any model is loaded
    canvas, canvas_mask = (outpaint_canvas(image_tensor(image), pad) if pad is not None
                           else (image_tensor(image), map_tensor(mask)))
    prepare_inpaint(canvas, canvas_mask, args.task)
    folder = controlnet_folder(args) if args.method != "repaint" else None
    pipe = InpaintPipeline.from_pretrained(resolve_model(args.model), controlnet=folder).to(device)
    apply_finetunes(pipe, args)
    bound = BoundPipeline(pipe, drop=("height", "width", "final_stage"), image=image, mask=mask, task=args.task,
                          pad=pad, method=args.method, feather_px=args.feather, control_weight=args.control_weight,
                          control_start=args.control_start, control_end=args.control_end)
    generate(bound, args, paths, device)
    return 0


def generate(bound: BoundPipeline, args: argparse.Namespace, paths, device) -> None:
    from edify import runtime
    from edify.pipelines.generate_cli import generate_all

    batch_size = args.batch_size or runtime.default_batch_size(device)
    progress = runtime.Progress(len(paths), "generating", runtime.progress_enabled(args.quiet))
    try:
        generate_all(bound, args, paths, batch_size, progress)
    finally:
        progress.close()


def write_map(control, path: Path) -> int:
    """A control map [1, 1, H, W] in [-1, 1] as an 8-bit grey PNG (white = edge / near)."""
    import numpy as np
    from PIL import Image

    from edify.pipelines.generate_cli import save_png

    arr = ((control[0, 0].float().clamp(-1, 1) + 1) * 127.5).round().byte().cpu().numpy()
    save_png(Image.fromarray(np.ascontiguousarray(arr), mode="L"), path)
    print(f"{path}  ({arr.shape[0]}x{arr.shape[1]} control map)")
    return 0

