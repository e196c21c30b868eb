"""bench/finetune_quality.py: its smoke run (tiny random networks, made-up data) measures everything."""

from __future__ import annotations

import json

from _training_helpers import load_bench

fq = load_bench("finetune_quality")


def test_smoke_run_prints_every_measure_and_scale_zero_is_the_base(capsys):
    assert fq.main(["--smoke", "--threads", "1"]) == 0
    out = capsys.readouterr().out.splitlines()  # the smoke's own finetune logs its progress there too
    rows = [json.loads(line) for line in out if line.startswith("{")]
    assert [(r["measure"], r.get("arm")) for r in rows] == [
        ("cost", None), ("style", "base"), ("style", "finetune"), ("forgetting", "base"),
        ("forgetting", "scale 0"), ("forgetting", "scale 1"), ("controlnet", "base"), ("controlnet", "finetune")]
    assert rows[0]["trained_values"] > 0 and 0 < rows[0]["trained_share"] < 1
    assert next(r for r in rows if r.get("arm") == "scale 0")["bit_exact"] is True
    assert all(0 <= r["edge_f1"] <= 1 for r in rows if r["measure"] == "controlnet")


def test_unknown_measure_is_one_line(capsys):
    assert fq.main(["--smoke", "--measures", "style,nope"]) != 0
    assert "--measures takes a comma list" in capsys.readouterr().err
