"""`edify train`: train a model from a named preset, with `--set key=value` overrides.

    edify train --preset tiny-cpu --out runs/tiny
    edify train --preset emoji-64 --data shards/ --set batch_size=128 --set cond_drop.text=0.2
    edify train --preset emoji-64 --out runs/emoji --resume --export weights/emoji-64

Multi-GPU: `torchrun --nproc_per_node N -m edify.cli train ... --set dist=ddp` (or fsdp).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from edify.errors import EdifyError
from edify.training.config import PRESETS, apply_overrides, get_preset, load_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
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
    parser.add_argument("--export", default=None, metavar="DIR",
                        help="afterwards, write the EMA weights as a model folder for `edify generate`")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")


def run(args: argparse.Namespace) -> int:
    config = load_config(args.config) if args.config else get_preset(args.preset)
    if args.data is not None:
        config = config.replace(data=args.data)
    config = apply_overrides(config, args.overrides)
    if args.print_config:
        print(config.to_json())
        return 0
    if args.max_steps is not None and args.max_steps < 1:
        raise EdifyError(f"--max-steps must be >= 1, got {args.max_steps}")
    out = Path(args.out) if args.out else Path("runs") / config.name
    from edify.training import checkpoint, distributed
    from edify.training.loop import Trainer

    if not args.resume and checkpoint.latest_checkpoint(out) is not None:
        raise EdifyError(f"{out} already holds checkpoints; pass --resume to continue or choose another --out")
    trainer = Trainer(config, out, resume=args.resume)
    result = trainer.run(max_steps=args.max_steps)
    distributed.print0(f"trained to {result.images} images ({result.step} steps, "
                       f"{result.nonfinite_total} skipped); checkpoint: {result.checkpoint}")
    if args.export and distributed.is_main():
        from edify.training.export import export_pipeline

        distributed.print0(f"model folder: {export_pipeline(out, args.export)}")
    distributed.shutdown()
    return 0
