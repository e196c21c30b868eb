"""bench/fine_band.py: the finest band's flat share and the SWD of generated images per sampler setting."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from _training_helpers import load_bench

fine_band = load_bench("fine_band")
pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_band_shares_of_flat_and_speckled_images():
    flat = torch.full((2, 3, 16, 16), 0.2)
    assert fine_band.band_shares(flat) == {"flat": 1.0, "faint": 0.0}
    # a checkerboard of +-2 levels (of 255) on a flat grey: every band value is 2 levels in size
    sign = (torch.arange(16)[:, None] + torch.arange(16)[None, :]) % 2 * 2 - 1
    speckled = (128 + 2 * sign).float().expand(1, 3, 16, 16) / 127.5 - 1
    assert fine_band.band_shares(speckled) == {"flat": 0.0, "faint": 1.0}
    # +-3 levels: neither flat nor faint
    loud = (128 + 3 * sign).float().expand(1, 3, 16, 16) / 127.5 - 1
    assert fine_band.band_shares(loud) == {"flat": 0.0, "faint": 0.0}


def test_setting_arguments():
    assert fine_band.setting_value("a:") == ("a", {})
    assert fine_band.setting_value("b:guidance=3,sigma_min=0.3,eta=1/0/0,steps=12,experts=none") == \
        ("b", {"guidance_scale": 3.0, "sigma_min": 0.3, "eta": [1.0, 0.0, 0.0], "num_steps": 12, "experts": {}})
    assert fine_band.setting_value("c:guidance=2/4/4,eta=1") == ("c", {"guidance_scale": [2.0, 4.0, 4.0], "eta": [1.0]})
    for bad in ("nocolon", ":guidance=3", "c:size=3", "d:experts=all", "e:guidance=x", "f:guidance"):
        with pytest.raises(argparse.ArgumentTypeError):
            fine_band.setting_value(bad)


def test_smoke_run_prints_each_set(capsys):
    assert fine_band.main(["--smoke", "--threads", "1"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    assert [r["set"] for r in lines] == ["real (validation)", "default", "g1.5"]
    assert all(0 <= r["flat"] <= 1 and 0 <= r["faint"] <= 1 for r in lines)
    assert all(r["swd_16"] > 0 for r in lines[1:])
    assert lines[0]["flat"] > lines[1]["flat"]  # made-up flat shapes against a random network's noise


def test_flat_stats_of_exact_and_speckled_estimates():
    # a real image: flat grey with a 4-level bump at pixel (8, 8): its 2x2 block is not flat
    real = torch.full((1, 3, 16, 16), 128.0)
    real[..., 8, 8] += 4
    real = real / 127.5 - 1
    exact = fine_band.flat_stats(real, real, far=2)
    assert exact["flat_real"] == pytest.approx(1 - 4 / 256, abs=1e-4)
    assert exact["flat_kept"] == 1.0 and exact["rms_levels"] == 0.0
    assert exact["flat_kept_far"] == 1.0 and exact["rms_levels_far"] == 0.0
    # far: more than 2 px (Chebyshev) from the bump's block, rows and columns 8..9
    near = torch.zeros(16, 16, dtype=torch.bool)
    near[6:12, 6:12] = True
    assert exact["far_share"] == pytest.approx(float((~near).float().mean()), abs=1e-4)
    # an estimate with a +-2-level checker everywhere: nothing kept flat, RMS 2 levels
    sign = (torch.arange(16)[:, None] + torch.arange(16)[None, :]) % 2 * 2 - 1
    speckled = real + 2 * sign / 127.5
    s = fine_band.flat_stats(real, speckled, far=2)
    assert s["flat_kept"] == 0.0 and s["rms_levels"] == pytest.approx(2.0)
    assert s["flat_kept_far"] == 0.0 and s["rms_levels_far"] == pytest.approx(2.0)


def test_denoise_mode_on_the_smoke_model(capsys):
    assert fine_band.main(["--smoke", "--threads", "1", "--denoise", "0.5,1"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [r["sigma"] for r in rows] == [0.5, 1.0]
    for r in rows:
        assert 0 <= r["flat_kept"] <= 1 and r["rms_levels"] >= 0 and r["num"] > 0
    with pytest.raises(SystemExit):
        fine_band.main(["--denoise", "0,1"])


def test_shrink_is_a_setting_handed_to_the_pipeline():
    assert fine_band.setting_value("s:shrink=1.5") == ("s", {"shrink": 1.5})
    assert fine_band.setting_value("s:shrink=2,shrink_rule=soft") == ("s", {"shrink": 2.0, "shrink_rule": "soft"})
    for bad in ("s:shrink=-1", "s:shrink=inf", "s:shrink=x", "s:shrink_rule=blur"):
        with pytest.raises(argparse.ArgumentTypeError):
            fine_band.setting_value(bad)
