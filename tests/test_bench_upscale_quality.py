"""bench/upscale_quality.py: its measures against closed forms, and its smoke run."""

import json

import pytest
import torch

from _training_helpers import load_bench

uq = load_bench("upscale_quality")

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_psnr_of_a_constant_offset():
    a = torch.zeros(2, 3, 8, 8)
    # 0.2 in [-1, 1] is 0.1 in [0, 1]: MSE 0.01, PSNR 20 dB
    assert torch.allclose(uq.psnr(a + 0.2, a), torch.full((2,), 20.0), atol=1e-4)


def test_ssim_is_one_for_equal_images_and_lower_for_noise():
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert torch.allclose(uq.ssim(x, x), torch.ones(2), atol=1e-5)
    assert (uq.ssim(x, x + 0.3 * torch.randn_like(x)) < 0.9).all()


def test_high_frequency_of_the_real_images_themselves_and_of_a_blur():
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    assert uq.high_frequency(x, x, 4) == {"hf_ratio": 1.0, "hf_lsd": 0.0}
    blurred = uq.bicubic(torch.nn.functional.avg_pool2d(x, 4), 4)
    hf = uq.high_frequency(blurred, x, 4)
    assert hf["hf_ratio"] < 0.2 and hf["hf_lsd"] > 0.5  # white noise loses its fine bands


def test_smoke_run_prints_the_chosen_arms_and_the_tiling(capsys):
    assert uq.main(["--smoke", "--threads", "1", "--arms", "bicubic,controlnet,controlnet+guidance"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["arm"] for r in rows] == ["bicubic", "controlnet", "controlnet+guidance", "tiled", "one pass"]
    # reconstruction guidance pulls down(output) onto the input, even with random networks
    assert rows[2]["consistency_psnr"] > rows[1]["consistency_psnr"] + 10


def test_unknown_arm_is_one_line(capsys):
    assert uq.main(["--smoke", "--arms", "bicubic,nope"]) != 0
    assert "--arms takes a comma list" in capsys.readouterr().err


def test_spread_covers_the_split_evenly():
    assert uq.spread(4, 10) == [0, 2, 5, 7]
    assert uq.spread(12, 10) == list(range(10))
    picks = uq.spread(100, 924)
    assert len(set(picks)) == 100 and picks[-1] >= 924 - 10  # reaches the last styles of the split
    with pytest.raises(uq.EdifyError, match="--num must be >= 1"):
        uq.spread(0, 10)
