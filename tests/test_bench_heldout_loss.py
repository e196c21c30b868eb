"""bench/heldout_loss.py: per-stage EDM loss on held-out and training images, at fixed noise."""

import json

import pytest
import torch

from _training_helpers import load_bench

heldout = load_bench("heldout_loss")
pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_smoke_row_has_each_stage_on_both_splits_and_their_gap(capsys):
    assert heldout.main(["--smoke"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    row = json.loads(lines[0])
    assert row["images"] == 12 and row["reps"] == 2 and row["min_sigma"] == 0.0
    for split in ("val", "train"):
        assert set(row[split]) == {"s0", "s1", "mean"}
        assert all(v > 0 for v in row[split].values())
        assert row[split]["mean"] == pytest.approx((row[split]["s0"] + row[split]["s1"]) / 2, abs=1e-5)
    assert row["gap"]["s0"] == pytest.approx(row["val"]["s0"] - row["train"]["s0"], abs=1e-5)
    assert lines[-3].startswith("| model | s0 val / train")


def test_losses_depend_on_the_model_not_on_the_draw(tmp_path):
    from edify.pipelines.text2image import TextToImagePipeline

    pipe = TextToImagePipeline.from_pretrained(heldout.smoke_model(tmp_path / "m"))
    images = torch.rand(6, 3, 16, 16) * 2 - 1
    captions, styles = [f"shape {i}" for i in range(6)], ["noto", "twemoji"] * 3
    first = heldout.stage_losses(pipe, images, captions, styles, reps=2, batch_size=4)
    assert heldout.stage_losses(pipe, images, captions, styles, reps=2, batch_size=4) == first
    with torch.no_grad():  # another network: other losses at the same noise
        for p in pipe.network.parameters():
            p.mul_(0.5)
    assert heldout.stage_losses(pipe, images, captions, styles, reps=2, batch_size=4) != first


def test_a_noise_floor_scores_the_finest_stage_on_less_noise_range_only(capsys):
    assert heldout.main(["--smoke", "--min-sigma", "1.5"]) == 0
    floored = json.loads(capsys.readouterr().out.strip().splitlines()[0])
    assert heldout.main(["--smoke"]) == 0
    full = json.loads(capsys.readouterr().out.strip().splitlines()[0])
    assert floored["min_sigma"] == 1.5
    assert floored["val"]["s0"] != full["val"]["s0"]  # stage 0 (sigma in [0, 2]) now draws from [1.5, 2]
    assert floored["val"]["s1"] == full["val"]["s1"]  # stage 1 (sigma >= 2) is untouched


def test_bad_input_is_one_line_and_exit_2(capsys, tmp_path):
    assert heldout.main(["--smoke", "--reps", "0"]) == 2
    assert "--reps and --batch-size must be >= 1" in capsys.readouterr().err
    assert heldout.main([]) == 2
    assert "give one or more model folders" in capsys.readouterr().err
