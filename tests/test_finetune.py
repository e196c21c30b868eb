"""Finetuning (section 7): only the chosen parameters train, the delta file, loading at a scale,
unloading exactly, LoRA merges through peft, and one-line refusals of bad input."""

from __future__ import annotations

import argparse
import copy
import json

import numpy as np
import pytest
import torch
from PIL import Image
from test_cli import assert_one_line, edify
from test_pipeline import HashEncoder, tiny_pipeline

from edify.errors import EdifyError
from edify.pipelines import finetune as ft
from edify.pipelines.text2image import TextToImagePipeline
from edify.training import finetune as training

pytestmark = pytest.mark.usefixtures("one_thread")

MODES = ("crossattn", "crossattn_kv", "lora", "full")


def image_folder(folder, n: int = 4, captions: bool = True):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        if captions:
            (folder / f"{i}.txt").write_text(f"a red thing number {i}")
    return folder


def finetune_args(*words: str) -> argparse.Namespace:
    from edify.cli import ArgumentParser

    parser = ArgumentParser(prog="edify finetune")
    training.add_arguments(parser)
    return parser.parse_args(list(words))


def run_logged(args: argparse.Namespace) -> list[str]:
    """Run `edify finetune` with these arguments (tiny text encoder); returns the lines it logged."""
    import edify.training.distributed as distributed

    lines = []
    print0 = distributed.print0
    distributed.print0 = lambda *a, **k: lines.append(" ".join(map(str, a)))
    try:
        assert training.run(args, text_encoder=HashEncoder()) == 0
    finally:
        distributed.print0 = print0
    return lines


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny base model, four captioned images, and a 3-step delta of every mode (through the command)."""
    root = tmp_path_factory.mktemp("finetune")
    tiny_pipeline().save_pretrained(root / "base")
    data = image_folder(root / "images")
    deltas, logs = {}, {}
    for mode in MODES:
        args = finetune_args("--base", str(root / "base"), "--data", str(data), "--out", str(root / f"delta-{mode}"),
                             "--params", mode, "--rank", "2", "--steps", "3", "--batch-size", "2", "--lr", "1e-2",
                             "--style", "pixel", "--preset", "tiny-cpu", "--run", str(root / f"run-{mode}"),
                             "--set", "text_cache=false", "--set", "log_images=2", "--threads", "1")
        deltas[mode], logs[mode] = root / f"delta-{mode}", run_logged(args)
    return root, deltas, logs


def load_base(root) -> TextToImagePipeline:
    return TextToImagePipeline.from_pretrained(root / "base", text_encoder=HashEncoder())


def sample(pipe, style="noto"):
    return pipe("a red thing", style=style, seed=0, num_steps=3, output_type="tensor").images


# ---- training ---------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", MODES)
def test_only_the_chosen_parameters_train(setup, mode):
    root, deltas, logs = setup
    base = load_base(root).network.state_dict()
    info, tensors = ft.read_delta(deltas[mode])
    net = load_base(root).network
    expected = ft.lora_targets(net) if mode == "lora" else ft.trained_names(net, mode)
    assert list(info.parameters) == expected
    assert [(s.name, s.slot) for s in info.styles] == [("pixel", 2)]  # the tiny base has 2 styles of 4 slots
    # every trained tensor moved away from the base; crossattn_kv trains no query or output projection
    for name in info.parameters:
        if mode != "lora":
            assert not torch.equal(tensors[name], base[name]), name
    if mode == "crossattn_kv":
        assert all(name.endswith(".kv.weight") for name in info.parameters)
    if mode == "full":  # everything but the condition embedder, which ControlNets copy
        assert set(info.parameters) == {n for n, _ in net.named_parameters() if not n.startswith("cond_embed.")}
    # the run trained nothing else: the last checkpoint holds only these, the other table rows untouched
    from edify.training import checkpoint

    _, weights = checkpoint.load_weights(root / f"run-{mode}", use_ema=False)
    weights = {training.parameter_name(k): v for k, v in weights.items()}
    names = set(weights)
    lora = {f"{m}.{ab}.{ft.LORA_ADAPTER}.weight" for m in expected for ab in ("lora_A", "lora_B")}
    assert names == (lora if mode == "lora" else set(expected)) | {ft.MEDIA_TABLE}
    table = weights[ft.MEDIA_TABLE]
    keep = [r for r in range(table.shape[0]) if r != 2]
    assert torch.equal(table[keep], base[ft.MEDIA_TABLE][keep])
    assert not torch.equal(table[2], base[ft.MEDIA_TABLE][2])


def test_the_share_trained_is_printed(setup):
    root, _, logs = setup
    total = sum(p.numel() for p in load_base(root).network.parameters())
    net = load_base(root).network
    params = dict(net.named_parameters())
    trained = sum(params[n].numel() for n in ft.trained_names(net, "crossattn")) + params[ft.MEDIA_TABLE].shape[1]
    line = next(x for x in logs["crossattn"] if "trains" in x)
    assert f"trains {trained:,} of the base's {total:,} parameters ({100 * trained / total:.2f}%)" in line
    assert "new style 'pixel' in media slot 2" in line
    assert any("finetune:" in x and "MiB" in x for x in logs["crossattn"])


# ---- loading ------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", MODES)
def test_scale_zero_is_the_base_and_unload_restores_it(setup, mode):
    root, deltas, _ = setup
    pipe = load_base(root)
    state = {k: v.clone() for k, v in pipe.network.state_dict().items()}
    reference = sample(pipe)
    pipe.load_finetune(deltas[mode], scale=0.0)
    assert all(torch.equal(v, state[k]) for k, v in pipe.network.state_dict().items())
    assert torch.equal(sample(pipe), reference)
    pipe.unload_finetune()
    pipe.load_finetune(deltas[mode], scale=1.0)
    assert "pixel" in pipe.vocab.names
    changed = sample(pipe, style="pixel")
    assert not torch.equal(changed, reference)
    pipe.unload_finetune()
    assert all(torch.equal(v, state[k]) for k, v in pipe.network.state_dict().items())
    assert torch.equal(sample(pipe), reference)
    with pytest.raises(EdifyError, match="unknown style 'pixel'"):
        sample(pipe, style="pixel")


def test_scale_interpolates_the_weights(setup):
    root, deltas, _ = setup
    info, tensors = ft.read_delta(deltas["crossattn"])
    pipe = load_base(root)
    name = info.parameters[0]
    base = pipe.network.state_dict()[name].clone()
    base_row = pipe.network.state_dict()[ft.MEDIA_TABLE][2].clone()
    pipe.load_finetune(deltas["crossattn"], scale=0.5)
    assert torch.allclose(pipe.network.state_dict()[name], (base + tensors[name]) / 2, atol=1e-6)
    # the new style's row is written whole at any scale but 0: the base's row of a free slot is untrained
    row = tensors[ft.STYLE_PREFIX + "pixel"]
    assert torch.equal(pipe.network.state_dict()[ft.MEDIA_TABLE][2], row)
    pipe.unload_finetune().load_finetune(deltas["crossattn"], scale=1.0)
    assert torch.equal(pipe.network.state_dict()[name], tensors[name])  # lerp ends exactly
    assert torch.equal(pipe.network.state_dict()[ft.MEDIA_TABLE][2], row)
    pipe.unload_finetune().load_finetune(deltas["crossattn"], scale=0.0)
    assert torch.equal(pipe.network.state_dict()[ft.MEDIA_TABLE][2], base_row)


def test_lora_merge_matches_the_adapter_and_unmerges_exactly(setup):
    root, deltas, _ = setup
    info, tensors = ft.read_delta(deltas["lora"])
    pipe = load_base(root)
    state = {k: v.clone() for k, v in pipe.network.state_dict().items()}
    adapted = copy.deepcopy(pipe.network)  # peft's own unmerged adapters, loaded with the delta
    training.select(adapted, "lora", info.rank, info.alpha)
    params = dict(adapted.named_parameters())
    with torch.no_grad():
        for m in info.parameters:
            for ab in ("lora_A", "lora_B"):
                params[f"{m}.{ab}.{ft.LORA_ADAPTER}.weight"].copy_(tensors[f"{m}.{ab}"])
    g = torch.Generator().manual_seed(0)
    x, c_noise = torch.randn(2, 3, 32, 32, generator=g), torch.randn(2, generator=g)
    cond = pipe.encode(["a red thing", "a blue thing"], ["noto", None])
    with torch.no_grad():
        plain = pipe.network(x, c_noise, cond)
        expected = adapted(x, c_noise, cond)
        pipe.load_finetune(deltas["lora"], scale=1.0)
        merged = pipe.network(x, c_noise, cond)
    assert not torch.allclose(plain, expected, atol=1e-4)  # the adapter does something
    assert torch.allclose(merged, expected, atol=1e-5)
    pipe.unload_finetune()
    assert all(torch.equal(v, state[k]) for k, v in pipe.network.state_dict().items())


# ---- the delta file -------------------------------------------------------------------------------

def test_delta_round_trip_and_size(setup, tmp_path):
    root, deltas, _ = setup
    info, tensors = ft.read_delta(deltas["crossattn_kv"])
    out = ft.save_delta(tmp_path / "copy", info, tensors)
    info2, tensors2 = ft.read_delta(out / ft.INFO_FILE)
    assert info2.to_dict() | {"save": ""} == info.to_dict() | {"save": ""} and info2.save != info.save
    assert tensors2.keys() == tensors.keys() and all(torch.equal(tensors[k], tensors2[k]) for k in tensors)
    data = json.loads((out / ft.INFO_FILE).read_text())
    assert data["mode"] == "crossattn_kv" and data["trained"]["steps"] == 3
    assert sorted(p.name for p in out.iterdir()) == [ft.INFO_FILE, ft.WEIGHTS_FILE]
    values = sum(t.numel() for t in tensors.values())
    assert (out / ft.WEIGHTS_FILE).stat().st_size < 4 * values + 4096


def test_a_delta_of_another_save_or_with_bad_values_is_refused(setup, tmp_path):
    root, deltas, _ = setup
    info, tensors = ft.read_delta(deltas["crossattn_kv"])
    a, b = ft.save_delta(tmp_path / "a", info, tensors), ft.save_delta(tmp_path / "b", info, tensors)
    (a / ft.WEIGHTS_FILE).write_bytes((b / ft.WEIGHTS_FILE).read_bytes())
    with pytest.raises(EdifyError, match="not from the save"):
        ft.read_delta(a)
    bad = dict(tensors)
    bad[info.parameters[0]] = torch.full_like(bad[info.parameters[0]], float("nan"))
    ft.save_delta(tmp_path / "nan", info, bad)
    with pytest.raises(EdifyError, match="finite"):
        ft.read_delta(tmp_path / "nan")
    (tmp_path / "json").mkdir()
    (tmp_path / "json" / ft.INFO_FILE).write_text(json.dumps({**info.to_dict(), "mode": "everything"}))
    (tmp_path / "json" / ft.WEIGHTS_FILE).write_bytes(b"")
    with pytest.raises(EdifyError, match="mode"):
        ft.read_delta(tmp_path / "json")


def test_a_delta_for_another_base_is_refused(setup, tmp_path):
    root, deltas, _ = setup
    other = load_base(root)
    with torch.no_grad():
        other.network.head.bias.add_(1e-3)  # the same network, other weights
    other.save_pretrained(tmp_path / "other")
    pipe = TextToImagePipeline.from_pretrained(tmp_path / "other", text_encoder=HashEncoder())
    with pytest.raises(EdifyError, match="made for another base model .its weights differ"):
        pipe.load_finetune(deltas["crossattn"])
    assert pipe.finetunes == [] if hasattr(pipe, "finetunes") else True


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), "x"])
def test_a_scale_that_is_not_finite_is_refused(setup, scale):
    root, deltas, _ = setup
    with pytest.raises(EdifyError, match="finite number"):
        load_base(root).load_finetune(deltas["crossattn"], scale=scale)


def test_two_finetunes_load_together_unless_they_overlap(setup, tmp_path):
    root, deltas, _ = setup
    pipe = load_base(root)
    state = {k: v.clone() for k, v in pipe.network.state_dict().items()}
    pipe.load_finetune(deltas["crossattn"])
    for other in ("crossattn_kv", "lora"):  # both change kv projections and the same style slot
        with pytest.raises(EdifyError, match="both change"):
            pipe.load_finetune(deltas[other])
    pipe.unload_finetune()
    # two halves of one delta: queries only with the style, key/values only; they load together
    info, tensors = ft.read_delta(deltas["crossattn"])
    q = [n for n in info.parameters if ".q." in n]
    kv = [n for n in info.parameters if ".kv." in n]
    import dataclasses

    first = dataclasses.replace(info, parameters=tuple(q))
    second = dataclasses.replace(info, parameters=tuple(kv), styles=())
    ft.save_delta(tmp_path / "q", first, {k: v for k, v in tensors.items() if k in first.tensor_names()})
    ft.save_delta(tmp_path / "kv", second, {k: tensors[k] for k in kv})
    pipe.load_finetune(tmp_path / "q", 0.7).load_finetune(tmp_path / "kv", 0.3)
    now = pipe.network.state_dict()
    assert torch.allclose(now[q[0]], torch.lerp(state[q[0]], tensors[q[0]], 0.7))
    assert torch.allclose(now[kv[0]], torch.lerp(state[kv[0]], tensors[kv[0]], 0.3))
    pipe.unload_finetune(tmp_path / "q")
    assert torch.equal(pipe.network.state_dict()[q[0]], state[q[0]])
    assert "pixel" not in pipe.vocab.names
    pipe.unload_finetune(tmp_path / "kv")
    assert all(torch.equal(v, state[k]) for k, v in pipe.network.state_dict().items())


def test_new_style_rows_reach_the_controlnets(setup):
    from edify.networks.controlnet import ControlNet
    from edify.pipelines.control import ControlNetPipeline

    root, deltas, _ = setup
    base = load_base(root)
    pipe = ControlNetPipeline(base.network, base.config, base.text_encoder, [ControlNet.from_base(base.network)])
    cn_state = {k: v.clone() for k, v in pipe.controlnets[0].state_dict().items()}
    info, tensors = ft.read_delta(deltas["crossattn"])
    pipe.load_finetune(deltas["crossattn"])
    now = pipe.controlnets[0].state_dict()
    changed = [k for k in now if not torch.equal(now[k], cn_state[k])]
    assert changed == [ft.MEDIA_TABLE] and torch.equal(now[ft.MEDIA_TABLE][2], tensors["style.pixel"])
    pipe.unload_finetune()
    assert all(torch.equal(v, cn_state[k]) for k, v in pipe.controlnets[0].state_dict().items())


# ---- bad input through the commands: one line, exit status 2 --------------------------------------

def test_data_without_images_or_captions_is_one_line(setup, tmp_path):
    root, _, _ = setup
    (tmp_path / "empty").mkdir()
    result = edify("finetune", "--base", str(root / "base"), "--data", str(tmp_path / "empty"), "--out",
                   str(tmp_path / "d"))
    assert_one_line(result, 2, "no images in")
    image_folder(tmp_path / "bare", captions=False)
    (tmp_path / "bare" / "0.txt").write_text("only one has a caption")
    with pytest.raises(EdifyError, match="3 of 4 images .* have no caption"):
        training.read_data(str(tmp_path / "bare"), 32)
    for f in (tmp_path / "bare").glob("*.txt"):
        f.unlink()
    result = edify("finetune", "--base", str(root / "base"), "--data", str(tmp_path / "bare"), "--out",
                   str(tmp_path / "d"))
    assert_one_line(result, 2, "no captioned images", "--caption")
    data = training.read_data(str(tmp_path / "bare"), 32, caption="my thing", style="mine")
    assert data.images.shape == (4, 3, 32, 32) and set(data.captions) == {"my thing"}


# ---- prior preservation --------------------------------------------------------------------------

def tiny_data(n: int, style: str | None, caption: str = "thing") -> training.FinetuneData:
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 3, 4, 4).contiguous()
    return training.FinetuneData(images, [f"{caption} {i}" for i in range(n)], [style] * n)


@pytest.mark.parametrize("share", [0.5, 0.25, 0.3])
def test_prior_share_of_the_stream_is_exact_and_each_source_runs_through_epochs(share):
    data, prior = tiny_data(5, "pixel"), tiny_data(7, "noto", "prior")
    stream = training.images_stream(data, 4, seed=1, rank=0, world=1, prior=prior, prior_share=share)
    batches = [stream.next() for _ in range(50)]
    captions = [c for b in batches for c in b.caption]
    from_prior = [c.startswith("prior") for c in captions]
    assert sum(from_prior) == int(len(captions) * share)  # floor((i + 1) p) - floor(i p) summed over i < 200
    assert all(abs(sum(from_prior[:k]) - k * share) < 1 for k in range(len(captions)))  # spread evenly
    ours = [c for c, f in zip(captions, from_prior) if not f]
    theirs = [c for c, f in zip(captions, from_prior) if f]
    for seen, n in ((ours, 5), (theirs, 7)):  # every epoch of each source is a permutation of it
        for e in range(len(seen) // n):
            assert len(set(seen[e * n:(e + 1) * n])) == n
    assert all(st == "noto" for b in batches for c, st in zip(b.caption, b.style) if c.startswith("prior"))
    assert float(batches[0].image.min()) >= -1 and float(batches[0].image.max()) <= 1
    # resumable: a stream restored at a position continues with the same samples
    again = training.images_stream(data, 4, seed=1, rank=0, world=1, prior=prior, prior_share=share)
    again.load_state_dict({"kind": "synthetic", "consumed": 4 * 30})
    assert [again.next().caption for _ in range(20)] == [b.caption for b in batches[30:]]
    # without a prior, the stream is the plain one
    plain = training.images_stream(data, 4, seed=1, rank=0, world=1)
    assert all(not c.startswith("prior") for _ in range(5) for c in plain.next().caption)


def test_a_finetune_with_prior_data_trains_and_records_it(setup, tmp_path):
    root, _, _ = setup
    prior = image_folder(tmp_path / "prior", n=6)
    (prior / "metadata.jsonl").write_text("".join(
        json.dumps({"file_name": f"{i}.png", "caption": f"an old thing {i}", "style": "noto"}) + "\n"
        for i in range(6)))
    for f in prior.glob("*.txt"):
        f.unlink()
    args = finetune_args("--base", str(root / "base"), "--data", str(root / "images"), "--out",
                         str(tmp_path / "delta"), "--steps", "3", "--batch-size", "4", "--style", "pixel",
                         "--prior-data", str(prior), "--prior-share", "0.5", "--preset", "tiny-cpu",
                         "--run", str(tmp_path / "run"), "--set", "text_cache=false", "--threads", "1")
    assert training.run(args, text_encoder=HashEncoder()) == 0
    info, _ = ft.read_delta(tmp_path / "delta")
    assert info.trained["prior_share"] == 0.5 and info.trained["prior_data"] == str(prior)
    assert "--prior-data" in info.trained["command"]


def test_the_style_row_learns_at_its_own_rate(setup, tmp_path):
    """--style-lr scales the new style row's step and nothing else: after one Adam step (each
    coordinate moves by about the learning rate) the row has moved ~100x as far at 100x the rate,
    and every trained weight is the same in both runs."""
    root, _, _ = setup
    moved, deltas = {}, {}
    start = load_base(root).network.state_dict()[ft.MEDIA_TABLE][:2].mean(0)  # the row starts at the mean
    for style_lr in ("0.0001", "0.01"):
        args = finetune_args("--base", str(root / "base"), "--data", str(root / "images"), "--out",
                             str(tmp_path / style_lr), "--steps", "1", "--batch-size", "2", "--lr", "1e-3",
                             "--style-lr", style_lr, "--style", "pixel", "--preset", "tiny-cpu",
                             "--run", str(tmp_path / f"run-{style_lr}"), "--set", "text_cache=false",
                             "--threads", "1")
        assert training.run(args, text_encoder=HashEncoder()) == 0
        info, tensors = ft.read_delta(tmp_path / style_lr)
        moved[style_lr] = float((tensors[ft.STYLE_PREFIX + "pixel"] - start).abs().max())
        deltas[style_lr] = tensors
        assert f"--style-lr {style_lr}" in info.trained["command"]
    assert 90 < moved["0.01"] / moved["0.0001"] < 110
    for name in info.parameters:
        assert torch.equal(deltas["0.0001"][name], deltas["0.01"][name]), name
    for bad in ("0", "-1", "nan", "inf"):
        result = edify("finetune", "--base", str(root / "base"), "--data", str(root / "images"), "--out",
                       str(tmp_path / "d"), "--style-lr", bad)
        assert_one_line(result, 2, "--style-lr must be a finite number > 0")


def test_bad_prior_data_is_one_line(setup, tmp_path):
    root, _, _ = setup
    common = ("finetune", "--base", str(root / "base"), "--data", str(root / "images"), "--out", str(tmp_path / "d"),
              "--style", "pixel", "--steps", "2", "--preset", "tiny-cpu", "--run", str(tmp_path / "run"))
    assert_one_line(edify(*common, "--prior-data", str(tmp_path / "nope")), 2, "--prior-data", "does not exist")
    assert_one_line(edify(*common, "--prior-data", str(root / "images"), "--prior-share", "1"), 2,
                    "--prior-share must be in (0, 1), got 1.0")
    odd = image_folder(tmp_path / "odd", n=2)
    (odd / "metadata.jsonl").write_text("".join(
        json.dumps({"file_name": f"{i}.png", "caption": "x", "style": "watercolor"}) + "\n" for i in range(2)))
    assert_one_line(edify(*common, "--prior-data", str(odd)), 2, "the prior data's styles must be the base's",
                    "watercolor")
    assert not (tmp_path / "d").exists()


def test_generate_refuses_bad_finetunes_in_one_line(setup, tmp_path):
    root, deltas, _ = setup
    other = load_base(root)
    with torch.no_grad():
        other.network.head.bias.add_(1e-3)
    other.save_pretrained(tmp_path / "other")
    common = ("generate", "red thing", "-o", str(tmp_path / "x.png"), "--steps", "3")
    result = edify(*common, "--model", str(tmp_path / "other"), "--finetune", str(deltas["crossattn"]))
    assert_one_line(result, 2, "another base model")
    result = edify(*common, "--model", str(root / "base"), "--finetune", str(deltas["crossattn"]),
                   "--finetune-scale", "nan")
    assert_one_line(result, 2, "--finetune-scale must be a finite number")
    result = edify(*common, "--model", str(root / "base"), "--finetune", str(deltas["crossattn"]),
                   "--finetune", str(deltas["lora"]))
    assert_one_line(result, 2, "both change")
    assert not (tmp_path / "x.png").exists()


def test_finetune_help_does_not_import_torch():
    import subprocess
    import sys

    from test_cli import HELP_WITHOUT_TORCH, ROOT

    result = subprocess.run([sys.executable, "-c", HELP_WITHOUT_TORCH, "finetune"], capture_output=True, text=True,
                            cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert "--params" in result.stdout and "--finetune" not in result.stdout


def test_a_finetune_at_scale_zero_keeps_the_base_experts(setup):
    import copy

    root, deltas, _ = setup
    pipe = load_base(root)
    main_only = sample(pipe)
    expert = copy.deepcopy(pipe.network)
    torch.manual_seed(3)
    for p in expert.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    pipe.experts = {0: expert}
    reference = sample(pipe)
    assert not torch.equal(reference, main_only)
    pipe.load_finetune(deltas["crossattn"], scale=0.0)  # changes nothing, so the expert stays
    assert torch.equal(sample(pipe), reference)
    pipe.unload_finetune().load_finetune(deltas["crossattn"], scale=1.0)
    tuned = sample(pipe)  # the finetuned main network at every stage
    pipe.experts = {}
    assert torch.equal(sample(pipe), tuned)


# ---- bases with stage experts -------------------------------------------------------------------

@pytest.fixture(scope="module")
def expert_setup(tmp_path_factory):
    """A tiny base with a stage-0 expert (a perturbed copy of its network), and deltas made for it
    through the command: one with the expert's part, one of the main network only."""
    root = tmp_path_factory.mktemp("finetune-experts")
    pipe = tiny_pipeline()
    expert = copy.deepcopy(pipe.network)
    torch.manual_seed(3)
    for p in expert.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    pipe.experts = {0: expert}
    pipe.save_pretrained(root / "base")
    data = image_folder(root / "images")
    deltas, logs = {}, {}
    for name, extra in (("parts", []), ("main-only", ["--no-experts"])):
        args = finetune_args("--base", str(root / "base"), "--data", str(data), "--out", str(root / name),
                             "--steps", "3", "--batch-size", "2", "--lr", "1e-2", "--style", "pixel",
                             "--preset", "tiny-cpu", "--run", str(root / f"run-{name}"), "--set", "text_cache=false",
                             "--set", "log_images=2", "--threads", "1", *extra)
        deltas[name], logs[name] = root / name, run_logged(args)
    return root, deltas, logs


def test_a_base_with_an_expert_gets_a_part_for_it(expert_setup):
    root, deltas, logs = expert_setup
    info, tensors = ft.read_delta(deltas["parts"])
    parts = ft.read_parts(deltas["parts"], info)
    assert [p.stages for p in info.experts] == [(0,)] and set(parts) == {(0,)}
    part_info, part_tensors = parts[(0,)]
    base = load_base(root)
    assert part_info.base == ft.base_fingerprint(base, "expert-0") != info.base
    assert part_info.styles == info.styles and part_info.parameters == info.parameters
    # the part trained the expert's own weights, on its stage only, for steps x 1/levels steps
    levels = base.config.levels
    assert part_info.trained["stages"] == [0] and part_info.trained["steps"] == max(1, round(3 / levels))
    expert = dict(base.experts[0].named_parameters())
    assert any(not torch.equal(part_tensors[n], expert[n].float()) for n in part_info.parameters)
    assert any("the expert of stage 0" in line for line in logs["parts"])
    main_only, _ = ft.read_delta(deltas["main-only"])
    assert main_only.experts == () and not (deltas["main-only"] / "expert-0").exists()


def test_the_expert_part_keeps_the_expert_in_sampling(expert_setup):
    root, deltas, _ = expert_setup
    pipe = load_base(root)
    base_images = sample(pipe)
    pipe.load_finetune(deltas["parts"])
    assert pipe.experts_kept()
    tuned = sample(pipe, "pixel")
    # the same as the main network and the expert each with its own part, by hand
    info, tensors = ft.read_delta(deltas["parts"])
    part_info, part_tensors = ft.read_parts(deltas["parts"], info)[(0,)]
    manual = load_base(root)
    with torch.no_grad():
        for net, i, t in ((manual.network, info, tensors), (manual.experts[0], part_info, part_tensors)):
            params = dict(net.named_parameters())
            for name in i.parameters:
                params[name].copy_(t[name])
            params[ft.MEDIA_TABLE][i.styles[0].slot] = t[ft.STYLE_PREFIX + "pixel"]
    manual.vocab = pipe.vocab
    assert torch.equal(sample(manual, "pixel"), tuned)
    pipe.unload_finetune()
    assert torch.equal(sample(pipe), base_images)
    assert ft.base_fingerprint(pipe, "expert-0") == part_info.base
    # a delta without the part drops the expert at scale 1 and keeps it at scale 0
    pipe.load_finetune(deltas["main-only"], scale=0.0)
    assert pipe.experts_kept() and torch.equal(sample(pipe), base_images)
    pipe.unload_finetune().load_finetune(deltas["main-only"])
    assert not pipe.experts_kept()
    # on a model without the expert, the main part alone applies
    plain = load_base(root)
    plain.experts = {}
    plain.load_finetune(deltas["parts"])
    assert all(p.owner == ft.NETWORK for p in plain.finetunes[0].patches)


def test_a_part_from_another_save_or_base_is_refused(expert_setup, tmp_path):
    import shutil

    root, deltas, _ = expert_setup
    broken = tmp_path / "broken"
    shutil.copytree(deltas["parts"], broken)
    info, _ = ft.read_delta(broken)
    part = json.loads((broken / "expert-0" / ft.INFO_FILE).read_text())
    part["save"] = "0" * 16
    (broken / "expert-0" / ft.INFO_FILE).write_text(json.dumps(part))
    with pytest.raises(EdifyError, match="is not from the save|interrupted"):
        ft.read_parts(broken, info)
    shutil.rmtree(broken / "expert-0")
    with pytest.raises(EdifyError, match="has no folder expert-0"):
        load_base(root).load_finetune(broken)
    # the expert's part checked against the expert's own weights
    pipe = load_base(root)
    with torch.no_grad():
        next(pipe.experts[0].parameters()).add_(1.0)
    with pytest.raises(EdifyError, match="expert-0.*another base model"):
        pipe.load_finetune(deltas["parts"])


def test_resuming_a_finished_run_with_parts_writes_the_same_delta(expert_setup, tmp_path):
    root, deltas, _ = expert_setup
    args = finetune_args("--base", str(root / "base"), "--data", str(root / "images"), "--out", str(tmp_path / "again"),
                         "--steps", "3", "--batch-size", "2", "--lr", "1e-2", "--style", "pixel",
                         "--preset", "tiny-cpu", "--run", str(root / "run-parts"), "--set", "text_cache=false",
                         "--set", "log_images=2", "--threads", "1", "--resume")
    assert training.run(args, text_encoder=HashEncoder()) == 0
    for folder in ("", "expert-0"):
        _, before = ft.read_delta(deltas["parts"] / folder)
        _, after = ft.read_delta(tmp_path / "again" / folder)
        assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_a_resumed_part_records_the_time_of_every_session(tmp_path):
    # a run's runs.jsonl holds one line per session; a resumed finetune counts them all
    rows = [{"wall_seconds": 600.0, "cpu_seconds": 540.0}, {"wall_seconds": 3.0, "cpu_seconds": 0.5}]
    (tmp_path / "runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert training.session_time(tmp_path, 3.2, 0.6) == (603.0, 540.5)
    # no record (or an old one without CPU time): this session's own measurement
    assert training.session_time(tmp_path / "none", 3.2, 0.6) == (3.2, 0.6)
    (tmp_path / "runs.jsonl").write_text(json.dumps({"wall_seconds": 600.0}) + "\n")
    assert training.session_time(tmp_path, 3.2, 0.6) == (3.2, 0.6)


def test_the_cost_of_a_delta_counts_its_parts(expert_setup):
    from _training_helpers import load_bench

    _, deltas, _ = expert_setup
    (deltas["parts"] / "README.md").write_text("a card beside the delta is not part of its size")
    row = load_bench("finetune_quality").cost_row(deltas["parts"])
    info, _ = ft.read_delta(deltas["parts"])
    part, _ = ft.read_parts(deltas["parts"], info)[(0,)]
    assert row["parts"]["expert-0"]["steps"] == part.trained["steps"]
    assert row["cpu_minutes"] == info.trained["total_cpu_minutes"]
    files = [deltas["parts"] / name for name in (ft.INFO_FILE, ft.WEIGHTS_FILE)]
    files += [deltas["parts"] / "expert-0" / name for name in (ft.INFO_FILE, ft.WEIGHTS_FILE)]
    assert row["delta_bytes"] == sum(f.stat().st_size for f in files)


def test_generate_says_when_a_finetune_sets_the_experts_aside(expert_setup, tmp_path):
    root, deltas, _ = expert_setup
    common = ("generate", "red thing", "--style", "pixel", "--steps", "3", "--model", str(root / "base"))
    result = edify(*common, "-o", str(tmp_path / "a.png"), "--finetune", str(deltas["main-only"]))
    assert result.returncode == 0, result.stderr
    assert "no part for the model's expert(s) (32 px); the main network serves every stage" in result.stdout
    result = edify(*common, "-o", str(tmp_path / "b.png"), "--finetune", str(deltas["parts"]))
    assert result.returncode == 0, result.stderr
    assert "no part for the model's expert" not in result.stdout and (tmp_path / "b.png").exists()
