"""`edify expert MODEL`: list, add, replace or remove the stage experts of a model folder.

    edify expert weights/emoji-64                                  # list its experts
    edify expert weights/emoji-64 --stages 0 --from runs/e0-model  # add or replace the 64 px expert
    edify expert weights/emoji-64 --stages 0 --remove              # the main network serves it again
    edify expert weights/emoji-64 --stages 0 --from runs/e0-model --out runs/with-expert  # a copy

An expert is a model trained on some stages only from the model's own network (`edify train ...
--set init_from=MODEL --set stages=0`); --from takes its exported model folder, its run folder (the
latest checkpoint) or one checkpoint. See edify.pipelines.experts. Every input is checked before
anything is written; a refusal is one line.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from edify.errors import EdifyError

DTYPES = ("bf16", "fp16", "fp32")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="the model folder")
    parser.add_argument("--stages", help="the stages the expert serves, comma-separated (0 = finest)")
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--from", dest="source", metavar="DIR",
                      help="what becomes the expert of --stages: a model folder, a training run (its "
                           "latest checkpoint) or one checkpoint folder (its EMA weights)")
    what.add_argument("--remove", action="store_true", help="remove the expert of --stages")
    parser.add_argument("--out", help="change a copy written here instead of MODEL (a new folder)")
    parser.add_argument("--dtype", choices=DTYPES,
                        help="dtype of the expert's weights (default: that of the model's own files)")
    parser.add_argument("--shard-mib", type=float, default=16.0, help="largest weight file, MiB (default 16)")


def parse_stages(text: str) -> list[int]:
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise EdifyError(f"--stages must be comma-separated stage numbers such as 0 or 1,2, got {text!r}") from None


def last_run(folder: Path) -> str:
    """" (run NAME, N images)" from a model folder's run record (training.json), or "" without one."""
    from edify.pipelines.model_io import read_json

    record = folder / "training.json"
    if not record.is_file():
        return ""
    try:
        last = read_json(record)["runs"][-1]
        return f" (run {last['run']}, {int(last['images']):,} images)"
    except (EdifyError, KeyError, IndexError, TypeError, ValueError):
        return " (its training.json is not a run record)"


def run(args: argparse.Namespace) -> int:
    if (args.source or args.remove) and args.stages is None:
        raise EdifyError("--stages is needed with --from or --remove")
    if args.stages is not None and not (args.source or args.remove):
        raise EdifyError("--stages needs --from DIR (add or replace) or --remove")
    if not args.shard_mib > 0:
        raise EdifyError(f"--shard-mib must be positive, got {args.shard_mib}")
    import torch

    from edify.pipelines.experts import set_expert
    from edify.pipelines.text2image import TextToImagePipeline, expert_folder, expert_groups

    if args.stages is None:
        pipe = TextToImagePipeline.from_pretrained(args.model)
        groups = expert_groups(pipe.experts)
        for stage in range(pipe.process.levels):
            side = pipe.config.resolution >> stage
            group = next((g for g in groups if stage in g), None)
            owner = "the main network" if group is None else expert_folder(group)
            folder = Path(args.model) if group is None else Path(args.model) / owner
            print(f"stage {stage} ({side} px): {owner}{last_run(folder)}")
        return 0
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}.get(args.dtype)
    change = set_expert(args.model, parse_stages(args.stages), args.source, remove=args.remove, out=args.out,
                        dtype=dtype, max_shard_bytes=int(args.shard_mib * 2**20))
    print(change)
    return 0
