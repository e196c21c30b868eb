"""Training checkpoints without pickle, written atomically, resumable exactly.

A checkpoint is a directory `ckpt-<images>` (images zero-padded to 12 digits so names sort):

    config.json          the TrainConfig
    model.safetensors    network weights (full, unsharded, the same in every dist mode)
    ema.safetensors      EMA weights (fp32) and buffers: loadable as a model state dict
    optimizer.safetensors + optimizer.json
                         the optimizer state dict's tensors, and its structure with the tensors
                         replaced by {"__tensor__": key}
    rng.safetensors      torch CPU/CUDA generator states of every rank (uint8), numpy's MT state
    state.json           step, images seen, data position, counters, python RNG, file sizes

It is written into a temporary directory, every file fsynced, then renamed into place; the
`latest` pointer file is replaced atomically last. An interrupted save therefore leaves the
previous checkpoint and pointer intact.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from edify.errors import EdifyError
from edify.training import config as config_lib
from edify.training import distributed
from edify.training.config import TrainConfig
from edify.training.ema import EMA

FORMAT = 1
PREFIX = "ckpt-"
LATEST = "latest"


@dataclass
class TrainState:
    """Counters of a run and the position of its data stream (JSON-serialisable)."""

    step: int = 0
    images: int = 0
    data: dict = field(default_factory=dict)
    nonfinite_total: int = 0


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


def unflatten_state(obj, tensors: dict[str, torch.Tensor]):
    """Inverse of `flatten_state`."""
    if isinstance(obj, list):
        return [unflatten_state(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__tuple__" in obj:
            return tuple(unflatten_state(v, tensors) for v in obj["__tuple__"])
        return {k: unflatten_state(v, tensors) for k, v in obj["__dict__"]}
    return obj


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
        tmp = out_dir / f".tmp-{name}"
        if tmp.exists():
            shutil.rmtree(tmp)
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
            sizes = {p.name: p.stat().st_size for p in sorted(tmp.iterdir())}
            meta = {"format": FORMAT, "step": state.step, "images": state.images, "data": state.data,
                    "nonfinite_total": state.nonfinite_total, "world_size": distributed.world_size(),
                    "python_random": [[s[0], list(s[1]), s[2]] for s in py_rngs], "file_sizes": sizes}
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
    """Delete all but the newest `keep_last` checkpoints (never the one `latest` names), and the
    temporary folders a killed process left behind (rank 0 is the only writer, so none is live)."""
    latest = latest_checkpoint(out_dir)
    for path in list_checkpoints(out_dir)[:-keep_last]:
        if latest is None or path.resolve() != latest.resolve():
            shutil.rmtree(path, ignore_errors=True)
    for path in out_dir.glob(f".tmp-{PREFIX}*"):
        shutil.rmtree(path, ignore_errors=True)


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The checkpoint `latest` names, or None if the directory holds no pointer."""
    pointer = Path(out_dir) / LATEST
    if not pointer.is_file():
        return None
    name = pointer.read_text().strip()
    path = Path(out_dir) / name
    if not name.startswith(PREFIX) or not path.is_dir():
        raise EdifyError(f"{pointer} names a missing checkpoint {name!r}")
    return path


# ---- load ------------------------------------------------------------------------------------

def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise EdifyError(f"checkpoint file missing: {path}")
    try:
        return load_file(str(path))
    except Exception as err:  # safetensors raises its own error types for truncated headers/data
        raise EdifyError(f"checkpoint file {path} is corrupt: {err}") from None


def read_meta(path: str | Path) -> dict:
    path = Path(path)
    try:
        meta = json.loads((path / "state.json").read_text())
    except FileNotFoundError:
        raise EdifyError(f"not a checkpoint (no state.json): {path}") from None
    except json.JSONDecodeError as err:
        raise EdifyError(f"checkpoint {path} has a corrupt state.json: {err}") from None
    if meta.get("format") != FORMAT:
        raise EdifyError(f"checkpoint {path} has format {meta.get('format')!r}, expected {FORMAT}")
    for fname, size in meta["file_sizes"].items():
        f = path / fname
        if not f.is_file():
            raise EdifyError(f"checkpoint file missing: {f}")
        if f.stat().st_size != size:
            raise EdifyError(f"checkpoint file {f} is corrupt: {f.stat().st_size} bytes, expected {size}")
    return meta


def read_config(path: str | Path) -> TrainConfig:
    try:
        return TrainConfig.from_json((Path(path) / "config.json").read_text())
    except FileNotFoundError:
        raise EdifyError(f"checkpoint file missing: {Path(path) / 'config.json'}") from None
    except json.JSONDecodeError as err:
        raise EdifyError(f"checkpoint {path} has a corrupt config.json: {err}") from None


def load_checkpoint(path: str | Path, config: TrainConfig, model: nn.Module,
                    optimizer: torch.optim.Optimizer | None, ema: EMA | None,
                    restore_rng_states: bool = True) -> TrainState:
    """Load weights, optimizer, EMA and RNG states into the given objects; return the counters.

    Raises EdifyError if the checkpoint was written with a config that differs in anything
    but the fields listed in config.RESUMABLE_FIELDS, or if a file is missing or corrupt.
    Every rank calls it (each rank reads the files and keeps its own shard) and gets back its own
    global RNG states, when the world size is the one the checkpoint was written with.
    """
    path = Path(path)
    meta = read_meta(path)
    saved = read_config(path)
    changes = config_lib.diff(saved, config)
    if changes:
        raise EdifyError(f"checkpoint {path.name} was written with another config ({'; '.join(changes)})")
    msd = _read_tensors(path / "model.safetensors")
    osd = None
    if optimizer is not None:
        try:
            structure = json.loads((path / "optimizer.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError) as err:
            raise EdifyError(f"checkpoint {path.name} has a missing or corrupt optimizer.json: {err}") from None
        osd = unflatten_state(structure, _read_tensors(path / "optimizer.safetensors"))
    try:
        distributed.load_full_state_dicts(model, optimizer, msd, osd)
    except (RuntimeError, KeyError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise EdifyError(f"checkpoint {path.name} does not fit the model: {first}") from None
    if ema is not None:
        ema.load_state_dict(_read_tensors(path / "ema.safetensors"))
    if restore_rng_states and meta["world_size"] == distributed.world_size():
        rank = distributed.rank()
        tensors = _read_tensors(path / "rng.safetensors")
        prefix = f"rank{rank}."
        restore_rng({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
        version, internal, gauss = meta["python_random"][rank]
        random.setstate((version, tuple(internal), gauss))
    return TrainState(step=meta["step"], images=meta["images"], data=meta["data"],
                      nonfinite_total=meta["nonfinite_total"])


def load_latest(out_dir: str | Path, config: TrainConfig, model: nn.Module,
                optimizer: torch.optim.Optimizer | None, ema: EMA | None) -> TrainState | None:
    """Load the checkpoint `latest` points at; None if `out_dir` holds none yet."""
    path = latest_checkpoint(out_dir)
    return None if path is None else load_checkpoint(path, config, model, optimizer, ema)


def load_weights(path: str | Path, use_ema: bool = True) -> tuple[TrainConfig, dict[str, torch.Tensor]]:
    """(config, weights) of a checkpoint for inference: the EMA weights if present and asked for."""
    path = Path(path)
    if path.is_dir() and (path / LATEST).is_file():
        path = latest_checkpoint(path)
    read_meta(path)
    ema_file = path / "ema.safetensors"
    weights = _read_tensors(ema_file if use_ema and ema_file.is_file() else path / "model.safetensors")
    return read_config(path), weights
