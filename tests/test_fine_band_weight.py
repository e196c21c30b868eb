"""fine_band_weight: the loss's squared error with the stage's finest band weighted. The split is
orthogonal (a 2x2 block mean and its zero-mean detail), so weight 1 is the plain EDM loss to
rounding, an error wholly in the finest band is scaled by the weight and one wholly in the block
means is not; the trainer takes the knob from its config and may change it when a run resumes."""

from __future__ import annotations

import math

import pytest
import torch

from _training_helpers import WordHashEncoder, tiny_config
from edify.core.laplacian import LaplacianProcess, down, up
from edify.core.losses import LaplacianEDMLoss, edm_weight
from edify.errors import EdifyError
from edify.training.config import validate
from edify.training.loop import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


class Fixed(torch.nn.Module):
    """A 'denoiser' that returns a fixed image whatever its input."""

    def __init__(self, out: torch.Tensor):
        super().__init__()
        self.out = out

    def forward(self, x, sigma, cond, stage):
        return self.out[..., : x.shape[-2], : x.shape[-1]]


def test_the_weighted_error_is_the_plain_one_at_1_and_scales_only_the_finest_band():
    g = torch.Generator().manual_seed(0)
    e = torch.randn(4, 3, 8, 8, generator=g)
    coarse, fine = up(down(e)), e - up(down(e))
    process = LaplacianProcess(3, (1.0, 5.0))
    plain = LaplacianEDMLoss(process)
    torch.testing.assert_close(LaplacianEDMLoss(process, fine_band_weight=1.0).squared_error(e),
                               e.square().mean(dim=(1, 2, 3)))
    w = LaplacianEDMLoss(process, fine_band_weight=4.0)
    # orthogonality: ||e||^2 = ||fine||^2 + ||coarse||^2, so the weighted error is w*fine + coarse
    torch.testing.assert_close(plain.squared_error(fine) + plain.squared_error(coarse), plain.squared_error(e))
    torch.testing.assert_close(w.squared_error(fine), 4.0 * fine.square().mean(dim=(1, 2, 3)))
    torch.testing.assert_close(w.squared_error(coarse), coarse.square().mean(dim=(1, 2, 3)))
    # a checkerboard of amplitude a is all finest band: its weighted mean square is w a^2
    checker = 0.3 * (torch.arange(8)[:, None] + torch.arange(8)[None, :]).remainder(2).mul(2).sub(1).float()
    assert float(w.squared_error(checker.expand(1, 3, 8, 8))[0]) == pytest.approx(4.0 * 0.09, rel=1e-6)


def test_the_loss_call_applies_the_weight_at_the_stage_resolution():
    process = LaplacianProcess(3, (1.0, 5.0))
    x0 = torch.zeros(2, 3, 16, 16)
    checker = (torch.arange(16)[:, None] + torch.arange(16)[None, :]).remainder(2).mul(2).sub(1).float()
    den = Fixed(0.1 * checker.expand(2, 3, 16, 16) + 0.2)  # error: a constant 0.2 plus a checker 0.1
    sigma = torch.tensor([0.5, 2.0])
    for stage in (0, 1):
        s_px = sigma / 2**stage
        lam = edm_weight(s_px, 0.5)
        out = den.out[..., : 16 >> stage, : 16 >> stage]
        fine = (out - up(down(out))).square().mean(dim=(1, 2, 3))
        coarse = up(down(out)).square().mean(dim=(1, 2, 3))
        for w in (1.0, 3.0):
            loss = LaplacianEDMLoss(process, fine_band_weight=w)(den, x0, None, stage, sigma=sigma)
            torch.testing.assert_close(loss, lam * (w * fine + coarse))


def test_bad_weights_are_refused_and_the_trainer_takes_it_when_resuming(tmp_path):
    process = LaplacianProcess(3, (1.0, 5.0))
    for bad in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(EdifyError, match="fine_band_weight must be finite and positive"):
            LaplacianEDMLoss(process, fine_band_weight=bad)
        with pytest.raises(EdifyError, match="fine_band_weight must be finite and positive"):
            validate(tiny_config(fine_band_weight=bad))
    run = tmp_path / "run"
    Trainer(tiny_config(), run, text_encoder=WordHashEncoder()).run(max_steps=1)
    t = Trainer(tiny_config(fine_band_weight=4.0), run, resume=True, text_encoder=WordHashEncoder())
    assert t.state.step == 1 and t.loss_fn.fine_band_weight == 4.0
    t.run(max_steps=1)
    assert t.state.step == 2
