"""ControlNets (section 5): the network, the controlled denoiser, files, guidance and training.

Tiny networks and 32 px images (three stages: 32, 16, 8 px); the training test uses a stand-in for
`edify.data.controls.make_control` (a blurred grey image as the control)."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from _training_helpers import WordHashEncoder, tiny_config
from edify.cli import main as edify_main
from edify.conditioning import Cond
from edify.core.control import Control, ControlledDenoiser
from edify.core.guidance import CFGDenoiser
from edify.core.laplacian import down
from edify.core.precond import EDMPrecond
from edify.errors import EdifyError
from edify.networks.controlnet import ControlNet, load_controlnet_config, residual_shapes, stage_control
from edify.networks.presets import build_network, get_config
from edify.networks.unet import UNet
from edify.pipelines.text2image import PipelineConfig, TextToImagePipeline
from edify.training.controlnet import export_controlnet, make_trainer, read_run_file

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def base_net(seed: int = 0) -> UNet:
    torch.manual_seed(seed)
    return build_network("tiny").eval()


def trained_like(net: ControlNet, seed: int) -> ControlNet:
    """A ControlNet whose zero-initialised layers hold random weights, as after training."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in [*net.zero_convs, net.zero_mid, net.hint.out]:
            for p in module.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return net.eval()


def inputs(batch: int = 2, side: int = 32, stage: int = 0, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, side >> stage, side >> stage, generator=g)
    control = torch.rand(batch, 1, side, side, generator=g)
    cond = Cond(text=torch.randn(batch, 5, 384, generator=g), text_mask=torch.ones(batch, 5, dtype=torch.bool),
                media=torch.tensor([0, 1] * (batch // 2) + [0] * (batch % 2)))
    return x, control, cond


def one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text
    return text


# ---- the network ---------------------------------------------------------------------------------

def test_zero_initialised_controlnet_leaves_the_base_unchanged():
    base = base_net()
    net = ControlNet.from_base(base, control_channels=1, hint_widths=(8,))
    x, control, cond = inputs()
    precond = EDMPrecond(base)
    for stage in (0, 1, 2):
        x_s = down(x, stage)
        sigma = torch.full((2,), 0.7)
        controlled = ControlledDenoiser(precond, [Control(net, control)])(x_s, sigma, cond, stage)
        assert torch.equal(controlled, precond(x_s, sigma, cond, stage))
    # the copy starts as the base's encoder
    base_state = base.state_dict()
    for k, v in net.state_dict().items():
        if k.split(".", 1)[0] not in ("hint", "zero_convs", "zero_mid"):
            assert torch.equal(v, base_state[k]), k


def test_the_copy_of_a_pooled_condition_base_computes_the_bases_encoder_features():
    torch.manual_seed(0)
    base = build_network(dataclasses.replace(get_config("tiny"), pooled_cond=True)).eval()
    with torch.no_grad():
        base.cond_embed.to_emb.weight.normal_(0, 0.1)  # as after training
    net = ControlNet.from_base(base, control_channels=1, hint_widths=(8,)).eval()
    with torch.no_grad():  # identity projections: the residuals are the copy's features themselves
        for conv in [*net.zero_convs, net.zero_mid]:
            conv.weight.copy_(torch.eye(conv.weight.shape[0])[:, :, None, None])
    x, control, cond = inputs()
    c_noise, stage = torch.tensor([0.2, -0.5]), torch.zeros(2, dtype=torch.long)
    with torch.no_grad():
        residuals = net(x, c_noise, cond, stage, control)
        emb = base.embed(c_noise, stage)
        ctx, mask = base.cond_embed(cond, 2, x.device)
        emb = emb + base.cond_embed.pooled(ctx, mask)
        h, skips = base.encode(x, emb, ctx, mask)
        h = base.mid_res2(base.mid_attn(base.mid_res1(h, emb), ctx, mask), emb)
    for got, want in zip(residuals, [*skips, h]):
        torch.testing.assert_close(got, want)


def test_residual_shapes_fit_every_stage_and_are_the_unets_skips():
    base = base_net()
    net = trained_like(ControlNet.from_base(base, control_channels=1, hint_widths=(8, 8)), 3)
    control = torch.rand(2, 1, 32, 32)  # full resolution at every stage
    for stage, side in ((0, 32), (1, 16), (2, 8)):
        x, _, cond = inputs(side=side)
        stage_t = torch.full((2,), stage)
        r = net(x, torch.zeros(2), cond, stage_t, control=control)
        _, skips = base.encode(x, base.embed(torch.zeros(2), stage_t), *base.cond_embed(cond, 2, x.device))
        assert [tuple(t.shape[1:]) for t in r[:-1]] == [tuple(s.shape[1:]) for s in skips]
        assert [tuple(t.shape[1:]) for t in r] == residual_shapes(net, side, side)
        out = base(x, torch.zeros(2), cond, stage_t, residuals=r)  # the U-Net takes them as they are
        assert out.shape == x.shape and torch.isfinite(out).all()
    with pytest.raises(EdifyError) as err:
        net(x, torch.zeros(2), cond, stage_t, control=torch.rand(2, 1, 12, 12))
    assert "the control image must be [2, 1, 8 2^j, 8 2^j]" in one_line(err)
    with pytest.raises(EdifyError) as err:  # a 16x16 control on an 8x8 state is stage 1, not 2
        net(x, torch.zeros(2), cond, stage_t, control=torch.rand(2, 1, 16, 16))
    assert "is at stage 1, but stage is [2]" in one_line(err)


def test_every_stage_sees_every_control_pixel():
    """S_j is a permutation (space-to-depth), each stage has its own input conv, and a change of the
    control that leaves its stage-j pooling down^j unchanged still changes the stage-j residuals."""
    control = torch.rand(2, 7, 32, 32)
    for j in (0, 1, 2):
        z = stage_control(control, j)
        assert z.shape == (2, 7 * 4**j, 32 >> j, 32 >> j)
        assert torch.equal(torch.sort(z.flatten()).values, torch.sort(control.flatten()).values)
        assert torch.equal(F.pixel_shuffle(z, 2**j), control)
    base = base_net()
    net = trained_like(ControlNet.from_base(base, control_channels=1, hint_widths=(8,)), 3)
    assert net.hint.inputs.channels == (16, 64, 256)  # 16 Haar bands x 4^j Cc
    x, _, cond = inputs(side=8)
    control = torch.rand(2, 1, 32, 32)
    wiggle = torch.zeros_like(control)
    wiggle[:, :, 0, 0], wiggle[:, :, 0, 1] = 0.5, -0.5  # inside one 4x4 block: its mean stays
    assert torch.equal(down(control + wiggle, 2), down(control, 2))
    stage_t = torch.full((2,), 2)
    r = net(x, torch.zeros(2), cond, stage_t, control=control)
    r_w = net(x, torch.zeros(2), cond, stage_t, control=control + wiggle)
    assert not torch.allclose(r[0], r_w[0], atol=1e-4)


def test_a_controlnet_for_another_base_config_is_refused():
    net = ControlNet.from_base(base_net(), control_channels=1, hint_widths=(8,))
    other = UNet(dataclasses.replace(get_config("tiny"), widths=(16, 48)))
    with pytest.raises(EdifyError) as err:
        ControlledDenoiser(EDMPrecond(other), [Control(net, torch.zeros(1, 1, 32, 32))])
    assert "made for another base network" in one_line(err)
    with pytest.raises(EdifyError):
        ControlNet.from_base(other, net.config)
    # a base of the same config with other weights (finetuned) is accepted
    ControlledDenoiser(EDMPrecond(base_net(seed=5)), [Control(net, torch.zeros(1, 1, 32, 32))])


# ---- the controlled denoiser ---------------------------------------------------------------------

def controls_and_base():
    base = base_net()
    nets = [trained_like(ControlNet.from_base(base, control_channels=1, hint_widths=(8,)), s) for s in (3, 4)]
    return EDMPrecond(base), nets


def test_several_controlnets_sum_their_weighted_residuals_at_every_stage():
    precond, (a, b) = controls_and_base()
    x, control, cond = inputs(seed=2)
    control_b = torch.rand(1, 1, 32, 32)  # batch 1 broadcasts
    for stage in (0, 1, 2):
        x_s, sigma = down(x, stage), torch.full((2,), 0.3)
        got = ControlledDenoiser(precond, [Control(a, control, 0.7), Control(b, control_b, -0.4)])(
            x_s, sigma, cond, stage)
        stage_t = torch.full((2,), stage)
        c_in = 1 / (sigma**2 + 0.25).sqrt()
        c_noise = sigma.log() / 4
        x_in = c_in[:, None, None, None] * x_s
        ra = a(x_in, c_noise, cond, stage_t, control=control)  # full resolution at every stage
        rb = b(x_in, c_noise, cond, stage_t, control=control_b.expand(2, -1, -1, -1))
        F_x = precond.net(x_in, c_noise, cond, stage_t, residuals=[0.7 * u - 0.4 * v for u, v in zip(ra, rb)])
        c_skip, c_out = 0.25 / (sigma**2 + 0.25), sigma * 0.5 / (sigma**2 + 0.25).sqrt()
        expect = c_skip[:, None, None, None] * x_s + c_out[:, None, None, None] * F_x
        assert torch.allclose(got, expect, atol=1e-5)
        assert not torch.allclose(got, precond(x_s, sigma, cond, stage), atol=1e-4)


def test_weight_zero_or_inactive_range_is_the_base_bit_for_bit():
    precond, (a, b) = controls_and_base()
    x, control, cond = inputs(seed=3)
    stage = 1
    x_s = down(x, stage)
    sigma_px = torch.full((2,), 1.5)  # full-res sigma 3.0
    base = precond(x_s, sigma_px, cond, stage)
    for controls in ([Control(a, control, 0.0)], [Control(a, control, 1.0, sigma_max=2.9)],
                     [Control(a, control, 1.0, sigma_min=3.1), Control(b, control, 0.0)]):
        assert torch.equal(ControlledDenoiser(precond, controls)(x_s, sigma_px, cond, stage), base)
    inside = ControlledDenoiser(precond, [Control(a, control, 1.0, sigma_min=3.0, sigma_max=3.0)])
    assert not torch.allclose(inside(x_s, sigma_px, cond, stage), base, atol=1e-4)
    # per sample: the row outside the range is the base's bit for bit, the other is controlled
    mixed = torch.tensor([1.5, 0.5])
    out = ControlledDenoiser(precond, [Control(a, control, 1.0, sigma_min=2.0)])(x_s, mixed, cond, stage)
    ref = precond(x_s, mixed, cond, stage)
    assert torch.equal(out[1], ref[1]) and not torch.allclose(out[0], ref[0], atol=1e-4)


def test_classifier_free_guidance_doubles_the_control_for_both_branches():
    precond, (a, _) = controls_and_base()
    x, control, cond = inputs(seed=4)
    controlled = ControlledDenoiser(precond, [Control(a, control, 1.0)])
    sigma = torch.full((2,), 0.8)
    guided = CFGDenoiser(controlled, 2.5, drop=("text", "media"))(x, sigma, cond, 0)
    D_c = controlled(x, sigma, cond, 0)
    D_u = controlled(x, sigma, cond.drop(("text", "media")), 0)  # the unconditional branch keeps the control
    assert torch.allclose(guided, D_u + 2.5 * (D_c - D_u), atol=1e-5)
    with pytest.raises(EdifyError) as err:
        ControlledDenoiser(precond, [Control(a, torch.rand(3, 1, 32, 32))])(x, sigma, cond, 0)
    assert "control image batch must be 1 or divide the batch 2" in one_line(err)
    with pytest.raises(EdifyError) as err:
        controlled(x[:, :, :16, :16], sigma, cond, 0)
    assert "the control image is 32x32" in one_line(err)


# ---- files ---------------------------------------------------------------------------------------

def test_save_and_load_round_trip(tmp_path):
    base = base_net()
    net = trained_like(ControlNet.from_base(base, control_channels=1, hint_widths=(8,), kind="depth"), 6)
    net.save_pretrained(tmp_path / "cn")
    config = json.loads((tmp_path / "cn" / "config.json").read_text())
    assert config["format"] == "edify-controlnet" and config["version"] == 2 and config["kind"] == "depth"
    assert sorted(p.name for p in (tmp_path / "cn").iterdir()) == ["config.json", "model.safetensors"]
    loaded = ControlNet.from_pretrained(tmp_path / "cn", base=base.config).eval()
    x, control, cond = inputs(seed=5)
    args = (x, torch.zeros(2), cond, torch.zeros(2, dtype=torch.long))
    for u, v in zip(net(*args, control=control), loaded(*args, control=control)):
        assert torch.equal(u, v)
    assert load_controlnet_config(tmp_path / "cn") == net.config
    with pytest.raises(EdifyError) as err:  # another base
        ControlNet.from_pretrained(tmp_path / "cn", base=get_config("emoji-64"))
    assert "made for another base network" in one_line(err)
    config["network"]["emb_dim"] = 64  # an edited base config no longer matches its fingerprint
    (tmp_path / "cn" / "config.json").write_text(json.dumps(config))
    with pytest.raises(EdifyError) as err:
        ControlNet.from_pretrained(tmp_path / "cn")
    assert "the config was edited" in one_line(err)


def test_a_controlnet_of_the_pooled_format_is_refused(tmp_path):
    """Format 1 (no "version"; the hint read the control pooled to each stage) is refused in one line."""
    net = ControlNet.from_base(base_net(), control_channels=1, hint_widths=(8,))
    net.save_pretrained(tmp_path / "cn")
    config = json.loads((tmp_path / "cn" / "config.json").read_text())
    for old in ({k: v for k, v in config.items() if k != "version"}, {**config, "version": 1}):
        (tmp_path / "cn" / "config.json").write_text(json.dumps(old))
        with pytest.raises(EdifyError) as err:
            ControlNet.from_pretrained(tmp_path / "cn")
        assert "ControlNet format version 1 is not readable" in one_line(err)
    run = tmp_path / "run"  # a training run of format 1 cannot be resumed or exported either
    run.mkdir()
    (run / "controlnet.json").write_text(json.dumps({"kind": "canny", "base": "b", "controlnet": net.config.to_dict()}))
    with pytest.raises(EdifyError) as err:
        read_run_file(run)
    assert "ControlNet format version 1 is not readable" in one_line(err)


# ---- training ------------------------------------------------------------------------------------

def blurred_grey(kind, images, masks, generator):
    """Stand-in for edify.data.controls.make_control: a blurred grey image, the images as targets."""
    grey = images.mean(1, keepdim=True)
    noise = torch.randn(grey.shape, generator=generator) * 0.01
    return F.avg_pool2d(grey, 3, stride=1, padding=1) + noise, images


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    net = build_network("tiny")
    config = PipelineConfig(network=net.config.to_dict(), levels=2, switch_sigmas=(2.0,), resolution=16,
                            styles=("flat", "glossy"))
    folder = tmp_path_factory.mktemp("base") / "tiny"
    TextToImagePipeline(net, config).save_pretrained(folder)
    return folder


def trainer(base_folder, out, **changes):
    return make_trainer(tiny_config(**changes), base_folder, out, "canny", resume=True, make_control=blurred_grey,
                        hint_widths=(8,), text_encoder=WordHashEncoder())


def test_training_resumes_exactly_and_keeps_the_base_frozen(base_folder, tmp_path):
    straight = trainer(base_folder, tmp_path / "a")
    assert not any(p.requires_grad for p in straight.base.parameters())
    base_before = {k: v.clone() for k, v in straight.base.state_dict().items()}
    losses = straight.run(max_steps=4).losses
    assert len(losses) == 4 and all(0 < x < 10 for x in losses)
    assert all(torch.equal(v, straight.base.state_dict()[k]) for k, v in base_before.items())
    assert any(p.abs().sum() > 0 for p in straight.net.zero_convs.parameters())  # the ControlNet trained
    first = trainer(base_folder, tmp_path / "b").run(max_steps=2)
    resumed_trainer = trainer(base_folder, tmp_path / "b")
    assert resumed_trainer.stream.state_dict()["control_batches"] == 2
    resumed = resumed_trainer.run(max_steps=2)
    assert first.losses + resumed.losses == losses  # bit-identical
    for u, v in zip(straight.model.state_dict().values(), resumed_trainer.model.state_dict().values()):
        assert torch.equal(u, v)
    assert read_run_file(tmp_path / "b")["kind"] == "canny"
    out = export_controlnet(tmp_path / "b", tmp_path / "exported")
    loaded = ControlNet.from_pretrained(out, base=straight.base.config)
    ema = resumed_trainer.ema.state_dict(resumed_trainer.model)
    assert all(torch.equal(v, ema[k]) for k, v in loaded.state_dict().items())
    half = ControlNet.from_pretrained(export_controlnet(tmp_path / "b", tmp_path / "bf16", dtype=torch.bfloat16),
                                      base=straight.base.config)
    assert all(torch.equal(v, ema[k].to(torch.bfloat16).float()) for k, v in half.state_dict().items())
    with pytest.raises(EdifyError) as err:  # another ControlNet in the same run folder
        make_trainer(tiny_config(), base_folder, tmp_path / "b", "canny", resume=True, make_control=blurred_grey,
                     hint_widths=(16,), text_encoder=WordHashEncoder())
    assert "trains another ControlNet" in one_line(err)


def test_a_run_warm_starts_from_an_exported_controlnet_of_the_same_config(base_folder, tmp_path):
    first = trainer(base_folder, tmp_path / "a")
    first.run(max_steps=2)
    exported = export_controlnet(tmp_path / "a", tmp_path / "exported")
    saved = ControlNet.from_pretrained(exported).state_dict()
    warm = trainer(base_folder, tmp_path / "warm", init_from=str(exported))
    assert warm.state.images == 0  # counts, optimizer and data start afresh
    assert all(torch.equal(v, saved[k]) for k, v in warm.net.state_dict().items())
    ema = warm.ema.state_dict(warm.model)
    assert all(torch.equal(v, saved[k]) for k, v in ema.items())
    assert len(warm.run(max_steps=1).losses) == 1
    resumed = trainer(base_folder, tmp_path / "warm", init_from=str(exported))  # the checkpoint wins
    assert resumed.state.images > 0
    assert not all(torch.equal(v, saved[k]) for k, v in resumed.net.state_dict().items())
    with pytest.raises(EdifyError) as err:  # a ControlNet of other hint widths
        make_trainer(tiny_config(init_from=str(exported)), base_folder, tmp_path / "other", "canny", resume=True,
                     make_control=blurred_grey, hint_widths=(16,), text_encoder=WordHashEncoder())
    assert "another config" in one_line(err)


def test_a_controlnet_warm_starts_onto_a_base_that_grew(base_folder, tmp_path):
    first = trainer(base_folder, tmp_path / "a")
    first.run(max_steps=2)
    exported = export_controlnet(tmp_path / "a", tmp_path / "exported")
    saved = ControlNet.from_pretrained(exported).state_dict()
    old = TextToImagePipeline.from_pretrained(base_folder, text_encoder=WordHashEncoder())
    torch.manual_seed(1)
    grown_cfg = dataclasses.replace(old.network.config, cross_attention_levels=(0, 1), pooled_cond=True)
    grown = build_network(grown_cfg)
    state = grown.state_dict()
    state.update(old.network.state_dict())
    grown.load_state_dict(state)
    grown_folder = tmp_path / "grown-base"
    TextToImagePipeline(grown, old.config.__class__(**{**old.config.__dict__, "network": grown_cfg.to_dict()})
                        ).save_pretrained(grown_folder)
    warm = trainer(grown_folder, tmp_path / "warm", init_from=str(exported))
    mine, base_state = warm.net.state_dict(), warm.base.state_dict()
    added = set(mine) - set(saved)
    assert "cond_embed.to_emb.weight" in added and any(k.startswith("down.0.attn.") for k in added)
    assert all(torch.equal(mine[k], v) for k, v in saved.items())  # the trained ControlNet is kept
    assert all(torch.equal(mine[k], base_state[k]) for k in added)  # what grew starts as the new base's
    assert len(warm.run(max_steps=1).losses) == 1
    with pytest.raises(EdifyError) as err:  # the grown ControlNet onto the smaller base: refused
        trainer(base_folder, tmp_path / "shrink", init_from=str(export_controlnet(tmp_path / "warm", tmp_path / "g")))
    assert "does not grow" in one_line(err)


def test_training_with_the_real_inpainting_controls(base_folder, tmp_path):
    pytest.importorskip("edify.data.controls")
    t = make_trainer(tiny_config(), base_folder, tmp_path / "inpaint", "inpaint", hint_widths=(8,),
                     text_encoder=WordHashEncoder())
    from edify.data.controls import control_channels

    assert t.net.config.control_channels == control_channels("inpaint") and t.net.config.kind == "inpaint"
    losses = t.run(max_steps=2).losses
    assert len(losses) == 2 and all(0 < x < 10 for x in losses)


def test_the_command_gives_one_line_errors(tmp_path, capsys):
    code = edify_main(["train-controlnet", "--base", str(tmp_path / "none"), "--control", "canny",
                       "--out", str(tmp_path / "run"), "--data", "synthetic:8"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "no model folder" in err
    code = edify_main(["train-controlnet", "--base", "x", "--control", "sketch", "--out", "y"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "invalid choice: 'sketch'" in err


def test_help_does_not_import_torch():
    script = ("import sys\nfrom edify.cli import main\ncode = main(['train-controlnet', '--help'])\n"
              "assert code == 0 and 'torch' not in sys.modules\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert "--control {canny,softedge,depth,inpaint,upsample}" in " ".join(result.stdout.split())
