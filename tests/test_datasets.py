"""Loaders, skip counting, shard specs and splits, bucket fitting and bucketed batching."""

from __future__ import annotations

import io
import json
import tarfile
import warnings
from collections import Counter

import numpy as np
import pytest
from PIL import Image
from torch.utils.data import DataLoader

from edify.buckets import BUCKETS, bucket_shape, nearest_bucket
from edify.data.datasets import (
    DataConfig, ImageFolderDataset, LoaderStats, WebImageDataset, decode_image, expand_shards,
    fit_to_bucket,
)
from edify.data.sampler import (
    BucketBatchSampler, bucketed_batches, collate, folder_loader, stream_loader,
)
from edify.data.tarstream import iter_tar_members
from edify.errors import EdifyError
from edify.training.distributed import rank_and_world_size


def noisy_png(h: int = 64, w: int = 64) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (h, w, 3), np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def png(h: int, w: int, value: int | tuple = 200, mode: str = "RGB") -> bytes:
    fill = value if isinstance(value, tuple) else (value,) * len(mode)
    buf = io.BytesIO()
    Image.new(mode, (w, h), fill).save(buf, format="PNG")
    return buf.getvalue()


def write_tar(path, members: list[tuple[str, bytes]]) -> str:
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return str(path)


def good(key: str, h: int = 64, w: int = 64, value: int = 200, **meta) -> list[tuple[str, bytes]]:
    meta = {"caption": f"emoji {key}", "style": "twemoji", "license": "MIT", **meta}
    return [(f"{key}.{h}.png", png(h, w, value)), (f"{key}.json", json.dumps(meta).encode())]


def make_shards(tmp_path, n_shards: int, per_shard: int, prefix: str = "shard") -> list[str]:
    return [write_tar(tmp_path / f"{prefix}-{s:06d}.tar",
                      [m for i in range(per_shard) for m in good(f"s{s}_{i:03d}", value=s * 10 + i)])
            for s in range(n_shards)]


def keys_of(dataset) -> list[str]:
    return [r["key"] for r in dataset]


# ------------------------------------------------------------------ corrupt samples are counted


def test_corrupt_samples_are_skipped_and_counted(tmp_path):
    truncated = noisy_png()[:6000]  # of ~12 kB: the header parses, the pixels are cut
    members = good("a", value=0) + good("b", value=255)
    members += [("trunc.64.png", truncated), ("trunc.json", b'{"caption": "cut"}')]
    members += [("text.64.png", b"this is not an image"), ("text.json", b'{"caption": "t"}')]
    members += [("noimg.json", b'{"caption": "only metadata"}')]
    members += [("nocap.64.png", png(64, 64)), ("nocap.json", b'{"style": "noto"}')]
    members += [("badjson.64.png", png(64, 64)), ("badjson.json", b"{not json")]
    members += good("c", weight=2.5)
    ds = WebImageDataset(write_tar(tmp_path / "mixed.tar", members), shuffle=False)
    records = list(ds)
    assert [r["key"] for r in records] == ["a", "b", "c"]
    assert ds.stats.ok == 3
    assert ds.stats.skipped == Counter(bad_image=2, no_image=1, no_caption=1, bad_meta=1)
    a, b, c = records
    assert a["image"].shape == (3, 64, 64) and a["image"].dtype.is_floating_point
    assert float(a["image"].min()) == -1.0 and float(b["image"].max()) == 1.0  # 0 -> -1, 255 -> 1
    assert a["caption"] == "emoji a" and a["style"] == "twemoji" and a["meta"]["license"] == "MIT"
    assert (a["weight"], c["weight"]) == (1.0, 2.5)
    assert a["bucket"] == "1:1"


def test_multi_worker_counts_are_exact(tmp_path):
    shards = make_shards(tmp_path, 3, 5)
    bad = [("x.64.png", b"junk"), ("x.json", b'{"caption": "x"}'), ("y.json", b'{"caption": "y"}')]
    shards.append(write_tar(tmp_path / "bad.tar", bad + good("z")))
    ds = WebImageDataset(shards + [str(tmp_path / "missing.tar")], seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loader = stream_loader(ds, batch_size=4, num_workers=2)
        keys = [k for batch in loader for k in batch["key"]]
    assert sorted(keys) == sorted([f"s{s}_{i:03d}" for s in range(3) for i in range(5)] + ["z"])
    assert loader.stats.ok == 16
    assert loader.stats.skipped == Counter(bad_image=1, no_image=1, unreadable_shard=1)


# ------------------------------------------------------------------ shard specs and failures


def test_brace_glob_and_pipe_specs(tmp_path):
    shards = make_shards(tmp_path, 3, 2)
    assert expand_shards(str(tmp_path / "shard-{000000..000002}.tar")) == shards
    assert expand_shards(str(tmp_path / "shard-*.tar")) == shards
    assert expand_shards(f"{shards[0]}::{shards[2]}") == [shards[0], shards[2]]
    assert expand_shards(str(tmp_path)) == shards  # a directory means its *.tar
    with pytest.raises(EdifyError, match="no shard matches"):
        expand_shards(str(tmp_path / "nothing-*.tar"))
    braced = WebImageDataset(str(tmp_path / "shard-{000000..000001}.tar"), shuffle=False)
    assert keys_of(braced) == ["s0_000", "s0_001", "s1_000", "s1_001"]
    piped = WebImageDataset(f"pipe:cat {shards[2]}", shuffle=False)
    assert keys_of(piped) == ["s2_000", "s2_001"]


def test_missing_shard_is_skipped_counted_and_warned_once(tmp_path):
    shards = make_shards(tmp_path, 2, 3)
    missing = str(tmp_path / "gone.tar")
    ds = WebImageDataset([shards[0], missing, shards[1]], shuffle=False, epochs=2)
    with pytest.warns(RuntimeWarning, match="unreadable shard") as caught:
        keys = keys_of(ds)
    assert len([w for w in caught if "gone.tar" in str(w.message)]) == 1  # two epochs, one warning
    assert sorted(keys) == sorted(2 * [f"s{s}_{i:03d}" for s in range(2) for i in range(3)])
    assert ds.stats.ok == 12 and ds.stats.skipped == Counter(unreadable_shard=2)


def test_nothing_readable_raises(tmp_path):
    with pytest.raises(EdifyError, match="none of the 2 shard files exists"):
        WebImageDataset([str(tmp_path / "a.tar"), str(tmp_path / "b.tar")])
    ds = WebImageDataset(f"pipe:cat {tmp_path / 'a.tar'} 2>/dev/null")
    with pytest.warns(RuntimeWarning), pytest.raises(EdifyError, match="none of the 1 shards could be read"):
        list(ds)


@pytest.mark.parametrize("extra", [0, 1000])  # cut at a 512-byte block boundary / inside a member
def test_truncated_shard_keeps_earlier_samples(tmp_path, extra):
    path = make_shards(tmp_path, 1, 6)[0]
    data = open(path, "rb").read()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[: len(data) // 2 + extra])
    ds = WebImageDataset(str(cut), shuffle=False)
    with pytest.warns(RuntimeWarning, match="broken"):
        keys = keys_of(ds)
    assert keys == [f"s0_{i:03d}" for i in range(len(keys))] and 1 <= len(keys) < 6
    assert ds.stats.skipped["broken_shard"] == 1


@pytest.mark.parametrize("fmt,mode", [(tarfile.PAX_FORMAT, "w"), (tarfile.GNU_FORMAT, "w:gz"),
                                      (tarfile.USTAR_FORMAT, "w")])
def test_tar_reader_matches_tarfile(tmp_path, fmt, mode):
    long_dir = "d" * 120  # past ustar's 100-byte name field: pax / GNU long names / ustar prefix
    members = [(f"{long_dir}/k{i}.{ext}", bytes([i]) * (i * 300 + 1)) for i in range(4)
               for ext in ("png", "json")]
    path = tmp_path / "t.tar"
    with tarfile.open(path, mode, format=fmt) as tf:
        tf.addfile(_dir_info("folder"))  # non-file members are passed over
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    with open(path, "rb") as f:
        assert list(iter_tar_members(f)) == members
    corrupt = bytearray(open(path, "rb").read()) if mode == "w" else None
    if corrupt is not None:  # flip a name byte in the fourth file's header: checksum mismatch
        with tarfile.open(path) as tf:
            offset = [m for m in tf.getmembers() if m.isreg()][3].offset
        corrupt[offset + 5] ^= 1
        (tmp_path / "bad.tar").write_bytes(bytes(corrupt))
        ds = WebImageDataset(str(tmp_path / "bad.tar"), raw=True)
        with pytest.warns(RuntimeWarning, match="checksum"):
            list(ds)
        # k0 came through (its json bytes do not parse); k1 is cut at its json: the shard is broken
        assert ds.stats.skipped == Counter(bad_meta=1, broken_shard=1) and ds.stats.ok == 0


def _dir_info(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    return info


# ------------------------------------------------------------------ splits, shuffling, epochs


def _read_rank(shards, rank: int, workers: int, **kw) -> list[str]:
    ds = WebImageDataset(shards, rank=rank, world_size=2, seed=7, **kw)
    loader = DataLoader(ds, batch_size=None, num_workers=workers, collate_fn=lambda r: r["key"])
    return list(loader)


@pytest.mark.parametrize("n_shards", [8, 2])  # shard split (8 >= 4 readers) and sample split (2 < 4)
def test_two_ranks_two_workers_cover_each_sample_once(tmp_path, n_shards):
    shards = make_shards(tmp_path, n_shards, 16 // n_shards)
    keys = _read_rank(shards, 0, 2) + _read_rank(shards, 1, 2)
    assert sorted(keys) == sorted(f"s{s}_{i:03d}" for s in range(n_shards) for i in range(16 // n_shards))


def test_rank_and_world_size_from_environment(tmp_path, monkeypatch):
    shards = make_shards(tmp_path, 4, 2)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert rank_and_world_size() == (1, 2)
    from_env = WebImageDataset(shards, seed=7)
    assert (from_env.rank, from_env.world_size) == (1, 2)
    assert keys_of(from_env) == _read_rank(shards, 1, 0) and len(keys_of(from_env)) == 4


def test_shuffle_is_seeded_and_epochs_repeat(tmp_path):
    shards = make_shards(tmp_path, 4, 6)
    order = lambda seed, **kw: keys_of(WebImageDataset(shards, seed=seed, shuffle_buffer=10, **kw))
    assert order(1) == order(1)
    assert order(1) != order(2) and sorted(order(1)) == sorted(order(2))
    two = order(1, epochs=2)
    assert sorted(two) == sorted(2 * order(1)) and two[:24] != two[24:]
    ds = WebImageDataset(shards, seed=1, shuffle_buffer=10)
    ds.set_epoch(1)
    assert keys_of(ds) != order(1) and sorted(keys_of(ds)) == sorted(order(1))
    ds.set_epoch(0)
    assert keys_of(ds) == order(1)
    it = iter(WebImageDataset(shards, resample=True, seed=0))
    drawn = [next(it)["key"] for _ in range(60)]  # more than one pass: resampling never ends
    assert len(drawn) == 60 and set(drawn) <= set(order(1))


# ------------------------------------------------------------------ buckets and image fitting


def test_fit_to_bucket_crops_centre_and_keeps_orientation():
    cfg = DataConfig(resolution=64, multiple=16)
    wide = np.zeros((90, 200, 3), np.uint8)
    wide[:, :12] = (255, 0, 0)
    wide[:, -12:] = (0, 0, 255)
    wide[:, 12:-12] = (0, 255, 0)  # the centre crop (16:9 of a 2.22:1 image) removes ~20 px a side
    arr, bucket = fit_to_bucket(Image.fromarray(wide), cfg)
    assert bucket == nearest_bucket(90, 200) == "16:9" and arr.shape == (*bucket_shape("16:9", 64), 3)
    assert arr.shape == (48, 80, 3) and np.abs(arr.astype(int) - (0, 255, 0)).max() <= 2
    left_dark = np.zeros((120, 90, 3), np.uint8)
    left_dark[:, 45:] = 255
    arr, bucket = fit_to_bucket(Image.fromarray(left_dark), cfg)
    assert bucket == "3:4" and arr.shape == (*bucket_shape("3:4", 64), 3)
    assert arr[:, :5].max() < 10 and arr[:, -5:].min() > 245  # no flip by default
    arr, bucket = fit_to_bucket(Image.fromarray(wide), DataConfig(square=True))
    assert bucket == "1:1" and arr.shape == (64, 64, 3)
    big = np.zeros((480, 640, 3), np.uint8)
    big[:, 320:] = 255
    buf = io.BytesIO()
    Image.fromarray(big).save(buf, format="JPEG", quality=95)
    arr, bucket = decode_image(buf.getvalue(), cfg)  # JPEG draft path: decoded at reduced scale
    assert bucket == "4:3" and arr.shape == (*bucket_shape("4:3", 64), 3)
    assert arr[:, :30].max() < 12 and arr[:, -30:].min() > 243
    rgba = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    arr, _ = fit_to_bucket(rgba, cfg)
    assert (arr == 255).all()  # transparency composited onto the white background


def test_hflip_flag_flips_some_samples(tmp_path):
    img = np.zeros((64, 64, 3), np.uint8)
    img[:, 32:] = 255
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    members = [m for i in range(16) for m in [(f"k{i:02d}.png", buf.getvalue()),
                                              (f"k{i:02d}.txt", b"half")]]
    shard = write_tar(tmp_path / "h.tar", members)
    flipped = [bool(r["image"][0, 0, 0] > 0) for r in WebImageDataset(shard, DataConfig(hflip=True))]
    assert 0 < sum(flipped) < 16
    assert not any(bool(r["image"][0, 0, 0] > 0) for r in WebImageDataset(shard))


def test_image_key_selection(tmp_path):
    members = [("k.256.png", png(256, 256, 10)), ("k.64.png", png(64, 64, 250)),
               ("k.mask64.png", png(64, 64, 0, "L")), ("k.json", b'{"caption": "c"}')]
    shard = write_tar(tmp_path / "k.tar", members)
    pick = lambda **kw: next(iter(WebImageDataset(shard, DataConfig(**kw), raw=True)))["image"]
    assert pick(resolution=64).mean() == 250  # the key named after the resolution
    assert pick(resolution=128).mean() == 10  # else the smallest larger size
    assert pick(resolution=64, image_key="256.png").mean() == 10
    assert pick(resolution=128).shape == (128, 128, 3)


def test_bucketed_batches_one_shape_and_nothing_lost(tmp_path):
    sizes = [(64, 64)] * 23 + [(90, 160)] * 10 + [(60, 80)] * 7
    members = [m for i, (h, w) in enumerate(sizes) for m in good(f"k{i:02d}", h, w)]
    ds = WebImageDataset(write_tar(tmp_path / "mix.tar", members), seed=1)
    batches = list(stream_loader(ds, batch_size=4))
    for b in batches:
        assert b["image"].shape[2:] == bucket_shape(b["bucket"], 64)
        assert len(b["caption"]) == len(b["style"]) == b["weight"].numel() == b["image"].shape[0]
    per_bucket = Counter()
    for b in batches:
        per_bucket[b["bucket"]] += 1
        assert len(b["caption"]) <= 4
    assert per_bucket == {"1:1": 6, "16:9": 3, "4:3": 2}  # ceil(23/4), ceil(10/4), ceil(7/4)
    assert sorted(k for b in batches for k in b["key"]) == [f"k{i:02d}" for i in range(40)]
    dropped = stream_loader(ds, batch_size=4, drop_last=True)
    kept = [b for b in dropped]
    assert all(len(b["caption"]) == 4 for b in kept) and len(kept) == 5 + 2 + 1
    assert dropped.stats.ok == 40 and dropped.stats.dropped == 3 + 2 + 3
    small = list(bucketed_batches(iter(ds), batch_size=4, max_buffer=5))  # bounded buffer
    assert sorted(r["key"] for g in small for r in g) == [f"k{i:02d}" for i in range(40)]
    assert all(len({r["bucket"] for r in g}) == 1 and len(g) <= 4 for g in small)


# ------------------------------------------------------------------ image folders


def test_folder_with_txt_and_json_sidecars(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.png").write_bytes(png(64, 64, 0))
    (tmp_path / "a.txt").write_text("a red apple\n")
    (tmp_path / "sub" / "b.png").write_bytes(png(90, 160, 255))
    (tmp_path / "sub" / "b.json").write_text(json.dumps({"caption": "a banana", "weight": 3}))
    (tmp_path / "c.png").write_bytes(png(64, 64))  # no caption
    (tmp_path / "d.png").write_bytes(b"not a png")
    (tmp_path / "d.txt").write_text("junk")
    (tmp_path / "e.png").write_bytes(noisy_png()[:6000])  # header parses, pixels are cut
    (tmp_path / "e.txt").write_text("cut")
    ds = ImageFolderDataset(tmp_path)
    assert len(ds) == 3 and ds.buckets == ["1:1", "1:1", "16:9"]
    assert ds.stats.skipped == Counter(no_caption=1, bad_image=1)
    a, e, b = ds[0], ds[1], ds[2]
    assert a["caption"] == "a red apple" and a["key"] == "a.png" and float(a["image"].max()) == -1.0
    assert e == {"skip": "bad_image"}
    assert b["caption"] == "a banana" and b["weight"] == 3.0 and b["image"].shape == (3, 48, 80)
    loader = folder_loader(ds, batch_size=2, seed=0)
    keys = [k for batch in loader for k in batch["key"]]
    assert sorted(keys) == ["a.png", "sub/b.png"]
    assert loader.stats.ok == 2 and loader.stats.skipped == Counter(no_caption=1, bad_image=2)


def test_folder_with_metadata_jsonl(tmp_path):
    for name, value in [("x.png", 10), ("y.jpg", 20), ("z.png", 30)]:
        Image.new("RGB", (80, 60), (value,) * 3).save(tmp_path / name)
    lines = [{"file_name": "x.png", "caption": "ex", "style": "noto"},
             {"file_name": "y.jpg", "text": "why"}, {"file_name": "gone.png", "caption": "?"}]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\nbroken\n")
    ds = ImageFolderDataset(tmp_path, DataConfig(resolution=32))
    assert [ds[i]["caption"] for i in range(len(ds))] == ["ex", "why"]
    assert ds[0]["style"] == "noto" and ds[0]["image"].shape == (3, *bucket_shape("4:3", 32))
    assert ds.stats.skipped == Counter(no_caption=1, bad_meta=1, no_image=1)
    with pytest.raises(EdifyError, match="image folder does not exist"):
        ImageFolderDataset(tmp_path / "nope")


def test_bucket_batch_sampler_splits_ranks_and_epochs():
    buckets = [list(BUCKETS)[i % 3] for i in range(50)]  # 17 / 17 / 16 over three buckets
    samplers = [BucketBatchSampler(buckets, 4, seed=5, rank=r, world_size=2) for r in range(2)]
    epoch0 = [list(s) for s in samplers]
    indices = [i for batches in epoch0 for b in batches for i in b]
    assert sorted(indices) == list(range(50))
    assert all(len({buckets[i] for i in b}) == 1 for batches in epoch0 for b in batches)
    for s in samplers:
        s.set_epoch(1)
    assert [list(s) for s in samplers] != epoch0
    strict = [list(BucketBatchSampler(buckets, 4, seed=5, drop_last=True, rank=r, world_size=2))
              for r in range(2)]
    assert len(strict[0]) == len(strict[1]) == 6 and all(len(b) == 4 for b in strict[0] + strict[1])


# ------------------------------------------------------------------ input errors


def test_bad_inputs_raise_edify_error(tmp_path):
    shard = make_shards(tmp_path, 1, 1)[0]
    with pytest.raises(EdifyError, match="multiple of 16, got 30"):
        DataConfig(resolution=30)
    with pytest.raises(EdifyError, match="rank must be in"):
        WebImageDataset(shard, rank=2, world_size=2)
    with pytest.raises(EdifyError, match="epochs must be"):
        WebImageDataset(shard, epochs=0)
    with pytest.raises(EdifyError, match="batch_size must be >= 1, got 0"):
        list(bucketed_batches([], 0))
    with pytest.raises(EdifyError, match="max_buffer must be >= batch_size=4, got 2"):
        list(bucketed_batches([], 4, max_buffer=2))
    with pytest.raises(EdifyError, match="one aspect-ratio bucket"):
        collate([{"bucket": "1:1"}, {"bucket": "4:3"}])
    assert LoaderStats(1, Counter(a=1)).merge(LoaderStats(2, Counter(a=2, b=1), 3)).as_dict() == {
        "ok": 3, "skipped": {"a": 3, "b": 1}, "dropped": 3}
