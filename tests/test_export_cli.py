"""`edify export`: a run's latest checkpoint, or one checkpoint, as a model folder without training."""

from __future__ import annotations

import json

import torch

from edify.cli import main as cli_main
from edify.pipelines.text2image import TextToImagePipeline
from edify.training import checkpoint
from edify.training.loop import Trainer
from _training_helpers import WordHashEncoder, tiny_config


def test_export_a_run_or_one_of_its_checkpoints(tmp_path, capsys):
    run = tmp_path / "run"
    Trainer(tiny_config(checkpoint_images=2, keep_last=5), run, text_encoder=WordHashEncoder()).run(max_steps=3)
    ckpts = checkpoint.list_checkpoints(run)
    assert len(ckpts) >= 2
    first, latest = ckpts[0], checkpoint.latest_checkpoint(run)
    before = sorted(p.name for p in run.iterdir())
    assert cli_main(["export", str(first), str(tmp_path / "first"), "--dtype", "bf16"]) == 0
    assert cli_main(["export", str(run), str(tmp_path / "latest")]) == 0
    assert "model folder:" in capsys.readouterr().out
    assert sorted(p.name for p in run.iterdir()) == before  # nothing trained, nothing written in the run
    for folder, ckpt, dtype in ((tmp_path / "first", first, torch.bfloat16), (tmp_path / "latest", latest, torch.float32)):
        _, ema = checkpoint.load_weights(ckpt)
        net = TextToImagePipeline.from_pretrained(folder, text_encoder=WordHashEncoder()).network
        state = net.state_dict()
        assert all(torch.equal(state[k], ema[k].to(dtype).to(state[k].dtype)) for k in state)
        assert json.loads((folder / "training.json").read_text())["runs"]
    # the raw weights instead of the EMA ones
    assert cli_main(["export", str(first), str(tmp_path / "raw"), "--no-ema"]) == 0
    _, raw = checkpoint.load_weights(first, use_ema=False)
    state = TextToImagePipeline.from_pretrained(tmp_path / "raw", text_encoder=WordHashEncoder()).network.state_dict()
    assert all(torch.equal(state[k], raw[k]) for k in state)


def test_bad_input_is_one_line(tmp_path, capsys):
    run = tmp_path / "run"
    Trainer(tiny_config(), run, text_encoder=WordHashEncoder()).run(max_steps=1)
    assert cli_main(["export", str(run), str(tmp_path / "m")]) == 0
    capsys.readouterr()
    for words, message in ((["nowhere", "x"], "no training run or checkpoint at"),
                           ([str(tmp_path / "m"), str(tmp_path / "y")], "not a checkpoint"),
                           ([str(run), str(tmp_path / "m")], "already holds a model"),
                           ([str(run), str(tmp_path / "z"), "--shard-mib", "0"], "--shard-mib must be > 0")):
        assert cli_main(["export", *words]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err
    assert cli_main(["export", str(run), str(tmp_path / "m"), "--overwrite"]) == 0
