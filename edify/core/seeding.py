"""Per-sample random noise: the same seed gives the same image at any batch size.

Following the diffusers convention, `generator` may be None (global RNG), one torch.Generator
(one stream for the whole batch) or a list of generators, one per sample. With a list, sample b's
noise is drawn from generator b alone, in the same order whatever the batch it sits in, so a
sample depends only on its own seed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
from torch import Tensor

from edify.errors import EdifyError

Generators = torch.Generator | Sequence[torch.Generator] | None


class NoiseSource(Protocol):
    """Anything else that supplies the noise: `randn(shape, device, dtype) -> Tensor`
    (e.g. `edify.core.gaussian.BasisNoise`, which makes a linear sampler's map exact)."""

    def randn(self, shape, device=None, dtype=None) -> Tensor: ...


def randn(shape, generator: Generators = None, device=None, dtype=None) -> Tensor:
    """Standard normal noise of `shape`; with a list of generators, row b comes from generator b."""
    shape = tuple(shape)
    dtype = dtype or torch.get_default_dtype()
    if hasattr(generator, "randn"):
        return generator.randn(shape, device=device, dtype=dtype)
    if generator is None or isinstance(generator, torch.Generator):
        gen_device = generator.device if generator is not None else device
        return torch.randn(shape, generator=generator, device=gen_device, dtype=dtype).to(device)
    generator = list(generator)
    if len(generator) != shape[0]:
        raise EdifyError(f"need one generator per sample: batch {shape[0]}, got {len(generator)} generators")
    rows = [torch.randn(shape[1:], generator=g, device=g.device, dtype=dtype).to(device) for g in generator]
    return torch.stack(rows)


def generators(seeds: Sequence[int], device="cpu") -> list[torch.Generator]:
    """One seeded torch.Generator per sample."""
    return [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]
