"""ControlNetPipeline, InpaintPipeline, the RePaint baseline and `edify control` / `edify inpaint`,
with tiny random models (32 px, three stages) and ControlNets whose zero-initialised layers hold
random weights, as after training."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from edify.conditioning import Cond
from edify.core.laplacian import down
from edify.core.precond import EDMPrecond
from edify.core.repaint import RePaintDenoiser
from edify.core.samplers import SAMPLERS, initial_state
from edify.core.schedules import laplacian_sigmas
from edify.core.seeding import generators
from edify.data.annotators import canny_edges
from edify.errors import EdifyError
from edify.networks.controlnet import ControlNet
from edify.networks.presets import get_config
from edify.networks.unet import UNet
from edify.pipelines.control import ControlNetPipeline, InpaintPipeline, image_tensor
from edify.pipelines.text2image import TextToImagePipeline
from test_cli import assert_one_line, edify, save_tiny_model
from test_controlnet import trained_like
from test_pipeline import HashEncoder, tiny_pipeline

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def trained_controlnet(base: UNet, channels: int, kind: str, seed: int) -> ControlNet:
    """A ControlNet copied from `base` whose zero-initialised layers hold random weights."""
    return trained_like(ControlNet.from_base(base, control_channels=channels, hint_widths=(8,), kind=kind), seed)


def controlled(pipe: TextToImagePipeline, *nets: ControlNet, cls=ControlNetPipeline):
    return cls(pipe.network, pipe.config, HashEncoder(), controlnets=nets)


def picture(seed: int = 0, size: tuple[int, int] = (32, 32)) -> Image.Image:
    """A random 8-bit RGB image with a few flat boxes (so that Canny finds edges)."""
    rng = np.random.default_rng(seed)
    arr = np.full((*size, 3), 255, np.uint8)
    for _ in range(4):
        y, x = rng.integers(0, size[0] - 8), rng.integers(0, size[1] - 8)
        arr[y:y + rng.integers(4, 12), x:x + rng.integers(4, 12)] = rng.integers(0, 256, 3)
    return Image.fromarray(arr)


def box_mask(size=(32, 32), box=(8, 8, 20, 24)) -> Image.Image:
    arr = np.zeros(size, np.uint8)
    arr[box[0]:box[2], box[1]:box[3]] = 255
    return Image.fromarray(arr)


def one_line(err: pytest.ExceptionInfo) -> str:
    assert "\n" not in str(err.value)
    return str(err.value)


# ---- controlled text-to-image ----------------------------------------------------------------------

def test_weight_zero_is_the_text_to_image_output_bit_for_bit():
    plain = tiny_pipeline()
    net = trained_controlnet(plain.network, 1, "canny", seed=3)
    pipe = controlled(plain, net)
    edges = canny_edges(image_tensor(picture()))
    kwargs = dict(seed=[5, 9], num_images_per_prompt=2, output_type="tensor", style="noto")
    for sampler in ("dpmpp_2m", "heun"):
        ref = plain("red apple", sampler=sampler, **kwargs)
        off = pipe("red apple", control_image=edges, control_weight=0.0, sampler=sampler, **kwargs)
        assert torch.equal(off.images, ref.images) and off.nfe == ref.nfe and off.seeds == [5, 9]
        on = pipe("red apple", control_image=edges, control_weight=1.0, sampler=sampler, **kwargs)
        assert not torch.equal(on.images, ref.images)
    # a sigma range no step reaches is no control either
    off = pipe("red apple", control_image=edges, control_start=1e-4, control_end=1e-5, **kwargs)
    assert torch.equal(off.images, plain("red apple", **kwargs).images)


def test_a_controlled_call_reaches_the_experts_unless_told_not_to():
    import copy

    plain = tiny_pipeline()
    net = trained_controlnet(plain.network, 1, "canny", seed=3)
    pipe = controlled(plain, net)
    edges = canny_edges(image_tensor(picture()))
    kwargs = dict(control_image=edges, seed=[5, 9], num_images_per_prompt=2, output_type="tensor", style="noto")
    main_only = pipe("red apple", **kwargs).images
    # an expert identical to the main network: the ControlNet's residuals enter it the same way
    pipe.experts = {0: copy.deepcopy(plain.network)}
    assert torch.equal(pipe("red apple", **kwargs).images, main_only)  # default: the model's experts
    assert torch.equal(pipe("red apple", experts={}, **kwargs).images, main_only)
    with torch.no_grad():
        for p in pipe.experts[0].parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    routed = pipe("red apple", **kwargs).images
    assert not torch.equal(routed, main_only)
    assert torch.equal(pipe("red apple", experts={}, **kwargs).images, main_only)
    # at weight 0 the controlled call with experts is text-to-image with them, bit for bit
    off = pipe("red apple", control_weight=0.0, **kwargs).images
    plain.experts = pipe.experts
    del kwargs["control_image"]
    assert torch.equal(off, plain("red apple", **kwargs).images)


def perturbed_copy(network, seed: int = 1):
    """A copy of `network` with every weight moved a little: an expert that differs from it."""
    import copy

    expert = copy.deepcopy(network)
    with torch.no_grad():
        for p in expert.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)))
    return expert


def test_a_controlnets_measured_experts_default_picks_the_main_network(tmp_path):
    plain = tiny_pipeline()
    plain.save_pretrained(tmp_path / "base")
    net = trained_controlnet(plain.network, 1, "canny", seed=3)
    net.defaults = {"experts": False}
    net.save_pretrained(tmp_path / "canny")
    assert json.loads((tmp_path / "canny" / "config.json").read_text())["defaults"] == {"experts": False}
    pipe = ControlNetPipeline.from_pretrained(tmp_path / "base", controlnets=[tmp_path / "canny"],
                                              text_encoder=HashEncoder())
    assert pipe.controlnets[0].defaults == {"experts": False} and pipe.control_experts() == {}
    pipe.experts = {0: perturbed_copy(plain.network)}
    edges = canny_edges(image_tensor(picture()))
    kwargs = dict(control_image=edges, seed=[5, 9], num_images_per_prompt=2, output_type="tensor", style="noto")
    main_only = pipe("red apple", experts={}, **kwargs).images
    assert torch.equal(pipe("red apple", **kwargs).images, main_only)  # the ControlNet's default
    assert torch.equal(pipe("red apple", experts=False, **kwargs).images, main_only)
    routed = pipe("red apple", experts=True, **kwargs).images  # the caller's word wins
    assert not torch.equal(routed, main_only)
    assert torch.equal(routed, pipe("red apple", experts=pipe.experts, **kwargs).images)
    # plain text-to-image with the same pipeline still runs the experts
    t2i = dict(seed=2, output_type="tensor")
    assert torch.equal(TextToImagePipeline.__call__(pipe, "red apple", **t2i).images,
                       TextToImagePipeline.__call__(pipe, "red apple", experts=True, **t2i).images)
    # with several ControlNets one "false" is enough; "true" or no entry leaves the experts on
    other = trained_controlnet(plain.network, 1, "depth", seed=4)
    assert controlled(plain, pipe.controlnets[0], other).control_experts() == {}
    net.defaults = {"experts": True}
    assert controlled(plain, net, other).control_experts() is None
    for bad in ({"experts": 1}, {"experts": "false"}, {"experts": None}):
        assert "defaults.experts must be true or false" in refused_defaults(tmp_path / "canny", bad)


def test_an_inpainting_controlnets_experts_default_holds_and_repaint_keeps_the_experts():
    plain = tiny_pipeline()
    net = trained_controlnet(plain.network, 7, "inpaint", seed=6)
    net.defaults = {"experts": False}
    pipe = controlled(plain, net, cls=InpaintPipeline)
    pipe.experts = {0: perturbed_copy(plain.network)}
    x0 = image_tensor(picture(2))
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., 8:24, 8:24] = 1
    kwargs = dict(image=x0, mask=mask, seed=3, output_type="tensor", style="noto")
    main_only = pipe("red apple", experts={}, **kwargs).images
    assert torch.equal(pipe("red apple", **kwargs).images, main_only)
    assert not torch.equal(pipe("red apple", experts=True, **kwargs).images, main_only)
    # without the ControlNet (RePaint) nothing says otherwise: the model's experts
    repaint = pipe("red apple", method="repaint", **kwargs).images
    assert torch.equal(repaint, pipe("red apple", method="repaint", experts=True, **kwargs).images)
    assert not torch.equal(repaint, pipe("red apple", method="repaint", experts={}, **kwargs).images)


def test_several_controlnets_one_weight_each():
    plain = tiny_pipeline()
    a = trained_controlnet(plain.network, 1, "canny", seed=3)
    b = trained_controlnet(plain.network, 1, "depth", seed=4)
    edges = canny_edges(image_tensor(picture()))
    depth = Image.fromarray(np.tile(np.arange(32, dtype=np.uint8)[:, None] * 8, (1, 32)))  # a PIL map
    kwargs = dict(seed=1, output_type="tensor")
    both = controlled(plain, a, b)
    only_a = controlled(plain, a)("red apple", control_image=edges, control_weight=0.7, **kwargs)
    same = both("red apple", control_image=[edges, depth], control_weight=[0.7, 0.0], **kwargs)
    assert torch.equal(same.images, only_a.images)
    mixed = both("red apple", control_image=[edges, depth], control_weight=[0.7, 0.5], **kwargs)
    assert not torch.equal(mixed.images, only_a.images) and mixed.images.shape == (1, 3, 32, 32)
    with pytest.raises(EdifyError) as err:
        both("red apple", control_image=[edges], **kwargs)
    assert "one image per ControlNet (2), got 1" in one_line(err)
    with pytest.raises(EdifyError) as err:
        both("red apple", control_image=[edges, depth], control_start=1.0, control_end=2.0, **kwargs)
    assert "start >= end" in one_line(err)
    with pytest.raises(EdifyError) as err:
        both("red apple", control_image=[edges[..., :16], depth], **kwargs)
    assert "is 32x16 but the image is 32x32" in one_line(err)


def test_from_pretrained_loads_controlnets_and_refuses_another_base(tmp_path):
    plain = tiny_pipeline()
    plain.save_pretrained(tmp_path / "base")
    trained_controlnet(plain.network, 1, "canny", seed=3).save_pretrained(tmp_path / "canny")
    other = UNet(dataclasses.replace(get_config("tiny"), widths=(16, 48)))
    ControlNet.from_base(other, control_channels=1, hint_widths=(8,), kind="canny").save_pretrained(tmp_path / "other")
    pipe = ControlNetPipeline.from_pretrained(tmp_path / "base", controlnets=[tmp_path / "canny"],
                                              text_encoder=HashEncoder())
    assert len(pipe.controlnets) == 1 and pipe.controlnets[0].config.kind == "canny"
    with pytest.raises(EdifyError) as err:
        ControlNetPipeline.from_pretrained(tmp_path / "base", controlnets=[tmp_path / "other"])
    assert "made for another base network" in one_line(err)


def refused_defaults(folder: Path, bad) -> str:
    """The one-line error of loading the ControlNet `folder` with `bad` as its config's defaults."""
    config = json.loads((folder / "config.json").read_text())
    config["defaults"] = bad
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(EdifyError) as err:
        ControlNet.from_pretrained(folder)
    return one_line(err)


def test_a_controlnets_measured_guidance_is_the_default_and_a_given_one_wins(tmp_path):
    plain = tiny_pipeline()
    plain.save_pretrained(tmp_path / "base")
    net = trained_controlnet(plain.network, 1, "canny", seed=3)
    net.defaults = {"guidance_scale": 1.5}
    net.save_pretrained(tmp_path / "canny")
    assert json.loads((tmp_path / "canny" / "config.json").read_text())["defaults"] == {"guidance_scale": 1.5}
    pipe = ControlNetPipeline.from_pretrained(tmp_path / "base", controlnets=[tmp_path / "canny"],
                                              text_encoder=HashEncoder())
    assert pipe.controlnets[0].defaults == {"guidance_scale": 1.5} and pipe.control_guidance() == 1.5
    assert plain.config.defaults.guidance_scale != 1.5
    edges = canny_edges(image_tensor(picture()))
    kwargs = dict(control_image=edges, seed=2, output_type="tensor")
    assert torch.equal(pipe("red apple", **kwargs).images, pipe("red apple", guidance_scale=1.5, **kwargs).images)
    assert not torch.equal(pipe("red apple", **kwargs).images,
                           pipe("red apple", guidance_scale=plain.config.defaults.guidance_scale, **kwargs).images)
    other = trained_controlnet(plain.network, 1, "depth", seed=4)  # one ControlNet without a default: the base's
    assert controlled(plain, pipe.controlnets[0], other).control_guidance() is None
    other.defaults = {"guidance_scale": 1.2}
    assert controlled(plain, pipe.controlnets[0], other).control_guidance() == 1.2  # the smallest
    for bad in ({"guidance_scale": -1}, {"guidance_scale": "3"}, {"steps": 3}, [3], {"sigma_min": 0},
                {"sigma_min": float("nan")}, {"sigma_min": True}):
        assert "defaults" in refused_defaults(tmp_path / "canny", bad)


def test_a_controlnets_measured_schedule_end_is_the_default_and_a_given_one_wins(tmp_path):
    plain = tiny_pipeline()
    plain.save_pretrained(tmp_path / "base")
    net = trained_controlnet(plain.network, 1, "canny", seed=3)
    end = plain.config.defaults.sigma_min * 40
    net.defaults = {"guidance_scale": 1.5, "sigma_min": end}
    net.save_pretrained(tmp_path / "canny")
    pipe = ControlNetPipeline.from_pretrained(tmp_path / "base", controlnets=[tmp_path / "canny"],
                                              text_encoder=HashEncoder())
    assert pipe.control_sigma_min() == end
    edges = canny_edges(image_tensor(picture()))
    kwargs = dict(control_image=edges, seed=2, output_type="tensor")
    default = pipe("red apple", **kwargs).images
    assert torch.equal(default, pipe("red apple", sigma_min=end, **kwargs).images)
    assert not torch.equal(default, pipe("red apple", sigma_min=plain.config.defaults.sigma_min, **kwargs).images)
    # the text-to-image pipeline takes the same argument; without controls the model's default holds
    assert torch.equal(TextToImagePipeline.__call__(pipe, "red apple", seed=2, output_type="tensor").images,
                       plain("red apple", seed=2, output_type="tensor").images)
    other = trained_controlnet(plain.network, 1, "depth", seed=4)
    assert controlled(plain, pipe.controlnets[0], other).control_sigma_min() is None
    other.defaults = {"sigma_min": end / 2}
    assert controlled(plain, pipe.controlnets[0], other).control_sigma_min() == end  # the largest
    for bad in (0.0, -1.0, float("inf"), plain.config.defaults.sigma_max):
        with pytest.raises(EdifyError) as err:
            pipe("red apple", sigma_min=bad, **kwargs)
        assert "sigma_min must be" in one_line(err)


# ---- inpainting ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def inpaint_pipe():
    plain = tiny_pipeline()
    return controlled(plain, trained_controlnet(plain.network, 7, "inpaint", seed=6), cls=InpaintPipeline)


@pytest.mark.parametrize("task", ["inpaint", "replace"])
@pytest.mark.parametrize("method", ["controlnet", "repaint", "controlnet+repaint"])
def test_inpainting_keeps_the_known_pixels_exactly(inpaint_pipe, task, method):
    image, mask = picture(1), box_mask()
    out = inpaint_pipe("green apple", image=image, mask=mask, task=task, method=method, seed=[2, 3],
                       num_images_per_prompt=2)
    known = np.asarray(mask) == 0
    for generated in out.images:
        assert generated.size == (32, 32)
        assert np.array_equal(np.asarray(generated)[known], np.asarray(image)[known])
        assert not np.array_equal(np.asarray(generated)[~known], np.asarray(image)[~known])
    assert out.nfe == inpaint_pipe.config.defaults.num_steps  # dpmpp_2m: one evaluation per step, both methods


def test_shrink_reaches_controlled_and_inpainted_images_and_keeps_the_known_pixels(inpaint_pipe):
    from edify.core.thresholding import shrink_finest_band

    image, mask = picture(1), box_mask()
    kw = dict(image=image, mask=mask, seed=[2, 3], num_images_per_prompt=2, output_type="tensor")
    plain = inpaint_pipe("green apple", method="controlnet", feather_px=0, **kw).images
    shrunk = inpaint_pipe("green apple", method="controlnet", feather_px=0, shrink=4, **kw).images
    known = torch.from_numpy(np.asarray(mask) == 0)
    assert torch.equal(shrunk[..., known], plain[..., known])  # pasted back after the shrink
    assert not torch.equal(shrunk[..., ~known], plain[..., ~known])
    # a ControlNet call hands shrink to the sampling call: the same sample, post-processed
    controls = dict(control_image=canny_edges(image_tensor(picture())), seed=[5], output_type="tensor")
    pipe = controlled(tiny_pipeline(), trained_controlnet(inpaint_pipe.network, 1, "canny", seed=3))
    assert torch.equal(pipe("red apple", shrink=3, **controls).images,
                       shrink_finest_band(pipe("red apple", **controls).images, 3).clamp(-1, 1))


def test_outpainting_grows_the_canvas_and_keeps_the_image(inpaint_pipe):
    image = picture(2)
    for method in ("controlnet", "repaint"):
        out = inpaint_pipe("green apple", image=image, task="outpaint", pad=(16, 0, 16, 0), method=method, seed=0)
        (generated,) = out.images
        assert generated.size == (64, 32)
        assert np.array_equal(np.asarray(generated)[:, 16:48], np.asarray(image))


def test_controlnet_and_repaint_differ_and_weight_zero_is_plain_sampling_plus_paste(inpaint_pipe):
    image, mask = picture(1), box_mask()
    a = inpaint_pipe("green apple", image=image, mask=mask, method="controlnet", seed=4, output_type="tensor")
    b = inpaint_pipe("green apple", image=image, mask=mask, method="repaint", seed=4, output_type="tensor")
    assert a.nfe == b.nfe and not torch.equal(a.images, b.images)
    off = inpaint_pipe("green apple", image=image, mask=mask, method="controlnet", control_weight=0.0, seed=4,
                       output_type="tensor", feather_px=0)
    plain = TextToImagePipeline.__call__(inpaint_pipe, "green apple", seed=4, output_type="tensor").images
    unknown = torch.from_numpy(np.asarray(mask) > 0)  # there: the text-to-image pixels bit for bit
    assert torch.equal(off.images[0][:, unknown], plain[0][:, unknown])


def test_controlnet_plus_repaint_is_the_replacement_around_the_controlled_denoiser(inpaint_pipe):
    image, mask = picture(1), box_mask()
    run = partial(inpaint_pipe, "green apple", image=image, mask=mask, seed=4, output_type="tensor")
    both, cn, rp = (run(method=m) for m in ("controlnet+repaint", "controlnet", "repaint"))
    assert both.nfe == cn.nfe == rp.nfe
    assert not torch.equal(both.images, cn.images) and not torch.equal(both.images, rp.images)
    # at control weight 0 the controlled denoiser is the base itself: the result is RePaint's, bit for bit
    assert torch.equal(run(method="controlnet+repaint", control_weight=0.0).images, rp.images)


@pytest.mark.parametrize("kwargs, message", [
    (dict(mask=Image.new("L", (32, 32), 0)), "empty (no unknown pixel)"),
    (dict(mask=Image.new("L", (32, 32), 255)), "full (no known pixel)"),
    (dict(mask=Image.new("L", (16, 32), 255)), "mask is 32x16 but the image is 32x32"),
    (dict(mask=box_mask(), method="nope"), "unknown inpainting method 'nope'"),
    (dict(mask=box_mask(), task="nope"), "unknown inpainting task 'nope'"),
    (dict(), "needs a mask"),
    (dict(mask=box_mask(), task="inpaint", pad=(8, 0, 8, 0)), "pad extends the image for task 'outpaint'"),
    (dict(task="outpaint", pad=(8, 0, 0, 0)), "the image plus pad is 32x40; this model needs sides that are multiples"),
])
def test_bad_inpainting_inputs_are_one_line(inpaint_pipe, kwargs, message):
    with pytest.raises(EdifyError) as err:
        inpaint_pipe("green apple", image=picture(), **kwargs)
    assert message in one_line(err)


def test_inpainting_needs_an_inpainting_controlnet():
    plain = tiny_pipeline()
    with pytest.raises(EdifyError) as err:
        controlled(plain, trained_controlnet(plain.network, 1, "canny", seed=3), cls=InpaintPipeline)
    assert "not an inpainting one" in one_line(err)
    pipe = controlled(plain, cls=InpaintPipeline)
    with pytest.raises(EdifyError) as err:
        pipe("green apple", image=picture(), mask=box_mask())
    assert "method 'repaint' needs none" in one_line(err)
    assert pipe("green apple", image=picture(), mask=box_mask(), method="repaint").images[0].size == (32, 32)


# ---- the RePaint denoiser -------------------------------------------------------------------------

@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m"])
def test_repaint_keeps_the_known_pixels_on_their_forward_marginal(sampler):
    """Left half known (whole 4x4 blocks, so every band's support is known): within a stage the
    state there is A(sigma) x0 + sigma e with the same e at every step, and the result is x0."""
    pipe = tiny_pipeline()
    process, d = pipe.process, pipe.config.defaults
    x0 = image_tensor(picture(3))
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., 16:] = 1
    denoiser = RePaintDenoiser(EDMPrecond(pipe.network), x0, mask)
    sigmas = laplacian_sigmas(process, (6, 3, 3), d.sigma_min, d.sigma_max, d.rho, d.ramp_weight)
    gens = generators([0])
    x = initial_state(process, d.sigma_max, (1, 3, 32, 32), gens)
    noise: dict[int, list[torch.Tensor]] = {}

    def record(info):
        j, s = info["stage"], info["sigma_next"]
        if s > 0:
            x0_j = down(x0, j)
            e = (info["x"] - process.apply_A(x0_j, s, j)) / s
            noise.setdefault(j, []).append(e[..., : e.shape[-1] // 2])

    cond = pipe.encode(["red apple"], [None])
    out = SAMPLERS[sampler](denoiser, x, sigmas, process, cond, gens, record)
    for j, es in noise.items():
        for e in es[1:]:
            torch.testing.assert_close(e, es[0], rtol=0, atol=1e-4)
    assert len(noise) == 3
    torch.testing.assert_close(out[..., :16], x0[..., :16], rtol=0, atol=1e-5)
    assert not torch.allclose(out[..., 16:], x0[..., 16:], atol=0.1)


def test_repaint_doubles_its_image_for_guidance_and_checks_sizes():
    pipe = tiny_pipeline()
    x0, mask = torch.zeros(1, 3, 32, 32), torch.ones(1, 1, 32, 32)
    mask[..., :8] = 0
    rp = RePaintDenoiser(EDMPrecond(pipe.network), x0, mask)
    cond = pipe.encode(["a", "b"], [None, None])
    D = rp(torch.randn(4, 3, 16, 16), torch.full((4,), 2.0), Cond.cat([cond, cond]), 1)
    assert D.shape == (4, 3, 16, 16) and torch.equal(D[..., :4], torch.zeros(4, 3, 16, 4))
    with pytest.raises(EdifyError) as err:
        rp(torch.randn(1, 3, 8, 8), 1.0, None, 1)
    assert "a stage-1 state of 8x8 needs 16x16" in one_line(err)


# ---- the commands -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """A tiny saved model, canny and inpaint ControlNets for it, one for another base, images, masks."""
    root = tmp_path_factory.mktemp("control")
    model = save_tiny_model(root / "model")
    base = TextToImagePipeline.from_pretrained(model).network
    trained_controlnet(base, 1, "canny", seed=3).save_pretrained(root / "canny")
    trained_controlnet(base, 7, "inpaint", seed=6).save_pretrained(root / "inpaint")
    other = UNet(dataclasses.replace(get_config("tiny"), widths=(16, 48)))
    ControlNet.from_base(other, control_channels=1, hint_widths=(8,), kind="canny").save_pretrained(root / "other")
    picture(4).save(root / "in.png")
    picture(4, (64, 64)).save(root / "big.png")
    box_mask().save(root / "mask.png")
    box_mask((16, 16), (2, 2, 8, 8)).save(root / "small-mask.png")
    Image.new("L", (32, 32), 0).save(root / "empty.png")
    Image.new("L", (32, 32), 255).save(root / "full.png")
    (root / "notes.png").write_text("not an image")
    return {p.stem: p for p in root.iterdir()} | {"root": root}


def test_control_command_uses_the_experts_unless_told_not_to(files, tmp_path):
    import copy

    pipe = TextToImagePipeline.from_pretrained(files["model"])
    expert = copy.deepcopy(pipe.network)
    with torch.no_grad():
        for p in expert.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    pipe.experts = {0: expert}
    pipe.save_pretrained(tmp_path / "with-expert")
    out = {}
    for name, model, extra in (("plain", files["model"], []), ("expert", tmp_path / "with-expert", []),
                               ("main", tmp_path / "with-expert", ["--no-experts"])):
        result = edify("control", "--type", "canny", "--image", str(files["in"]), "red apple", "--model", str(model),
                       "--controlnet", str(files["canny"]), "-o", str(tmp_path / f"{name}.png"), "--steps", "3",
                       "--style", "noto", *extra)
        assert result.returncode == 0, result.stderr
        out[name] = np.asarray(Image.open(tmp_path / f"{name}.png"))
    assert np.array_equal(out["main"], out["plain"]) and not np.array_equal(out["expert"], out["plain"])
    # `edify generate` takes the same option
    for name, model, extra in (("g-plain", files["model"], []), ("g-expert", tmp_path / "with-expert", []),
                               ("g-main", tmp_path / "with-expert", ["--no-experts"])):
        result = edify("generate", "red apple", "--model", str(model), "-o", str(tmp_path / f"{name}.png"),
                       "--steps", "3", "--style", "noto", *extra)
        assert result.returncode == 0, result.stderr
        out[name] = np.asarray(Image.open(tmp_path / f"{name}.png"))
    assert np.array_equal(out["g-main"], out["g-plain"]) and not np.array_equal(out["g-expert"], out["g-plain"])


def test_inpaint_command_follows_the_controlnets_experts_default(files, tmp_path):
    pipe = TextToImagePipeline.from_pretrained(files["model"])
    pipe.experts = {0: perturbed_copy(pipe.network)}
    pipe.save_pretrained(tmp_path / "with-expert")
    net = ControlNet.from_pretrained(files["inpaint"])
    net.defaults = {"experts": False}
    net.save_pretrained(tmp_path / "inpaint-main")
    out = {}
    for name, extra in (("default", []), ("main", ["--no-experts"]), ("expert", ["--experts"])):
        result = edify("inpaint", "--image", str(files["in"]), "--mask", str(files["mask"]), "green apple",
                       "--model", str(tmp_path / "with-expert"), "--controlnet", str(tmp_path / "inpaint-main"),
                       "-o", str(tmp_path / f"{name}.png"), "--steps", "3", "--style", "noto", *extra)
        assert result.returncode == 0, result.stderr
        out[name] = np.asarray(Image.open(tmp_path / f"{name}.png"))
    assert np.array_equal(out["default"], out["main"]) and not np.array_equal(out["expert"], out["main"])
    result = edify("inpaint", "--image", str(files["in"]), "--mask", str(files["mask"]), "green apple",
                   "--model", str(tmp_path / "with-expert"), "--controlnet", str(tmp_path / "inpaint-main"),
                   "-o", str(tmp_path / "both.png"), "--experts", "--no-experts")
    assert_one_line(result, 2, "--experts", "--no-experts")


def test_control_command_writes_images_and_the_edge_map(files, tmp_path):
    result = edify("control", "--type", "canny", "--image", str(files["big"]), "--resize", "red apple", "--model",
                   str(files["model"]), "--controlnet", str(files["canny"]), "-o", str(tmp_path / "a.png"),
                   "--num", "2", "--control-weight", "0.5", "--steps", "3", "--style", "noto")
    assert result.returncode == 0, result.stderr
    assert f"resized image {files['big']} from 64x64 to 32x32" in result.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-0.png", "a-1.png"]
    assert all(Image.open(tmp_path / f"a-{i}.png").size == (32, 32) for i in range(2))
    result = edify("control", "--type", "canny", "--image", str(files["big"]), "--annotate-only",
                   "-o", str(tmp_path / "edges.png"))
    assert result.returncode == 0, result.stderr
    edges = np.asarray(Image.open(tmp_path / "edges.png"))
    want = canny_edges(image_tensor(Image.open(files["big"])))[0, 0].numpy() > 0
    assert edges.shape == (64, 64) and edges.any() and np.array_equal(edges == 255, want)


def test_inpaint_command_keeps_the_known_pixels(files, tmp_path):
    result = edify("inpaint", "--image", str(files["in"]), "--mask", str(files["mask"]), "green apple", "--model",
                   str(files["model"]), "--controlnet", str(files["inpaint"]), "-o", str(tmp_path / "a.png"),
                   "--shrink", "3")  # the finest band shrunk before the known pixels are pasted back
    assert result.returncode == 0, result.stderr
    known = np.asarray(Image.open(files["mask"])) == 0
    out = np.asarray(Image.open(tmp_path / "a.png"))
    assert out.shape == (32, 32, 3) and np.array_equal(out[known], np.asarray(Image.open(files["in"]))[known])
    result = edify("inpaint", "--image", str(files["in"]), "--task", "outpaint", "--pad", "0,16,0,16", "green apple",
                   "--model", str(files["model"]), "--method", "repaint", "-o", str(tmp_path / "b.png"))
    assert result.returncode == 0, result.stderr
    out = np.asarray(Image.open(tmp_path / "b.png"))
    assert out.shape == (64, 32, 3) and np.array_equal(out[16:48], np.asarray(Image.open(files["in"])))


BAD = [
    (["control", "--type", "sobel", "--image", "{in}", "x"], ["unknown control type 'sobel'", "canny"]),
    (["control", "--type", "canny", "--image", "{big}", "x", "--controlnet", "{canny}"],
     ["is 64x64 but 32x32 is needed", "--resize"]),
    (["control", "--type", "canny", "--image", "{in}", "x", "--controlnet", "{other}"],
     ["made for another base network"]),
    (["control", "--type", "canny", "--image", "{notes}", "x"], ["is not an image file"]),
    (["control", "--type", "softedge", "--image", "{in}", "x", "--annotator", "{root}/missing"],
     ["HED folder does not exist"]),
    (["control", "--type", "softedge", "--image", "{in}", "x", "--annotator", "{canny}"],
     ["not 'edify-hed'"]),
    (["control", "--type", "depth", "--image", "{in}", "x", "--controlnet", "{canny}"], ["--annotator FOLDER"]),
    (["inpaint", "--image", "{in}", "--mask", "{small-mask}", "x"], ["is 16x16 but 32x32 is needed", "--resize"]),
    (["inpaint", "--image", "{in}", "--mask", "{empty}", "x"], ["empty (no unknown pixel)"]),
    (["inpaint", "--image", "{in}", "--mask", "{full}", "x"], ["full (no known pixel)"]),
    (["inpaint", "--image", "{in}", "--mask", "{notes}", "x"], ["mask", "is not an image file"]),
    (["inpaint", "--image", "{in}", "--mask", "{mask}", "x", "--controlnet", "{canny}"], ["not an inpainting one"]),
    (["inpaint", "--image", "{in}", "--pad", "1,2", "--task", "outpaint", "x"], ["--pad must be four integers"]),
]


@pytest.mark.parametrize("args, fragments", BAD, ids=[" ".join(a[:1] + f[:1]) for a, f in BAD])
def test_bad_input_is_one_line_and_writes_nothing(files, tmp_path, args, fragments):
    names = {k: str(v) for k, v in files.items()}
    args = [a.format(**names) for a in args]
    assert_one_line(edify(*args, "--model", str(files["model"]), "-o", str(tmp_path / "o.png")), 2, *fragments)
    assert not list(tmp_path.iterdir())


def test_a_missing_default_controlnet_says_how_to_train_one(files, tmp_path, monkeypatch, capsys):
    from edify import assets
    from edify.cli import main

    monkeypatch.setattr(assets, "shipped_path", lambda name: tmp_path / "weights" / name)  # none shipped
    out = tmp_path / "out"
    out.mkdir()
    for args in (["control", "--type", "canny"], ["inpaint", "--mask", str(files["mask"])]):
        assert main([*args, "--image", str(files["in"]), "x", "--model", str(files["model"]),
                     "-o", str(out / "o.png")]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "edify train-controlnet" in err and "--controlnet FOLDER" in err, err
    assert not list(out.iterdir())


HELP_WITHOUT_TORCH = """
import sys
from edify.cli import main
assert main(sys.argv[1:] + ["--help"]) == 0
assert "torch" not in sys.modules, "imported torch"
"""


@pytest.mark.parametrize("command", ["control", "inpaint"])
def test_help_does_not_import_torch(command):
    result = subprocess.run([sys.executable, "-c", HELP_WITHOUT_TORCH, command], capture_output=True, text=True,
                            cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert ("--annotate-only" in result.stdout) == (command == "control")
    assert ("--method" in result.stdout) == (command == "inpaint")
