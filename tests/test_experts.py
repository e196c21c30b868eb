"""Separate expert networks per Laplacian stage: the pipeline's `experts=` (edify.core.precond.StageDenoisers)."""

from __future__ import annotations

import pytest
import torch

from edify.errors import EdifyError
from test_pipeline import tiny_pipeline


def two_models(seed: int):
    """A tiny model and another of the same task whose weights differ by a little seeded noise."""
    pipe, other = tiny_pipeline(), tiny_pipeline()
    torch.manual_seed(seed)
    for p in other.network.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    return pipe, other


def test_pipeline_experts_replace_exactly_their_stages():
    pipe, other = two_models(7)
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


def test_a_saved_expert_loads_with_its_model_and_is_the_default(tmp_path):
    import json
    import shutil

    from edify.pipelines.text2image import TextToImagePipeline

    pipe, other = two_models(11)
    kw = dict(seed=[4, 5], output_type="tensor", guidance_scale=3.0)
    plain = pipe(["red apple"] * 2, **kw).images
    routed = pipe(["red apple"] * 2, experts={0: other}, **kw).images
    pipe.experts = {0: other.network}
    assert torch.equal(pipe(["red apple"] * 2, **kw).images, routed)  # its own expert, by default
    assert torch.equal(pipe(["red apple"] * 2, experts={}, **kw).images, plain)
    pipe.save_pretrained(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["stage_experts"] == [0]
    assert json.loads((tmp_path / "m" / "expert-0" / "config.json").read_text())["stage_experts"] == []
    loaded = TextToImagePipeline.from_pretrained(tmp_path / "m", text_encoder=pipe.text_encoder)
    assert set(loaded.experts) == {0}
    assert torch.equal(loaded(["red apple"] * 2, **kw).images, routed)
    # the expert's folder is a model folder of its own: the expert network alone
    alone = TextToImagePipeline.from_pretrained(tmp_path / "m" / "expert-0", text_encoder=pipe.text_encoder)
    assert torch.equal(alone(["red apple"] * 2, **kw).images, other(["red apple"] * 2, **kw).images)
    # a loaded finetune of the main network only: the experts stand aside, unless its scale is 0;
    # one with a part for the expert keeps it
    from types import SimpleNamespace

    loaded.finetunes = [SimpleNamespace(scale=0.5, experts=())]
    assert torch.equal(loaded(["red apple"] * 2, **kw).images, plain)
    loaded.finetunes = [SimpleNamespace(scale=0.0, experts=())]
    assert torch.equal(loaded(["red apple"] * 2, **kw).images, routed)
    loaded.finetunes = [SimpleNamespace(scale=0.5, experts=((0,),))]
    assert torch.equal(loaded(["red apple"] * 2, **kw).images, routed)
    loaded.finetunes = []
    # a folder that lists an expert it does not hold, or a stage the process does not have
    shutil.rmtree(tmp_path / "m" / "expert-0")
    with pytest.raises(EdifyError, match="lists an expert for stage 0 but has no folder expert-0"):
        TextToImagePipeline.from_pretrained(tmp_path / "m")
    config["stage_experts"] = [3]
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(EdifyError, match=r"'stage_experts' must list distinct stages in 0..2, got \[3\]"):
        TextToImagePipeline.from_pretrained(tmp_path / "m")


def test_an_expert_network_of_another_config_is_refused():
    from edify.networks.unet import UNet, UNetConfig

    pipe = tiny_pipeline()
    cfg = UNetConfig.from_dict({**pipe.config.network, "num_res_blocks": 2})
    with pytest.raises(EdifyError, match="expert network of stage 0 has another config"):
        pipe("red apple", experts={0: UNet(cfg)})


def test_one_expert_network_for_several_stages_is_saved_once(tmp_path):
    import json

    from edify.pipelines.text2image import TextToImagePipeline

    pipe, other = two_models(13)
    _, third = two_models(17)
    kw = dict(seed=[6, 7], output_type="tensor", guidance_scale=3.0)
    routed = pipe(["red apple"] * 2, experts={0: third, 1: other, 2: other}, **kw).images
    pipe.experts = {0: third.network, 1: other.network, 2: other.network}
    pipe.save_pretrained(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["stage_experts"] == [0, [1, 2]]
    assert sorted(p.name for p in (tmp_path / "m").glob("expert-*")) == ["expert-0", "expert-1-2"]
    loaded = TextToImagePipeline.from_pretrained(tmp_path / "m", text_encoder=pipe.text_encoder)
    assert loaded.experts[1] is loaded.experts[2] and loaded.experts[0] is not loaded.experts[1]
    assert torch.equal(loaded(["red apple"] * 2, **kw).images, routed)
    # a stage in two groups, or an empty group
    for bad in ([0, [0, 1]], [[]]):
        config["stage_experts"] = bad
        (tmp_path / "m" / "config.json").write_text(json.dumps(config))
        with pytest.raises(EdifyError, match=r"'stage_experts' must list distinct stages in 0..2"):
            TextToImagePipeline.from_pretrained(tmp_path / "m")
