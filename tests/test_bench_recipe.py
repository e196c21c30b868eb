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
    table = [line for line in out if line.startswith("| baseline")]
    assert table and "| 0.4 |" in table[-1]


def test_table_marks_rows_without_a_figure():
    text = recipe.table([{"candidate": "old", "guidance": 3.0, "fid": 300.0}])
    header, _, row = text.splitlines()
    assert "SWD 64" in header and "last sigma" in header
    assert row.startswith("| old | 3 | 0 | - |") and "| 300.0 |" in row
