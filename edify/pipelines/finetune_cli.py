"""`--finetune DELTA [--finetune-scale S]` of the image commands (generate, control, inpaint).

Each `--finetune` loads one delta folder (`edify finetune --out DELTA`) onto the model after it is
read; two or more load together when they change no common parameter. `--finetune-scale` is one
scale for all of them, or one per `--finetune` in order (default 1; 0 = the base bit for bit).
Nothing here imports torch, so `--help` stays fast.
"""

from __future__ import annotations

import argparse
import math

from edify.errors import EdifyError


def add_finetune_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--finetune", action="append", default=[], metavar="DELTA",
                        help="a finetune delta folder (from `edify finetune`) to load onto the model; repeat for "
                             "several that change different parameters")
    parser.add_argument("--finetune-scale", action="append", type=float, default=[], metavar="S",
                        help="strength of the finetune(s): one for all, or one per --finetune (default 1; 0 = "
                             "the base model)")


def finetune_scales(args: argparse.Namespace) -> list[float]:
    """One finite scale per --finetune; a count or value that does not fit is one line."""
    deltas, scales = getattr(args, "finetune", []), getattr(args, "finetune_scale", [])
    if scales and not deltas:
        raise EdifyError("--finetune-scale needs a --finetune")
    if len(scales) not in (0, 1, len(deltas)):
        raise EdifyError(f"--finetune-scale needs one value for all or one per --finetune ({len(deltas)}), "
                         f"got {len(scales)}")
    for s in scales:
        if not math.isfinite(s):
            raise EdifyError(f"--finetune-scale must be a finite number, got {s}")
    return list(scales) if len(scales) == len(deltas) else [scales[0] if scales else 1.0] * len(deltas)


def apply_finetunes(pipe, args: argparse.Namespace):
    """Load every --finetune onto `pipe` at its scale; returns `pipe`. Says so when the model's
    stage experts stand aside (a finetune without parts for them changed the main network only)."""
    for delta, scale in zip(getattr(args, "finetune", []), finetune_scales(args)):
        pipe.load_finetune(delta, scale)
    if getattr(pipe, "experts", None) and not pipe.experts_kept():
        stages = ", ".join(str(pipe.config.resolution >> s) + " px" for s in sorted(pipe.experts))
        print(f"note: a finetune has no part for the model's expert(s) ({stages}); the main network serves "
              f"every stage (make the finetune for this model to keep them)")
    return pipe
