"""Image-text loaders: webdataset tar shards and image folders with caption sidecars (docs/design.md section 4).

Every loader yields the same sample record::

    {"image": 3xHxW float tensor in [-1, 1] (or HxWx3 uint8 array with raw=True),
     "caption": str, "style": str | None, "meta": dict, "weight": float, "key": str, "bucket": str}

and, with `DataConfig(masks=True)`, "mask": the object's alpha mask (1xHxW float tensor in {0, 1},
or HxW uint8 {0, 1} with raw=True; 1 = object), or None when the sample has none. A shard sample's
mask is the member `mask<image key>` (`mask64.png` beside `64.png`, as `edify data emoji` writes),
cropped like the image and area-resized, then thresholded at 0.5.

Each image is centre-cropped to the aspect ratio of its nearest bucket (section 3.1 of the paper,
`edify.buckets`) and resized with antialiasing to that bucket's shape. Corrupt or undecodable
samples are skipped and counted in a `LoaderStats`, never fatal; only "nothing at all could be read"
raises `EdifyError`. Images stay uint8 until collation (`edify.data.sampler`), which keeps decoding
cheap enough for thousands of 64px images per second per core.
"""

from __future__ import annotations

import io
import json
import os
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from edify.buckets import bucket_shape, nearest_bucket
from edify.data.tarstream import expand_shards, is_local, iter_tar_groups
from edify.errors import EdifyError
from edify.training.distributed import resolve_rank

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")


@dataclass
class LoaderStats:
    """Counts of samples delivered (`ok`) and skipped by reason.

    Sample reasons: no_image, bad_image, no_caption, bad_meta. Shard reasons (counting shards, not
    samples): unreadable_shard (could not be opened), broken_shard (the tar stream failed midway).
    `dropped` counts good samples a bucketed loader left out of a short final batch (drop_last),
    so the samples delivered in batches are `ok - dropped`.
    """

    ok: int = 0
    skipped: Counter = field(default_factory=Counter)
    dropped: int = 0

    def skip(self, reason: str) -> None:
        self.skipped[reason] += 1

    def merge(self, other: LoaderStats) -> LoaderStats:
        skipped = Counter(self.skipped)
        skipped.update(other.skipped)
        return LoaderStats(self.ok + other.ok, skipped, self.dropped + other.dropped)

    def as_dict(self) -> dict:
        return {"ok": self.ok, "skipped": dict(self.skipped), "dropped": self.dropped}

    @classmethod
    def from_dict(cls, d: dict) -> LoaderStats:
        return cls(int(d["ok"]), Counter(d["skipped"]), int(d.get("dropped", 0)))


@dataclass(frozen=True)
class DataConfig:
    """How a sample becomes a training record.

    resolution/multiple: bucket shapes via `bucket_shape(bucket, resolution, multiple)`.
    square: force the 1:1 bucket (centre crop) instead of the nearest one.
    hflip: random horizontal flips; off by default, since emoji and text are not mirror-symmetric.
    image_key: tar member extension to decode (e.g. "64.png"); None picks the key named after
        `resolution`, else the smallest larger size, else the first image member.
    caption_key/style_key/weight_key: fields of the sample's json (or jsonl record); the caption
        falls back to a "txt" member. A missing weight is 1.0.
    background: RGB colour that transparent pixels are composited onto.
    masks: also read each sample's alpha mask (member "mask" + image key) as record["mask"]; a
        sample without one (or whose mask does not decode) gets None. Image folders have none.
    """

    resolution: int = 64
    multiple: int = 16
    square: bool = False
    hflip: bool = False
    image_key: str | None = None
    caption_key: str = "caption"
    style_key: str = "style"
    weight_key: str = "weight"
    background: tuple[int, int, int] = (255, 255, 255)
    masks: bool = False

    def __post_init__(self):
        bucket_shape("1:1", self.resolution, self.multiple)  # validates resolution and multiple


# ---------------------------------------------------------------------------------------------
# Decoding and bucket fitting (shared by both loaders)


def _select_image_key(sample: dict[str, bytes], cfg: DataConfig) -> str | None:
    if cfg.image_key is not None:
        return cfg.image_key if cfg.image_key in sample else None
    keys = [k for k in sample if k.rsplit(".", 1)[-1] in IMAGE_EXTS and not k.startswith("mask")]
    sized = {}
    for k in keys:
        head = k.split(".", 1)[0]
        if head.isdigit():
            sized[int(head)] = k
    if cfg.resolution in sized:
        return sized[cfg.resolution]
    larger = [s for s in sized if s > cfg.resolution]
    if larger:
        return sized[min(larger)]
    return keys[0] if keys else None


def choose_bucket(height: int, width: int, cfg: DataConfig) -> str:
    """The nearest aspect-ratio bucket of a source image, or 1:1 when `cfg.square`."""
    return "1:1" if cfg.square else nearest_bucket(height, width)


def crop_box(w: int, h: int, H: int, W: int) -> tuple[float, float, float, float]:
    """The centre crop of a w x h image to the aspect of an H x W bucket."""
    if w * H > h * W:  # too wide for the bucket: crop the sides
        cw = h * W / H
        return ((w - cw) / 2, 0.0, (w + cw) / 2, float(h))
    ch = w * H / W  # too tall: crop top and bottom
    return (0.0, (h - ch) / 2, float(w), (h + ch) / 2)


def fit_to_bucket(img: Image.Image, cfg: DataConfig, bucket: str | None = None) -> tuple[np.ndarray, str]:
    """Centre-crop to the bucket's aspect, resize (antialiased) to its shape: (HxWx3 uint8, bucket)."""
    w, h = img.size
    bucket = bucket or choose_bucket(h, w, cfg)
    H, W = bucket_shape(bucket, cfg.resolution, cfg.multiple)
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        base = Image.new("RGBA", rgba.size, (*cfg.background, 255))
        img = Image.alpha_composite(base, rgba)
    if img.mode != "RGB":
        img = img.convert("RGB")
    box = crop_box(w, h, H, W)
    if (w, h) != (W, H) or box != (0.0, 0.0, float(w), float(h)):
        img = img.resize((W, H), Image.Resampling.BICUBIC, box=box, reducing_gap=3.0)
    return np.asarray(img), bucket


def decode_mask(data: bytes, cfg: DataConfig, bucket: str) -> np.ndarray:
    """An alpha mask fitted to `bucket` like its image (same centre crop, area resize), thresholded
    at 0.5: HxW uint8, 1 = object. Raises on anything undecodable."""
    img = Image.open(io.BytesIO(data))
    img = img.getchannel("A") if img.mode in ("RGBA", "LA") else img.convert("L")
    H, W = bucket_shape(bucket, cfg.resolution, cfg.multiple)
    box = crop_box(*img.size, H, W)
    if img.size != (W, H) or box != (0.0, 0.0, *map(float, img.size)):
        img = img.resize((W, H), Image.Resampling.BOX, box=box)
    return (np.asarray(img) >= 128).astype(np.uint8)  # alpha / 255 > 0.5


def decode_image(data: bytes, cfg: DataConfig) -> tuple[np.ndarray, str]:
    """Decode image bytes and fit them to a bucket; raises on anything undecodable."""
    img = Image.open(io.BytesIO(data))
    bucket = choose_bucket(img.height, img.width, cfg)  # from the full size, before any draft
    if img.format == "JPEG":  # let libjpeg downscale by a power of two while decoding
        side = max(bucket_shape(bucket, cfg.resolution, cfg.multiple))
        img.draft("RGB", (side, side))
    img.load()
    return fit_to_bucket(img, cfg, bucket)


def to_float_image(arr: np.ndarray) -> torch.Tensor:
    """[..., H, W, 3] uint8 -> [..., 3, H, W] float32 in [-1, 1] (x / 127.5 - 1).

    Done in numpy: one pass per step, and free of torch's per-op threading overhead, which on a
    busy 2-core machine made the same arithmetic ~10x slower."""
    x = np.moveaxis(arr, -1, -3).astype(np.float32, order="C")
    np.divide(x, 127.5, out=x)
    np.subtract(x, 1.0, out=x)
    return torch.from_numpy(x)


def make_record(
    key: str, data: bytes | None, meta: dict, caption: str | None, cfg: DataConfig,
    stats: LoaderStats, rng: random.Random, raw: bool, mask_data: bytes | None = None,
) -> dict | None:
    """Build one sample record, or count the reason and return None; with `cfg.masks` it carries
    the alpha mask decoded from `mask_data` (None when absent or undecodable)."""
    if data is None:
        stats.skip("no_image")
        return None
    if not isinstance(caption, str) or not caption.strip():
        stats.skip("no_caption")
        return None
    try:
        weight = float(meta.get(cfg.weight_key, 1.0))
    except (TypeError, ValueError):
        stats.skip("bad_meta")
        return None
    try:
        arr, bucket = decode_image(data, cfg)
    except Exception:  # truncated, not an image, decompression bomb...: skip and count
        stats.skip("bad_image")
        return None
    mask = read_mask(mask_data, cfg, bucket) if cfg.masks else None
    if cfg.hflip and rng.random() < 0.5:
        arr = arr[:, ::-1]
        mask = None if mask is None else mask[:, ::-1]
    stats.ok += 1
    style = meta.get(cfg.style_key)
    record = {
        "image": arr if raw else to_float_image(arr),
        "caption": caption.strip(),
        "style": None if style is None else str(style),
        "meta": meta,
        "weight": weight,
        "key": key,
        "bucket": bucket,
    }
    if cfg.masks:
        record["mask"] = mask if raw or mask is None else torch.from_numpy(mask[None].astype(np.float32))
    return record


def read_mask(data: bytes | None, cfg: DataConfig, bucket: str) -> np.ndarray | None:
    """`decode_mask`, or None for a missing or undecodable mask (the sample is kept without one)."""
    if data is None:
        return None
    try:
        return decode_mask(data, cfg, bucket)
    except Exception:  # truncated, not an image...: the image is still good
        return None


# ---------------------------------------------------------------------------------------------
# WebDataset shards


def _group_to_record(key, group, cfg, stats, rng, raw) -> dict | None:
    meta: dict = {}
    if "json" in group:
        try:
            meta = json.loads(group["json"])
            assert isinstance(meta, dict)
        except Exception:
            stats.skip("bad_meta")
            return None
    caption = meta.get(cfg.caption_key)
    if caption is None and "txt" in group:
        caption = group["txt"].decode("utf-8", "replace")
    image_key = _select_image_key(group, cfg)
    data = group.get(image_key) if image_key else None
    mask = group.get("mask" + image_key) if cfg.masks and image_key else None
    return make_record(key, data, meta, caption, cfg, stats, rng, raw, mask)


class WebImageDataset(IterableDataset):
    """Streaming image-text samples from webdataset tar shards.

    Shards are shuffled per epoch with `seed + epoch` (the same order on every rank and worker;
    `epochs` passes run per iteration, starting at the epoch given to `set_epoch`),
    then split: with at least as many shards as readers (ranks x DataLoader workers), reader g
    takes shards g, g + n, ...; with fewer, every reader streams every shard and keeps samples
    g, g + n, ... Either way each sample reaches exactly one reader per epoch. With `resample`,
    each reader instead draws shards with replacement forever (the usual choice for multi-node
    training, where shard splits leave ranks with unequal sample counts).

    `stats` is exact for iteration in this process; under DataLoader workers each worker holds
    its own copy, which `edify.data.sampler.BucketedStream` sends back with every batch.
    """

    def __init__(
        self, shards: str | Sequence[str], config: DataConfig = DataConfig(), *, shuffle: bool = True,
        shuffle_buffer: int = 1000, seed: int = 0, epochs: int | None = 1, resample: bool = False,
        rank: int | None = None, world_size: int | None = None, raw: bool = False,
    ):
        self.urls = expand_shards(shards)
        local = [u for u in self.urls if is_local(u)]
        if len(local) == len(self.urls) and not any(os.path.isfile(u) for u in local):
            raise EdifyError(f"none of the {len(local)} shard files exists, first: {local[0]!r}")
        if epochs is not None and epochs < 1:
            raise EdifyError(f"epochs must be >= 1 or None, got {epochs}")
        if shuffle_buffer < 0:
            raise EdifyError(f"shuffle_buffer must be >= 0, got {shuffle_buffer}")
        self.rank, self.world_size = resolve_rank(rank, world_size)
        self.config, self.shuffle, self.shuffle_buffer = config, shuffle, shuffle_buffer
        self.seed, self.epochs, self.resample, self.raw = seed, epochs, resample, raw
        self.first_epoch = 0
        self.stats = LoaderStats()

    def set_epoch(self, epoch: int) -> None:
        """Start the next iteration at `epoch` (its shard order, shuffle and resampling draws);
        takes effect in DataLoader workers started after the call (persistent_workers=False)."""
        self.first_epoch = epoch

    def _reader(self) -> tuple[int, int]:
        """(this reader's index, number of readers) over ranks x DataLoader workers."""
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        return self.rank * workers + worker, self.world_size * workers

    def _groups(self, stats: LoaderStats, tally: Counter) -> Iterator[tuple[str, dict]]:
        """Raw sample groups of this reader; `tally` counts shards "tried" and "opened"."""
        g, n = self._reader()

        def read(url, counts):
            tally["tried"] += 1
            tally["opened"] += yield from iter_tar_groups(url, counts.skip)

        if self.resample:  # draw shards with replacement, a different stream per reader
            rng = random.Random(f"{self.seed}-{self.first_epoch}-{g}")
            while True:
                yield from read(rng.choice(self.urls), stats)
                if tally["opened"] == 0 and tally["tried"] >= 10 * len(self.urls):
                    raise EdifyError(f"no shard could be read in {tally['tried']} tries of {self.urls!r}")
        epoch = 0
        while self.epochs is None or epoch < self.epochs:
            urls = list(self.urls)
            if self.shuffle:
                random.Random(self.seed + self.first_epoch + epoch).shuffle(urls)
            if len(urls) >= n:  # split shards
                for url in urls[g::n]:
                    yield from read(url, stats)
            else:  # split samples; shard failures are counted by one reader only
                index, quiet = 0, LoaderStats()
                for i, url in enumerate(urls):
                    for item in read(url, stats if i % n == g else quiet):
                        if index % n == g:
                            yield item
                        index += 1
            epoch += 1
            if tally["opened"] == 0 and (n == 1 or len(urls) < n):  # this reader tried every shard
                raise EdifyError(f"none of the {len(urls)} shards could be read, first: {urls[0]!r}")

    def _shuffled(self, items: Iterator, rng: random.Random) -> Iterator:
        """Approximate shuffle through a buffer of `shuffle_buffer` items."""
        if not self.shuffle or self.shuffle_buffer <= 1:
            yield from items
            return
        buf: list = []
        for item in items:
            if len(buf) < self.shuffle_buffer:
                buf.append(item)
                continue
            j = rng.randrange(len(buf))
            buf[j], item = item, buf[j]
            yield item
        rng.shuffle(buf)
        yield from buf

    def iter_records(self, stats: LoaderStats, raw: bool | None = None) -> Iterator[dict]:
        """Sample records, counting into `stats`."""
        raw = self.raw if raw is None else raw
        rng = random.Random(f"{self.seed}-{self.first_epoch}-{self._reader()[0]}-samples")
        for key, group in self._shuffled(self._groups(stats, Counter()), rng):
            record = _group_to_record(key, group, self.config, stats, rng, raw)
            if record is not None:
                yield record

    def __iter__(self) -> Iterator[dict]:
        self.stats = LoaderStats()
        yield from self.iter_records(self.stats)


# ---------------------------------------------------------------------------------------------
# Image folders


def _read_captions_jsonl(root: Path, stats: LoaderStats) -> dict[str, dict] | None:
    for name in ("captions.jsonl", "metadata.jsonl"):
        path = root / name
        if path.is_file():
            records = {}
            for line in path.read_text(encoding="utf-8").splitlines():
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                    records[str(rec["file_name"])] = rec
                except Exception:
                    stats.skip("bad_meta")
            return records
    return None


class ImageFolderDataset(Dataset):
    """Map-style image-text samples from a folder (searched recursively).

    Captions come from `captions.jsonl` or `metadata.jsonl` at the root (one json object per line
    with `file_name` relative to the root, the caption field and any other metadata), else from a
    sidecar `image.txt` (and optional `image.json` metadata) beside each `image.png`. Images without
    a caption or whose header does not parse are left out at indexing and counted in `index_stats`;
    an image that fails to decode later becomes {"skip": reason}, which collation drops and counts.
    `stats` adds up indexing and every item fetched in this process.
    """

    def __init__(self, root: str | os.PathLike, config: DataConfig = DataConfig(), *, raw: bool = False,
                 seed: int = 0):
        self.root = Path(root)
        if not self.root.is_dir():
            raise EdifyError(f"image folder does not exist: {str(root)!r}")
        self.config, self.raw, self.seed = config, raw, seed
        self.stats = LoaderStats()
        table = _read_captions_jsonl(self.root, self.stats)
        self.items: list[tuple[Path, str, dict]] = []
        self.buckets: list[str] = []
        files = sorted(p for p in self.root.rglob("*") if p.suffix.lower().lstrip(".") in IMAGE_EXTS)
        seen = set()
        for path in files:
            rel = path.relative_to(self.root).as_posix()
            seen.add(rel)
            if table is not None:
                meta = {k: v for k, v in table.get(rel, {}).items() if k != "file_name"}
                caption = meta.get(config.caption_key, meta.get("text"))
            else:
                meta, caption = self._sidecars(path)
            if not isinstance(caption, str) or not caption.strip():
                self.stats.skip("no_caption")
                continue
            try:
                with Image.open(path) as im:  # reads the header only
                    w, h = im.size
            except Exception:
                self.stats.skip("bad_image")
                continue
            self.items.append((path, caption, meta))
            self.buckets.append(choose_bucket(h, w, config))
        if table is not None:  # jsonl lines naming no image file
            self.stats.skipped["no_image"] += len(set(table) - seen)
        if not self.items:
            raise EdifyError(f"no captioned images in {str(root)!r} (skipped: {dict(self.stats.skipped)})")
        self.index_stats = LoaderStats().merge(self.stats)  # what indexing left out

    def _sidecars(self, path: Path) -> tuple[dict, str | None]:
        meta: dict = {}
        side = path.with_suffix(".json")
        if side.is_file():
            try:
                meta = json.loads(side.read_text(encoding="utf-8"))
            except Exception:
                self.stats.skip("bad_meta")
                return {}, None
        caption = meta.get(self.config.caption_key)
        txt = path.with_suffix(".txt")
        if caption is None and txt.is_file():
            caption = txt.read_text(encoding="utf-8")
        return meta, caption

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        """The sample record, or {"skip": reason} when the image fails to read or decode."""
        path, caption, meta = self.items[index]
        rng = random.Random(f"{self.seed}-{index}")
        local = LoaderStats()
        try:
            data = path.read_bytes()
        except OSError:
            local.skip("bad_image")
            data = None
        rel = path.relative_to(self.root).as_posix()
        record = None
        if data is not None:
            record = make_record(rel, data, meta, caption, self.config, local, rng, self.raw)
        self.stats = self.stats.merge(local)
        return record if record is not None else {"skip": next(iter(local.skipped))}
