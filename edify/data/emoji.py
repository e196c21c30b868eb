"""The emoji demo dataset: color emoji sets rendered from SVG into webdataset shards.

Sources are iconify JSON packages from the npm registry (`@iconify-json/NAME`), one per emoji set.
Each non-hidden icon is rendered at every requested size (RGB on white plus its alpha mask),
captioned with its Unicode CLDR name, labelled with its set as the style (the media-type token of
the Edify Image conditioning), and carries its set's license and author for attribution.

Layout under `out/`:
    train/SET-NNNN.tar, val/SET-NNNN.tar   webdataset shards (val shards load on their own)
    */SET-NNNN.tar.json                    per-shard sidecar: count and build fingerprint
    manifest.json                          counts, sets, licenses, sizes, shard lists, timing
Each sample holds `SIZE.png` (RGB on white), `maskSIZE.png` (8-bit alpha) for every size, and
`json` (caption, style, license, author, name, codepoints, split, ...).

The validation split holds out about 5% of the *named emoji*: a hash of the codepoint sequence
decides, so one emoji is held out in every style at once and the split never depends on
random state or on which sets were built.

Packages are input from elsewhere and treated as hostile. Their JSON is schema-checked
(edify.data.schema: a broken file is one `EdifyError` line, a broken icon is skipped), every SVG is
checked before resvg sees it (edify.data.render.svg_problem: no files outside the icon, bounded
size, depth and `<use>` expansion), and rendering runs in worker processes with a time and memory
limit per icon (edify.data.sandbox), also with one worker. A skipped icon is counted in the
manifest as `dropped_REASON`:
    not_svg, empty, vanishes                          not an image worth training on
    bad_name, bad_icon, bad_geometry, too_large       its icons.json entry fails the schema
    malformed, too_deep, too_complex, external_ref,   its SVG fails the pre-check
    bad_image
    timeout, crashed, out_of_memory, panic, error     its render failed in the worker
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from tqdm import tqdm

from edify.data.emoji_names import Caption, EmojiNamer
from edify.data.render import RenderResult, render_sample
from edify.data.sandbox import Failed, IsolatedPool
from edify.data.schema import IconSet, load_icon_set
from edify.data.shards import AtomicShardWriter, finished_shard, remove_stale_temps, sidecar, write_json_atomic
from edify.errors import EdifyError

# set name -> SPDX license of the published package; share-alike sets are kept out by
# --permissive-only (weights trained on them need CC-BY-SA terms on their model card).
KNOWN_SETS: dict[str, str] = {
    "twemoji": "CC-BY-4.0",
    "noto": "Apache-2.0",
    "noto-v1": "Apache-2.0",
    "fluent-emoji-flat": "MIT",
    "fluent-emoji": "MIT",
    "emojione": "CC-BY-4.0",
    "fxemoji": "Apache-2.0",
    "openmoji": "CC-BY-SA-4.0",
    "emojione-v1": "CC-BY-SA-4.0",
}
# sets whose chars.json (codepoints -> icon name) also names the other sets' icons; they are read
# even when not built, so captions and the split do not depend on which sets are built
NAMING_SETS = ("twemoji", "noto", "fluent-emoji-flat", "openmoji")
VAL_PER_MILLE = 50  # 5% of named emoji held out
SHARD_SIZE = 1000  # icons per shard
FORMAT_VERSION = 1
MIN_SIZE, MAX_SIZE = 8, 4096
# Wall time to render one icon at every size: ICON_SECONDS plus ICON_SECONDS_PER_4K for each
# 4096x4096 px rendered. The heaviest published icons (fluent-emoji) take up to 20 s at 4096 px on
# a busy 2-core machine and well under 1 s at 64 px.
ICON_SECONDS, ICON_SECONDS_PER_4K = 30.0, 120.0
ICON_MEMORY_MB = 2048  # memory a worker may add while rendering; a 4096 px icon needs about 600 MB
MAX_FAILURES_LISTED = 100  # per shard sidecar: which icons failed and why


def is_share_alike(spdx: str) -> bool:
    return "-SA-" in spdx or spdx.endswith("-SA")


@dataclass(frozen=True)
class Sample:
    """One icon to render: where it comes from, what it is called, and its split."""

    key: str
    icon_set: str
    icon: str
    caption: Caption
    split: str


def parse_sets(sets: str | list[str] | tuple[str, ...] | None, permissive_only: bool) -> list[str]:
    """Validate set names (comma list or sequence); None means every known set."""
    if sets is None:
        names = list(KNOWN_SETS)
    else:
        names = [s.strip() for s in (sets.split(",") if isinstance(sets, str) else sets) if s.strip()]
    unknown = [s for s in names if s not in KNOWN_SETS]
    if unknown or not names:
        raise EdifyError(f"unknown emoji set(s) {unknown or names}; known sets: {', '.join(KNOWN_SETS)}")
    if permissive_only:
        names = [s for s in names if not is_share_alike(KNOWN_SETS[s])]
        if not names:
            raise EdifyError(f"--permissive-only leaves no set out of {sets}; all are share-alike")
    return list(dict.fromkeys(names))


def parse_sizes(sizes: str | int | tuple[int, ...] | list[int]) -> tuple[int, ...]:
    """Sizes as a sorted tuple of distinct ints in [MIN_SIZE, MAX_SIZE]."""
    try:
        items = [int(s) for s in str(sizes).split(",")] if isinstance(sizes, (str, int)) else [int(s) for s in sizes]
    except ValueError:
        raise EdifyError(f"sizes must be comma-separated integers, got {sizes!r}") from None
    bad = [s for s in items if not MIN_SIZE <= s <= MAX_SIZE]
    if bad or not items:
        raise EdifyError(f"image sizes must be between {MIN_SIZE} and {MAX_SIZE} px, got {sizes!r}")
    return tuple(sorted(set(items)))


def find_tarball(folder: Path, name: str) -> Path | None:
    """The newest `iconify-json-NAME-VERSION.tgz` in folder (versions start with a digit)."""
    pattern = re.compile(rf"^iconify-json-{re.escape(name)}-(\d[\w.+-]*)\.tgz$", re.ASCII)
    found = [(m.group(1), p) for p in folder.iterdir() if (m := pattern.match(p.name))]
    if not found:
        return None
    version_key = lambda v: [int(x) if x.isdigit() else -1 for x in re.split(r"[.+-]", v[0])]
    return max(found, key=version_key)[1]


def default_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "edify" / "emoji-npm"


def fetch_tarballs(names: list[str], cache: Path) -> Path:
    """Fetch missing packages with `npm pack @iconify-json/NAME` (the user's npm registry)."""
    cache.mkdir(parents=True, exist_ok=True)
    missing = [n for n in names if find_tarball(cache, n) is None]
    if missing and shutil.which("npm") is None:
        raise EdifyError(f"npm is not installed; it fetches the emoji sets {missing}: install Node.js or pass --tarballs DIR")
    for name in missing:
        done = subprocess.run(["npm", "pack", f"@iconify-json/{name}", "--pack-destination", str(cache)],
                              capture_output=True, text=True)
        if done.returncode != 0 or find_tarball(cache, name) is None:
            last = (done.stderr.strip().splitlines() or ["no tarball written"])[-1]
            raise EdifyError(f"npm pack @iconify-json/{name} failed: {last}")
    return cache


def read_icon_set(path: Path, name: str) -> IconSet:
    """Read and schema-check icons.json, info.json and (if present) chars.json of a tarball."""
    return load_icon_set(Path(path), name, KNOWN_SETS.get(name, "unknown"))


def split_of(caption: Caption, icon: str) -> str:
    """'val' for ~5% of emoji, decided by a hash of the codepoints (or of the name if unnamed)."""
    identity = f"cp:{caption.codepoints}" if caption.codepoints else f"name:{icon}"
    bucket = int(hashlib.sha256(identity.encode()).hexdigest()[:8], 16) % 1000
    return "val" if bucket < VAL_PER_MILLE else "train"


def plan_samples(icon_set: IconSet, namer: EmojiNamer) -> list[Sample]:
    """Every non-hidden icon of a set (aliases are duplicates and are skipped), sorted by name.

    An icon whose name failed the schema is planned under a digest key and never captioned: its
    name may be anything, and it is only counted.
    """
    samples = []
    for icon in sorted(icon_set.icons):
        if icon_set.icons[icon].hidden:
            continue
        if icon_set.icons[icon].problem == "bad_name":
            digest = hashlib.sha1(icon.encode("utf-8", "surrogatepass")).hexdigest()[:16]
            caption = Caption("", None, "icon-name")
            samples.append(Sample(f"{icon_set.name}__bad-name-{digest}", icon_set.name, icon, caption, "train"))
            continue
        caption = namer.caption(icon_set.name, icon)
        key = f"{icon_set.name}__{icon}".replace(".", "_")
        samples.append(Sample(key, icon_set.name, icon, caption, split_of(caption, icon)))
    return samples


@dataclass(frozen=True)
class Shard:
    path: Path
    split: str
    icon_set: IconSet
    samples: list[Sample]

    def fingerprint(self, sizes: tuple[int, ...]) -> dict[str, Any]:
        planned = "\n".join(f"{s.key}|{s.caption}|{s.split}" for s in self.samples)
        return {"format": FORMAT_VERSION, "set": self.icon_set.name, "version": self.icon_set.version,
                "sizes": list(sizes), "content_sha1": hashlib.sha1(planned.encode()).hexdigest()}


def plan_shards(out: Path, icon_sets: list[IconSet], namer: EmojiNamer) -> list[Shard]:
    shards = []
    for icon_set in icon_sets:
        samples = plan_samples(icon_set, namer)
        for split in ("train", "val"):
            part = [s for s in samples if s.split == split]
            for index, start in enumerate(range(0, len(part), SHARD_SIZE)):
                path = out / split / f"{icon_set.name}-{index:04d}.tar"
                shards.append(Shard(path, split, icon_set, part[start:start + SHARD_SIZE]))
    return shards


def sample_record(sample: Sample, icon_set: IconSet, result: RenderResult) -> dict[str, Any]:
    """The webdataset sample: one image and one mask per size, plus the json metadata."""
    meta = {
        "caption": sample.caption.text, "style": icon_set.name, "license": icon_set.license,
        "license_url": icon_set.license_url, "author": icon_set.author, "author_url": icon_set.author_url,
        "name": sample.icon, "codepoints": sample.caption.codepoints, "named": sample.caption.named,
        "caption_source": sample.caption.source, "split": sample.split, "set_version": icon_set.version,
        "sizes": sorted(result.images),
    }
    record: dict[str, Any] = {"__key__": sample.key, "json": json.dumps(meta).encode()}
    for size, (rgb, mask) in result.images.items():
        record[f"{size}.png"] = rgb
        record[f"mask{size}.png"] = mask
    return record


def _as_result(outcome: RenderResult | Failed) -> RenderResult:
    if isinstance(outcome, Failed):
        return RenderResult(outcome.reason, error=outcome.detail)
    return outcome


def _results(pending: list[Shard], sizes: tuple[int, ...], pool: IsolatedPool) -> Iterator[RenderResult]:
    """One result per planned sample, in order; icons the schema refused never reach a worker."""
    icons = [sh.icon_set.icons[s.icon] for sh in pending for s in sh.samples]
    rendered = pool.imap((icon.body, icon.geometry, sizes) for icon in icons if not icon.problem)
    for icon in icons:
        yield RenderResult(icon.problem, error="refused by the schema") if icon.problem else _as_result(next(rendered))


@contextlib.contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM unwinds the build like Ctrl-C, so workers stop and the shard being written is removed."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def _write_shard(shard: Shard, sizes: tuple[int, ...], results: Iterator[RenderResult], bar: tqdm) -> None:
    """Write one shard atomically; its sidecar counts every status and names the failed icons."""
    with AtomicShardWriter(shard.path, shard.fingerprint(sizes)) as writer:
        statuses, named, failed, shard_started = Counter(), 0, {}, time.perf_counter()
        for sample in shard.samples:
            result = next(results)
            statuses[result.status] += 1
            if result.status == "ok":
                writer.write(sample_record(sample, shard.icon_set, result))
                named += sample.caption.named
            elif result.error and len(failed) < MAX_FAILURES_LISTED:
                failed[sample.key] = f"{result.status}: {result.error}"[:300]
            bar.update()
        writer.stats = {"icons": len(shard.samples), "named": named, "statuses": dict(statuses),
                        "failed": failed, "seconds": round(time.perf_counter() - shard_started, 3)}


def icon_time_limit(sizes: tuple[int, ...]) -> float:
    """The default per-icon time limit: grows with the pixels rendered, so large sizes do not time out."""
    return ICON_SECONDS + ICON_SECONDS_PER_4K * sum(s * s for s in sizes) / MAX_SIZE**2


def build_emoji_dataset(
    tarballs: Path | None,
    out: Path,
    sets: str | list[str] | None = None,
    sizes: tuple[int, ...] | str = (64,),
    permissive_only: bool = False,
    workers: int | None = None,
    progress: bool = True,
    icon_seconds: float | None = None,
    icon_memory_mb: int = ICON_MEMORY_MB,
) -> dict[str, Any]:
    """Build (or resume) the emoji webdataset under `out`; returns the manifest it writes.

    Every icon is rendered in a worker process (also with `workers=1`) with at most
    `icon_seconds` of wall time (default: `icon_time_limit(sizes)`) and `icon_memory_mb` of extra
    memory (0: no memory cap); an icon over either is skipped and counted.
    """
    started = time.perf_counter()
    names, sizes = parse_sets(sets, permissive_only), parse_sizes(sizes)
    icon_seconds = icon_time_limit(sizes) if icon_seconds is None else float(icon_seconds)
    workers = (os.cpu_count() or 1) if workers is None else int(workers)
    if workers < 1:
        raise EdifyError(f"workers must be at least 1, got {workers}")
    if not 0 < icon_seconds <= 86_400 or icon_memory_mb < 0:
        raise EdifyError(f"per-icon limits must be positive (time at most a day), got {icon_seconds} s "
                         f"and {icon_memory_mb} MB")
    if tarballs is None:
        folder = fetch_tarballs(names + [n for n in NAMING_SETS if n not in names], default_cache())
    else:
        folder = Path(tarballs)
        if not folder.is_dir():
            raise EdifyError(f"tarball folder does not exist: {folder}")
    paths = {}
    for name in names:
        path = find_tarball(folder, name)
        if path is None:
            raise EdifyError(f"no iconify-json-{name}-VERSION.tgz for set {name!r} in {folder}")
        paths[name] = path
    icon_sets = [read_icon_set(paths[n], n) for n in names]
    if permissive_only:  # trust the package's own license over the table above
        icon_sets = [s for s in icon_sets if not is_share_alike(s.license)]
    # other sets' chars.json help name icons of sets without one, even when not being built
    built, chars = {s.name: s for s in icon_sets}, {}
    for name in KNOWN_SETS:  # a fixed order: the first set naming an icon wins, whatever is built
        if name in built:
            chars[name] = built[name].chars
        elif (other := find_tarball(folder, name)) is not None:
            chars[name] = read_icon_set(other, name).chars
    namer = EmojiNamer(chars)
    out = Path(out)
    remove_stale_temps(out, out / "train", out / "val")  # left by a build that was killed
    shards = plan_shards(out, icon_sets, namer)
    pending = [sh for sh in shards if finished_shard(sh.path, sh.fingerprint(sizes)) is None]
    total = sum(len(sh.samples) for sh in pending)
    with (_terminate_as_interrupt(),
          IsolatedPool(render_sample, workers, seconds=icon_seconds, megabytes=icon_memory_mb) as pool,
          tqdm(total=total, disable=not progress, unit="icon", desc="emoji") as bar):
        results = _results(pending, sizes, pool)
        for shard in pending:
            _write_shard(shard, sizes, results, bar)
    manifest = summarize(out, shards, icon_sets, sizes, total, time.perf_counter() - started)
    # whose chars.json named the icons; without one of NAMING_SETS some captions, and with them
    # the split, differ from a build that has it (the command says so)
    manifest["naming_sets"] = [n for n in KNOWN_SETS if n in chars]
    write_json_atomic(out / "manifest.json", manifest)
    return manifest


def summarize(out: Path, shards: list[Shard], icon_sets: list[IconSet], sizes: tuple[int, ...],
              rendered: int, seconds: float) -> dict[str, Any]:
    """Manifest from the shard sidecars: per-set counts and attribution, shard lists, timing."""
    per_set: dict[str, Counter] = {s.name: Counter() for s in icon_sets}
    build_seconds = 0.0
    for shard in shards:
        info = json.loads(sidecar(shard.path).read_text())
        build_seconds += info.get("seconds", 0.0)
        counts = per_set[shard.icon_set.name]
        counts["icons"] += info["icons"]
        counts[shard.split] += info["count"]
        counts["named"] += info["named"]
        for status, n in info["statuses"].items():
            counts["dropped_" + status if status != "ok" else "written"] += n
    sets = {s.name: {"title": s.title, "version": s.version, "license": s.license, "license_url": s.license_url,
                     "author": s.author, "author_url": s.author_url, **per_set[s.name]} for s in icon_sets}
    totals = sum(per_set.values(), Counter())
    return {
        "format": FORMAT_VERSION,
        "sizes": list(sizes),
        "keys": [k for size in sizes for k in (f"{size}.png", f"mask{size}.png")] + ["json"],
        "split": {"rule": "sha256(codepoints) % 1000 < 50 -> val", "val_per_mille": VAL_PER_MILLE},
        "sets": sets,
        "licenses": sorted({s.license for s in icon_sets}),
        "counts": dict(totals),
        "named_fraction": round(totals["named"] / max(totals["written"], 1), 4),
        "shards": {split: [str(sh.path.relative_to(out)) for sh in shards if sh.split == split]
                   for split in ("train", "val")},
        "icons_rendered": rendered,  # this run; shards already built are skipped
        "seconds": round(seconds, 2),  # this run's wall time
        "build_seconds": round(build_seconds, 2),  # time spent writing every shard, over all runs
        "images_per_second": round(rendered * len(sizes) / seconds, 1) if rendered else None,
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tarballs", type=Path, default=None,
                        help="folder of iconify-json-NAME-VERSION.tgz (default: fetch with npm pack)")
    parser.add_argument("--sets", default=None, help=f"comma-separated sets (default all: {','.join(KNOWN_SETS)})")
    parser.add_argument("--sizes", default="64", help="comma-separated square sizes in px (default 64)")
    parser.add_argument("--permissive-only", action="store_true", help="skip share-alike sets (CC-BY-SA)")
    parser.add_argument("--workers", type=int, default=None, help="render processes (default: CPU count)")
    parser.add_argument("--icon-timeout", type=float, default=None,
                        help=f"seconds to render one icon before it is skipped (default {ICON_SECONDS:g}, "
                             f"plus {ICON_SECONDS_PER_4K:g} per 4096x4096 px rendered)")
    parser.add_argument("--icon-memory", type=int, default=ICON_MEMORY_MB,
                        help=f"MB a worker may add while rendering one icon, 0 for no cap (default {ICON_MEMORY_MB})")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--out", type=Path, required=True, help="output folder for shards and manifest")


def run(args: argparse.Namespace) -> int:
    manifest = build_emoji_dataset(args.tarballs, args.out, sets=args.sets, sizes=args.sizes,
                                   permissive_only=args.permissive_only, workers=args.workers,
                                   progress=not args.quiet, icon_seconds=args.icon_timeout,
                                   icon_memory_mb=args.icon_memory)
    counts = manifest["counts"]
    print(f"wrote {counts.get('train', 0)} train + {counts.get('val', 0)} val samples "
          f"({len(manifest['sets'])} sets, sizes {manifest['sizes']}) to {args.out} "
          f"in {manifest['seconds']} s")
    missing = [n for n in NAMING_SETS if n not in manifest["naming_sets"]]
    if missing:
        print(f"note: no tarball of the naming set(s) {', '.join(missing)}: some icons may have other captions "
              "and splits than in a build that has them (docs/data.md)")
    return 0
