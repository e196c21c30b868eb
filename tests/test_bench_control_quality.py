"""bench/control_quality.py: its seam statistic against closed forms, and its smoke run."""

import json

import pytest
import torch

from _training_helpers import load_bench

cq = load_bench("control_quality")

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_seam_band_is_the_boundary_two_pixels_wide():
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., :, 4:] = 1  # right half generated: the seam is columns 3 and 4
    band = cq.seam_band(mask)[0, 0]
    assert band[:, 3].all() and band[:, 4].all() and band.sum() == 16


def test_gradient_energy_of_a_ramp_and_of_a_step():
    ramp = torch.linspace(0, 1, 11).repeat(1, 3, 11, 1) * 2 - 1  # +0.1 per pixel along x, 3 channels
    band = torch.zeros(1, 1, 11, 11, dtype=torch.bool)
    band[..., 2:8, 2:8] = True
    assert cq.gradient_energy(ramp, band).item() == pytest.approx(3 * 0.1 ** 2, rel=1e-5)
    step = -torch.ones(1, 3, 8, 8)
    step[..., 4:] = 1  # black | white at column 4: one jump of 1 per channel in each row
    band = cq.seam_band((step[:, :1] > 0).float())
    assert cq.gradient_energy(step, band).item() == pytest.approx(3 * 1.0 / 2)  # half the band's pixels


def test_smoke_run_keeps_known_pixels_and_prints_every_arm(capsys):
    assert cq.main(["--smoke", "--threads", "1"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["control"], r.get("task"), r["arm"]) for r in rows] == [
        ("canny", None, "controlnet"), ("canny", None, "base"),
        *((("inpaint", task, method) for task in ("inpaint", "outpaint")
           for method in ("controlnet", "repaint", "controlnet+repaint")))]
    assert all(r["kept_max_err_255"] == 0 for r in rows if r["control"] == "inpaint")
    assert all(0 <= r["edge_f1"] <= 1 for r in rows if r["control"] == "canny")


def test_unknown_inpainting_method_is_one_line(capsys):
    assert cq.main(["--smoke", "--methods", "controlnet,nope"]) != 0
    assert "--methods takes a comma list" in capsys.readouterr().err
