"""Property tests of the JSON schemas a model folder or a checkpoint is read through.

Any JSON value in any field (the fields are taken from the dataclasses, so new ones are fuzzed
too) must either load or raise EdifyError: never another exception, and never slowly.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import shutil
import tempfile
import warnings
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from edify.errors import EdifyError
from edify.networks.presets import build_network
from edify.networks.unet import UNetConfig
from edify.pipelines import model_io
from edify.pipelines.text2image import PipelineConfig, SamplingDefaults, TextToImagePipeline
from edify.training import checkpoint as ckpt
from edify.training.checkpoint import CheckpointMeta, TrainState
from edify.training.config import get_preset
from edify.training.ema import EMA

FUZZ = settings(max_examples=150, deadline=timedelta(seconds=10), derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow])
FUZZ_FILES = settings(FUZZ, max_examples=60)

scalars = (st.none() | st.booleans() | st.integers() | st.integers(-2**70, 2**70) | st.floats()
           | st.text(max_size=20) | st.sampled_from(["", "cosine", "minilm", "noto", "dpmpp_2m", "__tensor__"]))
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=6)
                           | st.dictionaries(st.text(max_size=12), inner, max_size=6), max_leaves=24)


def field_paths(cls, prefix: tuple = ()) -> list[tuple]:
    """Every field of a dataclass, nested dataclasses included, as key paths."""
    paths = []
    for f in dataclasses.fields(cls):
        hint = model_io.field_types(cls)[f.name]
        paths.append(prefix + (f.name,))
        if dataclasses.is_dataclass(hint):
            paths += field_paths(hint, prefix + (f.name,))
    return paths


PIPELINE_PATHS = field_paths(PipelineConfig) + [("network", f.name) for f in dataclasses.fields(UNetConfig)]
META_PATHS = [(f.name,) for f in dataclasses.fields(CheckpointMeta)]


@functools.cache
def _good_config() -> dict:
    net = build_network("tiny")
    return PipelineConfig(network=net.config.to_dict(), levels=3, switch_sigmas=(1.0, 5.0), resolution=32,
                          styles=("noto", "twemoji"), defaults=SamplingDefaults(num_steps=6)).to_dict()


def good_config() -> dict:
    """A valid config.json object of the tiny network (a fresh copy)."""
    return json.loads(json.dumps(_good_config()))


def with_value(data: dict, path: tuple, value, drop: bool = False) -> dict:
    data = json.loads(json.dumps(data))
    node = data
    for key in path[:-1]:
        node = node[key]
    if drop:
        node.pop(path[-1], None)
    else:
        node[path[-1]] = value
    return data


def loads_or_edify_error(load):
    try:
        return load()
    except EdifyError as err:
        assert "\n" not in str(err)
        return None


edits = st.tuples(st.sampled_from(PIPELINE_PATHS), json_values, st.booleans())  # (field, value, drop it)


@FUZZ
@given(edit=edits)
def test_pipeline_config_any_field_loads_or_raises_edify_error(edit):
    path, value, drop = edit
    loads_or_edify_error(lambda: PipelineConfig.from_dict(with_value(good_config(), path, value, drop)))


@FUZZ
@given(value=json_values, key=st.text(max_size=12))
def test_pipeline_and_network_configs_of_any_json_shape(value, key):
    loads_or_edify_error(lambda: PipelineConfig.from_dict(value))
    loads_or_edify_error(lambda: UNetConfig.from_dict(value))
    loads_or_edify_error(lambda: PipelineConfig.from_dict({**good_config(), key: value}))


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("fuzz") / "model"
    pipe = TextToImagePipeline(build_network("tiny"), PipelineConfig.from_dict(good_config()))
    pipe.save_pretrained(folder, max_shard_bytes=400_000)
    return folder


@FUZZ_FILES
@given(edit=edits)
def test_model_folder_with_any_config_field_loads_or_raises_edify_error(model_folder, edit):
    path, value, drop = edit
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(shutil.copytree(model_folder, Path(tmp) / "m"))
        (folder / "config.json").write_text(json.dumps(with_value(good_config(), path, value, drop)))
        loads_or_edify_error(lambda: TextToImagePipeline.from_pretrained(folder))


@FUZZ_FILES
@given(data=st.binary(max_size=200) | json_values.map(lambda v: json.dumps(v).encode()),
       name=st.sampled_from(["config.json", model_io.INDEX_NAME]))
def test_model_folder_with_any_json_file_bytes_raises_edify_error(model_folder, data, name):
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(shutil.copytree(model_folder, Path(tmp) / "m"))
        (folder / name).write_bytes(data)
        assert loads_or_edify_error(lambda: TextToImagePipeline.from_pretrained(folder)) is None


@FUZZ_FILES
@given(weight_map=json_values | st.dictionaries(st.text(max_size=8), st.text(max_size=40), max_size=4))
def test_index_with_any_weight_map_raises_edify_error(model_folder, weight_map):
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(shutil.copytree(model_folder, Path(tmp) / "m"))
        (folder / model_io.INDEX_NAME).write_text(json.dumps({"weight_map": weight_map}))
        assert loads_or_edify_error(lambda: TextToImagePipeline.from_pretrained(folder)) is None


# ---- checkpoints ------------------------------------------------------------------------------

CONFIG = get_preset("tiny-cpu")


def small_model(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(3, 4)).square().mean().backward()
    opt.step()
    return model, opt, EMA(model, halflife_images=16.0, rampup=0.0)


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("fuzz") / "run"
    ckpt.save_checkpoint(run, CONFIG, *small_model(), TrainState(step=1, images=4, data={"consumed": 4}))
    return run


def load_copy(run: Path, change) -> TrainState | None:
    """Load a copy of the run whose checkpoint `change` edited (and recorded, for a changed file)."""
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(shutil.copytree(run, Path(tmp) / "run"))
        change(ckpt.latest_checkpoint(copy))
        return loads_or_edify_error(lambda: ckpt.load_latest(copy, CONFIG, *small_model(seed=1)))


def edit_meta(path: tuple, value, drop: bool):
    def change(folder: Path):
        meta = json.loads((folder / "state.json").read_text())
        (folder / "state.json").write_text(json.dumps(with_value(meta, path, value, drop)))
    return change


def replace_recorded(name: str, data: bytes):
    def change(folder: Path):
        (folder / name).write_bytes(data)
        meta = json.loads((folder / "state.json").read_text())
        meta["file_sizes"][name] = len(data)
        meta["file_sha256"][name] = model_io.sha256_file(folder / name)
        (folder / "state.json").write_text(json.dumps(meta))
    return change


@FUZZ_FILES
@given(path=st.sampled_from(META_PATHS), value=json_values, drop=st.booleans())
def test_checkpoint_state_json_any_field_loads_or_raises_edify_error(run_folder, path, value, drop):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a dropped file_sha256 is an old checkpoint: it warns
        load_copy(run_folder, edit_meta(path, value, drop))


tensor_refs = st.builds(lambda k: {"__tensor__": k}, st.sampled_from(["s/state/0.weight/exp_avg", "s/x"]) | scalars)
structures = st.recursive(
    scalars | tensor_refs,
    lambda inner: st.lists(inner, max_size=4) | st.builds(lambda v: {"__tuple__": v}, st.lists(inner, max_size=3))
    | st.builds(lambda v: {"__dict__": v}, st.lists(st.tuples(scalars, inner).map(list) | inner, max_size=3))
    | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=20)


@FUZZ_FILES
@given(structure=structures)
def test_checkpoint_optimizer_json_of_any_structure_loads_or_raises_edify_error(run_folder, structure):
    load_copy(run_folder, replace_recorded("optimizer.json", json.dumps(structure).encode()))


def node_paths(obj, prefix: tuple = ()) -> list[tuple]:
    """Key paths of every node of a JSON value."""
    children = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    return [prefix] + [p for k, v in children for p in node_paths(v, prefix + (k,))]


def replace_node(obj, path: tuple, value):
    if not path:
        return value
    obj = json.loads(json.dumps(obj))
    node = obj
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return obj


@FUZZ_FILES
@given(data=st.data())
def test_checkpoint_optimizer_json_with_any_node_replaced_loads_or_raises_edify_error(run_folder, data):
    folder = ckpt.latest_checkpoint(run_folder)
    real = json.loads((folder / "optimizer.json").read_text())
    path = data.draw(st.sampled_from(node_paths(real)))
    structure = replace_node(real, path, data.draw(structures))
    load_copy(run_folder, replace_recorded("optimizer.json", json.dumps(structure).encode()))


@FUZZ_FILES
@given(data=st.binary(max_size=200), name=st.sampled_from(["state.json", "config.json", "latest"]))
def test_checkpoint_json_files_of_any_bytes_raise_edify_error(run_folder, data, name):
    def change(folder: Path):
        target = folder.parent / name if name == "latest" else folder / name
        target.write_bytes(data)

    load_copy(run_folder, change)
