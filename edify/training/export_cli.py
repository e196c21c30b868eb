"""`edify export RUN_OR_CHECKPOINT OUT`: a training run's latest checkpoint, or one checkpoint, as a
model folder for `edify generate` (its EMA weights; edify.training.export.export_pipeline), without
training a step:

    edify export runs/emoji-64-cpu out/emoji-64 --dtype bf16
    edify export runs/e0/ckpt-000000487904 out/e0-488k --dtype bf16 --model-card

`edify train ... --export DIR` does the same at the end of a training session; this command exports
any checkpoint the run kept. With --model-card, README.md is filled from the run's own logs up to
that checkpoint (a sample grid is drawn by `edify train --model-card` or docs/model_figures.py).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from edify.errors import EdifyError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", help="a training run folder (its latest checkpoint) or one checkpoint folder")
    parser.add_argument("out", help="the model folder to write")
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"), help="dtype of the weights (default fp32)")
    parser.add_argument("--shard-mib", type=float, default=16.0, help="largest weight file in MiB (default 16)")
    parser.add_argument("--no-ema", action="store_true", help="the raw weights instead of the EMA ones")
    parser.add_argument("--model-card", action="store_true", help="README.md filled from the run's logs")
    parser.add_argument("--manifest", default=None, help="dataset manifest.json for the model card "
                                                         "(default: <data>/manifest.json)")
    parser.add_argument("--overwrite", action="store_true", help="replace a folder that already holds a model")


def run(args: argparse.Namespace) -> int:
    if not args.shard_mib > 0:
        raise EdifyError(f"--shard-mib must be > 0, got {args.shard_mib}")
    source = Path(args.source)
    if not source.is_dir():
        raise EdifyError(f"no training run or checkpoint at {str(source)!r}")
    import torch

    from edify.training.export import export_pipeline

    folder = export_pipeline(source, args.out, use_ema=not args.no_ema,
                             dtype=torch.bfloat16 if args.dtype == "bf16" else torch.float32,
                             max_shard_bytes=int(args.shard_mib * 2**20), card=args.model_card,
                             manifest=args.manifest, overwrite=args.overwrite)
    print(f"model folder: {folder}")
    return 0
