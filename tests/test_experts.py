"""Separate expert denoisers per Laplacian stage (edify.core.experts) and the pipeline's `experts=`."""

from __future__ import annotations

import pytest
import torch

from edify.conditioning import Cond
from edify.core.experts import StageExperts
from edify.errors import EdifyError
from test_pipeline import tiny_pipeline


def constant(value: float):
    """A denoiser that returns `value` everywhere and records the batches it was given."""
    calls = []

    def D(x, sigma, cond=None, stage=None):
        calls.append((x.shape[0], None if cond is None else cond.batch_size))
        return torch.full_like(x, value)
    D.calls = calls
    return D


def test_each_sample_goes_to_its_stages_expert_and_the_rest_to_the_shared_denoiser():
    shared, fine = constant(1.0), constant(2.0)
    router = StageExperts(shared, {0: fine}, levels=3)
    x = torch.zeros(5, 3, 4, 4)
    assert torch.equal(router(x, 0.5, None, 0), torch.full_like(x, 2.0))
    assert torch.equal(router(x, 3.0, None, torch.tensor([2] * 5)), torch.full_like(x, 1.0))
    # a batch that mixes stages is split, each part run by its own denoiser, and put back in order
    stage = torch.tensor([0, 1, 0, 2, 1])
    cond = Cond(text=torch.randn(5, 2, 8), text_mask=torch.ones(5, 2, dtype=torch.bool))
    out = router(x, torch.rand(5) + 0.1, cond, stage)
    expected = torch.tensor([2.0, 1.0, 2.0, 1.0, 1.0]).view(5, 1, 1, 1).expand_as(x)
    assert torch.equal(out, expected)
    assert fine.calls[-1] == (2, 2) and shared.calls[-1] == (3, 3)


def test_bad_expert_stages_and_a_missing_stage_are_refused():
    with pytest.raises(EdifyError, match="integer in 0..2"):
        StageExperts(constant(0.0), {3: constant(1.0)}, levels=3)
    with pytest.raises(EdifyError, match="integer in 0..2"):
        StageExperts(constant(0.0), {-1: constant(1.0)}, levels=3)
    with pytest.raises(EdifyError, match="stage of each sample"):
        StageExperts(constant(0.0), {0: constant(1.0)})(torch.zeros(1, 3, 4, 4), 1.0)


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
