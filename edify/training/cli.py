"""`edify train`: train a model from a named preset, with `--set key=value` overrides.

    edify train --preset tiny-cpu --out runs/tiny
    edify train --preset emoji-64 --data shards/ --set batch_size=128 --set cond_drop.text=0.2
    edify train --preset emoji-64 --out runs/emoji --resume --export weights/emoji-64
    edify train --preset emoji-64 --out runs/emoji --max-minutes 8 --export weights/emoji-64 \
        --export-dtype bf16 --model-card      # stop on time, checkpoint, ship bf16 shards + README.md

Multi-GPU: `torchrun --nproc_per_node N -m edify.cli train ... --set dist=ddp` (or fsdp).

Nothing here imports torch before `run`, so `edify train --help` is fast (the training config
module is torch-free).
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
from pathlib import Path

from edify.errors import EdifyError



def add_arguments(parser: argparse.ArgumentParser) -> None:
    from edify.runtime import add_runtime_arguments

    from edify.training.config import PRESETS

    parser.add_argument("--preset", default="tiny-cpu", choices=sorted(PRESETS),
                        help="named training configuration (default: tiny-cpu)")
    parser.add_argument("--config", default=None, metavar="JSON",
                        help="a config file (e.g. a checkpoint's config.json) instead of --preset")
    parser.add_argument("--data", default=None,
                        help="'synthetic[:N]', a folder of .tar shards, a shard pattern or an image folder")
    parser.add_argument("--out", default=None, help="run folder (default: runs/<preset>)")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. --set lr=1e-4 --set cond_drop.text=0.2")
    parser.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (and checkpoint)")
    parser.add_argument("--max-minutes", type=float, default=None,
                        help="stop after this many wall-clock minutes from the start (and checkpoint)")
    parser.add_argument("--export", default=None, metavar="DIR",
                        help="afterwards, write the EMA weights as a model folder for `edify generate`")
    parser.add_argument("--overwrite", action="store_true",
                        help="let --export replace a folder that already holds another model")
    parser.add_argument("--export-dtype", default="fp32", choices=("fp32", "bf16"),
                        help="dtype of the exported weights (default fp32)")
    parser.add_argument("--export-shard-mib", type=float, default=16.0,
                        help="largest exported weight file in MiB (default 16)")
    parser.add_argument("--model-card", action="store_true",
                        help="with --export: a sample grid (samples.png) and README.md filled from the run's logs")
    parser.add_argument("--manifest", default=None,
                        help="dataset manifest.json for the model card (default: <data>/manifest.json)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")
    add_runtime_arguments(parser, device_default=None, quiet=False, workers=True)


def command_line(args: argparse.Namespace) -> str:
    """The `edify train` command equivalent to the parsed arguments (recorded for the model card)."""
    words = ["edify", "train"] + (["--config", args.config] if args.config else ["--preset", args.preset])
    for flag, value in (("--data", args.data), ("--out", args.out), ("--max-steps", args.max_steps),
                        ("--max-minutes", args.max_minutes), ("--export", args.export)):
        if value is not None:
            words += [flag, str(value)]
    words += ["--resume"] if args.resume else []
    for item in args.overrides:
        words += ["--set", item]
    if args.export:
        words += ["--export-dtype", args.export_dtype, "--export-shard-mib", f"{args.export_shard_mib:g}"]
        words += ["--overwrite"] if args.overwrite else []
        words += ["--model-card"] if args.model_card else []
        words += ["--manifest", args.manifest] if args.manifest else []
    return shlex.join(words)


def training_device(name: str | None):
    """--device for the trainer: None lets it choose (cuda:LOCAL_RANK under torchrun, else cuda:0 or cpu)."""
    if name is None:
        return None
    from edify.runtime import resolve_device

    device = resolve_device(name)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise EdifyError(f"--device {name} cannot be combined with torchrun: each process uses cuda:LOCAL_RANK "
                         f"(or cpu); leave --device out")
    if device.type == "cuda":
        import torch

        torch.cuda.set_device(device)
    return device


def run(args: argparse.Namespace) -> int:
    from edify.runtime import threads
    from edify.training.config import apply_overrides, get_preset, load_config

    config = load_config(args.config) if args.config else get_preset(args.preset)
    if args.data is not None:
        config = config.replace(data=args.data)
    config = apply_overrides(config, args.overrides)
    if args.print_config:
        print(config.to_json())
        return 0
    if args.max_steps is not None and args.max_steps < 1:
        raise EdifyError(f"--max-steps must be >= 1, got {args.max_steps}")
    if args.max_minutes is not None:
        if not args.max_minutes > 0:
            raise EdifyError(f"--max-minutes must be > 0, got {args.max_minutes}")
        config = config.replace(max_minutes=args.max_minutes)
    if not args.export_shard_mib > 0:
        raise EdifyError(f"--export-shard-mib must be > 0, got {args.export_shard_mib}")
    out = Path(args.out) if args.out else Path("runs") / config.name
    device = training_device(args.device)
    with threads(args.threads):
        return train(args, config, out, device)


def train(args: argparse.Namespace, config, out: Path, device) -> int:
    """Train (and export) with the checked arguments; 0 when done."""
    import torch

    from edify.training import checkpoint, distributed
    from edify.training.loop import Trainer

    if not args.resume and checkpoint.latest_checkpoint(out) is not None:
        raise EdifyError(f"{out} already holds checkpoints; pass --resume to continue or choose another --out")
    if args.export:
        from edify.training.export import check_target

        check_target(Path(args.export), args.overwrite)  # before training, not after it
    trainer = Trainer(config, out, resume=args.resume, command=command_line(args), device=device)
    result = trainer.run(max_steps=args.max_steps)
    distributed.print0(f"trained to {result.images} images ({result.step} steps, "
                       f"{result.nonfinite_total} skipped, stopped by {result.stop}); checkpoint: {result.checkpoint}")
    grid = trainer.sample_grid() if args.export and args.model_card else None  # collective under FSDP
    if args.export and distributed.is_main():
        from edify.training.export import export_pipeline, inherited_defaults, pipeline_config

        dtype = torch.bfloat16 if args.export_dtype == "bf16" else torch.float32
        folder = export_pipeline(out, args.export, dtype=dtype, max_shard_bytes=int(args.export_shard_mib * 2**20),
                                 card=args.model_card, manifest=args.manifest, overwrite=args.overwrite)
        if grid is not None:
            shutil.copyfile(grid, folder / "samples.png")
        distributed.print0(f"model folder: {folder}")
        if inherited_defaults(trainer.config, pipeline_config(trainer.config, trainer.net), out):
            distributed.print0(f"sampling defaults: those of {trainer.config.init_from} (the model it continues)")
    distributed.shutdown()
    return 0
