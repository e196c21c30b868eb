"""Random crops for training the fine stages of a cascade upsampler (docs/upscale.md, "Training on crops").

`CropStream` wraps a batch stream: every image (and mask) of a micro-batch is cut to a crop x crop
window at a random offset, a multiple of `align`. With align a multiple of 2^(K-1) (times the Haar
factor 4), cropping commutes with the process: down^j(crop(x)) is the crop of down^j(x) at offset /
2^j, the bands of a crop are the crops of the bands, and white noise cropped is white noise, so
a crop of a forward-diffused image is the forward-diffused crop. What changes is only what the
denoiser sees: a window instead of the whole image. That is valid where the denoiser's answer
depends on a neighbourhood smaller than the window, which is the case of an upsampler's fine
stages (the coarse content is nearly clean there and the missing detail is local); at inference
the same model then runs on windows of that size (`edify.core.tiling`), so it never sees a
larger field than in training.

Offsets come from a generator seeded by (seed, batches drawn, rank), and the count is part of the
data position: a resumed run draws the same crops.
"""

from __future__ import annotations

import dataclasses

import torch

from edify.errors import EdifyError


class CropStream:
    """A stream whose batches are random crop x crop windows of the inner stream's (aligned to `align`)."""

    def __init__(self, inner, crop: int, align: int, seed: int, rank: int = 0):
        if crop <= 0 or crop % align:
            raise EdifyError(f"the crop must be a positive multiple of {align} px, got {crop}")
        self.inner, self.crop, self.align, self.seed, self.rank, self.drawn = inner, crop, align, seed, rank, 0
        self.data = getattr(inner, "data", None)

    def next(self):
        from edify.training.loop import step_seed

        batch = self.inner.next()
        B, _, H, W = batch.image.shape
        if H < self.crop or W < self.crop:
            raise EdifyError(f"a {self.crop} px crop does not fit {H}x{W} training images")
        g = torch.Generator().manual_seed(step_seed(self.seed, self.drawn, self.rank, 0xC7))
        tops = torch.randint(0, (H - self.crop) // self.align + 1, (B,), generator=g) * self.align
        lefts = torch.randint(0, (W - self.crop) // self.align + 1, (B,), generator=g) * self.align
        self.drawn += 1

        def cut(x):
            if x is None:
                return None
            return torch.stack([x[i, :, t:t + self.crop, l:l + self.crop]
                                for i, (t, l) in enumerate(zip(tops.tolist(), lefts.tolist()))])
        return dataclasses.replace(batch, image=cut(batch.image), mask=cut(batch.mask))

    def state_dict(self) -> dict:
        return {**self.inner.state_dict(), "crop_batches": self.drawn}

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state)
        self.drawn = int(state.get("crop_batches", 0))
