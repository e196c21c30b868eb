"""Hostile model folders and checkpoints: each is crafted here from a good one, and each must fail
with a one-line EdifyError naming the file, quickly, without reading a byte outside its folder."""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import struct
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from edify.errors import EdifyError
from edify.networks.presets import PRESETS, build_network
from edify.networks.unet import UNetConfig
from edify.pipelines import model_io, text2image
from edify.pipelines.text2image import PipelineConfig, SamplingDefaults, TextToImagePipeline
from edify.training import checkpoint as ckpt
from edify.training.checkpoint import TrainState
from edify.training.config import get_preset
from edify.training.ema import EMA
from edify.training.export import build_net, export_pipeline

SECONDS = 10  # every refusal below takes milliseconds; the bound leaves room for a busy machine


# ---- crafting helpers ---------------------------------------------------------------------------

def tiny_pipeline(seed: int = 0) -> TextToImagePipeline:
    torch.manual_seed(seed)
    net = build_network("tiny")
    config = PipelineConfig(network=net.config.to_dict(), levels=3, switch_sigmas=(1.0, 5.0), resolution=32,
                            styles=("noto", "twemoji"), defaults=SamplingDefaults(num_steps=6))
    return TextToImagePipeline(net, config)


def saved(folder: Path, seed: int = 0, **kwargs) -> Path:
    """A tiny model folder in three shards (or as told)."""
    tiny_pipeline(seed).save_pretrained(folder, **{"max_shard_bytes": 400_000, **kwargs})
    return folder


def edit_json(file: Path, change) -> None:
    data = json.loads(file.read_text())
    change(data)
    file.write_text(json.dumps(data))


def edit_config(change):
    return lambda folder, other: edit_json(folder / "config.json", change)


def edit_index(change):
    return lambda folder, other: edit_json(folder / model_io.INDEX_NAME, change)


def shards(folder: Path) -> list[Path]:
    return sorted(folder.glob("model-*.safetensors"))


def data_offset(file: Path) -> int:
    """Where a safetensors file's tensor data starts (after its 8-byte length and JSON header)."""
    with open(file, "rb") as f:
        return 8 + struct.unpack("<Q", f.read(8))[0]


def write_random_bytes(file: Path, n: int = 100_000, seed: int = 0) -> None:
    """Overwrite up to n bytes of tensor data in place with random bytes (the header stays valid)."""
    data = bytearray(file.read_bytes())
    start = data_offset(file)
    n = min(n, len(data) - start)
    data[start:start + n] = random.Random(seed).randbytes(n)
    file.write_bytes(bytes(data))


def biggest_shard(folder: Path) -> Path:
    return max(shards(folder), key=lambda p: p.stat().st_size)


def replace_with(file: Path, make) -> None:
    file.unlink()
    make(file)


def weight_map_into(prefix_of):
    def change(index):
        index["weight_map"] = {k: prefix_of(v) for k, v in index["weight_map"].items()}
    return change


def shard_of_other_save(folder: Path, other: Path) -> None:
    """A shard of another save of the same architecture: what a save killed between renames leaves."""
    shutil.copyfile(shards(other)[0], shards(folder)[0])


def set_network(**fields):
    return edit_config(lambda c: c["network"].update(fields))


# name -> (how the folder is crafted from a good one, what the one-line error says)
MODEL_CASES = {
    "config is a JSON list": (lambda f, o: (f / "config.json").write_text("[1, 2]"), "not an edify-text2image config"),
    "config not UTF-8": (lambda f, o: (f / "config.json").write_bytes(b'{"format": "\xff"}'), "not UTF-8"),
    "config is a directory": (lambda f, o: replace_with(f / "config.json", Path.mkdir), "not a regular file"),
    "config is a fifo": (lambda f, o: replace_with(f / "config.json", os.mkfifo), "not a regular file"),
    "config nested 100k deep": (lambda f, o: (f / "config.json").write_text("[" * 100_000 + "]" * 100_000),
                                "too deeply"),
    "config 5000-digit int": (lambda f, o: (f / "config.json").write_text('{"levels": ' + "9" * 5000 + "}"),
                              "not valid JSON"),
    "config symlinked out": (lambda f, o: replace_with(f / "config.json", lambda p: p.symlink_to(o / p.name)),
                             "leads outside the folder"),
    "config missing": (lambda f, o: (f / "config.json").unlink(), "has no config.json"),
    "unknown config key": (edit_config(lambda c: c.update(colour="red")), "unknown pipeline config keys"),
    "sigma_data NaN": (edit_config(lambda c: c.update(sigma_data=float("nan"))), "'sigma_data' must be a finite"),
    "styles a string": (edit_config(lambda c: c.update(styles="noto")), "'styles' must be a list"),
    "defaults a list": (edit_config(lambda c: c.update(defaults=[])), "'defaults' must be a JSON object"),
    "widths a string": (set_network(widths="64"), "'widths' must be a list"),
    "width 1e9 (JSON float)": (set_network(widths=[16, 1e9]), r"'widths\[1\]' must be an integer"),
    "width 10**9": (set_network(widths=[16, 10**9]), "would hold"),
    "num_res_blocks 1e6": (set_network(num_res_blocks=10**6), "num_res_blocks must be <= 64"),
    "norm_groups 0": (set_network(norm_groups=0), "norm_groups must be >= 1"),
    "network larger than its weights": (set_network(widths=[64, 128], head_dim=8, norm_groups=8),
                                        "the weight files hold"),
    "index weight_map a list": (edit_index(lambda i: i.update(weight_map=list(i["weight_map"].items()))),
                                "'weight_map' must be a JSON object"),
    "index unknown key": (edit_index(lambda i: i.update(extra=1)), "unknown index keys"),
    "weight_map ../other/": (edit_index(weight_map_into(lambda v: f"../other/{v}")), "outside the folder"),
    "weight_map absolute path": (lambda f, o: edit_json(f / model_io.INDEX_NAME, weight_map_into(
        lambda v: str(o / v))), "outside the folder"),
    "shard symlinked out": (lambda f, o: replace_with(shards(f)[0], lambda p: p.symlink_to(o / p.name)),
                            "leads outside the folder"),
    "weight_map misplaces a tensor": (edit_index(lambda i: i["weight_map"].update(
        {next(iter(i["weight_map"])): "model-00003-of-00003.safetensors"})), "listed for"),
    "random bytes in a shard": (lambda f, o: write_random_bytes(biggest_shard(f)), "holds non-finite values"),
    "garbage shard": (lambda f, o: shards(f)[1].write_bytes(os.urandom(5000)), "corrupt weights"),
    "truncated shard": (lambda f, o: shards(f)[1].write_bytes(shards(f)[1].read_bytes()[:-100]), "corrupt weights"),
    "shard of another save": (shard_of_other_save, "mixes two saves"),
}


@pytest.fixture
def opened(monkeypatch):
    """Every file model_io and the checkpoint loader open for reading, by resolved path."""
    paths = []

    def recorder(real):
        def wrapper(file, *args, **kwargs):
            paths.append(Path(file).resolve())
            return real(file, *args, **kwargs)
        return wrapper

    monkeypatch.setattr(model_io, "open", recorder(open), raising=False)
    monkeypatch.setattr(model_io, "safe_open", recorder(model_io.safe_open))
    monkeypatch.setattr(ckpt, "load_file", recorder(ckpt.load_file))
    return paths


def one_line_error(load, *match: str) -> str:
    start = time.perf_counter()
    with pytest.raises(EdifyError) as info:
        load()
    assert time.perf_counter() - start < SECONDS
    message = str(info.value)
    assert "\n" not in message
    for m in match:
        assert re.search(m, message), (m, message)
    return message


@pytest.mark.parametrize("case", list(MODEL_CASES))
def test_hostile_model_folders_fail_in_one_line(tmp_path, case, opened, monkeypatch):
    craft, match = MODEL_CASES[case]
    folder, other = saved(tmp_path / "m"), saved(tmp_path / "other", seed=1)
    craft(folder, other)
    opened.clear()
    # the network must not be built for a config that is refused before allocation
    builds = []
    monkeypatch.setattr(text2image, "UNet", lambda cfg: builds.append(cfg) or build_network(cfg))
    message = one_line_error(lambda: TextToImagePipeline.from_pretrained(folder), match)
    assert str(folder) in message
    assert all(p.is_relative_to(folder.resolve()) for p in opened), opened  # nothing read outside
    if case in ("width 10**9", "num_res_blocks 1e6", "network larger than its weights"):
        assert builds == []


def test_good_folder_loads_and_reads_only_its_own_files(tmp_path, opened):
    folder = saved(tmp_path / "m")
    pipe = TextToImagePipeline.from_pretrained(folder)
    assert opened and all(p.is_relative_to(folder.resolve()) for p in opened)
    assert pipe.weights_dtype == torch.float32


def test_weights_stored_as_integers_are_refused(tmp_path):
    folder = saved(tmp_path / "m", max_shard_bytes=10**9)
    state = {k: v.to(torch.int32) for k, v in tiny_pipeline().network.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"))
    one_line_error(lambda: TextToImagePipeline.from_pretrained(folder), "not floating point")


def test_config_arrays_load_as_tuples_and_round_trip(tmp_path):
    folder = saved(tmp_path / "m")
    loaded = TextToImagePipeline.from_pretrained(folder)
    assert loaded.config == tiny_pipeline().config
    assert isinstance(loaded.config.switch_sigmas, tuple) and isinstance(loaded.config.styles, tuple)


def test_weight_count_of_the_config_matches_the_network():
    for name, cfg in PRESETS.items():
        for variant in (cfg, UNetConfig(**{**cfg.to_dict(), "widths": tuple(cfg.widths), "band_skip": True, "pooled_cond": True,
                                            "self_attention_levels": (), "num_res_blocks": 3,
                                            "cross_attention_levels": tuple(cfg.cross_attention_levels)})):
            real = sum(t.numel() for t in build_network(variant).state_dict().values())
            assert variant.num_weights == real, name


# ---- saving -----------------------------------------------------------------------------------

def test_save_keeps_the_dtype_of_the_loaded_weights_and_says_so(tmp_path, caplog):
    tiny_pipeline().save_pretrained(tmp_path / "bf16", dtype=torch.bfloat16)
    loaded = TextToImagePipeline.from_pretrained(tmp_path / "bf16")
    assert loaded.weights_dtype == torch.bfloat16
    with caplog.at_level(logging.INFO, logger="edify.pipelines.model_io"):
        result = loaded.save_pretrained(tmp_path / "again")
    assert result.dtype == torch.bfloat16 and "bfloat16" in str(result) and "bfloat16" in caplog.text
    size = lambda p: sum(f.stat().st_size for f in p.glob("*.safetensors"))  # noqa: E731
    assert size(tmp_path / "again") == size(tmp_path / "bf16")
    fresh = tiny_pipeline().save_pretrained(tmp_path / "f32")
    assert fresh.dtype == torch.float32
    assert loaded.save_pretrained(tmp_path / "told", dtype=torch.float32).dtype == torch.float32


def test_killed_save_leaves_the_previous_model_whole(tmp_path, monkeypatch):
    folder = saved(tmp_path / "m")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    real, calls = model_io.save_file, []

    def dying_save(tensors, filename, *args, **kwargs):
        calls.append(filename)
        if len(calls) == 2:  # the second shard: half written, then the process "dies"
            Path(filename).write_bytes(b"half")
            raise KeyboardInterrupt
        return real(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(model_io, "save_file", dying_save)
    with pytest.raises(KeyboardInterrupt):
        tiny_pipeline(seed=5).save_pretrained(folder, max_shard_bytes=400_000)
    monkeypatch.setattr(model_io, "save_file", real)
    visible = {p.name: p.read_bytes() for p in folder.iterdir() if not p.name.startswith(".")}
    assert visible == before
    TextToImagePipeline.from_pretrained(folder)
    # a process killed outright cannot clean up: the next save removes what it left
    (folder / f".model-00001-of-00003.safetensors.1234abcd{model_io.PARTIAL}").write_bytes(b"half")
    saved(folder, seed=5)
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]


def test_switching_between_one_file_and_shards_leaves_no_stale_files(tmp_path):
    folder = saved(tmp_path / "m")
    saved(folder, max_shard_bytes=10**9)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    saved(folder)
    names = sorted(p.name for p in folder.iterdir())
    assert "model.safetensors" not in names and model_io.INDEX_NAME in names and len(names) == 5
    TextToImagePipeline.from_pretrained(folder)


# ---- export -------------------------------------------------------------------------------------

def checkpoint_run(run: Path) -> Path:
    config = get_preset("tiny-cpu")
    net = build_net(config)
    opt = torch.optim.AdamW(net.parameters())
    ckpt.save_checkpoint(run, config, net, opt, EMA(net, halflife_images=8.0), TrainState(step=1, images=4))
    return run


def test_export_never_overwrites_another_model_unless_told(tmp_path):
    run = checkpoint_run(tmp_path / "run")
    folder = saved(tmp_path / "model")
    before = (folder / "config.json").read_bytes()
    one_line_error(lambda: export_pipeline(run, folder), "already holds a model", "overwrite")
    assert (folder / "config.json").read_bytes() == before
    export_pipeline(run, folder, overwrite=True)
    assert TextToImagePipeline.from_pretrained(folder).config.levels == 2
    (tmp_path / "file").write_text("x")
    one_line_error(lambda: export_pipeline(run, tmp_path / "file"), "not a folder")
    export_pipeline(run, tmp_path / "new")  # a new folder, or one without a model, is fine
