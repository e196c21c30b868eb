"""bench/swd_noise.py: the multi-scale SWD of real images against the same images with faint noise."""

import json

import pytest
import torch

from _training_helpers import load_bench

swd_noise = load_bench("swd_noise")
pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_noise_free_row_is_exactly_zero_and_noise_raises_the_finest_band_most():
    images = swd_noise.flat_images(32, 32, seed=5)
    rows = swd_noise.swd_under_noise(images, images.clone(), [0.0, 0.02, 0.1])
    assert [r["noise_std"] for r in rows] == [0.0, 0.02, 0.1]
    assert rows[0]["swd_32"] == rows[0]["swd_16"] == 0.0  # identical sets: SWD exactly 0
    assert 0 < rows[1]["swd_32"] < rows[2]["swd_32"]
    # flat fills: the noise changes the finest band's (normalised) patch distribution more
    assert rows[2]["swd_32"] > rows[2]["swd_16"]
    assert rows == swd_noise.swd_under_noise(images, images.clone(), [0.0, 0.02, 0.1])  # seeded


def test_smoke_prints_one_row_per_level_and_a_table(capsys):
    assert swd_noise.main(["--smoke", "--noise", "0,0.05"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    rows = [json.loads(line) for line in lines[:2]]
    assert [r["noise_std"] for r in rows] == [0, 0.05] and rows[0]["images"] == 64
    assert lines[2] == "| noise std | SWD 32 / 16 |"


@pytest.mark.parametrize("bad", ["", "a", "-0.1", "inf"])
def test_bad_noise_is_one_line_and_exit_2(bad, capsys):
    assert swd_noise.main(["--smoke", "--noise", bad]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("swd_noise: error: --noise") and "\n" not in err


def test_flat_images_are_seeded_and_in_range():
    a = swd_noise.flat_images(4, 16, seed=0)
    assert torch.equal(a, swd_noise.flat_images(4, 16, seed=0))
    assert a.shape == (4, 3, 16, 16) and a.min() >= -1 and a.max() <= 1
