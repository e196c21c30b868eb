"""EDM preconditioning, stage routing, the training loss and classifier-free guidance."""

import math
from functools import partial

import pytest
import torch
from torch import nn

from edify.conditioning import Cond
from edify.core.guidance import CFGDenoiser
from edify.core.laplacian import LaplacianProcess, down
from edify.core.losses import LaplacianEDMLoss, edm_weight, sample_lognormal_sigma
from edify.core.precond import EDMPrecond, StageDenoisers, edm_scalings, stage_sigma_ranges
from edify.core.seeding import generators
from edify.errors import EdifyError

PROC = LaplacianProcess(3, (1.0, 4.0))


class TinyNet(nn.Module):
    """net(x_in, c_noise, cond, stage): a conv whose output depends on every input."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.media = nn.Embedding(5, 3)

    def forward(self, x_in, c_noise, cond, stage):
        h = self.conv(x_in) * (1 + c_noise.reshape(-1, 1, 1, 1))
        if cond is not None and cond.media is not None:
            h = h + self.media(cond.media.clamp_min(0) + (cond.media < 0) * 4)[:, :, None, None]
        if stage is not None:
            h = h + stage.reshape(-1, 1, 1, 1).to(h.dtype)
        return h


def test_edm_scalings_closed_form():
    sigma_data = 0.5
    sigma = torch.tensor([0.002, 0.1, 0.5, 3.0, 80.0], dtype=torch.float64)
    c_skip, c_out, c_in, c_noise = edm_scalings(sigma, sigma_data)
    assert torch.allclose(c_in**2 * (sigma**2 + sigma_data**2), torch.ones_like(sigma))  # unit input
    # unit-variance training target: (1 - c_skip)^2 sigma_data^2 + c_skip^2 sigma^2 = c_out^2
    assert torch.allclose((1 - c_skip) ** 2 * sigma_data**2 + c_skip**2 * sigma**2, c_out**2)
    assert torch.allclose(edm_weight(sigma, sigma_data) * c_out**2, torch.ones_like(sigma))  # Eq. 1
    assert torch.allclose(c_noise, sigma.log() / 4)
    assert torch.allclose(c_skip, sigma_data**2 / (sigma**2 + sigma_data**2))


def test_ideal_network_gives_x0():
    """F* = (x0 - c_skip x) / c_out, read off (x_in, c_noise) alone, makes D return x0."""
    x0 = torch.randn(2, 3, 8, 8)

    class Oracle(nn.Module):
        def forward(self, x_in, c_noise, cond, stage):
            sigma = (4 * c_noise).exp().reshape(-1, 1, 1, 1)
            c_skip, c_out, c_in, _ = edm_scalings(sigma, 0.5)
            return (x0 - c_skip * x_in / c_in) / c_out

    D = EDMPrecond(Oracle(), sigma_data=0.5)
    sigma = torch.tensor([0.05, 7.0])
    x = x0 + sigma.reshape(-1, 1, 1, 1) * torch.randn_like(x0)
    assert torch.allclose(D(x, sigma), x0, atol=1e-4)
    assert torch.allclose(D(x, 0.3), x0, atol=1e-4)  # a scalar sigma broadcasts


def test_precond_bf16_flag_returns_fp32():
    net = TinyNet()
    x = torch.randn(2, 3, 8, 8)
    d32 = EDMPrecond(net)(x, torch.tensor([0.5, 2.0]), stage=1)
    d16 = EDMPrecond(net, dtype=torch.bfloat16)(x, torch.tensor([0.5, 2.0]), stage=1)
    assert d32.dtype == d16.dtype == torch.float32
    assert torch.allclose(d32, d16, atol=0.1) and not torch.equal(d32, d16)


def test_stage_ranges_and_router():
    r = stage_sigma_ranges(PROC)
    assert r == {0: (0.0, 1.0), 1: (1.0, 4.0), 2: (4.0, math.inf)}
    experts = {j: (lambda j: lambda x, s, c=None, st=None: torch.full_like(x, 10.0 * j + 1))(j) for j in range(3)}

    class Wrap(nn.Module):
        def __init__(self, f):
            super().__init__()
            self.f = f

        def forward(self, x, sigma, cond=None, stage=None):
            return self.f(x, sigma, cond, stage)

    router = StageDenoisers({j: Wrap(f) for j, f in experts.items()})
    x = torch.zeros(3, 1, 2, 2)
    out = router(x, torch.ones(3), None, torch.tensor([2, 0, 2]))
    assert out[:, 0, 0, 0].tolist() == [21.0, 1.0, 21.0]
    assert router(x, 1.0, None, 1)[0, 0, 0, 0] == 11.0
    with pytest.raises(EdifyError, match="no denoiser for stage 3"):
        router(x, 1.0, None, 3)


def test_truncated_lognormal_sigma():
    s = sample_lognormal_sigma(20_000, -1.2, 1.2, high=1.0, generator=torch.Generator().manual_seed(0))
    assert s.max() <= 1.0 and s.min() > 0
    # median of the truncated law: Phi^-1(Phi(z_high) / 2)
    z_high = torch.tensor((0.0 + 1.2) / 1.2, dtype=torch.float64)
    median = math.exp(-1.2 + 1.2 * torch.special.ndtri(torch.special.ndtr(z_high) / 2).item())
    assert s.median().item() == pytest.approx(median, rel=0.03)
    full = sample_lognormal_sigma(20_000, -1.2, 1.2, generator=torch.Generator().manual_seed(0)).log()
    assert full.mean().item() == pytest.approx(-1.2, abs=0.03) and full.std().item() == pytest.approx(1.2, rel=0.03)
    # two-sided, far in the upper tail (the coarsest expert's range): median Phi^-1((Phi(a) + Phi(b)) / 2)
    both = sample_lognormal_sigma(20_000, -1.2, 1.2, high=20.0, low=1.25, generator=torch.Generator().manual_seed(1))
    assert both.min() >= 1.25 and both.max() <= 20.0
    za, zb = [torch.tensor((math.log(v) + 1.2) / 1.2, dtype=torch.float64) for v in (1.25, 20.0)]
    mid = (torch.special.ndtr(za) + torch.special.ndtr(zb)) / 2
    assert both.median().item() == pytest.approx(math.exp(-1.2 + 1.2 * torch.special.ndtri(mid).item()), rel=0.03)
    # the conditional law above `low` keeps the log-normal's shape: P(s > 5 | s > 1.25) in closed form
    tail = (1 - torch.special.ndtr(torch.tensor((math.log(5.0) + 1.2) / 1.2, dtype=torch.float64))) / \
        (torch.special.ndtr(zb) - torch.special.ndtr(za))
    assert (both > 5.0).double().mean().item() == pytest.approx(tail.item(), abs=0.01)


def test_loss_matches_hand_computation_and_respects_stage_range():
    loss_fn = LaplacianEDMLoss(PROC)
    x0 = torch.randn(4, 3, 16, 16)
    D = EDMPrecond(TinyNet())
    for stage in range(3):
        loss, sigma = loss_fn(D, x0, None, stage, generator=generators([0, 1, 2, 3]), return_sigma=True)
        low, high = stage_sigma_ranges(PROC)[stage]
        assert loss.shape == (4,) and (sigma <= high).all() and (sigma >= low).all()
        # the same draws by hand: sigma from the uniforms, then the noise, per sample
        g = generators([0, 1, 2, 3])
        sig = loss_fn.sample_sigma(4, stage, g)
        noise = torch.stack([torch.randn(3, 16, 16, generator=gi) for gi in g])
        x = down(PROC.forward(x0, sig, noise), stage)
        s_px = sig / 2**stage
        expect = edm_weight(s_px) * (D(x, s_px, None, stage) - down(x0, stage)).square().mean(dim=(1, 2, 3))
        assert torch.equal(sig, sigma)
        assert torch.allclose(loss, expect, rtol=1e-5)
    w = torch.tensor([1.0, 0.0, 2.0, 1.0])
    weighted = loss_fn(D, x0, None, 1, generator=generators([0, 1, 2, 3]), weight=w)
    assert torch.allclose(weighted, w * loss_fn(D, x0, None, 1, generator=generators([0, 1, 2, 3])))


def test_loss_of_ideal_denoiser_is_zero():
    x0 = torch.randn(2, 1, 8, 8)
    oracle = lambda x, sigma, cond, stage: down(x0, int(stage[0]))
    assert LaplacianEDMLoss(PROC)(oracle, x0, None, 2).abs().max() == 0


def _cond(B):
    return Cond(media=torch.arange(B) % 3, text=torch.randn(B, 4, 8), text_mask=torch.ones(B, 4, dtype=torch.bool))


def test_guidance_scales():
    D = EDMPrecond(TinyNet())
    x, sigma, cond = torch.randn(3, 3, 8, 8), torch.tensor([0.3, 1.0, 2.0]), _cond(3)
    D_c = D(x, sigma, cond, None)
    D_u = D(x, sigma, cond.drop(("text", "media")), None)
    assert not torch.allclose(D_c, D_u)
    assert torch.equal(CFGDenoiser(D, 1.0, drop=("text", "media"))(x, sigma, cond), D_c)
    assert torch.allclose(CFGDenoiser(D, 0.0, drop=("text", "media"))(x, sigma, cond), D_u, atol=1e-6)
    g3 = CFGDenoiser(D, 3.0, drop=("text", "media"))(x, sigma, cond)
    g5 = CFGDenoiser(D, 5.0, drop=("text", "media"))(x, sigma, cond)
    assert torch.allclose(g5 - g3, 2 * (D_c - D_u), atol=1e-5)  # linear in the scale
    assert torch.allclose(g3, D_u + 3 * (D_c - D_u), atol=1e-5)


def test_per_stage_guidance_picks_each_samples_stage_scale_and_skips_unguided_stages():
    """scale (1, 3, 5), finest first: each sample is guided with its own stage's scale; a batch
    all at a stage whose scale is 1 is the conditional denoiser alone, in one branch."""
    calls = []
    D = EDMPrecond(TinyNet())

    def counting(x, sigma, cond=None, stage=None):
        calls.append(x.shape[0])
        return D(x, sigma, cond, stage)

    x, sigma, cond = torch.randn(3, 3, 8, 8), torch.tensor([0.3, 1.0, 2.0]), _cond(3)
    per_stage = CFGDenoiser(counting, (1.0, 3.0, 5.0), drop=("text", "media"))
    for k, scale in enumerate((1.0, 3.0, 5.0)):
        stage = torch.full((3,), k)
        calls.clear()
        out = per_stage(x, sigma, cond, stage)
        assert torch.equal(out, CFGDenoiser(D, scale, drop=("text", "media"))(x, sigma, cond, stage))
        assert calls == ([3] if scale == 1 else [6])
    mixed = torch.tensor([0, 1, 2])
    out = per_stage(x, sigma, cond, mixed)
    D_c, D_u = D(x, sigma, cond, mixed), D(x, sigma, cond.drop(("text", "media")), mixed)
    expect = D_u + torch.tensor([1.0, 3.0, 5.0]).view(3, 1, 1, 1) * (D_c - D_u)
    assert torch.allclose(out, expect, atol=1e-5)
    assert torch.allclose(out[0], D_c[0], atol=1e-5)  # the stage at scale 1 is the conditional estimate
    with pytest.raises(EdifyError, match="needs the stage"):
        per_stage(x, sigma, cond)
    with pytest.raises(EdifyError, match="3 scales, got stage 3"):
        per_stage(x, sigma, cond, torch.tensor([0, 1, 3]))
    for bad in ((), (1.0, float("nan")), (-1.0,), "seven"):
        with pytest.raises(EdifyError, match="guidance scale"):
            CFGDenoiser(D, bad)


def _counting(calls: list, name: str, den):
    """`den`, recording (name, batch rows) in `calls` at every call."""
    def f(x, sigma, cond=None, stage=None):
        calls.append((name, x.shape[0]))
        return den(x, sigma, cond, stage)
    return f


def test_autoguidance_uses_the_weaker_models_estimate_as_the_second_branch():
    """D_g(c) + w (D_c - D_g(c)) with the guide's own call of B rows; with guide_uncond the guide sees
    the unconditional condition; a guide equal to the model leaves D_c exactly."""
    calls = []
    torch.manual_seed(1)
    D, D_bad = EDMPrecond(TinyNet()), EDMPrecond(TinyNet())

    counting = partial(_counting, calls)

    x, sigma, cond, stage = torch.randn(3, 3, 8, 8), torch.tensor([0.3, 1.0, 2.0]), _cond(3), torch.zeros(3)
    D_c, D_g = D(x, sigma, cond, stage), D_bad(x, sigma, cond, stage)
    out = CFGDenoiser(counting("main", D), 2.5, guide=counting("guide", D_bad))(x, sigma, cond, stage)
    assert calls == [("main", 3), ("guide", 3)]
    assert torch.allclose(out, D_g + 2.5 * (D_c - D_g), atol=1e-5)
    uncond = CFGDenoiser(D, 2.5, drop=("text", "media"), guide=D_bad, guide_uncond=True)(x, sigma, cond, stage)
    D_gu = D_bad(x, sigma, cond.drop(("text", "media")), stage)
    assert torch.allclose(uncond, D_gu + 2.5 * (D_c - D_gu), atol=1e-5)
    assert torch.equal(CFGDenoiser(D, 4.0, guide=D)(x, sigma, cond, stage), D_c)
    D_none, D_g_none = D(x, sigma, None, stage), D_bad(x, sigma, None, stage)  # an unconditional model
    assert torch.allclose(CFGDenoiser(D, 2.0, guide=D_bad)(x, sigma, None, stage), D_g_none + 2 * (D_none - D_g_none),
                          atol=1e-5)
    calls.clear()
    assert torch.equal(CFGDenoiser(counting("main", D), 1.0, guide=counting("guide", D_bad))(x, sigma, cond, stage), D_c)
    assert calls == [("main", 3)]  # scale 1: the guide is never called
    with pytest.raises(EdifyError, match="no negative prompt"):
        CFGDenoiser(D, 2.0, negative=_cond(1), guide=D_bad)


def test_autoguidance_term_on_top_of_guidance_per_stage():
    """guide_weight a: D_u + s (D_c - D_u) + a (D_c - D_g(c)), the guide called only at stages whose
    a is not 0; mixed stages get each sample's own a; a guide equal to the model adds nothing."""
    calls = []
    torch.manual_seed(2)
    D, D_bad = EDMPrecond(TinyNet()), EDMPrecond(TinyNet())

    counting = partial(_counting, calls)

    drop = ("text", "media")
    x, sigma, cond = torch.randn(3, 3, 8, 8), torch.tensor([0.3, 1.0, 2.0]), _cond(3)
    g = CFGDenoiser(counting("main", D), 3.0, drop=drop, guide=counting("guide", D_bad), guide_weight=(1.5, 0.0, 0.5))
    for k, a in enumerate((1.5, 0.0, 0.5)):
        stage = torch.full((3,), k)
        D_c, D_u, D_g = D(x, sigma, cond, stage), D(x, sigma, cond.drop(drop), stage), D_bad(x, sigma, cond, stage)
        calls.clear()
        out = g(x, sigma, cond, stage)
        assert calls == ([("main", 6), ("guide", 3)] if a else [("main", 6)])
        assert torch.allclose(out, D_u + 3 * (D_c - D_u) + a * (D_c - D_g), atol=1e-5)
    mixed = torch.tensor([0, 1, 2])
    D_c, D_u, D_g = D(x, sigma, cond, mixed), D(x, sigma, cond.drop(drop), mixed), D_bad(x, sigma, cond, mixed)
    a = torch.tensor([1.5, 0.0, 0.5]).view(3, 1, 1, 1)
    assert torch.allclose(g(x, sigma, cond, mixed), D_u + 3 * (D_c - D_u) + a * (D_c - D_g), atol=1e-5)
    # without classifier-free guidance (scale 1) the term alone: D_c + a (D_c - D_g)
    stage = torch.zeros(3)
    D_c, D_g = D(x, sigma, cond, stage), D_bad(x, sigma, cond, stage)
    alone = CFGDenoiser(D, 1.0, guide=D_bad, guide_weight=2.0)(x, sigma, cond, stage)
    assert torch.allclose(alone, D_c + 2 * (D_c - D_g), atol=1e-5)
    assert torch.equal(CFGDenoiser(D, 1.0, guide=D, guide_weight=2.0)(x, sigma, cond, stage), D_c)
    plain = CFGDenoiser(D, 3.0, drop=drop)(x, sigma, cond, stage)
    assert torch.equal(CFGDenoiser(D, 3.0, drop=drop, guide=D_bad, guide_weight=0.0)(x, sigma, cond, stage), plain)
    with pytest.raises(EdifyError, match="needs a guide"):
        CFGDenoiser(D, 3.0, guide_weight=1.0)
    with pytest.raises(EdifyError, match="no guide_uncond"):
        CFGDenoiser(D, 3.0, guide=D_bad, guide_uncond=True, guide_weight=1.0)
    for bad in (float("nan"), (-1.0,), "x"):
        with pytest.raises(EdifyError, match="guide_weight"):
            CFGDenoiser(D, 3.0, guide=D_bad, guide_weight=bad)
    negative = Cond(media=torch.tensor([2]), text=torch.randn(1, 4, 8), text_mask=torch.ones(1, 4, dtype=torch.bool))
    neg = CFGDenoiser(D, 3.0, negative=negative, guide=D_bad, guide_weight=1.0)(x, sigma, cond, stage)
    D_n = D(x, sigma, negative.repeat(3), stage)  # a negative prompt keeps its branch beside the term
    assert torch.allclose(neg, D_n + 3 * (D_c - D_n) + (D_c - D_g), atol=1e-5)


def test_guidance_negative_prompt_and_one_batched_call():
    calls = []
    D = EDMPrecond(TinyNet())

    def counting(x, sigma, cond=None, stage=None):
        calls.append(x.shape[0])
        return D(x, sigma, cond, stage)

    x, cond = torch.randn(2, 3, 8, 8), _cond(2)
    neg = Cond(media=torch.tensor([4]), text=torch.randn(1, 2, 8), text_mask=torch.ones(1, 2, dtype=torch.bool))
    out = CFGDenoiser(counting, 2.0, negative=neg)(x, 0.5, cond, torch.tensor([0, 0]))
    assert calls == [4]
    D_n = D(x, 0.5, neg.repeat(2), torch.tensor([0, 0]))
    D_c = D(x, 0.5, cond, torch.tensor([0, 0]))
    assert torch.allclose(out, D_n + 2 * (D_c - D_n), atol=1e-5)
    with pytest.raises(EdifyError, match="negative condition batch"):
        CFGDenoiser(D, 2.0, negative=_cond(3))(x, 0.5, cond)
    with pytest.raises(EdifyError, match="unknown condition"):
        CFGDenoiser(D, 2.0, drop=("colour",))


def test_guidance_terms_compose_in_one_batched_call():
    """D_u + s (D_c - D_u) + w (D_c - D_{c without media}): one call of 3 B rows; weight 0 adds no branch
    and leaves plain guidance bit for bit; with s = 1 only the term's branch is added."""
    calls = []
    D = EDMPrecond(TinyNet())

    def counting(x, sigma, cond=None, stage=None):
        calls.append(x.shape[0])
        return D(x, sigma, cond, stage)

    x, sigma, cond, stage = torch.randn(2, 3, 8, 8), torch.tensor([0.4, 2.0]), _cond(2), torch.tensor([0, 1])
    D_c, D_u = D(x, sigma, cond, stage), D(x, sigma, cond.drop(("text", "media")), stage)
    D_ns = D(x, sigma, cond.drop(("media",)), stage)
    assert not torch.allclose(D_c, D_ns)
    out = CFGDenoiser(counting, 3.0, drop=("text", "media"), terms=[(("media",), 2.0)])(x, sigma, cond, stage)
    assert calls == [6]
    assert torch.allclose(out, D_u + 3 * (D_c - D_u) + 2 * (D_c - D_ns), atol=1e-5)
    calls.clear()
    plain = CFGDenoiser(counting, 3.0, drop=("text", "media"))(x, sigma, cond, stage)
    zero = CFGDenoiser(counting, 3.0, drop=("text", "media"), terms=[(("media",), 0.0)])(x, sigma, cond, stage)
    assert calls == [4, 4] and torch.equal(plain, zero)
    calls.clear()
    only = CFGDenoiser(counting, 1.0, terms=[(("media",), 1.5)])(x, sigma, cond, stage)
    assert calls == [4]
    assert torch.allclose(only, D_c + 1.5 * (D_c - D_ns), atol=1e-5)
    with pytest.raises(EdifyError, match="unknown condition"):
        CFGDenoiser(D, 2.0, terms=[(("colour",), 1.0)])
    with pytest.raises(EdifyError, match="finite weight"):
        CFGDenoiser(D, 2.0, terms=[(("media",), float("nan"))])


@pytest.mark.parametrize("bad", [
    lambda: EDMPrecond(TinyNet(), sigma_data=0.0),
    lambda: EDMPrecond(TinyNet(), dtype=torch.int8),
    lambda: EDMPrecond(TinyNet())(torch.zeros(1, 3, 4, 4), 0.0),
    lambda: LaplacianEDMLoss(PROC)(lambda *a: a[0], torch.zeros(1, 3, 8, 8), None, 3),
    lambda: LaplacianEDMLoss(PROC, P_std=0.0),
    lambda: sample_lognormal_sigma(2, -1.2, 1.2, high=0.0),
    lambda: sample_lognormal_sigma(2, -1.2, 1.2, high=1.0, low=2.0),
])
def test_bad_input(bad):
    with pytest.raises(EdifyError):
        bad()
