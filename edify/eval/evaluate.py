"""Evaluate generated images against real ones: the metrics of `edify eval` in one function.

    evaluate(fake, real, metrics=("fid", "kid", "swd"))  -> {"fid": ..., "kid": ..., "swd": ...}

Images are [-1, 1] tensors [N, 3, H, W] or iterables of batches (generated batches can stream
straight in: each batch is passed to the Inception extractor and to the SWD descriptor sampler
once). Real features may come precomputed (a cached `FeatureStats`), in which case the real
images are only read for SWD. Also here: reading a real validation split and drawing the
deterministic caption list a run generates from.
"""

from __future__ import annotations

import itertools
import json
import random
import warnings
from collections import Counter
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from edify.errors import EdifyError
from edify.eval.features import InceptionFeatures, as_batches
from edify.eval.fid import FID_MIN_SAMPLES, KID_MIN_SAMPLES, FeatureStats, fid, kid
from edify.eval.retrieval import retrieval_accuracy
from edify.eval.swd import SWDDescriptors, swd_from_descriptors

METRICS = ("fid", "kid", "swd", "retrieval")
FEATURE_METRICS = frozenset({"fid", "kid", "retrieval"})


def parse_metrics(metrics: str | Sequence[str]) -> tuple[str, ...]:
    names = [m.strip() for m in metrics.split(",")] if isinstance(metrics, str) else list(metrics)
    names = [m for m in names if m]
    unknown = [m for m in names if m not in METRICS]
    if unknown or not names:
        raise EdifyError(f"metrics must be a non-empty subset of {', '.join(METRICS)}, got {names or metrics!r}")
    return tuple(dict.fromkeys(names))


def _consume(images, batch_size: int, extractor: InceptionFeatures | None, swd_seed: int | None):
    """One pass over an image set: (features or None, SWD descriptors or None, count)."""
    feats, desc, count = [], SWDDescriptors(swd_seed) if swd_seed is not None else None, 0
    for batch in as_batches(images, batch_size):
        if batch.shape[0] == 0:
            continue
        if extractor is not None:
            feats.append(extractor(batch))
        if desc is not None:
            desc.add(batch)
        count += batch.shape[0]
    if count == 0:
        raise EdifyError("an image set to evaluate is empty, got 0 images")
    return (torch.cat(feats) if extractor is not None else None), desc, count


def sample_count_warnings(metrics: Sequence[str], n_fake: int, n_real: int) -> list[str]:
    """Warnings for sample counts below what a metric needs to be a standard figure."""
    out = []
    n = min(n_fake, n_real)
    if "fid" in metrics and n < FID_MIN_SAMPLES:
        out.append(f"FID from {n_fake} generated / {n_real} real images: below {FID_MIN_SAMPLES} per set "
                   "(the feature dimension) the covariance is singular and FID is biased upward; "
                   "compare it only across runs with the same counts")
    if "kid" in metrics and n < KID_MIN_SAMPLES:
        out.append(f"KID from {n_fake} generated / {n_real} real images: below {KID_MIN_SAMPLES} per set "
                   "its spread is large; read kid_std")
    return out


def evaluate(images_fake: Tensor | Iterable[Tensor], images_real: Tensor | Iterable[Tensor] | None = None,
             metrics: str | Sequence[str] = ("fid", "kid", "swd"), *,
             extractor: InceptionFeatures | None = None, real_stats: FeatureStats | None = None,
             fake_labels: Sequence[Hashable] | None = None, real_labels: Sequence[Hashable] | None = None,
             batch_size: int = 64, seed: int = 0, kid_subsets: int = 100, kid_subset_size: int = 1000,
             warn: bool = True) -> dict:
    """Metrics of generated images against real ones.

    Returns {"fid", "kid", "kid_std", "swd", "swd_<res>"..., "retrieval_top1", "retrieval_top5",
    "num_fake", "num_real"} for the metrics asked. FID/KID/retrieval use Inception pool features
    (`extractor`, built on first need), with `real_stats` standing in for the real images' features;
    retrieval needs `fake_labels` / `real_labels` (e.g. (caption, style) pairs); SWD needs
    `images_real`. Warns (UserWarning) when counts are below a metric's minimum.
    """
    metrics = parse_metrics(metrics)
    need_features = bool(FEATURE_METRICS & set(metrics))
    if "swd" in metrics and images_real is None:
        raise EdifyError("SWD needs the real images, got images_real=None")
    if need_features and real_stats is None and images_real is None:
        raise EdifyError("FID, KID and retrieval need real images or real_stats, got neither")
    if "retrieval" in metrics and (fake_labels is None or real_labels is None):
        raise EdifyError("retrieval needs fake_labels and real_labels (e.g. caption, style pairs), got None")
    if need_features and extractor is None:
        extractor = InceptionFeatures(batch_size=batch_size)

    swd_seed = seed if "swd" in metrics else None
    f_fake, d_fake, n_fake = _consume(images_fake, batch_size, extractor if need_features else None, swd_seed)
    real_extractor = extractor if need_features and real_stats is None else None
    f_real, d_real, n_real = None, None, real_stats.count if real_stats is not None else 0
    if real_extractor is not None or swd_seed is not None:
        f_real, d_real, n_real = _consume(images_real, batch_size, real_extractor, swd_seed)
        if real_stats is not None and n_real != real_stats.count:
            raise EdifyError(f"real_stats hold {real_stats.count} images, images_real has {n_real}")
    if need_features and real_stats is None:
        if n_real < 2:
            raise EdifyError(f"FID, KID and retrieval need at least 2 real images, got {n_real}")
        real_stats = FeatureStats.from_features(f_real)

    if warn:
        for message in sample_count_warnings(metrics, n_fake, n_real):
            warnings.warn(message, stacklevel=2)
    result: dict = {}
    if "fid" in metrics:
        if n_fake < 2:
            raise EdifyError(f"FID needs at least 2 generated images, got {n_fake}")
        result["fid"] = fid(real_stats, FeatureStats.from_features(f_fake))
    if "kid" in metrics:
        result["kid"], result["kid_std"] = kid(real_stats.features, f_fake, kid_subsets, kid_subset_size, seed)
    if "swd" in metrics:
        result.update(swd_from_descriptors(d_real, d_fake, seed=seed))
    if "retrieval" in metrics:
        result.update(retrieval_accuracy(f_fake, real_stats.features, fake_labels, real_labels))
    result["num_fake"], result["num_real"] = n_fake, n_real
    return result


# ---------------------------------------------------------------------------------------------
# Real validation splits


@dataclass(frozen=True)
class RealSplit:
    """The real images of a split at one resolution, with their captions and styles, in file order."""

    images: Tensor  # [N, 3, R, R] in [-1, 1]
    captions: list[str]
    styles: list[str | None]
    path: Path
    fingerprint: str  # names, sizes and mtimes of the files read: part of the feature cache key
    lost: int = 0  # images of the split that could not be read, accepted by `allow_missing`

    @property
    def labels(self) -> list[tuple[str, str | None]]:
        return list(zip(self.captions, self.styles))


def split_folder(data: str | Path, split: str) -> Path:
    """<data>/<split>, which must exist (the layout `edify data emoji` writes)."""
    path = Path(data) / split
    if not Path(data).is_dir():
        raise EdifyError(f"data folder does not exist: {str(data)!r}")
    if not path.is_dir():
        found = sorted(p.name for p in Path(data).iterdir() if p.is_dir())
        raise EdifyError(f"data {str(data)!r} has no split {split!r} (splits found: {', '.join(found) or 'none'})")
    return path


def _fingerprint(files: list[Path]) -> str:
    return ";".join(f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)


def _tar_image_key(shards: list[Path], resolution: int) -> str | None:
    """The member key holding `resolution`-px images ("64.png"), None for unsized keys; raises on a mismatch."""
    from edify.data.datasets import IMAGE_EXTS
    from edify.data.tarstream import iter_tar_groups

    for _, group in iter_tar_groups(str(shards[0]), lambda reason: None):
        images = [k for k in group if k.rsplit(".", 1)[-1] in IMAGE_EXTS and not k.startswith("mask")]
        sized = {int(k.split(".", 1)[0]): k for k in images if k.split(".", 1)[0].isdigit()}
        if not sized:
            if images:
                _check_native_side(group[images[0]], resolution)
            return None
        if resolution not in sized:
            raise EdifyError(f"the model makes {resolution} px images, the data split holds "
                             f"{', '.join(str(s) for s in sorted(sized))} px images")
        return sized[resolution]
    return None


def load_split(data: str | Path, split: str, resolution: int, max_images: int | None = None,
               allow_missing: int = 0) -> RealSplit:
    """The real images of a split (webdataset shards or an image folder) at `resolution` px, in file
    order; all of them, or the first `max_images`.

    A reference set must be the split, not what survived of it: images that could not be read
    (a truncated or unreadable shard, an undecodable image, a sample without caption or image)
    are counted, and more than `allow_missing` of them raise EdifyError saying how many were lost
    (default 0: any loss). Shards count their images in the `NAME.tar.json` sidecar `edify data`
    writes; a shard that breaks without one has lost an unknown number, which is always refused.
    Accepted losses are kept in `RealSplit.lost` and reported as a warning.
    """
    from edify.data.datasets import DataConfig

    if max_images is not None and max_images < 2:
        raise EdifyError(f"max_images must be >= 2 (or None for all), got {max_images}")
    if allow_missing < 0:
        raise EdifyError(f"allow_missing must be >= 0, got {allow_missing}")
    folder = split_folder(data, split)
    shards = sorted(folder.glob("*.tar"))
    multiple = 16 if resolution % 16 == 0 else 4 if resolution % 4 == 0 else 1
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if shards:
            key = _tar_image_key(shards, resolution)
            cfg = DataConfig(resolution=resolution, multiple=multiple, square=True, image_key=key)
            records, lost, reasons = _read_shards(shards, cfg, max_images)
            files = shards
        else:
            cfg = DataConfig(resolution=resolution, multiple=multiple, square=True)
            records, lost, reasons, files = _read_folder(folder, cfg, max_images)
    detail = "; ".join(dict.fromkeys(_one_line(w.message) for w in caught))
    where = f"split {split!r} of {str(data)!r}"
    _check_lost(where, len(records), lost, reasons, detail, allow_missing)
    if lost:
        warnings.warn(f"{where}: evaluating without {lost} unreadable image(s) "
                      f"({_reasons(reasons)}; allowed: {allow_missing})", stacklevel=2)
    images = to_float_image_batch(records)
    fingerprint = _fingerprint(files) + (f";first {max_images}" if max_images is not None else "")
    return RealSplit(images, [r["caption"] for r in records], [r["style"] for r in records], folder, fingerprint,
                     lost or 0)


def to_float_image_batch(records: list[dict]) -> Tensor:
    from edify.data.datasets import to_float_image

    return to_float_image(torch.stack([torch.from_numpy(r["image"].copy()) for r in records]).numpy())


def _one_line(message) -> str:
    return " ".join(str(message).split())


def _reasons(reasons: Counter) -> str:
    return ", ".join(f"{k}: {v}" for k, v in sorted(reasons.items())) or "no reason recorded"


def _sidecar_count(shards: list[Path]) -> int | None:
    """The samples the shards hold by their sidecars (NAME.tar.json "count"), None if any lacks one."""
    total = 0
    for shard in shards:
        try:
            total += int(json.loads(shard.with_name(shard.name + ".json").read_text())["count"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
    return total


def _read_shards(shards: list[Path], cfg, max_images: int | None) -> tuple[list[dict], int | None, Counter]:
    """(records, images lost or None when unknown, skip reasons) of webdataset shards in file order."""
    from edify.data.datasets import WebImageDataset

    stream = WebImageDataset([str(s) for s in shards], cfg, shuffle=False, rank=0, world_size=1, raw=True)
    records = list(itertools.islice(stream, max_images))
    reasons = Counter(stream.stats.skipped)
    expected = _sidecar_count(shards)
    if expected is not None:
        wanted = expected if max_images is None else min(expected, max_images)
        return records, max(0, wanted - len(records)), reasons
    if reasons["broken_shard"] or reasons["unreadable_shard"]:
        return records, None, reasons
    return records, sum(reasons.values()), reasons


def _read_folder(folder: Path, cfg, max_images: int | None) -> tuple[list[dict], int, Counter, list[Path]]:
    """(records, images lost, skip reasons, files) of an image folder, in file order."""
    from edify.data.datasets import ImageFolderDataset

    dataset = ImageFolderDataset(folder, cfg, raw=True)
    reasons = Counter(dataset.index_stats.skipped)
    records = []
    for i in range(len(dataset)):
        if max_images is not None and len(records) >= max_images:
            break
        record = dataset[i]
        if "skip" in record:
            reasons[record["skip"]] += 1
        else:
            records.append(record)
    files = [p for p, _, _ in dataset.items]
    _check_native_side(files[0], cfg.resolution)
    return records, sum(reasons.values()), reasons, files


def _check_lost(where: str, read: int, lost: int | None, reasons: Counter, detail: str, allow_missing: int) -> None:
    """EdifyError unless the images lost number at most `allow_missing` (see `load_split`)."""
    detail = f"; {detail}" if detail else ""
    if lost is None:
        raise EdifyError(f"{where}: a shard is truncated or unreadable and has no .tar.json sidecar giving its "
                         f"image count, so how many images were lost is unknown ({_reasons(reasons)}{detail}); "
                         f"rebuild the split or move the shard out of it")
    if read == 0:
        raise EdifyError(f"no readable images in {where} ({_reasons(reasons)}{detail})")
    if lost > allow_missing:
        raise EdifyError(f"{where} lost {lost} of {read + lost} images to unreadable data ({_reasons(reasons)}"
                         f"{detail}); metrics on the other {read} would not describe the split: rebuild it, or "
                         f"accept the loss with --allow-missing {lost}")


def _check_native_side(source, resolution: int) -> None:
    """Unsized images (image folders, unsized tar keys): the source's long side must be `resolution`."""
    import io

    from PIL import Image

    with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as im:
        side = max(im.size)
    if side != resolution:
        raise EdifyError(f"the model makes {resolution} px images, the data split holds {side} px images")


def draw_prompts(real: RealSplit, num_samples: int, seed: int) -> list[int]:
    """Indices of the real samples whose caption/style each generated image uses.

    A seeded permutation of the split, repeated (each pass reshuffled) when more samples than real
    images are asked: the same list for the same seed and split, whatever the batch size.
    """
    if num_samples < 1:
        raise EdifyError(f"num_samples must be >= 1, got {num_samples}")
    rng = random.Random(seed)
    out: list[int] = []
    while len(out) < num_samples:
        order = list(range(len(real.captions)))
        rng.shuffle(order)
        out.extend(order[: num_samples - len(out)])
    return out


# ---------------------------------------------------------------------------------------------
# A model against a split (what `edify eval` and the benches run)


def real_reference(real: RealSplit, data: str | Path, split: str, resolution: int,
                   extractor: InceptionFeatures, cache_dir: str | Path | None,
                   progress: Callable[[int], None] | None = None) -> FeatureStats:
    """Inception statistics of a split's real images, cached per data + split + resolution + extractor.
    `progress(n)` is called as each batch of n real images has been read on a cache miss."""
    from edify.eval.fid import cache_key, reference_stats

    key = cache_key(str(Path(data).resolve()), split, resolution, extractor.id, real.fingerprint)
    meta = {"data": str(data), "split": split, "resolution": resolution, "extractor": extractor.id,
            "count": len(real.captions)}
    batches = _counted(as_batches(real.images, extractor.batch_size), progress)
    stats, _ = reference_stats(key, cache_dir, lambda: (extractor(batches), meta))
    if stats.count != len(real.captions):
        raise EdifyError(f"cached features hold {stats.count} images, the split has {len(real.captions)}")
    return stats


def _counted(batches: Iterable[Tensor], progress: Callable[[int], None] | None) -> Iterable[Tensor]:
    """The batches, calling `progress(len(batch))` after each one has been consumed."""
    for batch in batches:
        yield batch
        if progress is not None:
            progress(batch.shape[0])


def evaluate_pipeline(pipe, real: RealSplit, num_samples: int, *, sampler: str, steps: int, guidance: float,
                      style_guidance: float | None = None, seed: int = 0,
                      metrics: str | Sequence[str] = METRICS, batch_size: int = 32,
                      extractor: InceptionFeatures | None = None, real_stats: FeatureStats | None = None,
                      warn: bool = True, progress: Callable[[int], None] | None = None,
                      callback: Callable[[dict], None] | None = None, guide=None,
                      guide_uncond: bool = False, experts=None, guide_weight=None) -> dict:
    """Generate `num_samples` images for captions/styles drawn from `real` (`draw_prompts`; image i
    uses seed + i) and evaluate them against all of `real`. Adds "nfe" to `evaluate`'s result.
    Styles the model does not know are replaced by no style. Retrieval counts a hit when any real
    image of the same caption (in any style) ranks within the top k.

    `callback(info)` sees every sampler step (the pipeline's callback), `progress(n)` every batch
    of n images generated and measured; style_guidance is the pipeline's (None: the model's
    default); guide, guide_uncond, guide_weight: autoguidance, experts: stage experts (the pipeline's). A sampler step that produces NaN or infinity raises
    EdifyError: metrics of a broken model are not numbers to report."""
    if batch_size < 1:
        raise EdifyError(f"batch size must be >= 1, got {batch_size}")
    metrics = parse_metrics(metrics)
    indices = draw_prompts(real, num_samples, seed)
    nfe = [0]

    def generated():
        for out in generate_for_prompts(pipe, real, indices, batch_size, seed, callback, num_steps=steps,
                                        guidance_scale=guidance, style_guidance=style_guidance, sampler=sampler,
                                        guide=guide, guide_uncond=guide_uncond, experts=experts,
                                        guide_weight=guide_weight):
            nfe[0] = out.nfe
            yield out.images

    # retrieval targets: every real image with the generated image's caption, whatever its style
    result = evaluate(_counted(generated(), progress), real.images, metrics, extractor=extractor,
                      real_stats=real_stats, fake_labels=[real.captions[j] for j in indices],
                      real_labels=real.captions, batch_size=batch_size, seed=seed, warn=warn)
    return {**result, "nfe": nfe[0]}


def generate_for_prompts(pipe, real: RealSplit, indices: list[int], batch_size: int, seed: int = 0,
                         callback: Callable[[dict], None] | None = None, **kwargs):
    """The pipeline's outputs (tensors) for the captions and styles of `real` at `indices`, in batches
    of `batch_size`, image i with seed + i; styles the model does not know become no style; `kwargs`
    go to the pipeline call. A sampler step that produces NaN or infinity raises EdifyError."""
    known = set(pipe.vocab.names)
    for i in range(0, len(indices), batch_size):
        chunk = indices[i:i + batch_size]
        seeds = [seed + i + k for k in range(len(chunk))]
        yield pipe([real.captions[j] for j in chunk],
                   style=[real.styles[j] if real.styles[j] in known else None for j in chunk],
                   seed=seeds, output_type="tensor", callback=_finite_steps(seeds, callback), **kwargs)


def _finite_steps(seeds: list[int], callback: Callable[[dict], None] | None) -> Callable[[dict], None]:
    """A sampler callback that calls `callback` and stops on a state holding NaN or infinity."""
    from edify.runtime import all_finite

    def on_step(info: dict) -> None:
        if callback is not None:
            callback(info)
        if not all_finite(info["x"]):
            raise EdifyError(f"sampling produced non-finite values (NaN or infinity) at step {info['i'] + 1} for "
                             f"seeds {seeds[0]}..{seeds[-1]}: the model's weights are corrupt or unusable")
    return on_step
