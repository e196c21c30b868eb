"""What the bench scripts' `main` share: the thread count, bad input as one line and exit 2, and
comma-list options checked against the names they may hold."""

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


def comma_list(value: str, known, flag: str) -> list[str]:
    """`value` ("a,b") as a list of names, each one of `known`; else a one-line EdifyError."""
    names = [name for name in value.split(",") if name]
    unknown = [name for name in names if name not in known]
    if unknown or not names:
        raise EdifyError(f"{flag} takes a comma list of {', '.join(known)}; got {unknown or 'none'}")
    return names
