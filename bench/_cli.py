"""What the bench scripts' `main` share: the thread count, and bad input as one line and exit 2."""

from __future__ import annotations

import sys

from edify.errors import EdifyError


def run_bench(name: str, args, run) -> int:
    """`run(args)` with `args.threads` torch threads (if given); an EdifyError becomes
    `<name>: error: ...` on stderr and exit code 2."""
    import torch

    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    try:
        return run(args)
    except EdifyError as err:
        print(f"{name}: error: {err}", file=sys.stderr)
        return 2
