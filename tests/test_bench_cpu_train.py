"""bench/cpu_train.py: fp32 and bf16 autocast steps side by side, and the two dtypes' losses agree."""

import json

import pytest

from _training_helpers import load_bench

cpu_train = load_bench("cpu_train")
pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_smoke_run_times_both_dtypes_and_their_losses_agree(capsys):
    assert cpu_train.main(["--smoke", "--threads", "1"]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["preset"] == "tiny-cpu" and row["stage_weights"] == [1.0, 1.0]
    for name in ("fp32", "bf16"):
        assert len(row[f"{name}_s_per_step"]) == 2 and all(t > 0 for t in row[f"{name}_s_per_step"])
    assert row["bf16_speedup"] == pytest.approx(row["bf16_img_per_s"] / row["fp32_img_per_s"], rel=1e-2)
    # bf16 keeps 8 bits of mantissa: the batch loss moves by far less than a percent, but it moves
    assert all(0 < d < 1e-2 for d in row["loss_rel_diff"])


def test_bad_stage_weights_are_one_line_and_exit_2(capsys):
    assert cpu_train.main(["--smoke", "--stage-weights", "1,x"]) == 2
    assert "--stage-weights takes 2 positive numbers" in capsys.readouterr().err
