"""Thresholding of the guided estimate (Imagen's static and dynamic thresholding)."""

import pytest
import torch

from edify.core.thresholding import ThresholdedDenoiser, check_threshold, maybe_threshold, threshold_denoised
from edify.errors import EdifyError
from test_cli import assert_one_line, edify
from test_sampling_modes import tiny


def test_static_clamps_to_the_image_range():
    D = torch.tensor([[-3.0, -1.0, 0.2, 1.0, 2.5]]).reshape(1, 1, 1, 5)
    assert threshold_denoised(D, 1.0).flatten().tolist() == pytest.approx([-1.0, -1.0, 0.2, 1.0, 1.0])


def test_dynamic_rescales_by_the_quantile_per_sample():
    g = torch.Generator().manual_seed(0)
    inside = torch.rand(1, 3, 8, 8, generator=g) * 1.8 - 0.9  # already in range: unchanged (s = 1)
    wild = torch.randn(1, 3, 8, 8, generator=g) * 4
    out = threshold_denoised(torch.cat([inside, wild]), 0.9)
    assert torch.equal(out[0], inside[0])
    s = torch.quantile(wild.abs().flatten(), 0.9)
    assert torch.allclose(out[1], wild[0].clamp(-s, s) / s)
    assert out[1].abs().max() <= 1 + 1e-6 and (out[1].abs() > 0.999).float().mean() > 0.05


def test_wrapper_follows_the_denoiser_contract():
    inner = lambda x, sigma, cond=None, stage=None: 3 * x
    x = torch.full((2, 3, 4, 4), 0.5)
    wrapped = ThresholdedDenoiser(inner, 1.0)
    assert torch.equal(wrapped(x, torch.ones(2)), torch.ones_like(x))
    assert maybe_threshold(inner, 0) is inner
    with pytest.raises(EdifyError, match="needs a threshold in \\(0, 1\\]"):
        ThresholdedDenoiser(inner, 0.0)


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan"), float("inf"), "0.9", True])
def test_bad_threshold(bad):
    with pytest.raises(EdifyError, match="threshold must be 0 \\(off\\), a quantile in \\(0, 1\\)"):
        check_threshold(bad)


def test_pipeline_threshold(tmp_path):
    pipe = tiny("truncated")
    kw = dict(seed=0, output_type="tensor", num_steps=6, guidance_scale=7.0)
    plain = pipe("red apple", **kw).images
    assert torch.equal(pipe("red apple", threshold=0.0, **kw).images, plain)
    seen = []
    pipe("red apple", threshold=1.0, callback=lambda info: seen.append(info["denoised"].abs().max().item()), **kw)
    assert max(seen) <= 1.0
    with pytest.raises(EdifyError, match="threshold must be"):
        pipe("red apple", threshold=2.0, **kw)
    folder = tmp_path / "m"
    pipe.save_pretrained(folder)
    assert_one_line(edify("generate", "x", "--model", str(folder), "--threshold", "-1", "-o", str(tmp_path / "a.png")),
                    2, "threshold must be 0 (off)", "-1.0")


def test_saved_defaults_round_trip_and_are_checked(tmp_path):
    import dataclasses
    import json

    from edify.pipelines.text2image import PipelineConfig, TextToImagePipeline

    pipe = tiny("truncated")
    pipe.config = dataclasses.replace(pipe.config, defaults=dataclasses.replace(
        pipe.config.defaults, sampler="dpmpp_2m_sde", eta=(1.0, 0.0, 0.0), threshold=0.995, shrink=2.5, shrink_rule="soft"))
    folder = tmp_path / "m"
    pipe.save_pretrained(folder)
    d = json.loads((folder / "config.json").read_text())
    back = PipelineConfig.from_dict(d).defaults
    assert (back.sampler, back.eta, back.threshold, back.shrink, back.shrink_rule) == \
        ("dpmpp_2m_sde", (1.0, 0.0, 0.0), 0.995, 2.5, "soft")
    for key, bad, message in (("eta", [1, -1, 0], "eta must be a finite number >= 0"),
                              ("eta", [1, 0], "eta per stage needs one value per stage"),
                              ("threshold", 3, "threshold must be 0 \\(off\\)"),
                              ("shrink", -1, "shrink must be a finite number"),
                              ("shrink_rule", "blur", "unknown shrink rule")):
        with pytest.raises(EdifyError, match=f"field 'defaults': {message}"):
            PipelineConfig.from_dict({**d, "defaults": {**d["defaults"], key: bad}})
    assert TextToImagePipeline.from_pretrained(folder).config.defaults.eta == (1.0, 0.0, 0.0)


# ---- the finest band soft-thresholded after sampling ---------------------------------------------

def test_shrink_soft_thresholds_the_finest_band_and_keeps_block_means():
    from edify.core.laplacian import down, up
    from edify.core.thresholding import shrink_finest_band

    t = 2 / 127.5
    # a 2x2 checkerboard of amplitude a on a flat ground: its own finest band with zero block means
    # (and so is its shrunk band), so the closed form is the rule applied to the amplitude
    sign = torch.tensor([[1.0, -1.0], [-1.0, 1.0]]).repeat(4, 4)
    closed = {"soft": lambda a: max(a - t, 0.0), "hard": lambda a: a if a > t else 0.0,
              "garrote": lambda a: a - t * t / a if a > t else 0.0}
    for rule, kept in closed.items():
        for a in (3 / 127.5, 6 / 127.5, 1.5 / 127.5, t, 0.0):
            x = 0.25 + a * sign[None, None]
            assert torch.allclose(shrink_finest_band(x, 2, rule), 0.25 + kept(a) * sign[None, None], atol=1e-6), rule
    assert torch.equal(shrink_finest_band(x, 2), shrink_finest_band(x, 2, "garrote"))  # the default rule
    # the garrote moves an edge of k t by t / k: less than soft's t, and continuously unlike hard
    assert closed["soft"](3 * t) < closed["garrote"](3 * t) < closed["hard"](3 * t)
    # any image: block means exactly kept, and a band within t of 0 everywhere becomes flat
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 16, 16, generator=g) * 2 - 1
    for rule in closed:
        out = shrink_finest_band(x, 2, rule)
        assert torch.allclose(down(out), down(x), atol=1e-6) and out.isfinite().all()
    out = shrink_finest_band(x, 2, "soft")
    assert torch.allclose(down(out), down(x), atol=1e-6)
    band_in, band_out = x - up(down(x)), out - up(down(out))
    # a shrinkage: |s| <= |b| and taking out s's block mean is an orthogonal projection, so no 2x2
    # block's band energy grows
    assert (down(band_out ** 2) <= down(band_in ** 2) + 1e-6).all() and (down(band_out ** 2) < down(band_in ** 2)).any()
    noise = 0.45 * t * (torch.rand(x.shape, generator=g) * 2 - 1)
    faint = up(down(x)) + noise - up(down(noise))  # a finest band within 0.9 t of 0
    assert torch.allclose(shrink_finest_band(faint, 2), up(down(faint)), atol=1e-6)
    assert shrink_finest_band(x, 0) is x


@pytest.mark.parametrize("bad", [-1, float("nan"), float("inf"), "2", True])
def test_bad_shrink(bad):
    from edify.core.thresholding import check_shrink, shrink_finest_band

    with pytest.raises(EdifyError, match="shrink must be a finite number of 8-bit levels >= 0"):
        check_shrink(bad)
    with pytest.raises(EdifyError, match="unknown shrink rule 'blur'; known: garrote, soft, hard"):
        shrink_finest_band(torch.zeros(1, 3, 4, 4), 2, "blur")


def test_pipeline_shrink_is_the_post_process_of_the_same_sample(tmp_path):
    import dataclasses

    from edify.core.thresholding import shrink_finest_band

    pipe = tiny("truncated")
    kw = dict(seed=0, output_type="tensor", num_steps=6, guidance_scale=3.0)
    plain = pipe("red apple", **kw).images
    assert torch.equal(pipe("red apple", shrink=0, **kw).images, plain)
    shrunk = pipe("red apple", shrink=3, **kw).images
    assert torch.equal(shrunk, shrink_finest_band(plain, 3).clamp(-1, 1)) and not torch.equal(shrunk, plain)
    assert torch.equal(pipe("red apple", shrink=3, shrink_rule="soft", **kw).images,
                       shrink_finest_band(plain, 3, "soft").clamp(-1, 1))
    with pytest.raises(EdifyError, match="shrink must be"):
        pipe("red apple", shrink=-2, **kw)
    with pytest.raises(EdifyError, match="unknown shrink rule"):
        pipe("red apple", shrink=2, shrink_rule="median", **kw)
    # a model's saved default applies when a call gives none, and a call's 0 turns it off
    pipe.config = dataclasses.replace(pipe.config, defaults=dataclasses.replace(pipe.config.defaults, shrink=3.0))
    assert torch.equal(pipe("red apple", **kw).images, shrunk)
    assert torch.equal(pipe("red apple", shrink=0, **kw).images, plain)
    folder = tmp_path / "m"
    pipe.save_pretrained(folder)
    assert_one_line(edify("generate", "x", "--model", str(folder), "--shrink", "-1", "-o", str(tmp_path / "a.png")),
                    2, "shrink must be a finite number", "-1.0")
    assert_one_line(edify("generate", "x", "--model", str(folder), "--shrink-rule", "blur", "-o",
                          str(tmp_path / "a.png")), 2, "unknown shrink rule 'blur'")
    out = edify("generate", "red apple", "--model", str(folder), "--steps", "6", "--guidance", "3", "--shrink", "1",
                "--shrink-rule", "hard", "-o", str(tmp_path / "b.png"))
    assert out.returncode == 0, out.stderr
