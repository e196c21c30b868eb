"""Data benchmarks on the CPU: emoji dataset build time and bucketed loader throughput.

(1) Builds every permissive emoji set at 64 and 256 px from the npm tarballs with
    `edify.data.emoji.build_emoji_dataset` (target: <= 10 minutes on a 2-core machine).
(2) Streams the 64 px images through `WebImageDataset` + `stream_loader` (PNG decoding, bucket
    fitting, bucketed collation into float batches) with 0, 1 and 2 DataLoader workers
    (target: >= 2,000 images/s).

    python bench/data.py                          # build into a temp folder, then measure
    python bench/data.py --skip-build --out /work/data/emoji
    python bench/data.py --synthetic 8000         # loader only, on generated 64 px shards
"""

from __future__ import annotations

import argparse
import glob
import io
import json
import os
import resource
import shlex
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from edify.data.datasets import DataConfig, WebImageDataset  # noqa: E402
from edify.data.sampler import stream_loader  # noqa: E402


def build(tarballs: Path, out: Path, workers: int | None) -> dict:
    """Time the permissive 64 + 256 px build; returns a result row."""
    from edify.data.emoji import build_emoji_dataset

    started = time.perf_counter()
    manifest = build_emoji_dataset(tarballs, out, sets=None, sizes=(64, 256), permissive_only=True,
                                   workers=workers, progress=False)
    seconds = time.perf_counter() - started
    counts = manifest.get("counts", {})
    print(f"build: {counts.get('train', '?')} train + {counts.get('val', '?')} val samples from "
          f"{len(manifest.get('sets', []))} sets, sizes {manifest.get('sizes')}, in {seconds:.1f} s -> {out}")
    return {"what": "build permissive sets, 64+256 px", "value": f"{seconds:.1f} s",
            "target": "<= 600 s", "pass": seconds <= 600, "cpu": "-"}


def synthetic_shards(folder: Path, count: int, per_shard: int = 1000) -> list[str]:
    """64 px emoji-like PNGs (flat shapes on white, ~1-3 kB like the real ones) in shards."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:64, :64]
    paths = []
    for s in range(0, count, per_shard):
        path = folder / f"synthetic-{s // per_shard:06d}.tar"
        with tarfile.open(path, "w") as tf:
            for i in range(s, min(s + per_shard, count)):
                img = np.full((64, 64, 3), 255, np.uint8)
                for _ in range(3):
                    cy, cx, r = rng.integers(12, 52, 2).tolist() + [int(rng.integers(6, 20))]
                    img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rng.integers(0, 255, 3)
                buf = io.BytesIO()
                Image.fromarray(img).save(buf, format="PNG")
                meta = json.dumps({"caption": f"shape {i}", "style": "synthetic"}).encode()
                for name, data in ((f"{i:07d}.64.png", buf.getvalue()), (f"{i:07d}.json", meta)):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
        paths.append(str(path))
    return paths


def cpu_seconds() -> float:
    """User + system CPU time of this process and its finished children (DataLoader workers)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def throughput(shards: list[str], workers: int, batch_size: int, limit: int | None) -> dict:
    """Images/s of bucketed 64 px batches, timed from loader creation to the last batch, and the
    CPU time per image (all processes), which a machine shared with other jobs inflates less."""
    dataset = WebImageDataset(shards, DataConfig(resolution=64), seed=0, shuffle_buffer=1000)
    started, cpu_started = time.perf_counter(), cpu_seconds()
    loader = stream_loader(dataset, batch_size, num_workers=workers)
    images = 0
    for batch in loader:
        images += batch["image"].shape[0]
        if limit is not None and images >= limit:
            break
    seconds = time.perf_counter() - started
    stats = loader.stats
    del loader  # ends the workers, so their CPU time is counted
    cpu_ms = (cpu_seconds() - cpu_started) / images * 1e3
    rate = images / seconds
    print(f"loader: workers={workers} batch={batch_size}: {images} images in {seconds:.2f} s "
          f"= {rate:.0f} images/s, {cpu_ms:.3f} CPU ms/image (ok={stats.ok}, skipped={dict(stats.skipped)})")
    return {"what": f"loader 64 px, {workers} workers", "value": f"{rate:.0f} img/s",
            "target": ">= 2000 img/s", "pass": rate >= 2000, "cpu": f"{cpu_ms:.3f}"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tarballs", type=Path, default=REPO.parent / "shared" / "data" / "emoji-npm")
    parser.add_argument("--out", type=Path, default=None, help="build folder (default: a temp folder)")
    parser.add_argument("--skip-build", action="store_true", help="reuse the shards under --out")
    parser.add_argument("--build-workers", type=int, default=None)
    parser.add_argument("--synthetic", type=int, default=0,
                        help="measure the loader on N generated 64 px images instead of the build")
    parser.add_argument("--workers", default="0,1,2", help="comma-separated DataLoader worker counts")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--limit", type=int, default=None, help="stop each loader run after N images")
    args = parser.parse_args(argv)
    print("$ python " + " ".join(shlex.quote(a) for a in sys.argv))
    print(f"cpu cores: {os.cpu_count()}, load average: {os.getloadavg()}")

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp) / "emoji"
        if args.synthetic:
            shards = synthetic_shards(Path(tmp), args.synthetic)
        else:
            if not args.skip_build:
                rows.append(build(args.tarballs, out, args.build_workers))
            shards = sorted(glob.glob(str(out / "train" / "*.tar")))
            if not shards:
                print(f"no shards under {out / 'train'}", file=sys.stderr)
                return 1
        for workers in (int(w) for w in args.workers.split(",")):
            rows.append(throughput(shards, workers, args.batch_size, args.limit))

    print(f"\n{'measure':<34} {'value':>11} {'target':>14}  ok   CPU ms/img")
    for row in rows:
        ok = "yes" if row["pass"] else "NO "
        print(f"{row['what']:<34} {row['value']:>11} {row['target']:>14}  {ok}  {row['cpu']:>10}")
    print(f"load average at the end: {os.getloadavg()} (other jobs share these cores)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
