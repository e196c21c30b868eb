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
