"""Shared stand-ins for the training tests: a tiny deterministic text encoder and a tiny config."""

from __future__ import annotations

import importlib.util
import zlib
from pathlib import Path

import torch

from edify.training.config import get_preset


class WordHashEncoder:
    """Text encoder stand-in: one fixed random 384-d state per word (seeded by its crc32), plus a
    start token; same contract as edify.text encoders: encode(texts) -> (states, mask)."""

    dim = 384
    name = "word-hash"
    max_length = 77
    device = torch.device("cpu")

    def to(self, device):
        return self

    def encode(self, texts):
        words = [["<s>"] + t.split() for t in texts]
        L = max(len(w) for w in words)
        states = torch.zeros(len(texts), L, self.dim)
        mask = torch.zeros(len(texts), L, dtype=torch.bool)
        for i, ws in enumerate(words):
            for j, w in enumerate(ws):
                g = torch.Generator().manual_seed(zlib.crc32(w.encode()))
                states[i, j] = torch.randn(self.dim, generator=g)
                mask[i, j] = True
        return states, mask


def tiny_config(**changes):
    """tiny-cpu made smaller still: 2 images per step, no text cache, no periodic outputs."""
    base = get_preset("tiny-cpu").replace(
        batch_size=2, total_images=12, checkpoint_images=0, log_images=4, sample_images=0,
        text_cache=False, ema_halflife_images=8.0, data="synthetic:16", stage_sampling="round_robin")
    return base.replace(**changes)


def load_bench(name: str):
    """bench/<name>.py as a module (the benches are scripts, not a package)."""
    path = Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
