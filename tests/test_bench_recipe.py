"""bench/recipe.py: its smoke run trains, scores and tabulates a candidate, every figure of the row."""

from __future__ import annotations

import json
import math

from _training_helpers import load_bench

recipe = load_bench("recipe")


def test_smoke_row_has_every_figure_and_the_schedule_end_it_was_asked(capsys):
    recipe.main(["--smoke", "--candidate", "baseline", "--sigma-min", "0.4", "--guidance", "2"])
    out = capsys.readouterr().out.splitlines()
    rows = [json.loads(line) for line in out if line.startswith("{")]
    row = next(r for r in rows if r.get("candidate") == "baseline" and "fid" in r)
    assert row["sigma_min"] == 0.4 and row["guidance"] == 2.0 and row["num_fake"] == 8
    for key in ("fid", "kid", "swd_64", "swd_32", "swd_16", "retrieval_top5", "style_acc"):
        assert math.isfinite(row[key]), key
    assert row["swd_64"] > 0 and 0 <= row["style_acc"] <= 1
    assert all(row[f"swd_{r}_real"] > 0 for r in (64, 32, 16))  # the real-vs-real floor
    table = [line for line in out if line.startswith("| baseline")]
    assert table and "| 0.4 |" in table[-1]


def test_table_marks_rows_without_a_figure():
    text = recipe.table([{"candidate": "old", "guidance": 3.0, "fid": 300.0}])
    header, _, row = text.splitlines()
    assert "SWD 64" in header and "last sigma" in header
    assert row.startswith("| old | - | - | - | - | - | 3 | 0 | - |") and "| 300.0 |" in row


def test_network_candidates_and_a_continuation_build_the_configs_they_name():
    from argparse import Namespace

    args = Namespace(data="data/emoji", cpu_minutes=5.0, smoke=False, init_from="weights/emoji-64", out="runs")
    grow = recipe.train_config(args, "grow")
    assert grow.model["pooled_cond"] and grow.model["cross_attention_levels"] == [0, 1, 2]
    assert grow.init_from == "weights/emoji-64" and grow.lr_decay_images == 40000
    assert grow.stage_weights == (0.2, 0.3, 0.5) and grow.max_cpu_minutes == 5.0
    assert recipe.run_dir_of(args, "grow").name == "grow-from-emoji-64-cpu5m"
    scratch = recipe.train_config(Namespace(**{**vars(args), "init_from": None}), "pooled")
    assert scratch.model["pooled_cond"] and scratch.model["cross_attention_levels"] == [1, 2]
    assert scratch.init_from == "" and scratch.lr_decay_images == 0


def test_stage_expert_arguments_and_their_table_cell():
    import argparse

    import pytest

    assert recipe.expert_value("0=runs/e0") == ((0,), "runs/e0")
    assert recipe.expert_value("1,2=runs/e12") == ((1, 2), "runs/e12")
    for bad in ("runs/e0", "x=runs/e0", "0=", "-1=runs/e0", "1,=runs/e1"):
        with pytest.raises(argparse.ArgumentTypeError, match="STAGES=DIR"):
            recipe.expert_value(bad)
    row = recipe.table([{"candidate": "m", "experts": {"0": "runs/p/e0"}, "fid": 1.0}]).splitlines()[-1]
    assert "| 0=e0 |" in row
    row = recipe.table([{"candidate": "m", "experts": {"0": "w/expert-0", "1,2": "w/expert-1-2"}}]).splitlines()[-1]
    assert "| 0=expert-0, 1,2=expert-1-2 |" in row


def test_guide_arguments_and_their_table_cell():
    assert recipe.guide_value("runs/old") == (None, "runs/old")
    assert recipe.guide_value("1,2=runs/old") == ((1, 2), "runs/old")
    row = recipe.table([{"candidate": "m", "guide_model": "w/old", "guide_uncond": True}]).splitlines()[-1]
    assert "| old (uncond) |" in row
    row = recipe.table([{"candidate": "m", "guide_model": {"0": "main", "1,2": "w/old"},
                         "guide_weight": [1.0, 0.5, 0.5]}]).splitlines()[-1]
    assert "| 0=main, 1,2=old x 1,0.5,0.5 |" in row


def test_shrink_is_a_sampling_override_and_a_table_column():
    import argparse

    import pytest

    assert recipe.shrink_value("1.5") == 1.5
    for bad in ("-1", "inf", "x"):
        with pytest.raises(argparse.ArgumentTypeError):
            recipe.shrink_value(bad)
    table = recipe.table([{"candidate": "a", "shrink": 2.0, "shrink_rule": "garrote", "fid": 1.0},
                          {"candidate": "b", "fid": 2.0}]).splitlines()
    assert "| shrink | shrink rule |" in table[0] and "| 2 | garrote |" in table[-2] and "| - | - |" in table[-1]
