"""Separate expert networks per Laplacian stage: the pipeline's `experts=` (edify.core.precond.StageDenoisers)."""

from __future__ import annotations

import pytest
import torch

from edify.errors import EdifyError
from test_pipeline import tiny_pipeline


def test_pipeline_experts_replace_exactly_their_stages():
    pipe, other = tiny_pipeline(), tiny_pipeline()
    torch.manual_seed(7)
    for p in other.network.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    kw = dict(seed=[2, 3], output_type="tensor", guidance_scale=3.0)
    base = pipe(["red apple"] * 2, **kw).images
    alone = other(["red apple"] * 2, **kw).images
    levels = pipe.process.levels
    # no experts, or this model as its own expert: the plain model bit for bit
    assert torch.equal(pipe(["red apple"] * 2, experts={}, **kw).images, base)
    assert torch.equal(pipe(["red apple"] * 2, experts={0: pipe}, **kw).images, base)
    # the other model as every stage's expert: the other model bit for bit
    assert torch.equal(pipe(["red apple"] * 2, experts={s: other for s in range(levels)}, **kw).images, alone)
    # the finest stage alone: neither model's images
    mixed = pipe(["red apple"] * 2, experts={0: other}, **kw).images
    assert not torch.allclose(mixed, base) and not torch.allclose(mixed, alone)
    with pytest.raises(EdifyError, match="a stage expert differs from this model in styles"):
        pipe("red apple", experts={0: tiny_pipeline(styles=("noto",))})
    with pytest.raises(EdifyError, match="a stage expert must be a TextToImagePipeline"):
        pipe("red apple", experts={0: "weights/emoji-64"})
    with pytest.raises(EdifyError, match=r"integer in 0..2 \(0 = finest\), got 3"):
        pipe("red apple", experts={3: other})
