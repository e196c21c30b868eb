"""Aspect-ratio bucketing (section 3.1 of the paper): every batch holds images of one bucket shape.

Two forms, one per kind of dataset:
- streaming (`BucketedStream`, webdataset shards): samples are grouped per bucket as they arrive,
  and a bucket is emitted as a batch when it holds `batch_size` samples; a bounded buffer caps
  memory, and the end of the stream flushes (or, with drop_last, drops and counts) short batches.
- map-style (`BucketBatchSampler`, image folders): index batches drawn from one bucket, shuffled
  per epoch with a seed, split across ranks.

Collation turns the uint8 images into one float tensor in [-1, 1] per batch. `BatchLoader` wraps
a torch DataLoader and keeps `stats`, the skip counts summed over all DataLoader workers.
"""

from __future__ import annotations

import random
from collections import Counter
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, Sampler, get_worker_info

from edify.buckets import BUCKETS
from edify.data.datasets import (
    ImageFolderDataset, LoaderStats, WebImageDataset, to_float_image,
)
from edify.errors import EdifyError
from edify.training.distributed import resolve_rank


def stack_masks(masks: Sequence, shape: tuple[int, int]) -> torch.Tensor | None:
    """Records' alpha masks (HxW uint8 arrays or None) as [B, 1, H, W] float, None when all are
    None; a missing one is zeros (no object, so inpainting's "replace" falls back to a drawn mask)."""
    if all(m is None for m in masks):
        return None
    out = torch.zeros(len(masks), 1, *shape)
    for i, m in enumerate(masks):
        if m is not None:
            out[i, 0] = torch.from_numpy(np.ascontiguousarray(m))
    return out


def collate(samples: Sequence[dict]) -> dict:
    """Stack one bucket's records: image [B, 3, H, W] float in [-1, 1], weight [B] float, lists
    of caption/style/key/meta, the bucket name, and `skipped` ({reason: n}) for {"skip": reason}
    entries that a map-style dataset returned for undecodable images. Records read with masks
    (`DataConfig(masks=True)`) also give "mask" (`stack_masks`)."""
    kept = [s for s in samples if "skip" not in s]
    skipped = Counter(s["skip"] for s in samples if "skip" in s)
    buckets = {s["bucket"] for s in kept}
    if len(buckets) > 1:
        raise EdifyError(f"a batch must hold one aspect-ratio bucket, got {sorted(buckets)}")
    if kept and isinstance(kept[0]["image"], np.ndarray):  # uint8 HxWx3 -> float, once per batch
        image = to_float_image(np.stack([s["image"] for s in kept]))
    elif kept:
        image = torch.stack([s["image"] for s in kept])
    else:
        image = torch.zeros(0, 3, 0, 0)
    return {
        "image": image,
        "caption": [s["caption"] for s in kept],
        "style": [s["style"] for s in kept],
        "weight": torch.tensor([s["weight"] for s in kept], dtype=torch.float32),
        "key": [s["key"] for s in kept],
        "meta": [s["meta"] for s in kept],
        "bucket": kept[0]["bucket"] if kept else None,
        "skipped": dict(skipped),
        **({"mask": stack_masks([s["mask"] for s in kept], tuple(image.shape[-2:]))}
           if kept and "mask" in kept[0] else {}),
    }


def bucketed_batches(
    records: Iterable[dict], batch_size: int, max_buffer: int | None = None, drop_last: bool = False,
    stats: LoaderStats | None = None,
) -> Iterator[list[dict]]:
    """Group a stream of records per bucket; yield a bucket as a batch once it holds `batch_size`.

    At most `max_buffer` records wait (default batch_size x number of buckets, which never forces
    a short batch); past it, the fullest bucket is emitted early as a short batch. At the end the
    partial buckets are emitted, or dropped with drop_last (their count added to `stats.dropped`).
    """
    if batch_size < 1:
        raise EdifyError(f"batch_size must be >= 1, got {batch_size}")
    max_buffer = batch_size * len(BUCKETS) if max_buffer is None else max_buffer
    if max_buffer < batch_size:
        raise EdifyError(f"max_buffer must be >= batch_size={batch_size}, got {max_buffer}")
    pending: dict[str, list[dict]] = {}
    waiting = 0
    for record in records:
        group = pending.setdefault(record["bucket"], [])
        group.append(record)
        waiting += 1
        if len(group) == batch_size:
            pending[record["bucket"]] = []
            waiting -= batch_size
            yield group
        elif waiting >= max_buffer:  # buffer full: release the fullest bucket early
            name = max(pending, key=lambda b: len(pending[b]))
            group, pending[name] = pending[name], []
            waiting -= len(group)
            yield group
    for name in sorted(pending):
        group = pending[name]
        if not group:
            continue
        if drop_last:
            if stats is not None:
                stats.dropped += len(group)
        else:
            yield group


class BucketedStream(IterableDataset):
    """Collated single-bucket batches from a `WebImageDataset`; use with DataLoader(batch_size=None).

    Each batch carries "stats" (this worker's cumulative LoaderStats as a dict) and "worker" (its
    DataLoader worker id). The snapshot is taken as the batch is handed out, one batch late, so a
    worker's last batch carries its final counts; a worker that delivers no sample at all sends
    one empty batch holding its counts. Summing the latest snapshot of every worker therefore gives
    exact totals once the epoch ends (`BatchLoader` does this).
    """

    def __init__(self, dataset: WebImageDataset, batch_size: int, *, max_buffer: int | None = None,
                 drop_last: bool = False):
        if batch_size < 1:
            raise EdifyError(f"batch_size must be >= 1, got {batch_size}")
        self.dataset, self.batch_size = dataset, batch_size
        self.max_buffer, self.drop_last = max_buffer, drop_last

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker = 0 if info is None else info.id
        stats = LoaderStats()
        records = self.dataset.iter_records(stats, raw=True)
        held = None
        for group in bucketed_batches(records, self.batch_size, self.max_buffer, self.drop_last, stats):
            if held is not None:
                yield {**held, "stats": stats.as_dict(), "worker": worker}
            held = collate(group)
        if held is None:
            held = collate([])
        yield {**held, "stats": stats.as_dict(), "worker": worker}


class BucketBatchSampler(Sampler[list[int]]):
    """Index batches of one bucket each for a map-style dataset with per-index bucket names.

    Per epoch (`set_epoch`), with one seed shared by all ranks: indices are shuffled inside each
    bucket, cut into batches, the batch order is shuffled, and rank r takes batches r, r + W, ...
    Without drop_last, each bucket's last batch may be short and ranks may differ by one batch;
    with drop_last, short batches are dropped and the batch count is cut to a multiple of W.
    """

    def __init__(self, buckets: Sequence[str], batch_size: int, *, shuffle: bool = True, seed: int = 0,
                 drop_last: bool = False, rank: int | None = None, world_size: int | None = None):
        if batch_size < 1:
            raise EdifyError(f"batch_size must be >= 1, got {batch_size}")
        self.rank, self.world_size = resolve_rank(rank, world_size)
        self.buckets, self.batch_size = list(buckets), batch_size
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _all_batches(self) -> list[list[int]]:
        rng = random.Random(self.seed + self.epoch)
        per_bucket: dict[str, list[int]] = {}
        for index, name in enumerate(self.buckets):
            per_bucket.setdefault(name, []).append(index)
        batches = []
        for name in sorted(per_bucket):
            indices = per_bucket[name]
            if self.shuffle:
                rng.shuffle(indices)
            for start in range(0, len(indices), self.batch_size):
                batch = indices[start:start + self.batch_size]
                if len(batch) == self.batch_size or not self.drop_last:
                    batches.append(batch)
        if self.shuffle:
            rng.shuffle(batches)
        if self.drop_last:
            batches = batches[: len(batches) - len(batches) % self.world_size]
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        yield from self._all_batches()[self.rank::self.world_size]

    def __len__(self) -> int:
        return len(self._all_batches()[self.rank::self.world_size])


class BatchLoader:
    """A DataLoader of collated batches that keeps `stats`, its LoaderStats over all workers.

    Streaming: the sum of each worker's latest snapshot (exact after the epoch). Map-style: the
    folder's indexing counts plus the per-batch `skipped` counts and delivered samples. Empty
    batches (possible only when a worker delivered nothing) are not yielded.
    """

    def __init__(self, loader: DataLoader, base: LoaderStats | None = None, epoch_target=None):
        self.loader, self.base, self.epoch_target = loader, base or LoaderStats(), epoch_target
        self.stats = LoaderStats().merge(self.base)

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle for `epoch` (the batch sampler's or the shard stream's order)."""
        if self.epoch_target is not None:
            self.epoch_target.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[dict]:
        latest: dict[int, LoaderStats] = {}
        runtime = LoaderStats()
        self.stats = LoaderStats().merge(self.base)
        for batch in self.loader:
            if "stats" in batch:  # streaming: per-worker cumulative snapshots
                latest[batch.pop("worker")] = LoaderStats.from_dict(batch.pop("stats"))
                total = LoaderStats()
                for s in latest.values():
                    total = total.merge(s)
                self.stats = self.base.merge(total)
            else:  # map-style: count this batch
                runtime.ok += len(batch["caption"])
                runtime.skipped.update(batch["skipped"])
                self.stats = self.base.merge(runtime)
            if batch["caption"]:
                yield batch


def _as_is(batch: dict) -> dict:
    return batch


def stream_loader(dataset: WebImageDataset, batch_size: int, *, num_workers: int = 0,
                  max_buffer: int | None = None, drop_last: bool = False, **loader_kwargs) -> BatchLoader:
    """Bucketed batches from webdataset shards, decoded in `num_workers` DataLoader workers."""
    stream = BucketedStream(dataset, batch_size, max_buffer=max_buffer, drop_last=drop_last)
    if num_workers > 0:
        loader_kwargs.setdefault("prefetch_factor", 4)
    loader_kwargs.setdefault("collate_fn", _as_is)  # batches are collated already
    loader = DataLoader(stream, batch_size=None, num_workers=num_workers, **loader_kwargs)
    return BatchLoader(loader, epoch_target=dataset)


def folder_loader(dataset: ImageFolderDataset, batch_size: int, *, num_workers: int = 0,
                  shuffle: bool = True, seed: int = 0, drop_last: bool = False, rank: int | None = None,
                  world_size: int | None = None, **loader_kwargs) -> BatchLoader:
    """Bucketed batches from an image folder through a `BucketBatchSampler`."""
    sampler = BucketBatchSampler(dataset.buckets, batch_size, shuffle=shuffle, seed=seed,
                                 drop_last=drop_last, rank=rank, world_size=world_size)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=num_workers,
                        **loader_kwargs)
    return BatchLoader(loader, base=dataset.index_stats, epoch_target=sampler)
