"""UpscalePipeline, `edify upscale`, `edify generate --upscale` and the upsampler's training (max_sigma,
crops, the upsample ControlNet), all on tiny random models."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from _training_helpers import WordHashEncoder, tiny_config
from edify.core.laplacian import down
from edify.errors import EdifyError
from edify.networks.controlnet import ControlNet
from edify.networks.presets import build_network
from edify.pipelines.text2image import PipelineConfig, SamplingDefaults, TextToImagePipeline
from edify.pipelines.upscale import UpscalePipeline
from edify.training.loop import Trainer
from test_cli import assert_one_line, edify, save_tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def save_tiny_upscaler(folder, resolution=64, train_size=0):
    """A tiny random 3-level upsampler: 64 px, input stages 32 px (2x) and 16 px (4x), max sigma 3."""
    torch.manual_seed(0)
    net = build_network("tiny")
    config = PipelineConfig(network=net.config.to_dict(), levels=3, switch_sigmas=(0.5, 1.0), resolution=resolution,
                            styles=("flat", "glossy"), max_sigma=3.0, train_size=train_size,
                            defaults=SamplingDefaults(num_steps=4, guidance_scale=2.0))
    TextToImagePipeline(net, config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def upscaler(tmp_path_factory):
    return save_tiny_upscaler(tmp_path_factory.mktemp("up") / "tiny-up")


@pytest.fixture(scope="module")
def pipe(upscaler):
    return UpscalePipeline.from_pretrained(upscaler, text_encoder=WordHashEncoder())


def low_res(side=16, batch=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, side, side, generator=g) * 2 - 1


def test_upscales_by_the_scale_and_pads_odd_sizes(pipe):
    assert pipe.scales == (2, 4) and pipe.default_entry(4) == 1.0 and pipe.default_entry(2) == 0.5
    out = pipe(low_res(16, 2), seed=[0, 1], output_type="tensor")
    assert out.images.shape == (2, 3, 64, 64) and out.tiles == 1 and out.entry_sigma == 1.0
    again = pipe(low_res(16, 2)[1:], seed=1, output_type="tensor")
    assert torch.allclose(again.images[0], out.images[1], atol=1e-5)  # per-sample seeds
    odd = pipe(torch.rand(1, 3, 10, 14) * 2 - 1, scale=2, seed=0, output_type="tensor")
    assert odd.images.shape == (1, 3, 20, 28)  # padded to the model's multiple, cropped back
    image = pipe(Image.new("RGB", (16, 16), (200, 30, 30)), "red heart", style="flat", seed=0).images[0]
    assert image.size == (64, 64)


def test_fresh_controlnet_changes_nothing_and_guidance_pulls_toward_the_input(pipe, upscaler):
    y = low_res(16)
    plain = pipe(y, seed=0, output_type="tensor").images
    controlled = UpscalePipeline.from_pretrained(upscaler, text_encoder=WordHashEncoder())
    controlled.add_controlnet(ControlNet.from_base(controlled.network, control_channels=3, kind="upsample"))
    assert torch.equal(controlled(y, seed=0, output_type="tensor").images, plain)  # zero-initialised: the base
    guided = controlled(y, seed=0, guidance_weight=1.0, output_type="tensor").images
    err = [float((down(x, 2) - y).square().mean()) for x in (plain, guided)]
    assert err[1] < 0.5 * err[0]
    with pytest.raises(EdifyError, match="not an upsample one"):
        controlled.controlnets.clear()
        controlled.add_controlnet(ControlNet.from_base(controlled.network, control_channels=1, kind="canny"))


def test_the_models_reconstruction_guidance_is_the_default_and_a_given_weight_wins(pipe, upscaler, tmp_path):
    y = low_res(16)
    folder = tmp_path / "guided-up"
    folder.mkdir()
    for f in upscaler.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    config = json.loads((folder / "config.json").read_text())
    config["defaults"]["reconstruction_guidance"] = 1.0
    (folder / "config.json").write_text(json.dumps(config))
    guided = UpscalePipeline.from_pretrained(folder, text_encoder=WordHashEncoder())
    assert guided.config.defaults.reconstruction_guidance == 1.0
    assert pipe.config.defaults.reconstruction_guidance == 0.0  # folders without the key: off
    by_default = guided(y, seed=0, output_type="tensor").images
    assert torch.equal(by_default, pipe(y, seed=0, guidance_weight=1.0, output_type="tensor").images)
    assert torch.equal(guided(y, seed=0, guidance_weight=0.0, output_type="tensor").images,
                       pipe(y, seed=0, output_type="tensor").images)
    config["defaults"]["reconstruction_guidance"] = float("nan")
    (folder / "config.json").write_text(json.dumps(config))  # NaN
    with pytest.raises(EdifyError, match="finite"):
        UpscalePipeline.from_pretrained(folder, text_encoder=WordHashEncoder())


def test_tiled_output_larger_than_the_training_size(upscaler, tmp_path):
    pipe = UpscalePipeline.from_pretrained(save_tiny_upscaler(tmp_path / "crop", train_size=32),
                                           text_encoder=WordHashEncoder())
    out = pipe(low_res(16), seed=0, guidance_weight=0.5, output_type="tensor")
    assert out.images.shape == (1, 3, 64, 64) and out.tiles == 9  # 32 px tiles, overlap 32 -> 3 x 3
    assert torch.isfinite(out.images).all()
    one = pipe(low_res(16), seed=0, tile=64, output_type="tensor")
    assert one.tiles == 1


def test_bad_inputs_of_the_pipeline(pipe, upscaler):
    for kwargs, match in (({"scale": 8}, "supports scale 2 or 4"), ({"entry_sigma": 0.7}, "outside the range"),
                          ({"entry_sigma": 3.5}, "outside the range"), ({"scale": 2, "entry_sigma": 1.0},
                                                                        "outside the range"),
                          ({"tile": 32, "overlap": 32}, "smaller than the tile"),
                          ({"guidance_weight": -1}, "weight must be finite")):
        with pytest.raises(EdifyError, match=match):
            pipe(low_res(16, 1), seed=0, **kwargs)
    with pytest.raises(EdifyError, match="is an upsampler"):  # it cannot start from noise
        TextToImagePipeline.from_pretrained(upscaler, text_encoder=WordHashEncoder())("red heart")


# ---- commands -----------------------------------------------------------------------------------

def write_png(path, side=16):
    arr = (np.random.default_rng(0).random((side, side, 3)) * 255).astype(np.uint8)
    Image.fromarray(arr).save(path)
    return path


def test_upscale_command_and_its_bad_input(upscaler, tmp_path):
    src = write_png(tmp_path / "in.png")
    result = edify("upscale", str(src), "-o", str(tmp_path / "out.png"), "--model", str(upscaler), "--quiet",
                   "--entry-sigma", "1.5", "--guidance-weight", "1")
    assert result.returncode == 0, result.stderr
    assert Image.open(tmp_path / "out.png").size == (64, 64) and "16x16 -> 64x64" in result.stdout
    (tmp_path / "text.png").write_text("not an image")
    cases = [(["text.png"], "not an image file"), (["in.png", "--scale", "8"], "supports scale 2 or 4"),
             (["in.png", "--scale", "3"], "power of 2"), (["in.png", "--entry-sigma", "0.2"], "outside the range"),
             (["in.png", "--tile", "32", "--overlap", "32"], "smaller than --tile"),
             (["in.png", "--tile", "48"], "multiple of 32")]
    for argv, fragment in cases:
        argv = [str(tmp_path / argv[0]), *argv[1:], "-o", str(tmp_path / "bad.png"), "--model", str(upscaler)]
        assert_one_line(edify("upscale", *argv), 2, fragment)
    assert not (tmp_path / "bad.png").exists()


def test_generate_with_upscale(upscaler, tmp_path):
    base = save_tiny_model(tmp_path / "base")  # 32 px -> 4x -> 128 px, in 64 px tiles
    out = tmp_path / "cascade.png"
    result = edify("generate", "red heart", "--model", str(base), "--upscale", str(upscaler), "-o", str(out),
                   "--steps", "3", "--quiet")
    assert result.returncode == 0, result.stderr
    assert Image.open(out).size == (128, 128)


def test_a_missing_default_upscaler_says_how_to_train_one(tmp_path, monkeypatch, capsys):
    from edify import assets
    from edify.cli import main

    base = save_tiny_model(tmp_path / "base")
    monkeypatch.setattr(assets, "shipped_path", lambda name: tmp_path / "weights" / name)  # none shipped
    out = tmp_path / "cascade.png"
    assert main(["generate", "red heart", "--model", str(base), "--upscale", "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "emoji-up-256" in err and "missing" in err and "edify train" in err, err
    assert not out.exists()


# ---- training -----------------------------------------------------------------------------------

def test_upsampler_training_on_crops_below_max_sigma(tmp_path):
    config = tiny_config(resolution=64, levels=3, switch_sigmas=(0.5, 1.0), max_sigma=3.0, crop=32,
                         stage_sampling="round_robin")
    t = Trainer(config, tmp_path / "run", text_encoder=WordHashEncoder())
    assert t.stages == (0, 1, 2) and t.loss_fn.max_sigma == 3.0
    for stage in (0, 1, 2):
        sigma = t.loss_fn.sample_sigma(4096, stage)
        assert float(sigma.max()) <= 3.0 + 1e-5
    assert t.stream.next().image.shape[-2:] == (32, 32)
    result = t.run(max_steps=3)
    assert all(np.isfinite(result.losses))
    from edify.training.export import export_pipeline

    folder = export_pipeline(tmp_path / "run", tmp_path / "export")
    saved = json.loads((folder / "config.json").read_text())
    assert saved["max_sigma"] == 3.0 and saved["train_size"] == 32
    pipe = UpscalePipeline.from_pretrained(folder, text_encoder=WordHashEncoder())
    assert pipe(low_res(16), seed=0, output_type="tensor").tiles == 9
    for bad, match in (({"max_sigma": -1.0}, "max_sigma must be >= 0"), ({"crop": 128}, "crop must be in")):
        with pytest.raises(EdifyError, match=match):
            tiny_config(**bad)


def test_upsample_controlnet_trains_on_the_upsampler(upscaler, tmp_path):
    from edify.data.controls import make_control
    from edify.training.controlnet import make_trainer

    images = low_res(64, 2)
    control, target = make_control("upsample", images)
    assert torch.equal(target, images) and control.shape == images.shape
    assert torch.allclose(down(control, 2), down(images, 2), atol=1e-6)  # the 4x-pooled input, lossless
    config = tiny_config(resolution=64, levels=3, switch_sigmas=(0.5, 1.0), crop=32)
    t = make_trainer(config, upscaler, tmp_path / "cn", "upsample", text_encoder=WordHashEncoder())
    assert t.config.max_sigma == 3.0 and t.stages == (0, 1, 2)
    assert all(np.isfinite(t.run(max_steps=2).losses))


def test_the_shipped_upsample_controlnet_fits_the_shipped_upsampler():
    """weights/controlnet-up-256 was trained on weights/emoji-up-256: same network fingerprint, an
    upsample control of 3 channels; the upsampler turns reconstruction guidance on by default."""
    from edify.assets import source_model_path
    from edify.networks.controlnet import base_fingerprint
    from edify.networks.unet import UNetConfig

    up, cn = source_model_path("emoji-up-256"), source_model_path("controlnet-up-256")
    if not (up / "config.json").is_file() or not (cn / "config.json").is_file():
        pytest.skip("the shipped upsampler folders are not in this checkout")
    up_config = PipelineConfig.from_dict(json.loads((up / "config.json").read_text()))
    cn_config = json.loads((cn / "config.json").read_text())
    assert cn_config["kind"] == "upsample" and cn_config["control_channels"] == 3
    assert cn_config["base_fingerprint"] == base_fingerprint(UNetConfig.from_dict(up_config.network))
    assert up_config.defaults.reconstruction_guidance == 1.0
