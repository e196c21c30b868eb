"""`edify train-controlnet`: train a ControlNet on a frozen base model (Edify Image section 5).

    edify train-controlnet --base weights/emoji-64 --control canny --data data/emoji --out runs/canny
    edify train-controlnet --base weights/emoji-64 --control inpaint --data data/emoji --out runs/inpaint \
        --preset emoji-64 --max-minutes 8 --export weights/emoji-64-inpaint

The trainer is `edify.training.loop.Trainer` (resume, EMA, checkpoints, logs, progress, time
budgets, one-line errors), built from a training preset whose network, Laplacian process,
resolution, text encoder and styles are replaced by the base model folder's. Three things change:

- the network it optimises is a `ControlNet` copied from the base (`ControlNet.from_base`); the
  base is loaded from its folder, frozen (eval mode, no gradients) and left out of the checkpoints;
- the denoiser of the loss is `ControlledDenoiser(base, [Control(controlnet, control)])`, so the loss
  (Eq. 1, `LaplacianEDMLoss`) trains D(x_t; control) toward the target at every stage, each stage
  seeing the whole full-resolution control; the base's condition dropout (`cond_drop`) applies as in
  the base's training;
- each micro-batch passes through `ControlStream`: `make_control(kind, images, masks, generator)`
  of `edify.data.controls` turns its images into (control image, target images), with a generator
  seeded by (seed, micro-batch count, rank) and the count kept in the data position, so a resumed
  run draws the same controls. Batches that carry the objects' alpha masks (`Batch.mask`, from shards
  with `maskS.png` members) let the inpaint control draw its "replace" task.

Depth (required) and soft edges (optional, HED) read a local annotator model folder (`--annotator`,
`edify.data.controls.load_annotator`). The run folder holds `controlnet.json` (kind, base folder,
ControlNet config, format version); resuming with another one, or a run of another ControlNet
format version, is refused. `--export DIR` writes the EMA ControlNet as a folder `ControlNet.from_pretrained`
loads. Nothing here imports torch before `run`, so `--help` stays fast.
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
from pathlib import Path

from edify.errors import EdifyError

KINDS = ("canny", "softedge", "depth", "inpaint", "upsample")
RUN_FILE = "controlnet.json"
# TrainConfig fields the base model folder decides.
BASE_FIELDS = ("model", "levels", "switch_sigmas", "sigma_data", "resolution", "text_encoder", "styles",
               "expert_ranges", "max_sigma", "min_sigma")


def load_make_control():
    """`edify.data.controls.make_control`, or a one-line error while it is not there."""
    try:
        from edify.data.controls import make_control
    except ImportError as err:
        raise EdifyError(f"the control annotators are not available (edify.data.controls.make_control): "
                         f"{err}") from None
    return make_control


class ControlStream:
    """A batch stream whose images become (control, target) through `make_control`.

    `next()` returns the batch with its images replaced by the targets; the control of the latest
    batch is in `control`. The position is the inner stream's plus the count of batches drawn.
    """

    def __init__(self, inner, kind: str, make_control, seed: int, rank: int):
        self.inner, self.kind, self.make_control = inner, kind, make_control
        self.seed, self.rank, self.drawn = seed, rank, 0
        self.control = None
        self.data = getattr(inner, "data", None)

    def next(self):
        import torch

        from edify.training.loop import step_seed

        batch = self.inner.next()
        gen = torch.Generator().manual_seed(step_seed(self.seed, self.drawn, self.rank, 0xC0))
        control, target = self.make_control(self.kind, batch.image, getattr(batch, "mask", None), gen)
        b, _, h, w = batch.image.shape
        if control.dim() != 4 or control.shape[0] != b or tuple(control.shape[2:]) != (h, w):
            raise EdifyError(f"make_control({self.kind!r}) must return a [{b}, C, {h}, {w}] control, "
                             f"got {list(control.shape)}")
        if tuple(target.shape) != tuple(batch.image.shape):
            raise EdifyError(f"make_control({self.kind!r}) must return targets of shape {list(batch.image.shape)}, "
                             f"got {list(target.shape)}")
        self.drawn += 1
        self.control = control
        return dataclasses.replace(batch, image=target)

    def state_dict(self) -> dict:
        return {**self.inner.state_dict(), "control_batches": self.drawn}

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state)
        self.drawn = int(state.get("control_batches", 0))


class StreamControlled:
    """The loss's denoiser: the base plus the ControlNet fed the stream's current control."""

    def __init__(self, base, net, stream: ControlStream):
        self.base, self.net, self.stream = base, net, stream
        self.dtype = base.dtype

    def __call__(self, x, sigma, cond=None, stage=None):
        from edify.core.control import Control, ControlledDenoiser

        return ControlledDenoiser(self.base, [Control(self.net, self.stream.control)])(x, sigma, cond, stage)


def base_train_config(config, base):
    """`config` (a TrainConfig) with the network, process and data fields of a base PipelineConfig."""
    from edify.core.laplacian import LaplacianProcess

    default = LaplacianProcess(base.levels, base.switch_sigmas)
    if (base.ramp, base.ramp_width) != (default.ramp, default.ramp_width):
        raise EdifyError(f"the trainer uses the {default.ramp} ramp of width {default.ramp_width:g}; the base "
                         f"model's process has a {base.ramp} ramp of width {base.ramp_width:g}")
    return config.replace(model=dict(base.network), levels=base.levels, switch_sigmas=tuple(base.switch_sigmas),
                          sigma_data=base.sigma_data, resolution=base.resolution, text_encoder=base.text_encoder,
                          styles=tuple(base.styles), expert_ranges=base.expert_ranges, max_sigma=base.max_sigma,
                          min_sigma=base.min_sigma,
                          sample_images=0)


def with_masks(config, kind: str):
    """Inpainting draws its "replace" task from the objects' alpha masks: read them from the data."""
    return config.replace(data_masks=True) if kind == "inpaint" else config


def probe_channels(kind: str, make_control, resolution: int) -> int:
    """Channels of the control an injected `make_control` returns, from one random image."""
    import torch

    g = torch.Generator().manual_seed(0)
    probe = torch.rand(1, 3, resolution, resolution, generator=g) * 2 - 1
    return int(make_control(kind, probe, None, g)[0].shape[1])


def make_trainer(config, base, out_dir, kind: str, *, resume: bool = False, make_control=None,
                 hint_widths: tuple[int, ...] = (64, 64), stream=None, text_encoder=None, device=None,
                 command: str | None = None):
    """A `Trainer` that trains a ControlNet of `kind` on the frozen base model folder `base`."""
    import torch

    from edify.core.precond import EDMPrecond
    from edify.networks.controlnet import FORMAT_VERSION, ControlNet, ControlNetConfig
    from edify.pipelines.text2image import TextToImagePipeline
    from edify.training import distributed
    from edify.training.ema import EMA
    from edify.training.loop import Trainer, resume_or_record

    if kind not in KINDS:
        raise EdifyError(f"control must be one of {', '.join(KINDS)}, got {kind!r}")
    pipe = TextToImagePipeline.from_pretrained(base, text_encoder=text_encoder)
    config = with_masks(base_train_config(config, pipe.config), kind)
    if config.dist == "fsdp":
        raise EdifyError("ControlNet training runs with dist='none' or 'ddp', got 'fsdp'")
    if make_control is None:
        make_control = load_make_control()
        from edify.data.controls import control_channels

        channels = control_channels(kind)
    else:
        channels = probe_channels(kind, make_control, config.resolution)
    init_from = config.init_from  # a ControlNet folder here, loaded below (not a base model folder)
    t = Trainer(config.replace(init_from=""), out_dir, resume=False, stream=stream, text_encoder=text_encoder,
                device=device, command=command)
    t.config = config
    c = t.config
    t.base = pipe.network.to(t.device).eval().requires_grad_(False)  # frozen: no gradients, no dropout
    cn_config = ControlNetConfig.for_base(t.base.config, channels, tuple(hint_widths), kind)
    t.net = ControlNet.from_base(t.base, cn_config).to(t.device)
    t.model = distributed.wrap_model(t.net, c.dist, t.device)
    forward = torch.compile(t.model, dynamic=False) if c.compile else t.model
    base_forward = torch.compile(t.base, dynamic=False) if c.compile else t.base
    t.stream = ControlStream(t.stream, kind, make_control, c.seed, t.rank)
    t.denoiser = StreamControlled(EDMPrecond(base_forward, c.sigma_data, t.network_dtype), forward, t.stream)
    t.optimizer = torch.optim.AdamW(t.model.parameters(), lr=c.lr, betas=tuple(c.betas), weight_decay=c.weight_decay)
    ema_on = c.ema_std == 0 and c.ema_decay == 0
    t.ema = EMA(t.model, c.ema_halflife_images if ema_on else 0.0, c.ema_rampup, c.ema_decay, c.ema_std)
    record = {"kind": kind, "base": str(base), "controlnet": cn_config.to_dict(), "version": FORMAT_VERSION}

    def conflict():
        saved = read_run_file(t.out_dir)
        if saved["controlnet"] != record["controlnet"]:
            return f"{t.out_dir} trains another ControlNet ({saved['kind']} for base {saved['base']}); choose another --out"
        return None

    resume_or_record(t, resume, RUN_FILE, record, conflict)
    if init_from and t.state.images == 0:
        warm_start(t, init_from, cn_config)
    return t


def warm_start(t, folder: str, cn_config) -> None:
    """Start the ControlNet and its EMA from an exported ControlNet folder of the same config, e.g.
    one trained on an earlier version of the base (the optimizer, data position and counts start
    afresh); a checkpoint being resumed wins over it. A base that grew the ControlNet's base
    (`growth_refusal`) is accepted: the copy's added modules start as the new base's."""
    from edify.networks.controlnet import ControlNet
    from edify.networks.unet import growth_refusal
    from edify.training import distributed

    source = ControlNet.from_pretrained(folder)
    old, new = source.config.to_dict(), cn_config.to_dict()
    mirrored = ("network", "base_fingerprint")  # the base's part, compared next
    if {k: v for k, v in old.items() if k not in mirrored} != {k: v for k, v in new.items() if k not in mirrored}:
        raise EdifyError(f"init_from {folder!r} is a ControlNet of another config than this run's "
                         f"({source.config.kind}, hint widths {list(source.config.hint_widths)}) "
                         f"vs ({cn_config.kind}, hint widths {list(cn_config.hint_widths)})")
    refusal = growth_refusal(source.config.base, cn_config.base)
    if refusal:
        raise EdifyError(f"init_from {folder!r} is a ControlNet of another base network than this run's, {refusal}")
    state = t.net.state_dict()  # the copy of this run's base: where the base grew, the copy starts from it
    added = sorted(set(state) - set(source.state_dict()))
    state.update(source.state_dict())
    t.load_start_weights(state)
    grown = f", grown by {len(added)} tensors copied from the base" if added else ""
    distributed.print0(f"warm start: ControlNet and EMA from {folder}{grown}")


def read_run_file(run: Path) -> dict:
    """controlnet.json of a run folder, checked (a run of another ControlNet format version is refused)."""
    from edify.networks.controlnet import ControlNetConfig, check_version
    from edify.pipelines.model_io import inside, naming, read_json

    file = inside(Path(run), RUN_FILE, f"run folder {run}")
    if not file.is_file():
        raise EdifyError(f"{run} is not a ControlNet run (no {RUN_FILE})")
    data = read_json(file)
    with naming(file):
        if not isinstance(data, dict) or set(data) - {"version"} != {"kind", "base", "controlnet"}:
            raise EdifyError("must be a JSON object with the keys base, controlnet, kind and version")
        check_version(data.get("version", 1))
        ControlNetConfig.from_dict(data["controlnet"])
    return data


def export_controlnet(run: str | Path, out: str | Path, use_ema: bool = True, overwrite: bool = False,
                      dtype=None) -> Path:
    """Write the latest checkpoint of a ControlNet run folder as a ControlNet folder."""
    import torch

    from edify.networks.controlnet import ControlNet, ControlNetConfig
    from edify.training import checkpoint
    from edify.training.export import check_target

    out = Path(out)
    check_target(out, overwrite)
    _, weights = checkpoint.load_weights(run, use_ema=use_ema)
    net = ControlNet(ControlNetConfig.from_dict(read_run_file(Path(run))["controlnet"]))
    try:
        net.load_state_dict(weights)
    except RuntimeError as err:
        raise EdifyError(f"the checkpoint in {run} does not fit its ControlNet config: "
                         f"{str(err).splitlines()[0]}") from None
    net.save_pretrained(out, dtype=dtype or torch.float32)
    return out


# ---- the command ------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    from edify.runtime import add_runtime_arguments
    from edify.training.config import PRESETS

    parser.add_argument("--base", required=True, metavar="MODEL_FOLDER", help="the frozen base model folder")
    parser.add_argument("--control", required=True, choices=KINDS, help="the control signal to train for")
    parser.add_argument("--data", default=None,
                        help="'synthetic[:N]', a folder of .tar shards, a shard pattern or an image folder")
    parser.add_argument("--out", required=True, help="run folder")
    parser.add_argument("--preset", default="tiny-cpu", choices=sorted(PRESETS),
                        help="training preset for the optimisation (its network and process come from --base)")
    parser.add_argument("--annotator", default=None, metavar="FOLDER",
                        help="a local annotator model folder: required for depth, optional for softedge (HED)")
    parser.add_argument("--hint-widths", default="64,64", help="widths of the hint encoder's convs (default 64,64)")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a training config field, e.g. --set lr=1e-5")
    parser.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (and checkpoint)")
    parser.add_argument("--max-minutes", type=float, default=None,
                        help="stop after this many wall-clock minutes from the start (and checkpoint)")
    parser.add_argument("--export", default=None, metavar="DIR", help="afterwards, write the EMA ControlNet here")
    parser.add_argument("--overwrite", action="store_true", help="let --export replace an existing folder")
    parser.add_argument("--export-dtype", default="fp32", choices=("fp32", "bf16"),
                        help="dtype of the exported weights (default fp32)")
    add_runtime_arguments(parser, device_default=None, quiet=False, workers=True)


def command_line(args: argparse.Namespace) -> str:
    words = ["edify", "train-controlnet", "--base", args.base, "--control", args.control, "--out", args.out,
             "--preset", args.preset, "--hint-widths", args.hint_widths]
    for flag, value in (("--data", args.data), ("--max-steps", args.max_steps), ("--max-minutes", args.max_minutes),
                        ("--export", args.export)):
        if value is not None:
            words += [flag, str(value)]
    words += ["--export-dtype", args.export_dtype] if args.export and args.export_dtype != "fp32" else []
    words += ["--annotator", args.annotator] if args.annotator else []
    words += ["--resume"] if args.resume else []
    for item in args.overrides:
        words += ["--set", item]
    return shlex.join(words)


def run(args: argparse.Namespace, make_control=None, text_encoder=None) -> int:
    from edify.runtime import threads
    from edify.training import checkpoint, distributed
    from edify.training.cli import training_device
    from edify.training.config import apply_overrides, get_preset

    config = get_preset(args.preset)
    config = config.replace(data=args.data) if args.data is not None else config
    config = apply_overrides(config, args.overrides)
    try:
        widths = tuple(int(w) for w in args.hint_widths.split(","))
    except ValueError:
        raise EdifyError(f"--hint-widths must be integers separated by commas, got {args.hint_widths!r}") from None
    if args.max_steps is not None and args.max_steps < 1:
        raise EdifyError(f"--max-steps must be >= 1, got {args.max_steps}")
    if args.max_minutes is not None:
        if not args.max_minutes > 0:
            raise EdifyError(f"--max-minutes must be > 0, got {args.max_minutes}")
        config = config.replace(max_minutes=args.max_minutes)
    out = Path(args.out)
    if not args.resume and checkpoint.latest_checkpoint(out) is not None:
        raise EdifyError(f"{out} already holds checkpoints; pass --resume to continue or choose another --out")
    if args.export:
        from edify.training.export import check_target

        check_target(Path(args.export), args.overwrite)
    device = training_device(args.device)
    if args.annotator and make_control is None:
        from functools import partial

        from edify.data.controls import load_annotator
        from edify.data.controls import make_control as annotate

        make_control = partial(annotate, annotator=load_annotator(args.control, args.annotator, device))
    with threads(args.threads):
        trainer = make_trainer(config, args.base, out, args.control, resume=args.resume, make_control=make_control,
                               hint_widths=widths, text_encoder=text_encoder, device=device,
                               command=command_line(args))
        result = trainer.run(max_steps=args.max_steps)
    distributed.print0(f"trained the {args.control} ControlNet to {result.images} images ({result.step} steps, "
                       f"{result.nonfinite_total} skipped, stopped by {result.stop}); checkpoint: {result.checkpoint}")
    if args.export and distributed.is_main():
        import torch

        dtype = torch.bfloat16 if args.export_dtype == "bf16" else torch.float32
        folder = export_controlnet(out, args.export, overwrite=args.overwrite, dtype=dtype)
        distributed.print0(f"ControlNet folder: {folder}")
    distributed.shutdown()
    return 0
