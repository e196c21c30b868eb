"""The paper's sampling modes (section 2.2.3): finishing at a coarse stage, expert ranges, and the
pipeline's schedule settings; through the pipeline, the CLI and a closed form."""

from __future__ import annotations

import math
import time
from pathlib import Path

import pytest
import torch

from edify.core.gaussian import ExactDenoiser, band_report, block_mean, output_covariance, power_law_cov
from edify.core.laplacian import LaplacianProcess
from edify.core.losses import LaplacianEDMLoss
from edify.core.precond import finishing_stages, stage_sigma_ranges
from edify.core.samplers import SAMPLERS, sampler_nfe
from edify.core.schedules import laplacian_sigmas, ramp_aware_sigmas, karras_sigmas, split_steps
from edify.errors import EdifyError
from edify.networks.presets import build_network
from edify.pipelines.text2image import PipelineConfig, SamplingDefaults, TextToImagePipeline
from edify.training.config import TrainConfig
from test_cli import assert_one_line, edify
from test_pipeline import HashEncoder

PROC = LaplacianProcess(3, (1.0, 5.0))


def test_expert_ranges_nested_and_truncated():
    assert stage_sigma_ranges(PROC, "truncated") == {0: (0.0, 1.0), 1: (1.0, 5.0), 2: (5.0, math.inf)}
    assert stage_sigma_ranges(PROC, "nested") == {0: (0.0, 1.0), 1: (0.0, 5.0), 2: (0.0, math.inf)}
    assert finishing_stages(PROC, "truncated") == (0,) and finishing_stages(PROC, "nested") == (0, 1, 2)
    with pytest.raises(EdifyError, match="expert ranges must be one of"):
        stage_sigma_ranges(PROC, "paper")


def test_nested_loss_draws_stage_sigmas_below_the_switches():
    loss = LaplacianEDMLoss(PROC, expert_ranges="nested")
    g = torch.Generator().manual_seed(0)
    s1 = loss.sample_sigma(20_000, 1, g)
    s2 = loss.sample_sigma(20_000, 2, g)
    assert s1.max() <= 5.0 and (s1 < 1.0).float().mean() > 0.3  # stage 1 also below s1*
    assert (s2 < 5.0).float().mean() > 0.5  # the coarsest expert sees the whole range
    truncated = LaplacianEDMLoss(PROC).sample_sigma(20_000, 1, g)
    assert truncated.min() >= 1.0 and truncated.max() <= 5.0


def test_saved_configs_without_the_field_stay_truncated():
    d = TrainConfig().to_dict()
    assert d["expert_ranges"] == "truncated"  # the measured default (bench/recipe.md)
    del d["expert_ranges"]
    assert TrainConfig.from_dict(d).expert_ranges == "truncated"
    config = PipelineConfig.from_dict({"format": "edify-text2image", "network": build_network("tiny").config.to_dict()})
    assert config.expert_ranges == "truncated"


def test_split_steps_and_ramp_aware_placement():
    assert split_steps(24, (0.6, 0.25, 0.15)) == (14, 6, 4)
    assert split_steps(5, (1, 1, 1)) == (1, 2, 2)  # ties go to the coarse (cheap) stages
    assert sum(split_steps(97, (0.2, 0.3, 0.5))) == 97
    with pytest.raises(EdifyError, match="at least one step per stage"):
        split_steps(2, (1, 1, 1))
    plain = karras_sigmas(8, 0.002, 1.0, append_zero=False)
    assert torch.allclose(ramp_aware_sigmas(8, 0.002, 1.0, PROC, 7.0, 0.0), plain)
    ramp = ramp_aware_sigmas(8, 0.002, 1.0, PROC, 7.0, 0.45)
    assert ramp[0] == 1.0 and ramp[-1] == 0.002 and (ramp[1:] < ramp[:-1]).all()
    on_ramp = lambda s: int(((s > 0.5) & (s < 1.0)).sum())  # noqa: E731  band 1's ramp is [0.5, 1]
    assert on_ramp(ramp) > on_ramp(plain)


def test_final_stage_reproduces_the_low_resolution_data_exactly():
    """Closed form: stopping at stage j returns down^j(x0) with covariance D_j Sigma D_j^T."""
    n = 16
    Sigma = power_law_cov(n)
    denoiser = ExactDenoiser(PROC, Sigma, n)
    for j in (1, 2):
        sigmas = laplacian_sigmas(PROC, 96, 0.002, 80.0, 7.0, 0.45, final_stage=j)
        C = output_covariance(SAMPLERS["dpmpp_2m"], PROC, sigmas, denoiser, Sigma, n, final_stage=j)
        target = block_mean(n, j) @ Sigma @ block_mean(n, j).T
        report = band_report(C, target, n >> j, PROC.levels - j)
        assert report.relative_error < 0.005, (j, report)
        assert all(abs(v - 1) < 0.005 for v in report.whitened_variance), (j, report)


def tiny(expert_ranges: str) -> TextToImagePipeline:
    torch.manual_seed(0)
    net = build_network("tiny")
    config = PipelineConfig(network=net.config.to_dict(), resolution=32, styles=("noto",),
                            defaults=SamplingDefaults(num_steps=6, guidance_scale=2.0),
                            expert_ranges=expert_ranges)
    return TextToImagePipeline(net, config, text_encoder=HashEncoder())


def test_pipeline_finishes_at_a_coarse_stage_for_nested_models_only():
    pipe = tiny("nested")
    full = pipe("red apple", seed=0, output_type="tensor", num_steps=6)
    preview = pipe("red apple", seed=0, output_type="tensor", num_steps=6, final_stage=2)
    assert full.images.shape[-1] == 32 and preview.images.shape[-1] == 8
    assert torch.isfinite(preview.images).all()
    with pytest.raises(EdifyError, match="cannot finish at stage 2.*expert_ranges=nested"):
        tiny("truncated")("red apple", seed=0, final_stage=2)
    with pytest.raises(EdifyError, match="final stage must be an integer in 0..2.*got 3"):
        pipe("red apple", final_stage=3)
    with pytest.raises(EdifyError, match="every stage needs at least one step.*\\(3, 0, 2\\)"):
        pipe("red apple", steps_per_stage=(3, 0, 2))
    with pytest.raises(EdifyError, match="unknown sampler 'ddim'"):
        pipe("red apple", sampler="ddim")
    out = pipe("red apple", seed=0, output_type="tensor", steps_per_stage=(4, 2, 1), sampler="heun")
    assert out.nfe == sampler_nfe("heun", 7) == 13


def test_pipeline_stochastic_sampler_and_eta():
    pipe = tiny("truncated")
    kw = dict(seed=[3, 4], output_type="tensor", num_steps=6, num_images_per_prompt=2)
    ode = pipe("red apple", sampler="dpmpp_2m", **kw).images
    sde0 = pipe("red apple", sampler="dpmpp_2m_sde", eta=0.0, **kw).images
    sde = pipe("red apple", sampler="dpmpp_2m_sde", **kw)
    assert (sde0 - ode).abs().max() < 1e-5  # eta 0: the deterministic sampler
    assert (sde.images - ode).abs().max() > 1e-3 and sde.nfe == 6
    again = pipe("red apple", sampler="dpmpp_2m_sde", **{**kw, "seed": [4], "num_images_per_prompt": 1}).images
    assert torch.allclose(again, sde.images[1:], atol=1e-5)  # per-seed noise, whatever the batch
    with pytest.raises(EdifyError, match="eta applies only to the stochastic samplers"):
        pipe("red apple", sampler="dpmpp_2m", eta=0.5)
    with pytest.raises(EdifyError, match="eta must be a finite number >= 0"):
        pipe("red apple", sampler="euler_sde", eta=-1.0)


@pytest.fixture(scope="module")
def nested_model(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("nested") / "m"
    pipe = tiny("nested")
    pipe.save_pretrained(folder)
    return folder


def test_cli_preview_and_bad_sampling_options(nested_model, tmp_path):
    out = tmp_path / "p.png"
    start = time.perf_counter()
    result = edify("generate", "red apple", "--model", str(nested_model), "--final-stage", "2", "-o", str(out))
    assert result.returncode == 0, result.stderr
    from PIL import Image

    assert Image.open(out).size == (8, 8)
    assert time.perf_counter() - start < 120
    assert_one_line(edify("generate", "x", "--model", str(nested_model), "--final-stage", "5", "-o", str(out)),
                    2, "final stage", "got 5")
    assert_one_line(edify("generate", "x", "--model", str(nested_model), "--sampler", "ddim", "-o", str(out)),
                    2, "unknown sampler 'ddim'")
    assert_one_line(edify("generate", "x", "--model", str(nested_model), "--eta", "0.5", "-o", str(out)),
                    2, "eta applies only to the stochastic samplers", "'dpmpp_2m'")
    assert_one_line(edify("generate", "x", "--model", str(nested_model), "--steps-per-stage", "3,0,2",
                          "-o", str(out)), 2, "every stage needs at least one step", "(3, 0, 2)")
    assert_one_line(edify("generate", "x", "--model", str(nested_model), "--steps-per-stage", "3,a",
                          "-o", str(out)), 2, "--steps-per-stage", "'3,a'")
