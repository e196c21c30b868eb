"""Evaluation of generated images: FID, KID, multi-scale SWD and prompt retrieval (`edify eval`).

The names below load on first use, so that `edify eval --help` (which imports `edify.eval.cli`)
does not import torch.
"""

from __future__ import annotations

import importlib
import sys
import types

_EXPORTS = {
    "METRICS": "edify.eval.evaluate", "evaluate": "edify.eval.evaluate",
    "evaluate_pipeline": "edify.eval.evaluate", "load_split": "edify.eval.evaluate",
    "InceptionFeatures": "edify.eval.features",
    "FeatureStats": "edify.eval.fid", "fid": "edify.eval.fid", "frechet_distance": "edify.eval.fid",
    "kid": "edify.eval.fid", "reference_stats": "edify.eval.fid",
    "retrieval_accuracy": "edify.eval.retrieval",
    "swd": "edify.eval.swd",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'edify.eval' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


class _Package(types.ModuleType):
    """`edify.eval.evaluate`, `.fid` and `.swd` name functions, as they did when this package
    imported them eagerly: the submodules of the same names do not replace them when imported."""

    def __setattr__(self, name: str, value) -> None:
        if name in _EXPORTS and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
