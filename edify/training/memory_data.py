"""In-memory training data for small datasets: every image on the device, every caption encoded once.

The emoji demo set is 18,070 images of 64 px, 222 MB as uint8: it fits on any accelerator many
times over, so the fastest loader is none at all. `MemoryData` reads every sample of the shards
(or an image folder) once, through the loaders of `edify.data.datasets`, which skip and count bad
samples, and keeps:

    images[b]   [N_b, 3, H_b, W_b] uint8 per aspect-ratio bucket b, on the training device
    masks[b]    [N_b, 1, H_b, W_b] uint8 {0, 1} alpha masks (1 = object) beside them, or masks = None
                when no sample has one (nothing stored); a sample without one gets zeros
    caption     [N] index into the caption table; media [N] style index (-1 = none); weight [N]
    text table  the unique captions encoded once: states [U, L, D] zero-padded + mask [U, L]

`MemoryStream` then builds each micro-batch with two gathers on the device. Its order is a pure
function of (seed, epoch, position): epoch e shuffles each bucket with a generator seeded by
(seed, e, bucket), cuts it into global batches of world x micro_batch samples (the remainder sits
the epoch out) and shuffles the batches; rank r takes slice r of each. Ranks therefore draw
disjoint samples, one bucket per batch, and a resumed run needs only (epoch, batches) to continue
exactly.

`TextTable` is also a file: the captions encoded on one machine can travel to another that lacks
the text encoder's weights (`python -m edify.training.memory_data DATA OUT.safetensors`), and
`TableTextEncoder` serves them with the text encoder's interface.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from edify.conditioning import Cond
from edify.errors import EdifyError
from edify.text.encoders import TextEncoder
from edify.training.batches import Batch, find_shards


# ---- caption table --------------------------------------------------------------------------

@dataclass
class TextTable:
    """Unique texts and their real-token states, ragged: row i is states[offsets[i]:offsets[i+1]]."""

    texts: list[str]
    states: Tensor  # [T, D] float
    lengths: Tensor  # [U] long
    encoder_name: str
    max_length: int

    def __post_init__(self):
        self.row = {t: i for i, t in enumerate(self.texts)}
        self.offsets = torch.cat([torch.zeros(1, dtype=torch.long), self.lengths.cumsum(0)])

    @staticmethod
    def build(encoder, texts: Sequence[str], batch_size: int = 256) -> TextTable:
        """Encode each unique text once (in batches sorted by length, little padding)."""
        unique = sorted(dict.fromkeys(texts), key=lambda t: (len(t), t))
        if not unique:
            raise EdifyError("a caption table needs at least one text, got 0")
        rows: dict[str, Tensor] = {}
        for start in range(0, len(unique), batch_size):
            chunk = unique[start:start + batch_size]
            states, mask = encoder.encode(chunk)
            states, mask = states.float().cpu(), mask.cpu()
            for i, text in enumerate(chunk):
                rows[text] = states[i, : int(mask[i].sum())].clone()
        ordered = sorted(rows)
        return TextTable(ordered, torch.cat([rows[t] for t in ordered]),
                         torch.tensor([rows[t].shape[0] for t in ordered], dtype=torch.long),
                         encoder.name, int(encoder.max_length))

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def dim(self) -> int:
        return self.states.shape[1]

    def indices(self, texts: Sequence[str], source: str = "the data") -> Tensor:
        """[B] long rows of `texts`; EdifyError naming the first text the table lacks."""
        missing = [t for t in dict.fromkeys(texts) if t not in self.row]
        if missing:
            raise EdifyError(f"{len(missing)} text(s) of {source} are not in the caption table "
                             f"({len(self)} texts), first: {missing[0]!r}")
        return torch.tensor([self.row[t] for t in texts], dtype=torch.long)

    def padded(self, device=None) -> tuple[Tensor, Tensor]:
        """(states [U, L, D] float32 zero-padded, mask [U, L] bool), L = the longest text."""
        length = int(self.lengths.max())
        states = torch.zeros(len(self), length, self.dim)
        mask = torch.arange(length)[None, :] < self.lengths[:, None]
        states[mask] = self.states.float()
        return states.to(device), mask.to(device)

    def save(self, path: str | Path, dtype: torch.dtype = torch.float16) -> Path:
        """One safetensors file (states in `dtype`; fp16 halves it at ~1e-3 relative rounding)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"encoder": self.encoder_name, "max_length": str(self.max_length), "texts": json.dumps(self.texts)}
        save_file({"states": self.states.to(dtype).contiguous(), "lengths": self.lengths}, str(path), metadata=meta)
        return path

    @staticmethod
    def load(path: str | Path) -> TextTable:
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                states, lengths = f.get_tensor("states"), f.get_tensor("lengths")
        except FileNotFoundError:
            raise EdifyError(f"caption table file not found: {path}") from None
        except Exception as err:
            raise EdifyError(f"caption table {path} is not readable: {err}") from None
        if "texts" not in meta or "encoder" not in meta:
            raise EdifyError(f"caption table {path} lacks its texts or encoder name")
        return TextTable(json.loads(meta["texts"]), states.float(), lengths.long(), meta["encoder"],
                         int(meta.get("max_length", "0")))


class TableTextEncoder(TextEncoder):
    """The text encoder interface over a caption table: known texts only, no model weights."""

    def __init__(self, table: TextTable, device=None):
        self.table = table
        self._device = torch.device(device or "cpu")

    @property
    def dim(self) -> int:
        return self.table.dim

    @property
    def max_length(self) -> int:
        return self.table.max_length

    @property
    def name(self) -> str:
        return self.table.encoder_name

    @property
    def device(self) -> torch.device:
        return self._device

    def to(self, device) -> TableTextEncoder:
        self._device = torch.device(device)
        return self

    def encode(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        rows = self.table.indices(texts, "the prompts")
        lengths = self.table.lengths[rows]
        length = int(lengths.max())
        states = torch.zeros(len(texts), length, self.dim)
        mask = torch.arange(length)[None, :] < lengths[:, None]
        for i, r in enumerate(rows.tolist()):
            a, b = int(self.table.offsets[r]), int(self.table.offsets[r + 1])
            states[i, : b - a] = self.table.states[a:b].float()
        return states.to(self._device), mask.to(self._device)


# ---- loading every sample once --------------------------------------------------------------

RECORD_KEYS = ("image", "caption", "style", "weight", "bucket", "mask")

def _read_shard(args) -> tuple[dict[str, list], dict]:
    """All good samples of one shard as raw uint8 arrays, in file order, and its LoaderStats."""
    shard, data_config = args
    from edify.data.datasets import LoaderStats, WebImageDataset

    dataset = WebImageDataset([shard], data_config, shuffle=False, epochs=1, rank=0, world_size=1, raw=True)
    stats, out = LoaderStats(), {key: [] for key in RECORD_KEYS}
    for record in dataset.iter_records(stats):
        for key in out:
            out[key].append(record.get(key))
    return out, stats.as_dict()


def read_samples(spec: str, resolution: int, multiple: int, weight_key: str = "weight",
                 workers: int = 0, masks: bool = False) -> tuple[dict[str, list], dict]:
    """Every good sample of a data spec (shards or an image folder), in a fixed order, and the
    merged LoaderStats as a dict; shards are read by `workers` processes when > 1. "mask" holds
    each sample's alpha mask (HxW uint8) or None."""
    from edify.data.datasets import DataConfig, ImageFolderDataset, LoaderStats

    data_config = DataConfig(resolution=resolution, multiple=multiple, weight_key=weight_key or "weight", masks=masks)
    shards = find_shards(spec)
    records = {key: [] for key in RECORD_KEYS}
    stats = LoaderStats()
    if shards is not None:
        jobs = [(s, data_config) for s in shards]
        if workers > 1 and len(jobs) > 1:
            with multiprocessing.get_context("spawn").Pool(min(workers, len(jobs))) as pool:
                parts = pool.map(_read_shard, jobs)
        else:
            parts = [_read_shard(job) for job in jobs]
        for part, part_stats in parts:
            for key in records:
                records[key].extend(part[key])
            stats = stats.merge(LoaderStats.from_dict(part_stats))
    elif Path(spec).is_dir():
        folder = ImageFolderDataset(spec, data_config, raw=True)
        for i in range(len(folder)):
            record = folder[i]
            if "skip" not in record:
                for key in records:
                    records[key].append(record.get(key))
        stats = folder.stats
    else:
        raise EdifyError(f"in-memory data must be a folder of images or .tar shards, or a shard pattern, got {spec!r}")
    if not records["image"]:
        raise EdifyError(f"no readable sample in {spec!r} (skipped: {dict(stats.skipped)})")
    return records, stats.as_dict()


class MemoryData:
    """A whole dataset on one device: uint8 images per bucket, caption rows, style indices, weights."""

    def __init__(self, records: dict[str, list], stats: dict, table: TextTable | None, vocab, device):
        self.stats = stats
        self.buckets = sorted(set(records["bucket"]))
        self.table = table
        where = {b: [i for i, x in enumerate(records["bucket"]) if x == b] for b in self.buckets}
        self.images = [torch.from_numpy(np.stack([records["image"][i] for i in where[b]])).permute(0, 3, 1, 2)
                       .contiguous().to(device) for b in self.buckets]
        masks = records.get("mask") or [None] * len(records["image"])
        self.masks = None if all(m is None for m in masks) else [bucket_masks(masks, where[b], x, device)
                                                                 for b, x in zip(self.buckets, self.images)]
        order = [i for b in self.buckets for i in where[b]]  # sample ids grouped by bucket
        self.captions = [records["caption"][i] for i in order]
        self.styles = [records["style"][i] for i in order]
        self.starts = np.cumsum([0] + [len(where[b]) for b in self.buckets]).tolist()
        self.weight = torch.tensor([float(records["weight"][i]) for i in order], device=device)
        self.media = None if vocab is None else vocab.indices(self.styles).to(device)
        if table is not None:
            self.caption_row = table.indices(self.captions).to(device)
            self.text, self.text_mask = table.padded(device)

    def __len__(self) -> int:
        return len(self.captions)

    def nbytes(self) -> int:
        return sum(x.numel() for x in self.images + (self.masks or []))

    def bucket_sizes(self) -> list[int]:
        return [b - a for a, b in zip(self.starts, self.starts[1:])]


def bucket_masks(masks: list, ids: list[int], images: Tensor, device) -> Tensor:
    """[N_b, 1, H, W] uint8 masks of one bucket's samples `ids`; zeros for a sample without one."""
    out = np.zeros((len(ids), 1, *images.shape[2:]), dtype=np.uint8)
    for k, i in enumerate(ids):
        if masks[i] is not None:
            out[k, 0] = masks[i]
    return torch.from_numpy(out).to(device)


def epoch_plan(sizes: Sequence[int], global_batch: int, seed: int, epoch: int) -> list[tuple[int, Tensor]]:
    """The global batches of one epoch: (bucket, [global_batch] indices within the bucket), shuffled."""
    from edify.training.loop import step_seed

    batches = []
    for b, n in enumerate(sizes):
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(step_seed(seed, epoch, b)))
        batches += [(b, perm[k:k + global_batch]) for k in range(0, n - global_batch + 1, global_batch)]
    order = torch.randperm(len(batches), generator=torch.Generator().manual_seed(step_seed(seed, epoch, 0x5EED)))
    return [batches[i] for i in order.tolist()]


class MemoryStream:
    """Micro-batches gathered on the device from `MemoryData`; position = (epoch, batches)."""

    def __init__(self, data: MemoryData, micro_batch: int, seed: int = 0, rank: int = 0, world_size: int = 1):
        self.data, self.micro_batch, self.seed = data, micro_batch, seed
        self.rank, self.world_size = rank, world_size
        self.global_batch = micro_batch * world_size
        if max(data.bucket_sizes()) < self.global_batch:
            raise EdifyError(f"in-memory data needs a bucket of at least world x micro batch = {self.global_batch} "
                             f"images, got buckets of {data.bucket_sizes()}")
        self.epoch, self.batches = 0, 0
        self._plan: tuple[int, list] | None = None

    def plan(self) -> list[tuple[int, Tensor]]:
        if self._plan is None or self._plan[0] != self.epoch:
            self._plan = (self.epoch, epoch_plan(self.data.bucket_sizes(), self.global_batch, self.seed, self.epoch))
        return self._plan[1]

    def next_indices(self) -> tuple[int, Tensor]:
        """(bucket, this rank's [micro_batch] indices within the bucket) of the next batch."""
        if self.batches >= len(self.plan()):
            self.epoch, self.batches = self.epoch + 1, 0
        bucket, idx = self.plan()[self.batches]
        self.batches += 1
        return bucket, idx[self.rank * self.micro_batch:(self.rank + 1) * self.micro_batch]

    def next(self) -> Batch:
        d = self.data
        bucket, local = self.next_indices()
        rows = local + d.starts[bucket]  # sample ids in the caption / style / weight arrays
        images = d.images[bucket]
        x0 = images[local.to(images.device)].float() / 127.5 - 1  # the same float math as to_float_image
        dev = rows.to(d.weight.device, non_blocking=True)
        media = None if d.media is None else d.media[dev]
        cond = None
        if d.table is not None:
            cap = d.caption_row[dev]
            cond = Cond(text=d.text[cap], text_mask=d.text_mask[cap], media=media)
        elif media is not None:
            cond = Cond(media=media)
        ids = rows.tolist()
        mask = None if d.masks is None else d.masks[bucket][local.to(images.device)].float()
        return Batch(x0, [d.captions[i] for i in ids], [d.styles[i] for i in ids], d.weight[dev], cond=cond,
                     mask=mask)

    def state_dict(self) -> dict:
        return {"kind": "memory", "epoch": self.epoch, "batches": self.batches}

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != "memory":
            raise EdifyError(f"data position is for a {state.get('kind')!r} stream, not an in-memory one")
        self.epoch, self.batches = int(state["epoch"]), int(state["batches"])


def open_memory_stream(spec: str, resolution: int, multiple: int, micro_batch: int, seed: int, workers: int,
                       weight_key: str, rank: int, world_size: int, text_encoder, vocab, device,
                       log=print, masks: bool = False) -> MemoryStream:
    """Read `spec` once, encode its unique captions once (through `text_encoder`), build the stream."""
    records, stats = read_samples(spec, resolution, multiple, weight_key, workers, masks)
    table = None
    if text_encoder is not None:
        if isinstance(text_encoder, TableTextEncoder):
            table = text_encoder.table
        else:
            table = TextTable.build(text_encoder, records["caption"])
    data = MemoryData(records, stats, table, vocab, device)
    masks = "" if data.masks is None else " with masks"
    log(f"in memory: {len(data)} images{masks} ({data.nbytes() / 2**20:.0f} MiB uint8, buckets {data.buckets}) and "
        f"{len(set(data.captions))} unique captions on {device}; skipped {stats['skipped']}")
    return MemoryStream(data, micro_batch, seed, rank, world_size)


# ---- `python -m edify.training.memory_data`: a caption table file ----------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m edify.training.memory_data",
        description="encode every caption of a dataset (and extra prompts) once into a caption table file")
    parser.add_argument("out", help="output .safetensors file")
    parser.add_argument("--data", default=None,
                        help="folder of .tar shards (or its parent holding train/), or an image folder")
    parser.add_argument("--texts", default=None, help="a text file of captions, one per line")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--text-encoder", default="minilm", help="'minilm' or 't5:/path'")
    parser.add_argument("--prompt", action="append", default=[], help="an extra text to include (repeatable)")
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--fp32", action="store_true", help="store float32 states (default float16)")
    args = parser.parse_args(argv)
    from edify.text.encoders import load_text_encoder

    texts = list(args.prompt)
    if args.data:
        records, stats = read_samples(args.data, args.resolution, 16, "weight", args.workers)
        texts += records["caption"]
        print(f"{len(records['caption'])} samples of {args.data} (skipped {stats['skipped']})")
    if args.texts:
        texts += [line.strip() for line in Path(args.texts).read_text(encoding="utf-8").splitlines() if line.strip()]
    table = TextTable.build(load_text_encoder(args.text_encoder), texts)
    path = table.save(args.out, torch.float32 if args.fp32 else torch.float16)
    print(f"{path}: {len(table)} unique texts, {table.states.shape[0]} token states of {table.dim} dims, "
          f"{path.stat().st_size / 2**20:.1f} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
