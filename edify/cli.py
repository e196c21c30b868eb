"""The `edify` command: a thin dispatcher over the library.

Each command lives in a module exposing `add_arguments(parser)` and `run(args) -> int`; only the
chosen command's module is imported, so `edify --help` stays fast. Bad input surfaces as one line
on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from edify.errors import EdifyError

# command words -> (module, one-line help)
COMMANDS: dict[tuple[str, ...], tuple[str, str]] = {
    ("generate",): ("edify.pipelines.generate_cli", "generate images from a prompt"),
    ("train",): ("edify.training.cli", "train a model from a named preset"),
    ("data", "emoji"): ("edify.data.emoji", "build the emoji demo dataset as webdataset shards"),
    ("eval",): ("edify.eval.cli", "FID, KID, sliced Wasserstein and prompt retrieval of a model"),
}


def _usage() -> str:
    lines = ["usage: edify COMMAND [options]", "", "commands:"]
    for words, (_, text) in COMMANDS.items():
        lines.append(f"  {' '.join(words):<14} {text}")
    lines.append("")
    lines.append("Run `edify COMMAND --help` for a command's options.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    for words, (module_name, text) in sorted(COMMANDS.items(), key=lambda kv: -len(kv[0])):
        if tuple(argv[: len(words)]) == words:
            break
    else:
        print(f"edify: error: unknown command {' '.join(argv[:2])!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog="edify " + " ".join(words), description=text)
    module.add_arguments(parser)
    args = parser.parse_args(argv[len(words):])
    try:
        return int(module.run(args) or 0)
    except (EdifyError, FileNotFoundError, NotADirectoryError, PermissionError) as err:
        print(f"edify: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("edify: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
