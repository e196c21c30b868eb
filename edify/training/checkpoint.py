"""Training checkpoints without pickle, written atomically, resumable exactly.

A checkpoint is a directory `ckpt-<images>` (images zero-padded to 12 digits so names sort):

    config.json          the TrainConfig
    model.safetensors    network weights (full, unsharded, the same in every dist mode)
    ema.safetensors      EMA weights (fp32) and buffers: loadable as a model state dict
    optimizer.safetensors + optimizer.json
                         the optimizer state dict's tensors, and its structure with the tensors
                         replaced by {"__tensor__": key}
    rng.safetensors      torch CPU/CUDA generator states of every rank (uint8), numpy's MT state
    state.json           step, images seen, data position, counters, python RNG, the size and
                         sha256 of every other file

It is written into a temporary directory, every file fsynced, then renamed into place; the
`latest` pointer file is replaced atomically last. An interrupted save therefore leaves the
previous checkpoint and pointer intact, and what it left behind is cleaned up by the next save
or resume (`remove_leftovers`).

Loading treats the files as untrusted: state.json is checked against its schema (`CheckpointMeta`),
every file it names must lie inside the checkpoint, and each file is checked against its recorded
size and sha256 before use (checkpoints written before checksums were recorded load with a warning).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from edify.errors import EdifyError
from edify.pipelines.model_io import (brief, first_line, from_json, inside, naming, parse_json, read_bytes, read_json,
                                      regular_file, sha256_file)
from edify.training import config as config_lib
from edify.training import distributed
from edify.training.config import TrainConfig
from edify.training.ema import EMA

FORMAT = 1
PREFIX = "ckpt-"
LATEST = "latest"
MAX_DEPTH = 64  # nesting of the optimizer state structure (a real one nests about 8 deep)


@dataclass
class TrainState:
    """Counters of a run and the position of its data stream (JSON-serialisable)."""

    step: int = 0
    images: int = 0
    data: dict = field(default_factory=dict)
    nonfinite_total: int = 0


@dataclass(frozen=True)
class CheckpointMeta:
    """The schema of state.json; `read_meta` checks a file against it field by field."""

    format: int
    step: int
    images: int
    data: dict
    nonfinite_total: int
    world_size: int
    python_random: tuple[tuple[int, tuple[int, ...], float | None], ...]  # random.getstate() per rank
    file_sizes: dict[str, int]
    file_sha256: dict[str, str] | None = None  # absent in checkpoints of older versions

    def __post_init__(self):
        for name in ("step", "images", "nonfinite_total"):
            if getattr(self, name) < 0:
                raise EdifyError(f"field {name!r} must be >= 0, got {getattr(self, name)}")
        if self.world_size < 1:
            raise EdifyError(f"field 'world_size' must be >= 1, got {self.world_size}")
        if len(self.python_random) != self.world_size:
            raise EdifyError(f"field 'python_random' must hold one state per rank ({self.world_size}), "
                             f"got {len(self.python_random)}")
        if any(size < 0 for size in self.file_sizes.values()):
            raise EdifyError("field 'file_sizes' holds a negative size")
        if self.file_sha256 is not None:
            if set(self.file_sha256) != set(self.file_sizes):
                raise EdifyError("fields 'file_sha256' and 'file_sizes' must name the same files")
            bad = [k for k, v in self.file_sha256.items() if not re.fullmatch(r"[0-9a-f]{64}", v)]
            if bad:
                raise EdifyError(f"field 'file_sha256' holds a malformed digest for {brief(bad[0])}")


def checkpoint_name(images: int) -> str:
    return f"{PREFIX}{images:012d}"


# ---- optimizer state: tensors to safetensors, structure to JSON --------------------------------

def flatten_state(obj, tensors: dict[str, torch.Tensor], key: str = "s"):
    """`obj` as JSON-able structure; every tensor moved into `tensors` under a path-like key."""
    if isinstance(obj, torch.Tensor):
        tensors[key] = obj.detach().cpu().contiguous().clone()
        return {"__tensor__": key}
    if isinstance(obj, dict):  # keys may be int (param ids) or str (parameter names)
        for k in obj:
            if not isinstance(k, (int, str)):
                raise EdifyError(f"optimizer state key must be int or str, got {type(k).__name__}")
        return {"__dict__": [[k, flatten_state(v, tensors, f"{key}/{k}")] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        items = [flatten_state(v, tensors, f"{key}/{i}") for i, v in enumerate(obj)]
        return {"__tuple__": items} if isinstance(obj, tuple) else items
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise EdifyError(f"cannot store {type(obj).__name__} at {key} in a checkpoint without pickle")


def unflatten_state(obj, tensors: dict[str, torch.Tensor], depth: int = 0):
    """Inverse of `flatten_state`; a structure off its format raises a one-line EdifyError."""
    if depth > MAX_DEPTH:
        raise EdifyError(f"optimizer state nests deeper than {MAX_DEPTH} levels")
    if isinstance(obj, list):
        return [unflatten_state(v, tensors, depth + 1) for v in obj]
    if not isinstance(obj, dict):
        return obj
    kind, value = next(iter(obj.items())) if len(obj) == 1 else (None, None)
    if kind == "__tensor__":
        if not isinstance(value, str) or value not in tensors:
            raise EdifyError(f"optimizer state refers to a missing tensor {brief(value)}")
        return tensors[value]
    if kind == "__tuple__" and isinstance(value, list):
        return tuple(unflatten_state(v, tensors, depth + 1) for v in value)
    if kind == "__dict__" and isinstance(value, list):
        return dict(_dict_entry(item, tensors, depth + 1) for item in value)
    raise EdifyError(f"optimizer state holds an object of unknown kind (keys {brief(sorted(obj))})")


def _dict_entry(item, tensors: dict[str, torch.Tensor], depth: int) -> tuple:
    if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], (int, str))
            and not isinstance(item[0], bool)):
        raise EdifyError(f"optimizer state holds a malformed dict entry {brief(item)}")
    return item[0], unflatten_state(item[1], tensors, depth)


# ---- RNG states -------------------------------------------------------------------------------

def capture_rng() -> dict[str, torch.Tensor]:
    """This process's global generator states as tensors."""
    out = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"cuda{i}"] = s
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    out["numpy_keys"] = torch.from_numpy(np.asarray(keys, dtype=np.uint32).astype(np.int64))
    out["numpy_rest"] = torch.tensor([pos, has_gauss], dtype=torch.int64)
    out["numpy_cached"] = torch.tensor([cached], dtype=torch.float64)
    return out


def restore_rng(states: dict[str, torch.Tensor]) -> None:
    """Inverse of `capture_rng`; states of the wrong kind or size raise a one-line EdifyError."""
    try:
        _restore_rng(states)
    except EdifyError:
        raise
    except (KeyError, ValueError, TypeError, RuntimeError, IndexError) as err:
        raise EdifyError(f"bad RNG state: {first_line(err)}") from None


def _restore_rng(states: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(states["torch_cpu"])
    cuda = [states[k] for k in sorted(k for k in states if k.startswith("cuda"))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    pos, has_gauss = states["numpy_rest"].tolist()
    np.random.set_state(("MT19937", states["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss,
                         float(states["numpy_cached"][0])))


# ---- atomic file system operations ----------------------------------------------------------

def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_text(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _write_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path))
    _fsync_path(path)


def _point_latest(out_dir: Path, name: str) -> None:
    tmp = out_dir / f".{LATEST}.tmp"
    _write_text(tmp, name + "\n")
    os.replace(tmp, out_dir / LATEST)
    _fsync_path(out_dir)


# ---- save ------------------------------------------------------------------------------------

def save_checkpoint(out_dir: str | Path, config: TrainConfig, model: nn.Module,
                    optimizer: torch.optim.Optimizer, ema: EMA | None, state: TrainState) -> Path:
    """Write `ckpt-<images>` atomically, point `latest` at it, keep the last `config.keep_last`.

    Collective: every rank calls it (FSDP gathers shards, RNG states come from every rank);
    rank 0 writes. Returns the checkpoint directory.
    """
    out_dir = Path(out_dir)
    msd, osd = distributed.full_state_dicts(model, optimizer)
    ema_sd = ema.state_dict(model) if ema is not None else None
    rngs = distributed.all_gather_object(capture_rng())
    py_rngs = distributed.all_gather_object(random.getstate())
    name = checkpoint_name(state.images)
    final = out_dir / name
    if distributed.is_main():
        out_dir.mkdir(parents=True, exist_ok=True)
        remove_leftovers(out_dir)
        tmp = out_dir / f".tmp-{name}"
        tmp.mkdir()
        try:
            _write_text(tmp / "config.json", config.to_json())
            _write_tensors(tmp / "model.safetensors", msd)
            if ema_sd is not None:
                _write_tensors(tmp / "ema.safetensors", ema_sd)
            opt_tensors: dict[str, torch.Tensor] = {}
            structure = flatten_state(osd, opt_tensors)
            _write_tensors(tmp / "optimizer.safetensors", opt_tensors)
            _write_text(tmp / "optimizer.json", json.dumps(structure))
            _write_tensors(tmp / "rng.safetensors",
                           {f"rank{r}.{k}": v for r, states in enumerate(rngs) for k, v in states.items()})
            files = sorted(tmp.iterdir())
            meta = {"format": FORMAT, "step": state.step, "images": state.images, "data": state.data,
                    "nonfinite_total": state.nonfinite_total, "world_size": distributed.world_size(),
                    "python_random": [[s[0], list(s[1]), s[2]] for s in py_rngs],
                    "file_sizes": {p.name: p.stat().st_size for p in files},
                    "file_sha256": {p.name: sha256_file(p) for p in files}}
            _write_text(tmp / "state.json", json.dumps(meta))
            _fsync_path(tmp)
            if final.exists():  # the same images count saved again: swap the old one out first
                old = out_dir / f".old-{name}"
                shutil.rmtree(old, ignore_errors=True)
                os.replace(final, old)
                os.replace(tmp, final)
                shutil.rmtree(old)
            else:
                os.replace(tmp, final)
            _fsync_path(out_dir)
            _point_latest(out_dir, name)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        prune(out_dir, config.keep_last)
    distributed.barrier()
    return final


def list_checkpoints(out_dir: str | Path) -> list[Path]:
    """Complete checkpoint directories in `out_dir`, oldest first."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    return sorted(p for p in out_dir.iterdir() if p.is_dir() and p.name.startswith(PREFIX)
                  and (p / "state.json").is_file())


def prune(out_dir: Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` checkpoints (never the one `latest` names), and what
    a killed save left behind."""
    latest = latest_checkpoint(out_dir)
    for path in list_checkpoints(out_dir)[:-keep_last]:
        if latest is None or path.resolve() != latest.resolve():
            shutil.rmtree(path, ignore_errors=True)
    remove_leftovers(out_dir)


def remove_leftovers(out_dir: Path) -> None:
    """Clean up after a save that was killed (rank 0 is the only writer, so none is live): a
    checkpoint moved aside for its replacement is moved back if the replacement never landed;
    temporary folders and the pointer's temporary file are deleted."""
    for old in sorted(out_dir.glob(f".old-{PREFIX}*")):
        final = out_dir / old.name.removeprefix(".old-")
        if old.is_symlink():
            old.unlink()
        elif os.path.lexists(final):
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(old, final)
    for tmp in out_dir.glob(f".tmp-{PREFIX}*"):
        if tmp.is_symlink():
            tmp.unlink()
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    (out_dir / f".{LATEST}.tmp").unlink(missing_ok=True)


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The checkpoint `latest` names, or None if the directory holds no pointer."""
    out_dir = Path(out_dir)
    pointer = out_dir / LATEST
    if not pointer.is_file():
        return None
    name = read_bytes(inside(out_dir, LATEST, f"run folder {out_dir}"), 4096).decode("utf-8", errors="replace").strip()
    if not re.fullmatch(rf"{PREFIX}\d+", name):
        raise EdifyError(f"{pointer} names a missing checkpoint {brief(name)}")
    path = inside(out_dir, name, str(pointer))
    if not path.is_dir():
        raise EdifyError(f"{pointer} names a missing checkpoint {name!r}")
    return path


# ---- load ------------------------------------------------------------------------------------

def read_meta(path: str | Path) -> dict:
    """state.json of a checkpoint, checked against `CheckpointMeta`; every file it lists must lie in
    the checkpoint and have its recorded size (checksums are checked as each file is read)."""
    path = Path(path)
    file = inside(path, "state.json", f"checkpoint {path}")
    if not os.path.lexists(file):
        raise EdifyError(f"not a checkpoint (no state.json): {path}")
    meta = read_json(file)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else meta
        raise EdifyError(f"checkpoint {path} has format {brief(got)}, expected {FORMAT}")
    with naming(file):
        from_json(CheckpointMeta, meta, "checkpoint state")
    for name, size in meta["file_sizes"].items():
        f = inside(path, name, str(file))
        if not os.path.lexists(f):
            raise EdifyError(f"checkpoint file missing: {f}")
        actual = regular_file(f).st_size
        if actual != size:
            raise EdifyError(f"checkpoint file {f} is corrupt: {actual} bytes, expected {size}")
    if meta.get("file_sha256") is None:
        warnings.warn(f"checkpoint {path} records no checksums (written by an older version): only its file "
                      f"sizes are checked", stacklevel=2)
    return meta


def _checked(path: Path, name: str, meta: dict) -> Path:
    """Checkpoint file `name`, listed in state.json and matching its recorded sha256 (if any)."""
    if name not in meta["file_sizes"]:
        raise EdifyError(f"checkpoint file missing: {path / name} (state.json does not list it)")
    file = inside(path, name, f"checkpoint {path}")
    digest = (meta.get("file_sha256") or {}).get(name)
    if digest is not None and sha256_file(file) != digest:
        raise EdifyError(f"checkpoint file {file} is corrupt: its sha256 differs from the one state.json records")
    return file


def _read_tensors(path: Path, name: str, meta: dict) -> dict[str, torch.Tensor]:
    file = _checked(path, name, meta)
    try:
        return load_file(str(file))
    except Exception as err:  # safetensors raises its own error types for truncated headers/data
        raise EdifyError(f"checkpoint file {file} is corrupt: {first_line(err)}") from None


def _read_json(path: Path, name: str, meta: dict):
    file = _checked(path, name, meta)
    return parse_json(read_bytes(file), file)


def read_config(path: str | Path, meta: dict | None = None) -> TrainConfig:
    """The TrainConfig a checkpoint was written with (checked against `meta`'s records if given)."""
    path = Path(path)
    file = _checked(path, "config.json", meta) if meta is not None else inside(path, "config.json", str(path))
    if not os.path.lexists(file):
        raise EdifyError(f"checkpoint file missing: {file}")
    data = read_json(file)
    with naming(file):
        if not isinstance(data, dict):
            raise EdifyError(f"a training config must be a JSON object, got {brief(data)}")
        try:
            return TrainConfig.from_dict(data)
        except EdifyError:
            raise
        except (TypeError, ValueError, ArithmeticError, AttributeError) as err:
            raise EdifyError(f"bad training config: {first_line(err)}") from None


def load_checkpoint(path: str | Path, config: TrainConfig, model: nn.Module,
                    optimizer: torch.optim.Optimizer | None, ema: EMA | None,
                    restore_rng_states: bool = True) -> TrainState:
    """Load weights, optimizer, EMA and RNG states into the given objects; return the counters.

    Raises EdifyError if the checkpoint was written with a config that differs in anything
    but the fields listed in config.RESUMABLE_FIELDS, or if a file is missing or corrupt; every
    file is read and checked before any object is changed.
    Every rank calls it (each rank reads the files and keeps its own shard) and gets back its own
    global RNG states, when the world size is the one the checkpoint was written with.
    """
    path = Path(path)
    meta = read_meta(path)
    changes = config_lib.diff(read_config(path, meta), config)
    if changes:
        raise EdifyError(f"checkpoint {path.name} was written with another config ({'; '.join(changes)})")
    msd = _read_tensors(path, "model.safetensors", meta)
    osd = None
    if optimizer is not None:
        structure = _read_json(path, "optimizer.json", meta)
        tensors = _read_tensors(path, "optimizer.safetensors", meta)
        with naming(path / "optimizer.json"):
            osd = unflatten_state(structure, tensors)
            if not isinstance(osd, dict):
                raise EdifyError(f"the optimizer state must be an object, got {brief(structure)}")
    ema_sd = _read_tensors(path, "ema.safetensors", meta) if ema is not None else None
    rank = distributed.rank()
    restore = restore_rng_states and meta["world_size"] == distributed.world_size()
    rng = _read_tensors(path, "rng.safetensors", meta) if restore else None

    _load_into(path, model, optimizer, msd, osd)
    if ema is not None:
        ema.load_state_dict(ema_sd)
    if restore:
        prefix = f"rank{rank}."
        with naming(path / "rng.safetensors"):
            restore_rng({k[len(prefix):]: v for k, v in rng.items() if k.startswith(prefix)})
        _restore_python_random(path, meta["python_random"][rank])
    return TrainState(step=meta["step"], images=meta["images"], data=meta["data"],
                      nonfinite_total=meta["nonfinite_total"])


def _load_into(path: Path, model: nn.Module, optimizer, msd: dict, osd: dict | None) -> None:
    try:
        distributed.load_full_state_dicts(model, optimizer, msd, osd)
    except (RuntimeError, KeyError, ValueError, TypeError, IndexError, AttributeError) as err:
        raise EdifyError(f"checkpoint {path.name} does not fit the model: {first_line(err)}") from None


def _restore_python_random(path: Path, state) -> None:
    version, internal, gauss = state
    try:
        random.setstate((version, tuple(internal), gauss))
    except (ValueError, TypeError, OverflowError) as err:
        raise EdifyError(f"{path / 'state.json'}: field 'python_random' holds a bad state: {first_line(err)}") from None


def load_latest(out_dir: str | Path, config: TrainConfig, model: nn.Module,
                optimizer: torch.optim.Optimizer | None, ema: EMA | None) -> TrainState | None:
    """Load the checkpoint `latest` points at, after cleaning up what a killed save left behind;
    None if `out_dir` holds none yet."""
    if distributed.is_main() and Path(out_dir).is_dir():
        remove_leftovers(Path(out_dir))
    distributed.barrier()
    path = latest_checkpoint(out_dir)
    return None if path is None else load_checkpoint(path, config, model, optimizer, ema)


def load_weights(path: str | Path, use_ema: bool = True) -> tuple[TrainConfig, dict[str, torch.Tensor]]:
    """(config, weights) of a checkpoint for inference: the EMA weights if present and asked for."""
    path = Path(path)
    if path.is_dir() and (path / LATEST).is_file():
        path = latest_checkpoint(path)
    meta = read_meta(path)
    name = "ema.safetensors" if use_ema and "ema.safetensors" in meta["file_sizes"] else "model.safetensors"
    return read_config(path, meta), _read_tensors(path, name, meta)
