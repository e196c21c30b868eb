"""Tests of the Haar-domain U-Net (section 3.1): Haar transform, buckets, conditioning, config, errors."""

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F

from edify.buckets import BUCKETS, bucket_shape
from edify.conditioning import Cond
from edify.errors import EdifyError
from edify.networks.embedders import PositionEncoding
from edify.networks.layers import HaarDWT, HaarIDWT, haar_basis_2d
from edify.networks.presets import PRESETS, build_network, count_parameters
from edify.networks.unet import UNetConfig


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return build_network("tiny").eval()


def make_cond(b, length=5, seed=0, text_dim=384):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(b, length, dtype=torch.bool)
    mask[:, -2:] = False  # right padding
    return Cond(text=torch.randn(b, length, text_dim, generator=g), text_mask=mask,
                media=torch.arange(b) % 4, pitch=torch.arange(b) % 3, dof=torch.arange(b) % 2)


def run(net, x, cond=None, stage=None, c_noise=None):
    c_noise = torch.full((x.shape[0],), 0.3) if c_noise is None else c_noise
    with torch.no_grad():
        return net(x, c_noise, cond, stage)


# -- Haar transform -------------------------------------------------------------------------------

def test_haar_basis_is_orthonormal():
    basis = haar_basis_2d().reshape(16, 16)
    torch.testing.assert_close(basis @ basis.T, torch.eye(16, dtype=torch.float64), rtol=0, atol=1e-12)


def test_haar_round_trip_and_energy():
    torch.manual_seed(1)
    x = torch.randn(2, 3, 32, 48)
    y = HaarDWT(3)(x)
    assert y.shape == (2, 48, 8, 12)
    assert (HaarIDWT(3)(y) - x).abs().max() < 1e-6
    # Orthonormal: energy (sum of squares) is preserved per sample.
    torch.testing.assert_close(y.pow(2).sum((1, 2, 3)), x.pow(2).sum((1, 2, 3)), rtol=1e-5, atol=0)


def test_haar_lowest_band_is_scaled_block_mean():
    torch.manual_seed(2)
    x = torch.randn(1, 3, 16, 16)
    y = HaarDWT(3)(x)
    # Basis image 0 is 1/4 on the 4x4 block, so its coefficient is sum/4 = 4 * mean.
    torch.testing.assert_close(y[:, ::16], 4 * F.avg_pool2d(x, 4), rtol=1e-5, atol=1e-6)
    # A constant image has no detail coefficients.
    y_const = HaarDWT(3)(torch.full((1, 3, 8, 8), 0.7))
    assert y_const[:, [k for k in range(48) if k % 16]].abs().max() < 1e-6


@pytest.mark.parametrize("shape", [(1, 3, 30, 32), (1, 3, 32, 18)])
def test_haar_rejects_sides_not_multiple_of_4(shape):
    bad = shape[2] if shape[2] % 4 else shape[3]
    with pytest.raises(EdifyError, match=f"multiple of 4.*got {bad}"):
        HaarDWT(3)(torch.zeros(shape))


# -- U-Net shapes and gradients ---------------------------------------------------------------------

@pytest.mark.parametrize("bucket", list(BUCKETS))
def test_forward_backward_on_every_bucket(bucket):
    torch.manual_seed(3)
    model = build_network("tiny").train()
    h, w = bucket_shape(bucket, 64, model.config.size_multiple)
    x = torch.randn(2, 3, h, w)
    out = model(x, torch.randn(2), make_cond(2), torch.tensor([0, 2]))
    assert out.shape == x.shape
    out.pow(2).mean().backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is None or torch.isfinite(g).all() for g in grads.values())
    # Every block takes part: the stem, the position encoding, attention and the text projection learn.
    for name in ("stem.weight", "pos.weight", "cond_embed.text_proj.weight", "mid_attn.cross_attn.kv.weight",
                 "head.weight", "embed.stage.weight"):
        assert grads[name] is not None and grads[name].abs().sum() > 0, name


def test_lower_laplacian_stage_sizes(net):
    # One network serves the 16 / 32 / 64 px stages of a 64 px model.
    for side in (16, 32, 64):
        x = torch.randn(1, 3, side, side)
        assert run(net, x, make_cond(1), torch.tensor([0])).shape == x.shape


def test_batch_independence(net):
    torch.manual_seed(4)
    x = torch.randn(2, 3, 32, 32)
    cond = make_cond(2)
    both = run(net, x, cond, torch.tensor([1, 1]), torch.tensor([0.1, -0.5]))
    one = run(net, x[1:], cond.index(slice(1, 2)), torch.tensor([1]), torch.tensor([-0.5]))
    torch.testing.assert_close(both[1:], one, rtol=1e-4, atol=1e-5)


def test_bf16_autocast_matches_fp32(net):
    torch.manual_seed(7)
    x = torch.randn(2, 3, 32, 32)
    ref = run(net, x, make_cond(2), torch.tensor([0, 1]))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = run(net, x, make_cond(2), torch.tensor([0, 1]))
    assert low.shape == ref.shape and torch.isfinite(low).all()
    assert (low.float() - ref).abs().max() < 0.05 * ref.abs().max()


def test_activation_checkpointing_gives_the_same_gradients():
    torch.manual_seed(8)
    plain = build_network("tiny").train()
    ckpt = build_network(UNetConfig.from_dict({**plain.config.to_dict(), "checkpointing": True})).train()
    ckpt.load_state_dict(plain.state_dict())
    x, c = torch.randn(2, 3, 32, 32), torch.randn(2)
    for model in (plain, ckpt):
        model(x, c, make_cond(2)).pow(2).mean().backward()
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)


# -- position encoding ------------------------------------------------------------------------------

def test_position_encoding_identity_at_reference_and_smooth_elsewhere():
    pos = PositionEncoding(4, 16)
    assert torch.equal(pos(16, 16), pos.weight)
    with torch.no_grad():
        pos.weight.fill_(0.25)
    # Bicubic resizing of a constant field is that constant (partition of unity).
    torch.testing.assert_close(pos(12, 21), torch.full((1, 4, 12, 21), 0.25))


def test_position_encoding_cache_follows_parameter_updates():
    pos = PositionEncoding(2, 8)
    with torch.no_grad():
        first = pos(6, 10)
        assert pos(6, 10) is first  # cached at inference
        pos.weight.add_(1.0)  # an optimizer step bumps the version
        second = pos(6, 10)
    torch.testing.assert_close(second, first + 1.0)
    assert pos(6, 10).requires_grad  # training path is never cached


# -- conditioning ----------------------------------------------------------------------------------

def test_null_conditions_agree_and_are_finite(net):
    torch.manual_seed(5)
    x = torch.randn(2, 3, 32, 32)
    out_none = run(net, x, None)
    out_empty = run(net, x, Cond())
    null = make_cond(2).drop(["text", "media", "pitch", "dof"], torch.ones(2, dtype=torch.bool))
    assert not null.text_mask.any()
    out_null = run(net, x, null)
    assert torch.isfinite(out_none).all()
    torch.testing.assert_close(out_none, out_empty)
    # Masked text tokens contribute nothing, so a null prompt equals no text at all.
    torch.testing.assert_close(out_null, out_none, rtol=1e-4, atol=1e-5)


def test_each_condition_field_changes_the_output(net):
    torch.manual_seed(6)
    x = torch.randn(2, 3, 32, 32)
    cond = make_cond(2, seed=1)
    base = run(net, x, cond)
    variants = {
        "text": Cond(text=cond.text.flip(0), text_mask=cond.text_mask, media=cond.media, pitch=cond.pitch, dof=cond.dof),
        "media": Cond(text=cond.text, text_mask=cond.text_mask, media=cond.media + 1, pitch=cond.pitch, dof=cond.dof),
        "pitch": cond.drop(["pitch"]),
        "dof": cond.drop(["dof"]),
    }
    for name, other in variants.items():
        assert (run(net, x, other) - base).abs().max() > 1e-4, name


def test_masked_text_tokens_are_ignored(net):
    x = torch.randn(1, 3, 32, 32)
    cond = make_cond(1)
    text = cond.text.clone()
    text[:, ~cond.text_mask[0]] = 100.0  # change only padded positions
    other = Cond(text=text, text_mask=cond.text_mask, media=cond.media, pitch=cond.pitch, dof=cond.dof)
    torch.testing.assert_close(run(net, x, other), run(net, x, cond), rtol=1e-4, atol=1e-5)


def test_stage_and_noise_embeddings_change_the_output(net):
    x = torch.randn(2, 3, 32, 32)
    base = run(net, x, None, torch.tensor([0, 0]))
    assert (run(net, x, None, torch.tensor([2, 2])) - base).abs().max() > 1e-4
    torch.testing.assert_close(run(net, x, None, None), base)  # stage None means stage 0
    assert (run(net, x, None, c_noise=torch.full((2,), -1.0)) - base).abs().max() > 1e-4


def test_controlnet_residuals(net):
    x = torch.randn(1, 3, 32, 32)
    c = torch.zeros(1)
    with torch.no_grad():
        _, skips = net.encode(x, net.embed(c, torch.zeros(1, dtype=torch.long)), *net.cond_embed(None, 1, x.device))
        assert [s.shape[1] for s in skips] == list(net.skip_channels)
        zeros = [torch.zeros_like(s) for s in skips] + [torch.zeros_like(skips[-1])]
        torch.testing.assert_close(net(x, c, residuals=zeros), net(x, c))
        bumped = zeros[:-2] + [torch.ones_like(skips[-1]), zeros[-1]]
        assert (net(x, c, residuals=bumped) - net(x, c)).abs().max() > 1e-4
        with pytest.raises(EdifyError, match=f"{len(skips) + 1} tensors.*got 2"):
            net(x, c, residuals=zeros[:2])


def test_pooled_condition_is_the_masked_text_mean_and_the_extra_tokens_through_one_map():
    torch.manual_seed(0)
    plain = build_network("tiny").eval()
    pooled = build_network(dataclasses.replace(PRESETS["tiny"], pooled_cond=True)).eval()
    missing, unexpected = pooled.load_state_dict(plain.state_dict(), strict=False)
    assert sorted(missing) == ["cond_embed.to_emb.bias", "cond_embed.to_emb.weight"] and not unexpected
    x, cond = torch.randn(2, 3, 32, 32), make_cond(2, seed=3)
    torch.testing.assert_close(run(pooled, x, cond), run(plain, x, cond))  # zero at init
    ce = pooled.cond_embed
    with torch.no_grad():
        ce.to_emb.weight.normal_(0, 0.05)
        ce.to_emb.bias.normal_(0, 0.05)
        tokens, mask = ce(cond, 2, x.device)
        # closed form: mean over the 3 unmasked text tokens, then pitch, depth of field, media
        mean = tokens[:, :3].mean(1)
        expect = mean @ ce.to_emb.weight[:, :32].T + tokens[:, 5:].flatten(1) @ ce.to_emb.weight[:, 32:].T
        torch.testing.assert_close(ce.pooled(tokens, mask), expect + ce.to_emb.bias, rtol=1e-5, atol=1e-6)
        null = cond.drop(["text"], torch.ones(2, dtype=torch.bool))
        tokens, mask = ce(null, 2, x.device)
        torch.testing.assert_close(ce.pooled(tokens, mask), tokens[:, -3:].flatten(1) @ ce.to_emb.weight[:, 32:].T
                                   + ce.to_emb.bias)  # a null text adds nothing, and no NaN
        # with every attention block's output at zero the condition reaches the output only this way
        for name, p in pooled.named_parameters():
            if "proj_out" in name:
                p.zero_()
    other = Cond(text=cond.text, text_mask=cond.text_mask, media=cond.media + 1, pitch=cond.pitch, dof=cond.dof)
    assert (run(pooled, x, other) - run(pooled, x, cond)).abs().max() > 1e-4
    padded = cond.text.clone()
    padded[:, 3:] = 100.0  # masked positions change nothing
    same = Cond(text=padded, text_mask=cond.text_mask, media=cond.media, pitch=cond.pitch, dof=cond.dof)
    torch.testing.assert_close(run(pooled, x, same), run(pooled, x, cond))
    with torch.no_grad():
        ce.to_emb.weight.zero_()
        ce.to_emb.bias.zero_()
    torch.testing.assert_close(run(pooled, x, other), run(pooled, x, cond))


def test_band_skip_is_a_per_subband_gain_on_the_input():
    torch.manual_seed(0)
    plain = build_network("tiny").eval()
    torch.manual_seed(0)
    skip = build_network(dataclasses.replace(PRESETS["tiny"], band_skip=True)).eval()
    skip.load_state_dict(plain.state_dict(), strict=False)
    x, c, stage = torch.randn(2, 3, 32, 32), torch.tensor([0.3, -1.0]), torch.tensor([0, 2])
    torch.testing.assert_close(run(skip, x, None, stage, c), run(plain, x, None, stage, c))  # zero at init
    # a gain g on every subband adds exactly IDWT(g * DWT(x)) = g * x (orthonormal transform)
    with torch.no_grad():
        skip.band_gain.bias.fill_(-0.5)
    torch.testing.assert_close(run(skip, x, None, stage, c), run(plain, x, None, stage, c) - 0.5 * x)
    # one subband only: the output moves by that subband of x and nothing else
    with torch.no_grad():
        skip.band_gain.bias.zero_()
        skip.band_gain.bias[47] = 1.0
    band = torch.zeros(1, 48, 1, 1)
    band[0, 47] = 1.0
    expect = HaarIDWT(3)(HaarDWT(3)(x) * band)
    torch.testing.assert_close(run(skip, x, None, stage, c) - run(plain, x, None, stage, c), expect)
    # and the gain depends on the noise level through the embedding, and it trains
    skip.train()
    loss = skip(x, c, None, stage).square().mean()
    loss.backward()
    assert skip.band_gain.weight.grad.abs().sum() > 0
    with pytest.raises(EdifyError, match="band_skip needs in_channels == out_channels"):
        UNetConfig(**{**PRESETS["tiny"].to_dict(), "widths": (16, 32), "out_channels": 6, "band_skip": True,
                      "self_attention_levels": (1,), "cross_attention_levels": (1,)})


# -- config and presets ----------------------------------------------------------------------------

def test_config_round_trip_through_json():
    for name, cfg in PRESETS.items():
        d = json.loads(json.dumps(cfg.to_dict()))
        assert UNetConfig.from_dict(d) == cfg, name
    with pytest.raises(EdifyError, match="unknown U-Net config keys \\['wdths'\\]"):
        UNetConfig.from_dict({**PRESETS["tiny"].to_dict(), "wdths": [8]})


def test_state_dict_loads_into_network_built_from_saved_config(net):
    clone = build_network(UNetConfig.from_dict(json.loads(json.dumps(net.config.to_dict())))).eval()
    clone.load_state_dict(net.state_dict())
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(run(clone, x, make_cond(1)), run(net, x, make_cond(1)))


def test_preset_sizes():
    with torch.device("meta"):
        sizes = {name: count_parameters(build_network(name)) for name in PRESETS}
    assert 140e6 < sizes["base-256"] < 180e6  # comparable to the 161M diffusers anchor
    assert sizes["emoji-64"] <= 30e6 and sizes["emoji-up-64-256"] <= 30e6
    assert sizes["tiny"] < 1e6


# -- errors ----------------------------------------------------------------------------------------

def test_bad_inputs_raise(net):
    c = torch.zeros(1)
    with pytest.raises(EdifyError, match=r"\[B, 3, H, W\], got \[1, 4, 32, 32\]"):
        net(torch.zeros(1, 4, 32, 32), c)
    with pytest.raises(EdifyError, match="height must be a multiple of 8.*got 36"):
        net(torch.zeros(1, 3, 36, 32), c)
    with pytest.raises(EdifyError, match="width must be a multiple of 8.*got 28"):
        net(torch.zeros(1, 3, 32, 28), c)
    with pytest.raises(EdifyError, match=r"c_noise must have shape \[1\], got \[2\]"):
        net(torch.zeros(1, 3, 32, 32), torch.zeros(2))
    with pytest.raises(EdifyError, match=r"text states must be \[B, L, 384\], got \[1, 5, 16\]"):
        net(torch.zeros(1, 3, 32, 32), c, make_cond(1, text_dim=16))
    with pytest.raises(EdifyError, match="condition batch size must match the image batch 1, got 2"):
        net(torch.zeros(1, 3, 32, 32), c, make_cond(2))
    with pytest.raises(EdifyError, match=r"stage must lie in \[0, 2\], got \[3\]"):
        net(torch.zeros(1, 3, 32, 32), c, stage=torch.tensor([3]))
    with pytest.raises(EdifyError, match="unknown network preset 'huge'"):
        build_network("huge")
    with pytest.raises(EdifyError, match=r"cross_attention_levels must lie in \[0, 1\], got \[2\]"):
        UNetConfig(widths=(32, 64), cross_attention_levels=(2,), self_attention_levels=(), head_dim=32)
    with pytest.raises(EdifyError, match="reference_resolution must be a multiple of 16, got 72"):
        UNetConfig(widths=(32, 64, 64), self_attention_levels=(), cross_attention_levels=(), head_dim=32,
                   reference_resolution=72)
