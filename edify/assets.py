"""Where the shipped demo model lives: the source checkout's weights/ folder or the installed package.

A source checkout (including `pip install -e .`) keeps the model in `weights/emoji-64` beside the
`edify/` package, with the default ControlNets (`weights/controlnet-canny-64`, `weights/inpaint-64`)
and the upsampler (`weights/emoji-up-256`);
a wheel (`pip install .`) carries the same files as package data in `edify/_weights/` (see
`[tool.setuptools]` in pyproject.toml).
"""

from __future__ import annotations

from pathlib import Path

from edify.errors import EdifyError

DEMO_MODEL = "emoji-64"
_PACKAGE = Path(__file__).resolve().parent


def source_model_path(name: str = DEMO_MODEL) -> Path:
    """The model folder of a source checkout: <repository>/weights/<name>."""
    return _PACKAGE.parent / "weights" / name


def installed_model_path(name: str = DEMO_MODEL) -> Path:
    """The model folder an installed wheel carries: <site-packages>/edify/_weights/<name>."""
    return _PACKAGE / "_weights" / name


def shipped_path(name: str) -> Path:
    """A shipped model folder (the demo model, a default ControlNet): the source checkout's copy
    first, else the installed one; the checkout's path when neither exists (for the error message)."""
    for folder in (source_model_path(name), installed_model_path(name)):
        if (folder / "config.json").is_file():
            return folder
    return source_model_path(name)


def demo_model_path() -> Path:
    """The shipped demo model's folder: the source checkout's copy first, else the installed one."""
    folder = shipped_path(DEMO_MODEL)
    if (folder / "config.json").is_file():
        return folder
    raise EdifyError(f"the demo model {DEMO_MODEL} is not installed (looked in {source_model_path()} and "
                     f"{installed_model_path()}); reinstall edify or pass --model PATH")
