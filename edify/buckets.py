"""Aspect-ratio buckets (section 3.1): the five shapes the networks train and sample at.

A bucket's shape at a given base resolution keeps the pixel count near resolution**2 and both sides
multiples of `multiple` (what the Haar transform, the U-Net's downsampling and the Laplacian levels
together require).
"""

from __future__ import annotations

import math

from edify.errors import EdifyError

# name -> (width, height) ratio
BUCKETS: dict[str, tuple[int, int]] = {
    "1:1": (1, 1),
    "4:3": (4, 3),
    "3:4": (3, 4),
    "16:9": (16, 9),
    "9:16": (9, 16),
}


def check_bucket(name: str) -> str:
    if name not in BUCKETS:
        raise EdifyError(f"unknown aspect-ratio bucket {name!r}; known: {', '.join(BUCKETS)}")
    return name


def bucket_shape(name: str, resolution: int, multiple: int = 16) -> tuple[int, int]:
    """(height, width) of bucket `name` with about resolution**2 pixels, sides multiples of `multiple`."""
    check_bucket(name)
    if resolution <= 0 or multiple <= 0 or resolution % multiple:
        raise EdifyError(f"resolution must be a positive multiple of {multiple}, got {resolution}")
    w, h = BUCKETS[name]
    ratio = w / h
    height = max(multiple, round(resolution / math.sqrt(ratio) / multiple) * multiple)
    width = max(multiple, round(resolution * math.sqrt(ratio) / multiple) * multiple)
    return height, width


def nearest_bucket(height: int, width: int) -> str:
    """The bucket whose aspect ratio is closest (in log ratio) to height x width."""
    if height <= 0 or width <= 0:
        raise EdifyError(f"image size must be positive, got {height}x{width}")
    target = math.log(width / height)
    return min(BUCKETS, key=lambda n: abs(math.log(BUCKETS[n][0] / BUCKETS[n][1]) - target))
