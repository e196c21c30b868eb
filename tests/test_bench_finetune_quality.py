"""bench/finetune_quality.py: its smoke run (tiny random networks, made-up data) measures everything."""

from __future__ import annotations

import json

from _training_helpers import load_bench

fq = load_bench("finetune_quality")


def test_smoke_run_prints_every_measure_and_scale_zero_is_the_base(capsys):
    assert fq.main(["--smoke", "--threads", "1", "--sigma-min", "0.5"]) == 0
    out = capsys.readouterr().out.splitlines()  # the smoke's own finetune logs its progress there too
    rows = [json.loads(line) for line in out if line.startswith("{")]
    assert [(r["measure"], r.get("arm")) for r in rows] == [
        ("cost", None), ("style", "base"), ("style", "finetune"), ("forgetting", "base"),
        ("forgetting", "scale 0"), ("forgetting", "scale 1"), ("controlnet", "base"), ("controlnet", "finetune"),
        ("loss", "base"), ("loss", "finetune"), ("loss", "base"), ("loss", "scale 1")]
    assert rows[0]["trained_values"] > 0 and 0 < rows[0]["trained_share"] < 1
    assert all(r["sigma_min"] == 0.5 and r["guidance"] == 2.0 for r in rows)  # the settings it ran at
    assert next(r for r in rows if r.get("arm") == "scale 0")["bit_exact"] is True
    assert all(0 <= r["edge_f1"] <= 1 for r in rows if r["measure"] == "controlnet")
    losses = [r for r in rows if r["measure"] == "loss"]
    assert all(r["loss"] > 0 and r["loss"] == round(sum(r[f"loss_stage{j}"] for j in range(3)) / 3, 4)
               for r in losses)
    assert losses[0]["loss"] != losses[1]["loss"]  # another style row and the delta's weights


def test_heldout_loss_is_seeded_and_the_same_draws_for_every_arm():
    import torch
    from test_pipeline import tiny_pipeline

    pipe = tiny_pipeline()
    images = torch.rand(5, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    args = (images, ["a red heart"] * 5, ["noto"] * 5)
    first = fq.heldout_loss(pipe, *args, repeats=2, seed=3, batch=2)
    assert first == fq.heldout_loss(pipe, *args, repeats=2, seed=3, batch=2)
    assert first != fq.heldout_loss(pipe, *args, repeats=2, seed=4, batch=2)
    with torch.no_grad():  # other weights, the same draws: another loss
        for p in pipe.network.parameters():
            p.mul_(3.0)
    assert fq.heldout_loss(pipe, *args, repeats=2, seed=3, batch=2)["loss"] != first["loss"]


def test_heldout_loss_scores_a_stage_on_its_expert():
    import copy
    from types import SimpleNamespace

    import torch
    from test_pipeline import tiny_pipeline

    pipe = tiny_pipeline()
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    args = (images, ["a red heart"] * 4, ["noto"] * 4)
    plain = fq.heldout_loss(pipe, *args, repeats=1, seed=3, batch=2)
    expert = copy.deepcopy(pipe.network)
    with torch.no_grad():
        for p in expert.parameters():
            p.mul_(3.0)
    pipe.experts = {0: expert}
    routed = fq.heldout_loss(pipe, *args, repeats=1, seed=3, batch=2)
    assert routed["loss_stage0"] != plain["loss_stage0"]
    assert all(routed[f"loss_stage{j}"] == plain[f"loss_stage{j}"] for j in (1, 2))
    pipe.finetunes = [SimpleNamespace(scale=1.0, experts=())]  # a finetune of the main network only
    assert fq.heldout_loss(pipe, *args, repeats=1, seed=3, batch=2) == plain


def test_unknown_measure_is_one_line(capsys):
    assert fq.main(["--smoke", "--measures", "style,nope"]) != 0
    assert "--measures takes a comma list" in capsys.readouterr().err
