"""Alpha masks through the data path: records, the shard loader stream, the in-memory stream, and
the inpaint ControlNet's "replace" task drawn from them.

Shards hold `32.png` (RGB) beside `mask32.png` (8-bit alpha), as `edify data emoji` writes them;
the masks are made of 2x2 blocks, so the area resize to 16 px and the 0.5 threshold are exact."""

import io
import json
import tarfile
from functools import partial

import numpy as np
import pytest
import torch
from PIL import Image

from _training_helpers import WordHashEncoder, tiny_config
from edify.data.datasets import DataConfig, WebImageDataset
from edify.networks.presets import build_network
from edify.pipelines.text2image import PipelineConfig, TextToImagePipeline
from edify.training.batches import LoaderStream
from edify.training.memory_data import MemoryData, MemoryStream, read_samples


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def object_mask(i: int, width: int = 32, height: int = 32) -> np.ndarray:
    """[height, width] uint8 {0, 1}: a 2x2-block box whose place depends on i (object 1-95% of the image)."""
    m = np.zeros((height // 2, width // 2), dtype=np.uint8)
    y, x = 2 + i % 4, 2 + (i * 3) % (width // 2 - 8)
    m[y:y + 6, x:x + 5] = 1
    return m.repeat(2, 0).repeat(2, 1)


def png(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, format="PNG")
    return out.getvalue()


def write_shard(path, n: int = 6, masks=True, width: int = 32, bad_mask=()):
    """n samples "icon i": a red object on white, its alpha mask (unless masks is False or i in
    `bad_mask`, which gets a truncated PNG)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for i in range(n):
            m = object_mask(i, width)
            rgb = np.full((32, width, 3), 255, dtype=np.uint8)
            rgb[m == 1] = (220, 30, 30)
            members = {f"{i:04d}.32.png": png(rgb), f"{i:04d}.json": json.dumps({"caption": f"icon {i}"}).encode()}
            if masks:
                data = png(m * 255)
                members[f"{i:04d}.mask32.png"] = data[:40] if i in bad_mask else data
            for name, data in members.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def expected(i: int, width: int = 32) -> np.ndarray:
    """The 16 px mask of sample i, centre-cropped to a square like its image."""
    lo = (width - 32) // 2
    return object_mask(i, width)[:, lo:lo + 32][::2, ::2]


def records(shard, **config):
    cfg = DataConfig(resolution=16, multiple=16, square=True, **config)
    return {r["caption"]: r for r in WebImageDataset(str(shard), cfg, shuffle=False, raw=True)}


def test_records_carry_the_mask_cropped_and_resized_like_the_image(tmp_path):
    shard = write_shard(tmp_path / "wide.tar", width=48)  # 3:2, centre-cropped to the square bucket
    for i, (caption, r) in enumerate(sorted(records(shard, masks=True).items())):
        assert r["mask"].dtype == np.uint8 and r["mask"].shape == (16, 16)
        assert np.array_equal(r["mask"], expected(i, 48)), caption
        assert np.array_equal(r["image"][..., 1] < 128, r["mask"] == 1)  # the object's pixels are red
    flipped = records(shard, masks=True, hflip=True)
    assert any(np.array_equal(r["mask"], expected(i, 48)[:, ::-1]) for i, r in enumerate(flipped.values()))
    for r in flipped.values():  # image and mask flip together
        assert np.array_equal(r["image"][..., 1] < 128, r["mask"] == 1)
    tensor = next(iter(WebImageDataset(str(shard), DataConfig(resolution=16, square=True, masks=True))))
    assert tensor["mask"].shape == (1, 16, 16) and tensor["mask"].dtype == torch.float32


def test_no_mask_key_unless_asked_and_none_when_missing_or_broken(tmp_path):
    shard = write_shard(tmp_path / "a.tar", bad_mask=(2,))
    assert all("mask" not in r for r in records(shard).values())
    got = records(shard, masks=True)
    assert len(got) == 6 and got["icon 2"]["mask"] is None  # a broken mask keeps its image
    assert all(got[f"icon {i}"]["mask"] is not None for i in (0, 1, 3, 4, 5))
    bare = records(write_shard(tmp_path / "b.tar", masks=False), masks=True)
    assert all(r["mask"] is None for r in bare.values())


def test_loader_stream_batches_carry_the_masks(tmp_path):
    stream = LoaderStream(str(write_shard(tmp_path / "a.tar", bad_mask=(2,))), 16, 16, micro_batch=3, masks=True)
    for _ in range(4):
        batch = stream.next()
        assert batch.mask.shape == (3, 1, 16, 16) and batch.mask.dtype == torch.float32
        for caption, m in zip(batch.caption, batch.mask):
            i = int(caption.split()[1])
            want = np.zeros((16, 16)) if i == 2 else expected(i)  # no mask: zeros, no object
            assert np.array_equal(m[0].numpy(), want)
    bare = LoaderStream(str(write_shard(tmp_path / "b.tar", masks=False)), 16, 16, micro_batch=3, masks=True)
    assert bare.next().mask is None


def test_memory_stream_keeps_uint8_masks_and_gathers_them(tmp_path):
    write_shard(tmp_path / "d" / "a.tar")
    data = MemoryData(*read_samples(str(tmp_path / "d"), 16, 16, masks=True), None, None, "cpu")
    assert [m.dtype for m in data.masks] == [torch.uint8] and data.masks[0].shape == (6, 1, 16, 16)
    stream = MemoryStream(data, micro_batch=2, seed=3)
    for _ in range(5):
        batch = stream.next()
        assert batch.mask.dtype == torch.float32 and batch.mask.shape == (2, 1, 16, 16)
        for caption, m in zip(batch.caption, batch.mask):
            assert np.array_equal(m[0].numpy(), expected(int(caption.split()[1])))
    write_shard(tmp_path / "e" / "a.tar", masks=False)
    bare = MemoryData(*read_samples(str(tmp_path / "e"), 16, 16), None, None, "cpu")
    assert bare.masks is None and MemoryStream(bare, 2).next().mask is None


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory):
    torch.manual_seed(0)
    net = build_network("tiny")
    config = PipelineConfig(network=net.config.to_dict(), levels=2, switch_sigmas=(2.0,), resolution=16)
    folder = tmp_path_factory.mktemp("base") / "tiny"
    TextToImagePipeline(net, config).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("in_memory", [False, True])
def test_inpaint_controlnet_training_draws_replace_from_the_masks(base_folder, tmp_path, in_memory):
    from edify.data.controls import make_control
    from edify.data.masks import TASKS, replace_mask
    from edify.training.controlnet import make_trainer

    seen = []

    def recording(kind, images, masks, generator, **kw):
        control, target = make_control(kind, images, masks, generator, **kw)
        seen.append((masks, control))
        return control, target

    write_shard(tmp_path / "data" / "a.tar")
    config = tiny_config(data=str(tmp_path / "data"), data_in_memory=in_memory, resolution=16)
    t = make_trainer(config, base_folder, tmp_path / "run", "inpaint", make_control=recording, hint_widths=(8,),
                     text_encoder=WordHashEncoder())
    seen.clear()  # the channel probe
    assert len(t.run(max_steps=4).losses) == 4
    replace = TASKS.index("replace")
    drawn = 0
    for masks, control in seen:
        assert masks is not None and masks.shape == (2, 1, 16, 16)
        for m, c in zip(masks, control):
            if c[4 + replace].min() == 1:  # the task one-hot says "replace": the mask is the grown object
                drawn += 1
                assert torch.equal(c[3], replace_mask(m[0]).to(c))
    assert drawn > 0
    only = partial(make_control, tasks=("replace",))
    t = make_trainer(config, base_folder, tmp_path / "run2", "inpaint", make_control=only, hint_widths=(8,),
                     text_encoder=WordHashEncoder())
    assert len(t.run(max_steps=1).losses) == 1


def test_masks_are_read_only_when_asked(tmp_path):
    """Base-model training does not pay for masks: off unless data_masks (inpainting sets it)."""
    shard = write_shard(tmp_path / "a.tar")
    assert LoaderStream(str(shard), 16, 16, micro_batch=3).next().mask is None
    assert MemoryData(*read_samples(str(tmp_path), 16, 16), None, None, "cpu").masks is None
    from edify.training.config import TrainConfig
    from edify.training.controlnet import with_masks

    assert with_masks(TrainConfig(), "inpaint").data_masks and not with_masks(TrainConfig(), "canny").data_masks
