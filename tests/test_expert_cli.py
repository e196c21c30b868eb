"""`edify expert`: a model folder's stage experts added, replaced and removed (edify.pipelines.experts)."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from edify.cli import main as cli_main
from edify.pipelines.text2image import TextToImagePipeline
from test_pipeline import HashEncoder, tiny_pipeline


def digests(folder) -> dict[str, str]:
    """sha256 of each file directly in a folder (not its subfolders)."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def file_dtypes(folder) -> set[torch.dtype]:
    """The dtypes of the floating-point tensors stored in a folder's safetensors files."""
    from safetensors import safe_open

    out = set()
    for path in folder.glob("*.safetensors"):
        with safe_open(str(path), "pt") as f:
            out |= {f.get_tensor(k).dtype for k in f.keys() if f.get_tensor(k).is_floating_point()}
    return out


def perturbed(seed: int, **kw) -> TextToImagePipeline:
    pipe = tiny_pipeline(**kw)
    torch.manual_seed(seed)
    for p in pipe.network.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    return pipe


@pytest.fixture
def folders(tmp_path):
    tiny_pipeline().save_pretrained(tmp_path / "model", dtype=torch.bfloat16)
    perturbed(1).save_pretrained(tmp_path / "e1")
    (tmp_path / "e1" / "training.json").write_text(json.dumps({"runs": [{"run": "e1"}]}))
    perturbed(2).save_pretrained(tmp_path / "e2")
    return tmp_path


def load(folder) -> TextToImagePipeline:
    return TextToImagePipeline.from_pretrained(folder, text_encoder=HashEncoder())


def same_weights(a: torch.nn.Module, b: torch.nn.Module, dtype=torch.bfloat16) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k].to(dtype), sb[k].to(dtype)) for k in sa)


def test_add_replace_and_remove_an_expert(folders, capsys):
    model = folders / "model"
    before = digests(model)
    assert cli_main(["expert", str(model), "--stages", "0", "--from", str(folders / "e1")]) == 0
    assert "wrote expert-0" in capsys.readouterr().out
    pipe, e1 = load(model), load(folders / "e1")
    assert set(pipe.experts) == {0} and same_weights(pipe.experts[0], e1.network)
    assert same_weights(pipe.network, tiny_pipeline().network)
    # the main network's files are untouched; config.json now lists the expert
    after = digests(model)
    assert {k for k in before if before[k] != after[k]} == {"config.json"}
    assert json.loads((model / "config.json").read_text())["stage_experts"] == [0]
    # written in the dtype of the model's own files; the source's run record goes with it
    assert file_dtypes(model / "expert-0") == {torch.bfloat16}
    assert json.loads((model / "expert-0" / "training.json").read_text()) == {"runs": [{"run": "e1"}]}
    # sampling with the folder's expert is sampling with the source as the stage-0 expert
    kw = dict(seed=[3, 4], output_type="tensor", guidance_scale=2.0)
    base = load(model)
    base.experts = {}
    assert torch.equal(pipe(["red apple"] * 2, **kw).images, base(["red apple"] * 2, experts={0: load(model / "expert-0")}, **kw).images)
    # replaced by a source without a record: the old record goes
    assert cli_main(["expert", str(model), "--stages", "0", "--from", str(folders / "e2")]) == 0
    assert same_weights(load(model).experts[0], load(folders / "e2").network)
    assert not (model / "expert-0" / "training.json").exists()
    # listed
    capsys.readouterr()
    assert cli_main(["expert", str(model)]) == 0
    assert capsys.readouterr().out.splitlines() == ["stage 0 (32 px): expert-0", "stage 1 (16 px): the main network",
                                                    "stage 2 (8 px): the main network"]
    (model / "expert-0" / "training.json").write_text(json.dumps({"runs": [{"run": "e2", "images": 12345}]}))
    assert cli_main(["expert", str(model)]) == 0
    assert capsys.readouterr().out.splitlines()[0] == "stage 0 (32 px): expert-0 (run e2, 12,345 images)"
    # removed: the folder is as it was
    assert cli_main(["expert", str(model), "--stages", "0", "--remove"]) == 0
    assert not (model / "expert-0").exists() and load(model).experts == {}
    assert digests(model) == before


def test_a_group_of_stages_and_a_copy(folders):
    model, out = folders / "model", folders / "copy"
    before = digests(model)
    assert cli_main(["expert", str(model), "--stages", "2,1", "--from", str(folders / "e1"), "--out", str(out),
                     "--dtype", "fp32"]) == 0
    assert digests(model) == before and not (model / "expert-1-2").exists()
    pipe = load(out)
    assert set(pipe.experts) == {1, 2} and pipe.experts[1] is pipe.experts[2]
    assert same_weights(pipe.experts[1], load(folders / "e1").network, torch.float32)
    assert file_dtypes(out / "expert-1-2") == {torch.float32} and file_dtypes(out) == {torch.bfloat16}
    assert json.loads((out / "config.json").read_text())["stage_experts"] == [[1, 2]]


@pytest.mark.parametrize("words, message", [
    (["--stages", "3", "--from", "e1"], r"distinct integers in 0..2"),
    (["--stages", "0,0", "--from", "e1"], r"distinct integers in 0..2"),
    (["--stages", "x", "--from", "e1"], r"comma-separated stage numbers"),
    (["--stages", "0"], r"needs --from DIR .* or --remove"),
    (["--from", "e1"], r"--stages is needed"),
    (["--stages", "0", "--remove"], r"has no expert for stage\(s\) 0"),
    (["--stages", "0", "--from", "nowhere"], r"no model folder at"),
    (["--stages", "0", "--from", "other-styles"], r"differs from this model in styles"),
    (["--stages", "0", "--from", "wide"], r"another config than the one of the model"),
    (["--stages", "0", "--from", "with-expert"], r"has stage experts of its own"),
    (["--stages", "0", "--from", "e1", "--out", "e2"], r"already exists"),
    (["--stages", "0", "--from", "e1", "--shard-mib", "0"], r"--shard-mib must be positive"),
])
def test_bad_input_is_one_line(folders, capsys, monkeypatch, words, message):
    import re

    monkeypatch.chdir(folders)
    tiny_pipeline(styles=("noto",)).save_pretrained(folders / "other-styles")
    wide = tiny_pipeline()
    wide.config.network["dropout"] = 0.5
    wide.save_pretrained(folders / "wide")
    holder = tiny_pipeline()
    holder.experts = {0: perturbed(3).network}
    holder.save_pretrained(folders / "with-expert")
    before = digests(folders / "model")
    assert cli_main(["expert", "model", *words]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(message, err), err
    assert digests(folders / "model") == before and not (folders / "model" / "expert-0").exists()


def test_an_overlapping_group_is_refused(folders, capsys):
    model = folders / "model"
    assert cli_main(["expert", str(model), "--stages", "1,2", "--from", str(folders / "e1")]) == 0
    capsys.readouterr()
    assert cli_main(["expert", str(model), "--stages", "1", "--from", str(folders / "e2")]) == 2
    assert "served by the expert expert-1-2; remove it first" in capsys.readouterr().err
    assert cli_main(["expert", str(model), "--stages", "1", "--remove"]) == 2


def test_a_training_run_or_checkpoint_is_a_source(tmp_path):
    from _training_helpers import WordHashEncoder, tiny_config

    from edify.pipelines.experts import set_expert
    from edify.training import checkpoint
    from edify.training.export import export_pipeline
    from edify.training.loop import Trainer

    Trainer(tiny_config(), tmp_path / "base-run", text_encoder=WordHashEncoder()).run(max_steps=1)
    model = export_pipeline(tmp_path / "base-run", tmp_path / "model")
    Trainer(tiny_config(seed=5), tmp_path / "e-run", text_encoder=WordHashEncoder()).run(max_steps=2)
    reference = load(export_pipeline(tmp_path / "e-run", tmp_path / "e-model"))
    change = set_expert(model, [0], tmp_path / "e-run")  # the run: its latest checkpoint
    assert change.groups == ((0,),) and not change.removed
    assert same_weights(load(model).experts[0], reference.network, torch.float32)
    assert (model / "expert-0" / "training.json").read_bytes() == (tmp_path / "e-model" / "training.json").read_bytes()
    ckpt = checkpoint.latest_checkpoint(tmp_path / "base-run")  # one checkpoint, by its folder
    set_expert(model, [0], ckpt)
    assert same_weights(load(model).experts[0], load(model).network, torch.float32)
