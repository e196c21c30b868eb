"""bench/style_bands.py: the bands it removes against the pyramid's closed form, and its smoke run."""

from __future__ import annotations

import json

import pytest
import torch

from _training_helpers import load_bench
from edify.core import laplacian

style_bands = load_bench("style_bands")
pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_removing_bands_leaves_the_block_means():
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    # finest band removed: each 2x2 block replaced by its mean
    no_fine = style_bands.without_bands(x, 3, 2)
    means = x.reshape(2, 3, 8, 2, 8, 2).mean((3, 5))
    assert torch.allclose(no_fine, means.repeat_interleave(2, 2).repeat_interleave(2, 3), atol=1e-6)
    assert torch.allclose(no_fine, laplacian.up(laplacian.down(x, 1), 1), atol=1e-6)
    # coarsest band only: 4x4 block means
    coarse = style_bands.without_bands(x, 3, 1)
    means4 = x.reshape(2, 3, 4, 4, 4, 4).mean((3, 5))
    assert torch.allclose(coarse, means4.repeat_interleave(4, 2).repeat_interleave(4, 3), atol=1e-6)
    # keeping every band returns the images
    assert torch.allclose(style_bands.without_bands(x, 3, 3), x, atol=1e-6)


def test_smoke_run_scores_every_row(capsys):
    assert style_bands.main(["--smoke", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert len(rows) == 5 and all(sum(r["predicted"].values()) == r["num"] == 8 for r in rows)
    for name in ("| real |", "| real, finest band removed |", "| real, coarsest band only |",
                 "| from real at sigma 2 |", "| from real at sigma 2, no style |"):
        assert name in out


def test_bad_arguments_exit_with_one_line(capsys):
    with pytest.raises(SystemExit) as err:
        style_bands.main(["--starts", "1"])
    assert err.value.code == 2 and "--starts needs --model" in capsys.readouterr().err
    assert style_bands.main(["--num", "1", "--data", "nowhere"]) == 2
    assert "--num must be >= 2" in capsys.readouterr().err
