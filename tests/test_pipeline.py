"""TextToImagePipeline and `edify generate` with a tiny random model (no shipped weights needed)."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import shutil
import stat
import types

import numpy as np
import pytest
import torch
from PIL import Image

from edify.cli import main as cli_main
from edify.errors import EdifyError
from edify.networks.presets import build_network
from edify.pipelines.text2image import PipelineConfig, SamplingDefaults, TextToImagePipeline
from edify.text.encoders import TextEncoder


class HashEncoder(TextEncoder):
    """A deterministic stand-in encoder: one token per word, states from a hash of the word."""

    def __init__(self, dim: int = 384, max_length: int = 8):
        self._dim, self._max = dim, max_length

    def encode(self, texts):
        L = max(1, min(self._max, max(len(t.split()) for t in texts)))
        states = torch.zeros(len(texts), L, self._dim)
        mask = torch.zeros(len(texts), L, dtype=torch.bool)
        for b, t in enumerate(texts):
            for i, word in enumerate(t.split()[:L]):
                seed = int(hashlib.sha256(word.encode()).hexdigest()[:8], 16)
                states[b, i] = torch.randn(self._dim, generator=torch.Generator().manual_seed(seed))
                mask[b, i] = True
        return states, mask

    dim = property(lambda self: self._dim)
    max_length = property(lambda self: self._max)
    name = property(lambda self: "hash")
    device = property(lambda self: torch.device("cpu"))

    def to(self, device):
        return self


def tiny_pipeline(styles=("noto", "twemoji")) -> TextToImagePipeline:
    torch.manual_seed(0)
    net = build_network("tiny")
    config = PipelineConfig(network=net.config.to_dict(), levels=3, switch_sigmas=(1.0, 5.0),
                            resolution=32, styles=styles,
                            defaults=SamplingDefaults(num_steps=6, guidance_scale=2.0))
    return TextToImagePipeline(net, config, text_encoder=HashEncoder())


def test_save_pretrained_round_trip(tmp_path):
    pipe = tiny_pipeline()
    pipe.save_pretrained(tmp_path / "m", max_shard_bytes=20_000)  # forces several shards
    shards = list((tmp_path / "m").glob("model-*.safetensors"))
    assert len(shards) > 1
    umask = os.umask(0)
    os.umask(umask)
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o666 & ~umask for p in shards)  # not owner-only
    loaded = TextToImagePipeline.from_pretrained(tmp_path / "m", text_encoder=HashEncoder())
    assert loaded.config == pipe.config
    for (k, a), (k2, b) in zip(pipe.network.state_dict().items(), loaded.network.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    a = pipe("red apple", style="noto", seed=3, output_type="tensor").images
    b = loaded("red apple", style="noto", seed=3, output_type="tensor").images
    assert torch.equal(a, b)


def test_bf16_save_halves_the_files(tmp_path):
    pipe = tiny_pipeline()
    pipe.save_pretrained(tmp_path / "f32")
    pipe.save_pretrained(tmp_path / "bf16", dtype=torch.bfloat16)
    size = lambda p: sum(f.stat().st_size for f in p.glob("*.safetensors"))  # noqa: E731
    assert size(tmp_path / "bf16") < 0.6 * size(tmp_path / "f32")
    loaded = TextToImagePipeline.from_pretrained(tmp_path / "bf16", text_encoder=HashEncoder())
    ref = pipe.network.state_dict()
    for k, v in loaded.network.state_dict().items():
        assert v.dtype == torch.float32
        torch.testing.assert_close(v, ref[k].to(torch.bfloat16).float(), rtol=0, atol=0)


def test_per_seed_images_do_not_depend_on_batch():
    pipe = tiny_pipeline()
    batch = pipe(["red apple", "green apple", "cat face"], style="twemoji", seed=[11, 12, 13],
                 output_type="tensor").images
    single = pipe("green apple", style="twemoji", seed=12, output_type="tensor").images
    assert batch.shape == (3, 3, 32, 32)
    torch.testing.assert_close(batch[1:2], single, rtol=0, atol=1e-5)
    assert not torch.allclose(batch[0], batch[2])


def test_outputs_are_images_of_the_requested_size_and_nfe():
    pipe = tiny_pipeline()
    out = pipe("red apple", height=32, width=64, seed=0, num_images_per_prompt=2, sampler="heun", num_steps=6)
    assert [im.size for im in out.images] == [(64, 32), (64, 32)]
    assert out.seeds == [0, 1]
    assert out.nfe == 2 * 6 - 1  # 6 steps (the last one to 0 included), Heun's last is first order


def test_guidance_and_negative_prompt_change_the_image():
    pipe = tiny_pipeline()
    base = pipe("red apple", seed=1, guidance_scale=1.0, output_type="tensor").images
    guided = pipe("red apple", seed=1, guidance_scale=4.0, output_type="tensor").images
    negative = pipe("red apple", seed=1, guidance_scale=4.0, negative_prompt="blue", output_type="tensor").images
    assert not torch.allclose(base, guided) and not torch.allclose(guided, negative)


def test_per_stage_guidance_in_the_pipeline_its_saved_default_and_the_cli(tmp_path, monkeypatch, capsys):
    pipe = tiny_pipeline()
    kw = dict(seed=[2, 3], output_type="tensor")
    uniform = pipe(["red apple"] * 2, guidance_scale=4.0, **kw).images
    assert torch.equal(pipe(["red apple"] * 2, guidance_scale=(4.0, 4.0, 4.0), **kw).images, uniform)
    per_stage = pipe(["red apple"] * 2, guidance_scale=(1.0, 4.0, 4.0), **kw).images
    unguided = pipe(["red apple"] * 2, guidance_scale=1.0, **kw).images
    assert not torch.allclose(per_stage, uniform) and not torch.allclose(per_stage, unguided)
    assert not torch.allclose(per_stage, pipe(["red apple"] * 2, guidance_scale=(1.0, 4.0, 4.0),
                                              negative_prompt="blue", **kw).images)
    with pytest.raises(EdifyError, match="one scale per stage \\(3"):
        pipe("red apple", guidance_scale=(1.0, 4.0))
    with pytest.raises(EdifyError, match="finite and >= 0"):
        pipe("red apple", guidance_scale=(1.0, -4.0, 4.0))
    # a per-stage default is saved and read back; the CLI takes one scale per stage, finest first
    d = pipe.config.defaults
    pipe.config = dataclasses.replace(pipe.config, defaults=dataclasses.replace(d, guidance_scale=(1.0, 4.0, 4.0)))
    assert torch.equal(pipe(["red apple"] * 2, **kw).images, per_stage)
    pipe.save_pretrained(tmp_path / "m")
    assert TextToImagePipeline.from_pretrained(tmp_path / "m", text_encoder=HashEncoder()).config == pipe.config
    monkeypatch.setattr(TextToImagePipeline, "text_encoder", property(lambda self: HashEncoder()))
    for flag, expected in (([], per_stage), (["--guidance", "4"], uniform), (["--guidance", "4,4,4"], uniform)):
        out = tmp_path / "img.png"
        assert cli_main(["generate", "red apple", "--model", str(tmp_path / "m"), "-o", str(out), "--seed", "2",
                         "--threads", "1", "--quiet"] + flag) == 0
        got = torch.from_numpy(np.array(Image.open(out))).permute(2, 0, 1).float()
        assert (got - ((expected[0] + 1) * 127.5).round()).abs().max() <= 1  # another batch size: 1/255
    capsys.readouterr()
    for bad, message in (("1,x,4", "numbers separated by commas"), ("1,4", "one scale per stage"),
                         ("nan", "finite and >= 0")):
        code = cli_main(["generate", "red apple", "--model", str(tmp_path / "m"), "-o", str(out), "--guidance", bad])
        err = capsys.readouterr().err
        assert code == 2 and message in err and err.count("\n") == 1


def test_autoguidance_with_a_weaker_model_of_the_same_task():
    pipe, weaker = tiny_pipeline(), tiny_pipeline()
    torch.manual_seed(5)
    for p in weaker.network.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    kw = dict(seed=[2, 3], output_type="tensor")
    conditional = pipe(["red apple"] * 2, guidance_scale=1.0, **kw).images
    assert torch.equal(pipe(["red apple"] * 2, guidance_scale=3.0, guide=pipe, **kw).images, conditional)
    auto = pipe(["red apple"] * 2, guidance_scale=3.0, guide=weaker, **kw).images
    cfg = pipe(["red apple"] * 2, guidance_scale=3.0, **kw).images
    assert not torch.allclose(auto, conditional) and not torch.allclose(auto, cfg)
    assert not torch.allclose(auto, pipe(["red apple"] * 2, guidance_scale=3.0, guide=weaker, guide_uncond=True,
                                         **kw).images)
    other = tiny_pipeline(styles=("noto",))
    with pytest.raises(EdifyError, match="differs from this model in styles"):
        pipe("red apple", guide=other)
    with pytest.raises(EdifyError, match="no negative prompt"):
        pipe("red apple", guidance_scale=3.0, guide=weaker, negative_prompt="blue")


def test_autoguidance_term_guides_a_stage_expert_by_the_main_network():
    """guide=the model itself with guide_weight (a, 0, 0): the main network is the weaker model of
    the 64 px expert's stage; without an expert the term is D_c - D_c = 0 and the images are the
    plain guided ones."""
    pipe = tiny_pipeline()
    kw = dict(seed=[2, 3], output_type="tensor")
    plain = pipe(["red apple"] * 2, **kw).images
    same = pipe(["red apple"] * 2, guide=pipe, guide_weight=(2.0, 0.0, 0.0), **kw).images
    torch.testing.assert_close(same, plain, rtol=0, atol=1e-5)
    expert = copy.deepcopy(pipe.network)
    torch.manual_seed(6)
    for p in expert.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    with_expert = pipe(["red apple"] * 2, experts={0: expert}, **kw).images
    guided = pipe(["red apple"] * 2, experts={0: expert}, guide=pipe, guide_weight=(2.0, 0.0, 0.0), **kw).images
    assert not torch.allclose(guided, with_expert, atol=1e-3)
    coarse = pipe(["red apple"] * 2, experts={0: expert}, guide=pipe, guide_weight=(0.0, 2.0, 2.0), **kw).images
    torch.testing.assert_close(coarse, with_expert, rtol=0, atol=1e-5)  # the main network serves those stages
    # a guide per stage: the same model at stages 1 and 2 is the single guide with those weights
    weaker = tiny_pipeline()
    torch.manual_seed(7)
    for p in weaker.network.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    single = pipe(["red apple"] * 2, guide=weaker, guide_weight=(0.0, 1.5, 1.5), **kw).images
    assert not torch.allclose(single, plain, atol=1e-3)
    per_stage = pipe(["red apple"] * 2, guide={1: weaker, 2: weaker}, guide_weight=(0.0, 1.5, 1.5), **kw).images
    torch.testing.assert_close(per_stage, single, rtol=0, atol=1e-5)
    both = pipe(["red apple"] * 2, experts={0: expert}, guide={0: pipe, 1: weaker, 2: weaker},
                guide_weight=(2.0, 1.5, 1.5), **kw).images
    assert not torch.allclose(both, guided, atol=1e-3)
    with pytest.raises(EdifyError, match=r"not 0 at stage\(s\) \[0\], which have no guide"):
        pipe("red apple", guide={1: weaker}, guide_weight=(1.0, 1.0, 0.0))
    with pytest.raises(EdifyError, match="adds its term with guide_weight"):
        pipe("red apple", guide={1: weaker})
    with pytest.raises(EdifyError, match="integer in 0..2"):
        pipe("red apple", guide={3: weaker}, guide_weight=1.0)
    with pytest.raises(EdifyError, match="no guides of its own"):
        pipe("red apple", guide_weight=1.0)
    with pytest.raises(EdifyError, match="per-stage guide_weight has 2 weights"):
        pipe("red apple", guide=pipe, guide_weight=(1.0, 1.0))


def test_a_models_own_guides_are_saved_with_it_and_used_by_default(tmp_path, monkeypatch, capsys):
    """stage_guides {"0": "main", "1": "guide", "2": "guide"} and defaults.guide_weight: the main
    network guides the stage-0 expert, the `guide/` network the coarser stages; saved and loaded
    with the model; a call's guide_weight overrides (0 = off); a finetune at a scale other than 0
    leaves the guide network out; a denoiser wrapper (ControlNets) turns the default off."""
    pipe, weaker = tiny_pipeline(), tiny_pipeline()
    torch.manual_seed(8)
    for p in weaker.network.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    expert = copy.deepcopy(pipe.network)
    for p in expert.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    pipe.experts = {0: expert}
    kw = dict(seed=[2, 3], output_type="tensor")
    plain = pipe(["red apple"] * 2, **kw).images
    explicit = pipe(["red apple"] * 2, guide={0: pipe, 1: weaker, 2: weaker}, guide_weight=(1.0, 0.5, 0.5),
                    **kw).images
    pipe.config = dataclasses.replace(pipe.config, stage_guides={"0": "main", "1": "guide", "2": "guide"},
                                      defaults=dataclasses.replace(pipe.config.defaults, guide_weight=(1.0, 0.5, 0.5)))
    pipe.guide_model = weaker
    torch.testing.assert_close(pipe(["red apple"] * 2, **kw).images, explicit, rtol=0, atol=1e-5)
    torch.testing.assert_close(pipe(["red apple"] * 2, guide_weight=0.0, **kw).images, plain, rtol=0, atol=1e-5)
    expert_only = pipe(["red apple"] * 2, guide={0: pipe}, guide_weight=(1.0, 0.0, 0.0), **kw).images
    no_experts = pipe(["red apple"] * 2, experts={}, **kw).images  # "main" needs an expert to guide
    torch.testing.assert_close(no_experts, pipe(["red apple"] * 2, experts={}, guide={1: weaker, 2: weaker},
                                                guide_weight=(0.0, 0.5, 0.5), **kw).images, rtol=0, atol=1e-5)
    pipe.save_pretrained(tmp_path / "m")
    assert (tmp_path / "m" / "guide" / "config.json").is_file()
    loaded = TextToImagePipeline.from_pretrained(tmp_path / "m", text_encoder=HashEncoder())
    assert loaded.config.stage_guides == {"0": "main", "1": "guide", "2": "guide"}
    torch.testing.assert_close(loaded(["red apple"] * 2, **kw).images, explicit, rtol=0, atol=1e-5)
    # while a finetune is loaded at a scale other than 0 the guide network (which lacks it) is left out
    pipe.finetunes = [types.SimpleNamespace(scale=1.0)]
    assert pipe.own_guides({0: expert}, None) == ({0: pipe}, (1.0, 0.0, 0.0))
    pipe.finetunes = [types.SimpleNamespace(scale=0.0)]
    assert pipe.own_guides({0: expert}, None) == ({0: pipe, 1: weaker, 2: weaker}, (1.0, 0.5, 0.5))
    pipe.finetunes = []
    wrapped = pipe(["red apple"] * 2, denoiser_wrapper=lambda d: d, **kw).images
    torch.testing.assert_close(wrapped, plain, rtol=0, atol=1e-5)
    assert not torch.allclose(expert_only, plain, atol=1e-3)
    # the command line: --guide-weight overrides the model's default, 0 = off
    monkeypatch.setattr(TextToImagePipeline, "text_encoder", property(lambda self: HashEncoder()))
    for flag, expected in (([], explicit), (["--guide-weight", "0"], plain)):
        out = tmp_path / "img.png"
        assert cli_main(["generate", "red apple", "--model", str(tmp_path / "m"), "-o", str(out), "--seed", "2",
                         "--threads", "1", "--quiet"] + flag) == 0
        got = torch.from_numpy(np.array(Image.open(out))).permute(2, 0, 1).float()
        assert (got - ((expected[0] + 1) * 127.5).round()).abs().max() <= 1
    capsys.readouterr()
    for bad, message in (("-1", "finite and >= 0"), ("1,1", "1 or 3 values")):
        code = cli_main(["generate", "red apple", "--model", str(tmp_path / "m"), "-o", str(out),
                         "--guide-weight", bad])
        err = capsys.readouterr().err
        assert code != 0 and message in err and err.count("\n") == 1, err
    shutil.rmtree(tmp_path / "m" / "guide")
    with pytest.raises(EdifyError, match="no folder guide"):
        TextToImagePipeline.from_pretrained(tmp_path / "m")
    edit = json.loads((tmp_path / "m" / "config.json").read_text())
    edit["stage_guides"] = {"3": "main"}
    (tmp_path / "m" / "config.json").write_text(json.dumps(edit))
    with pytest.raises(EdifyError, match="stage keys in 0..2"):
        TextToImagePipeline.from_pretrained(tmp_path / "m")
    edit["stage_guides"] = {"0": "other"}
    (tmp_path / "m" / "config.json").write_text(json.dumps(edit))
    with pytest.raises(EdifyError, match="stage_guides"):
        TextToImagePipeline.from_pretrained(tmp_path / "m")


def test_style_guidance_acts_on_styled_images_only_and_defaults_to_the_model(tmp_path, monkeypatch):
    pipe = tiny_pipeline()
    kw = dict(seed=[4, 5], output_type="tensor")
    plain = pipe(["red apple"] * 2, style="noto", **kw).images
    assert torch.equal(pipe(["red apple"] * 2, style="noto", style_guidance=0.0, **kw).images, plain)
    styled = pipe(["red apple"] * 2, style="noto", style_guidance=2.0, **kw).images
    assert not torch.allclose(styled, plain)
    unstyled = pipe(["red apple"] * 2, **kw).images  # no style: the term has nothing to steer
    assert torch.equal(pipe(["red apple"] * 2, style_guidance=2.0, **kw).images, unstyled)
    mixed = pipe(["red apple"] * 2, style=["noto", None], style_guidance=2.0, **kw).images
    torch.testing.assert_close(mixed[:1], styled[:1], rtol=0, atol=1e-5)  # per image, whatever the batch
    torch.testing.assert_close(mixed[1:], unstyled[1:], rtol=0, atol=1e-5)
    with pytest.raises(EdifyError, match="style_guidance must be finite"):
        pipe("red apple", style_guidance=float("inf"))
    # the model's default, saved and read back; the CLI flag overrides it
    d = pipe.config.defaults
    pipe.config = dataclasses.replace(pipe.config, defaults=dataclasses.replace(d, style_guidance=2.0))
    assert torch.equal(pipe(["red apple"] * 2, style="noto", **kw).images, styled)
    pipe.save_pretrained(tmp_path / "m")
    assert TextToImagePipeline.from_pretrained(tmp_path / "m", text_encoder=HashEncoder()).config == pipe.config
    monkeypatch.setattr(TextToImagePipeline, "text_encoder", property(lambda self: HashEncoder()))
    for flag, expected in (([], styled), (["--style-guidance", "0"], plain)):
        out = tmp_path / f"img{len(flag)}.png"
        assert cli_main(["generate", "red apple", "--model", str(tmp_path / "m"), "-o", str(out), "--seed", "4",
                         "--style", "noto", "--threads", "1", "--quiet"] + flag) == 0
        got = torch.from_numpy(np.array(Image.open(out))).permute(2, 0, 1).float()
        assert (got - ((expected[0] + 1) * 127.5).round()).abs().max() <= 1  # another batch size: 1/255


@pytest.mark.parametrize("kwargs, message", [
    (dict(prompt=""), "non-empty"),
    (dict(prompt="apple", style="openmoji"), "known: noto, twemoji"),
    (dict(prompt="apple", height=40), "multiple of 32"),
    (dict(prompt="apple", num_steps=2), "num_steps"),
    (dict(prompt="apple", sampler="ddim"), "unknown sampler"),
    (dict(prompt=["a", "b"], seed=[1]), "one seed per image"),
])
def test_bad_inputs_raise_one_line(kwargs, message):
    pipe = tiny_pipeline()
    with pytest.raises(EdifyError, match=message) as info:
        pipe(**kwargs)
    assert "\n" not in str(info.value)


def test_image_to_image_starts_from_the_image_at_start_sigma():
    """The start state is Eq. 4-5 pooled to the stage of start_sigma, with the seed's noise; the
    schedule runs from start_sigma to 0 in num_steps; the image steers the result."""
    from edify.core.laplacian import down
    from edify.core.seeding import generators

    pipe = tiny_pipeline()
    img = torch.linspace(-1, 1, 3 * 32 * 32).view(1, 3, 32, 32)
    for start, stage in ((3.0, 1), (20.0, 2), (0.8, 0)):
        x, sigmas = pipe.start_state(img, start, 2, (32, 32), 6, 0.4, 0, None, generators([5, 6]))
        noise = torch.stack([torch.randn((3, 32 >> stage, 32 >> stage), generator=torch.Generator().manual_seed(s))
                             for s in (5, 6)])
        expected = pipe.process.apply_A(down(img, stage), start, stage) + start / 2**stage * noise
        assert x.shape == (2, 3, 32 >> stage, 32 >> stage)
        torch.testing.assert_close(x, expected)
        assert float(sigmas[0]) == start and float(sigmas[-1]) == 0 and len(sigmas) - 1 == 6
    a = pipe("red apple", style="noto", seed=1, image=img, start_sigma=3.0, output_type="tensor").images
    b = pipe("red apple", style="noto", seed=1, image=img, start_sigma=3.0, output_type="tensor").images
    c = pipe("red apple", style="noto", seed=1, image=-img, start_sigma=3.0, output_type="tensor").images
    plain = pipe("red apple", style="noto", seed=1, output_type="tensor").images
    assert a.shape == plain.shape and torch.equal(a, b)
    assert not torch.equal(a, c) and not torch.equal(a, plain)


@pytest.mark.parametrize("kwargs, message", [
    (dict(start_sigma=3.0), "needs an image"),
    (dict(image=torch.zeros(1, 3, 32, 32)), "needs start_sigma"),
    (dict(image=torch.zeros(1, 3, 32, 32), start_sigma=0.1), r"start_sigma must be in \(0.4, 80\]"),
    (dict(image=torch.zeros(1, 3, 32, 32), start_sigma=float("nan")), "start_sigma must be in"),
    (dict(image=torch.zeros(1, 3, 32, 32), start_sigma="x"), "start_sigma must be a number"),
    (dict(image=torch.zeros(1, 3, 64, 64), start_sigma=3.0), "the image is 64x64; this call makes 32x32"),
    (dict(image=torch.zeros(3, 3, 32, 32), start_sigma=3.0), "one image for all 1 images or one per image"),
    (dict(image=torch.zeros(1, 32, 32), start_sigma=3.0), "must be a PIL image or a float tensor"),
])
def test_bad_image_to_image_inputs_raise_one_line(kwargs, message):
    pipe = tiny_pipeline()
    kwargs = {"sigma_min": 0.4, **kwargs}
    with pytest.raises(EdifyError, match=message) as info:
        pipe("apple", **kwargs)
    assert "\n" not in str(info.value)


def test_bad_model_folders(tmp_path):
    with pytest.raises(EdifyError, match="no model folder"):
        TextToImagePipeline.from_pretrained(tmp_path / "nope")
    pipe = tiny_pipeline()
    pipe.save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(EdifyError, match="corrupt weights"):
        TextToImagePipeline.from_pretrained(tmp_path / "m")
    # weights of another config
    pipe.save_pretrained(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["network"]["widths"] = [32, 64]
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(EdifyError, match="do not match"):
        TextToImagePipeline.from_pretrained(tmp_path / "m")


def test_generate_cli_writes_pngs_and_fails_cleanly(tmp_path, monkeypatch, capsys):
    pipe = tiny_pipeline()
    pipe.save_pretrained(tmp_path / "m")
    monkeypatch.setattr(TextToImagePipeline, "text_encoder", property(lambda self: HashEncoder()))
    out = tmp_path / "img.png"
    code = cli_main(["generate", "red apple", "--model", str(tmp_path / "m"), "-o", str(out),
                     "--num", "2", "--steps", "3", "--style", "noto"])
    assert code == 0
    assert (tmp_path / "img-0.png").exists() and (tmp_path / "img-1.png").exists()
    capsys.readouterr()
    code = cli_main(["generate", "red apple", "--model", str(tmp_path / "m"), "-o", str(out),
                     "--style", "nope"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "unknown style 'nope'" in err
    code = cli_main(["generate", "apple", "--model", str(tmp_path / "missing")])
    assert code == 2 and "no model folder" in capsys.readouterr().err


def test_generate_cli_image_to_image(tmp_path, monkeypatch, capsys):
    """`edify generate --image --start-sigma` writes the pipeline's image-to-image result; bad use is one line."""
    pipe = tiny_pipeline()
    pipe.save_pretrained(tmp_path / "m")
    monkeypatch.setattr(TextToImagePipeline, "text_encoder", property(lambda self: HashEncoder()))
    src = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    src.save(tmp_path / "src.png")
    out = tmp_path / "img.png"
    base = ["generate", "red apple", "--model", str(tmp_path / "m"), "--style", "noto", "--seed", "2",
            "--sigma-min", "0.4", "--threads", "1", "--quiet"]
    assert cli_main(base + ["-o", str(out), "--image", str(tmp_path / "src.png"), "--start-sigma", "3"]) == 0
    expected = pipe("red apple", style="noto", seed=2, sigma_min=0.4, image=src, start_sigma=3.0,
                    output_type="tensor").images
    got = torch.from_numpy(np.array(Image.open(out))).permute(2, 0, 1).float()
    assert (got - ((expected[0] + 1) * 127.5).round()).abs().max() <= 1
    capsys.readouterr()
    for extra, message in ((["--image", str(tmp_path / "src.png")], "--image needs --start-sigma"),
                           (["--start-sigma", "3"], "--start-sigma needs --image"),
                           (["--image", str(tmp_path / "nope.png"), "--start-sigma", "3"], "does not exist"),
                           (["--image", str(tmp_path / "src.png"), "--start-sigma", "3", "--height", "64"],
                            "is 32x32 but --height/--width ask for 64x32"),
                           (["--image", str(tmp_path / "src.png"), "--start-sigma", "0.1"], "start_sigma must be in")):
        assert cli_main(base + ["-o", str(out)] + extra) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err


def test_package_exposes_the_pipeline(tmp_path):
    import edify

    assert edify.TextToImagePipeline is TextToImagePipeline
    tiny_pipeline().save_pretrained(tmp_path / "m")
    loaded = edify.TextToImagePipeline.from_pretrained(tmp_path / "m", text_encoder=HashEncoder()).to("cpu")
    assert loaded("red apple", style="noto", seed=0, num_steps=3).images[0].size == (32, 32)
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        edify.Nope


def test_shipped_demo_model_draws_the_prompt_colours():
    """The model the README's first command uses: it loads, and its images follow the prompt's colours."""
    from edify.pipelines.generate_cli import DEFAULT_MODEL

    pipe = TextToImagePipeline.from_pretrained(DEFAULT_MODEL)
    assert pipe.config.resolution == 64 and pipe.config.levels == 3
    prompts = ["red heart"] * 4 + ["grinning face"] * 4
    x = pipe(prompts, style="twemoji", seed=[0, 1, 2, 3] * 2, output_type="tensor").images
    assert x.shape == (8, 3, 64, 64)
    x = (x + 1) / 2
    fg = (x.amin(1, keepdim=True) < 0.85).float()  # the drawing, not the white background
    assert (fg.mean(dim=(1, 2, 3)) > 0.1).all()
    r, g, b = ((x * fg).sum(dim=(2, 3)) / fg.sum(dim=(2, 3))).unbind(1)  # mean colour of each drawing
    assert (r[:4] - g[:4]).mean() > 0.25  # red hearts: more red than green
    assert (torch.minimum(r[4:], g[4:]) - b[4:]).mean() > 0.25  # yellow faces: red and green over blue
