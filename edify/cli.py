"""The `edify` command: a thin dispatcher over the library.

Each command lives in a module exposing `add_arguments(parser)` and `run(args) -> int` (and
optionally EPILOG, text shown at the end of its --help); only the chosen command's module is
imported, and a command module imports torch only inside its `run`, so that `--help` stays fast
(tests/test_cli.py checks each command).

Errors: bad input (an `EdifyError`, a wrong argument, a file that cannot be read or written, memory
running out) is one line `edify: error: ...` on stderr and exit status 2; Ctrl-C is one line and
exit status 130; anything else is a bug in edify: one line saying so and exit status 1. With the
global flag `--debug` (anywhere before a `--`) or EDIFY_DEBUG=1, every error shows its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from edify.errors import EdifyError

# command words -> (module, one-line help)
COMMANDS: dict[tuple[str, ...], tuple[str, str]] = {
    ("generate",): ("edify.pipelines.generate_cli", "generate images from a prompt"),
    ("train",): ("edify.training.cli", "train a model from a named preset"),
    ("export",): ("edify.training.export_cli", "write a training run's checkpoint as a model folder"),
    ("control",): ("edify.pipelines.control_cli", "generate images steered by edges or depth (a ControlNet)"),
    ("inpaint",): ("edify.pipelines.control_cli", "inpaint, outpaint or replace an object in an image"),
    ("upscale",): ("edify.pipelines.upscale_cli", "make an image 2x or 4x larger with a cascade upsampler"),
    ("train-controlnet",): ("edify.training.controlnet", "train a ControlNet (edges, depth, inpaint) on a base"),
    ("finetune",): ("edify.training.finetune", "learn a new style or concept as a small cross-attention delta"),
    ("expert",): ("edify.pipelines.expert_cli", "list, add or remove the separate network of some stages"),
    ("data", "emoji"): ("edify.data.emoji", "build the emoji demo dataset as webdataset shards"),
    ("eval",): ("edify.eval.cli", "FID, KID, sliced Wasserstein and prompt retrieval of a model"),
}
DEBUG_FLAG = "--debug"
DEBUG_ENV = "EDIFY_DEBUG"
HELP_COLUMN = max(len(" ".join(words)) for words in COMMANDS) + 1  # names and their help line up


class UsageError(EdifyError):
    """A command line argparse rejects."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with a rejected command line raised as one line instead of usage + exit."""

    def error(self, message: str):
        raise UsageError(f"{message} (see `{self.prog} --help`)")


# ---------------------------------------------------------------------------------------------
# Usage texts


def _usage(prefix: tuple[str, ...] = ()) -> str:
    """Usage of `edify` (prefix ()) or of a command group such as ("data",)."""
    name = " ".join(("edify",) + prefix)
    flags = "" if prefix else " [--version] [--debug]"
    lines = [f"usage: {name}{flags} COMMAND [options]", "", "commands:"]
    for words, (_, text) in COMMANDS.items():
        if words[: len(prefix)] == prefix:
            lines.append(f"  {' '.join(words[len(prefix):]):<{HELP_COLUMN}} {text}")
    lines.append("")
    if not prefix:
        lines += ["options:", f"  {'--version':<{HELP_COLUMN}} print the version and exit",
                  f"  {DEBUG_FLAG:<{HELP_COLUMN}} show the traceback of any error (or set {DEBUG_ENV}=1)", ""]
    lines.append(f"Run `{name} COMMAND --help` for a command's options.")
    return "\n".join(lines)


def _command_names(prefix: tuple[str, ...] = ()) -> str:
    return ", ".join(" ".join(w[len(prefix):]) for w in COMMANDS if w[: len(prefix)] == prefix)


def _groups() -> set[tuple[str, ...]]:
    """Word prefixes that are not commands themselves, e.g. ("data",)."""
    return {words[:k] for words in COMMANDS for k in range(1, len(words))} - set(COMMANDS)


# ---------------------------------------------------------------------------------------------
# Dispatch


def _take_debug(argv: list[str]) -> tuple[bool, list[str]]:
    """Remove the global --debug flag (anywhere before a `--` separator)."""
    end = argv.index("--") if "--" in argv else len(argv)
    debug = DEBUG_FLAG in argv[:end]
    return debug, [a for a in argv[:end] if a != DEBUG_FLAG] + argv[end:]


def _debug_env() -> bool:
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def _group_to_list(argv: list[str]) -> tuple[str, ...] | None:
    """The command group argv names without a command (`edify data`, `edify data --help`), if any."""
    for group in sorted(_groups(), key=len, reverse=True):
        rest = argv[len(group):]
        if tuple(argv[: len(group)]) == group and (not rest or rest[0] in ("-h", "--help")):
            return group
    return None


def _find_command(argv: list[str]) -> tuple[tuple[str, ...], str, str]:
    """(words, module, help) of the command argv starts with; EdifyError naming the known ones."""
    for words, (module_name, text) in sorted(COMMANDS.items(), key=lambda kv: -len(kv[0])):
        if tuple(argv[: len(words)]) == words:
            return words, module_name, text
    for group in sorted(_groups(), key=len, reverse=True):
        if tuple(argv[: len(group)]) == group:
            raise EdifyError(f"unknown command {' '.join(argv[: len(group) + 1])!r}; `edify {' '.join(group)}` "
                             f"commands: {_command_names(group)}")
    if argv[0].startswith("-"):
        raise EdifyError(f"unknown option {argv[0]!r} before the command (see `edify --help`)")
    raise EdifyError(f"unknown command {argv[0]!r}; commands: {_command_names()} (see `edify --help`)")


def _run(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] == "--version":
        from edify import __version__

        print(f"edify {__version__}")
        return 0
    group = _group_to_list(argv)
    if group is not None:
        print(_usage(group))
        return 0
    words, module_name, text = _find_command(argv)
    module = importlib.import_module(module_name)
    parser = ArgumentParser(prog="edify " + " ".join(words), description=text,
                            epilog=getattr(module, "EPILOG", None),
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    module.add_arguments(parser)
    try:
        args = parser.parse_args(argv[len(words):])
    except SystemExit as done:  # --help
        return int(done.code or 0)
    # library progress bars (e.g. loading the text encoder's weights) would garble ours and stderr
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    return int(module.run(args) or 0)


# ---------------------------------------------------------------------------------------------
# Errors


def _one_line(text: str) -> str:
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


def _os_message(err: OSError) -> str:
    if err.strerror and err.filename is not None:
        target = f"{err.filename!r}" + (f" -> {err.filename2!r}" if err.filename2 is not None else "")
        return f"{err.strerror}: {target}"
    return _one_line(str(err)) or type(err).__name__


def describe(err: BaseException) -> tuple[int, str]:
    """(exit status, one-line message) for an error that ends a command."""
    if isinstance(err, KeyboardInterrupt):
        return 130, "edify: interrupted" + (f": {_one_line(str(err))}" if str(err) else "")
    if isinstance(err, EdifyError):
        return 2, f"edify: error: {_one_line(str(err))}"
    if isinstance(err, OSError):
        return 2, f"edify: error: {_os_message(err)}"
    if isinstance(err, MemoryError) or type(err).__name__ == "OutOfMemoryError":
        return 2, ("edify: error: out of memory; use a smaller --batch-size (or --batch), fewer images "
                   f"or a device with more memory ({_one_line(str(err))[:200] or type(err).__name__})")
    return 1, (f"edify: internal error: {type(err).__name__}: {_one_line(str(err))[:500]} -- this is a bug "
               f"in edify; rerun with {DEBUG_FLAG} (or {DEBUG_ENV}=1) to see the traceback, and report it")


def main(argv: list[str] | None = None) -> int:
    debug, argv = _take_debug(list(sys.argv[1:] if argv is None else argv))
    debug = debug or _debug_env()
    try:
        return _run(argv)
    except (Exception, KeyboardInterrupt) as err:
        if debug:
            raise
        code, message = describe(err)
        sys.stdout.flush()
        print(message, file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
