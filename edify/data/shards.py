"""Atomic webdataset shard writing: a shard is either complete on disk or absent.

Each shard `NAME.tar` is written as a temporary file and renamed into place only after it closes
cleanly; its sidecar `NAME.tar.json` (sample count, build fingerprint) is renamed in after it,
and a stale sidecar is removed before a shard is rewritten. A re-run treats a shard as done when
both exist and the fingerprint matches, so an interrupted build resumes where it stopped and
never leaves a half-written shard behind. Temporary files are named `.NAME.tmp-PID`; a build
that was killed (SIGKILL, a power cut) cannot remove its own, so `remove_stale_temps` deletes
those whose process no longer exists when the next build starts.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

_TEMP_NAME = re.compile(r"\..+\.tmp-(\d+)", re.ASCII)


def _temp(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def _alive(pid: int) -> bool:
    """Whether another process with this id exists; the caller's own leftovers are stale."""
    if pid == os.getpid():
        return False
    if os.name != "posix":  # os.kill(pid, 0) would end the process on Windows: keep its files
        return True
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def remove_stale_temps(*folders: Path) -> list[Path]:
    """Delete `.NAME.tmp-PID` files in `folders` whose writing process is gone; returns them."""
    removed = []
    for folder in folders:
        if not Path(folder).is_dir():
            continue
        for path in Path(folder).iterdir():
            match = _TEMP_NAME.fullmatch(path.name)
            if match and (path.is_symlink() or path.is_file()) and not _alive(int(match.group(1))):
                path.unlink(missing_ok=True)
                removed.append(path)
    return removed


def sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    """Write JSON to a temporary name and rename it over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = _temp(path)
    temp.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    os.replace(temp, path)


def finished_shard(path: Path, fingerprint: dict[str, Any]) -> dict[str, Any] | None:
    """The sidecar of a completed shard built with the same fingerprint, else None."""
    if not path.exists() or not sidecar(path).exists():
        return None
    try:
        info = json.loads(sidecar(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return info if info.get("fingerprint") == fingerprint else None


class AtomicShardWriter:
    """A `webdataset.TarWriter` that publishes its shard only when closed without error.

    Use as a context manager; `stats` is stored in the sidecar next to the sample count.
    """

    def __init__(self, path: Path, fingerprint: dict[str, Any]):
        self.path = Path(path)
        self.fingerprint = fingerprint
        self.count = 0
        self.stats: dict[str, Any] = {}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        sidecar(self.path).unlink(missing_ok=True)  # a shard being rewritten is not done
        self._temp = _temp(self.path)
        import webdataset as wds  # here, not at the top: it imports torch, which `--help` should not

        self._stream = open(self._temp, "wb")
        self._writer = wds.TarWriter(self._stream)

    def write(self, sample: dict[str, Any]) -> None:
        self._writer.write(sample)
        self.count += 1

    def __enter__(self) -> "AtomicShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._writer.close()
        if not self._stream.closed:
            self._stream.close()
        if exc_type is not None:
            self._temp.unlink(missing_ok=True)
            return
        os.replace(self._temp, self.path)
        info = {"fingerprint": self.fingerprint, "count": self.count, **self.stats}
        write_json_atomic(sidecar(self.path), info)  # the sidecar appears last: it means "done"
