"""Resumable streams of training batches: every rank's micro-batches in a fixed, seeded order.

A stream hands out this rank's next micro-batch and reports its position as a small JSON dict, so
a resumed run continues at exactly the sample where the checkpoint was taken:

- `SyntheticStream`: an in-memory set of random smooth images with captions and styles, visited
  in a seeded permutation per epoch (tests, laptops, the `tiny-cpu` preset). Position = samples
  consumed over all ranks.
- `LoaderStream`: the real loaders of `edify.data` (webdataset shards or an image folder with
  caption sidecars), bucketed by aspect ratio. Position = epoch and batches consumed in it; a
  resumed stream rebuilds the loader with the same seed and skips that many batches. Shards
  whose samples carry alpha masks (`maskS.png` beside `S.png`) give `Batch.mask`.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from edify.conditioning import Cond
from edify.errors import EdifyError
from edify.runtime import single_thread_worker


@dataclass
class Batch:
    """One micro-batch: images [B, 3, H, W] in [-1, 1], captions, styles, per-sample loss weights,
    and, from streams that encode text ahead (the in-memory one), the ready Cond on the device.

    mask: the objects' alpha masks [B, 1, H, W] float in {0, 1} (1 = object), cropped and resized
    like the images, for the inpainting "replace" task; None when the data has none (a sample
    without one in a batch with masks gets zeros: no object)."""

    image: Tensor
    caption: list[str]
    style: list[str | None]
    weight: Tensor
    cond: Cond | None = None
    mask: Tensor | None = None


SYNTHETIC_COLORS = ("red", "green", "blue", "yellow")
SYNTHETIC_SHAPES = ("circle", "square", "star", "heart")
SYNTHETIC_STYLES = ("flat", "glossy")


class SyntheticStream:
    """`size` random smooth images with captions; rank r of W takes slice r of each global batch."""

    def __init__(self, size: int, resolution: int, micro_batch: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1):
        if size < 1:
            raise EdifyError(f"synthetic dataset size must be >= 1, got {size}")
        g = torch.Generator().manual_seed(seed)
        # Smooth images: 4x4 random colour fields upsampled bilinearly, so low bands carry signal.
        coarse = torch.rand(size, 3, 4, 4, generator=g) * 2 - 1
        self.images = F.interpolate(coarse, size=(resolution, resolution), mode="bilinear", align_corners=False)
        self.captions = [f"a {SYNTHETIC_COLORS[i % 4]} {SYNTHETIC_SHAPES[(i // 4) % 4]}" for i in range(size)]
        self.styles = [SYNTHETIC_STYLES[i % 2] for i in range(size)]
        self.weights = torch.ones(size)
        self.size, self.micro_batch, self.seed = size, micro_batch, seed
        self.rank, self.world_size = rank, world_size
        self.consumed = 0  # samples consumed over all ranks

    def _index(self, i: int) -> int:
        """Dataset index of the i-th sample of the stream: a fresh seeded permutation per epoch."""
        epoch, offset = divmod(i, self.size)
        perm = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed * 7919 + epoch))
        return int(perm[offset])

    def next(self) -> Batch:
        start = self.consumed + self.rank * self.micro_batch
        idx = [self._index(i) for i in range(start, start + self.micro_batch)]
        self.consumed += self.world_size * self.micro_batch
        return Batch(self.images[idx], [self.captions[i] for i in idx], [self.styles[i] for i in idx],
                     self.weights[idx])

    def state_dict(self) -> dict:
        return {"kind": "synthetic", "consumed": self.consumed}

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != "synthetic":
            raise EdifyError(f"data position is for a {state.get('kind')!r} stream, not a synthetic one")
        self.consumed = int(state["consumed"])


def find_shards(spec: str) -> list[str] | None:
    """The tar shards a data spec names, else None (an image folder).

    A folder of *.tar files; a folder whose train/ subfolder holds them (the layout `edify data
    emoji` writes, whose val/ split is left out); a glob; or a brace pattern.
    """
    path = Path(spec)
    if path.is_dir():
        for folder in (path, path / "train"):
            tars = sorted(str(p) for p in folder.glob("*.tar"))
            if tars:
                return tars
        return None
    if spec.endswith(".tar") or "{" in spec or any(c in spec for c in "*?["):
        return [spec] if "{" in spec else sorted(glob.glob(spec)) or None
    return None


class LoaderStream:
    """A resumable stream over `edify.data` loaders (webdataset shards or an image folder)."""

    def __init__(self, spec: str, resolution: int, multiple: int, micro_batch: int, seed: int = 0,
                 num_workers: int = 0, weight_key: str = "weight", rank: int = 0, world_size: int = 1,
                 masks: bool = False):
        from edify.data.datasets import DataConfig

        self.spec, self.micro_batch, self.seed, self.num_workers = spec, micro_batch, seed, num_workers
        self.rank, self.world_size = rank, world_size
        self.data_config = DataConfig(resolution=resolution, multiple=multiple,
                                      weight_key=weight_key or "weight", masks=masks)
        self.shards = find_shards(spec)
        if self.shards is None and not os.path.isdir(spec):
            raise EdifyError(f"data must be 'synthetic', a folder of images or .tar shards, or a shard "
                             f"pattern, got {spec!r}")
        self.epoch, self.batches = 0, 0
        self._iter = None
        self.loader = None

    def _open(self):
        from edify.data import datasets, sampler

        if self.shards is not None:  # one endless stream; shards reshuffled per epoch with the seed
            dataset = datasets.WebImageDataset(self.shards, self.data_config, seed=self.seed, epochs=None,
                                               rank=self.rank, world_size=self.world_size)
            self.loader = sampler.stream_loader(dataset, self.micro_batch, num_workers=self.num_workers,
                                                worker_init_fn=single_thread_worker)
        else:
            dataset = datasets.ImageFolderDataset(self.spec, self.data_config)
            self.loader = sampler.folder_loader(dataset, self.micro_batch, num_workers=self.num_workers,
                                                worker_init_fn=single_thread_worker, seed=self.seed,
                                                drop_last=True, rank=self.rank, world_size=self.world_size)
        self.loader.set_epoch(self.epoch)
        it = iter(self.loader)
        for _ in range(self.batches):  # resume: skip what this epoch already delivered
            next(it)
        return it

    def next(self) -> Batch:
        if self._iter is None:
            self._iter = self._open()
        for _ in range(2):
            try:
                raw = next(self._iter)
                break
            except StopIteration:  # an image folder's epoch ended: reshuffle with the next seed
                self.epoch, self.batches = self.epoch + 1, 0
                self.loader.set_epoch(self.epoch)
                self._iter = iter(self.loader)
        else:
            raise EdifyError(f"the data {self.spec!r} gives no full batch of {self.micro_batch} images")
        self.batches += 1
        return Batch(raw["image"], list(raw["caption"]), list(raw["style"]), raw["weight"].float(),
                     mask=raw.get("mask"))

    def state_dict(self) -> dict:
        return {"kind": "loader", "epoch": self.epoch, "batches": self.batches}

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != "loader":
            raise EdifyError(f"data position is for a {state.get('kind')!r} stream, not a loader")
        self.epoch, self.batches = int(state["epoch"]), int(state["batches"])
        self._iter = None


def open_stream(spec: str, resolution: int, multiple: int, micro_batch: int, seed: int,
                num_workers: int, weight_key: str, rank: int, world_size: int, masks: bool = False):
    """A stream for a data spec: "synthetic" or "synthetic:N" (N images, default 64), else a loader."""
    if spec == "synthetic" or spec.startswith("synthetic:"):
        size = 64
        if spec.startswith("synthetic:"):
            try:
                size = int(spec.split(":", 1)[1])
            except ValueError:
                raise EdifyError(f"synthetic data size must be an integer, got {spec!r}") from None
        return SyntheticStream(size, resolution, micro_batch, seed, rank, world_size)
    return LoaderStream(spec, resolution, multiple, micro_batch, seed, num_workers, weight_key,
                        rank, world_size, masks=masks)
