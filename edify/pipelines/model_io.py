"""Model folders on disk: checked reading of configs and weights, atomic writing.

A model folder holds `config.json` and the weights as safetensors: one `model.safetensors`, or
shards named by `model.safetensors.index.json` ({"weight_map": {tensor: file}, "metadata": {...}}).
Everything in a folder is untrusted input, so every failure is a one-line EdifyError naming the
file (and the field), and nothing is allocated or read before it is checked:

- JSON files are size-bounded UTF-8 and are parsed into dataclasses field by field against the
  declared types (`from_json`): unknown keys, wrong types and non-finite numbers are refused, for
  whatever fields a config class declares.
- Every file a folder names lies inside it: no absolute paths, no `..`, no symlinks out (`inside`).
- The weight headers are read first (`scan_weights`): their total size is checked against the
  network's before it is built, names and shapes before any tensor is read; tensors must be finite.

Saving (`save_model`) writes every file under a temporary name and renames it into place, so a
killed save leaves no half-written file; one save id stamped on the index and its shards makes a
folder whose shards come from two saves (a save killed between its renames) an error, not a mix.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import math
import os
import secrets
import stat
import types
import typing
from collections import Counter
from pathlib import Path, PurePosixPath

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from edify.errors import EdifyError

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
SAVE_KEY = "edify_save"  # the save id in the index's metadata and in every shard's header
MAX_JSON_BYTES = 64 * 2**20
PARTIAL = ".partial"  # suffix of the temporary files of a save in progress
INT64 = 2**63

log = logging.getLogger(__name__)


# ---- messages ---------------------------------------------------------------------------------

def brief(value, limit: int = 60) -> str:
    """repr(value) cut to `limit` characters: error messages stay one short line."""
    if isinstance(value, (list, dict)) and len(value) > 8:  # no repr of a huge container
        return f"a {'list' if isinstance(value, list) else 'JSON object'} of {len(value)} items"
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


@contextlib.contextmanager
def naming(where: str | Path):
    """Prefix any EdifyError raised inside with what it concerns: a file, or a field."""
    try:
        yield
    except EdifyError as err:
        raise EdifyError(f"{where}: {err}") from None


# ---- files inside a folder --------------------------------------------------------------------

def inside(folder: Path, name, what: str) -> Path:
    """`folder / name`, refused unless it stays inside `folder` once symlinks are resolved."""
    if not isinstance(name, str) or not name or "\x00" in name:
        raise EdifyError(f"{what} names an invalid file {brief(name)}")
    rel = PurePosixPath(name)
    if rel.is_absolute() or ".." in rel.parts:
        raise EdifyError(f"{what} names {brief(name)}, a path outside the folder {str(folder)!r}")
    path = folder / rel
    try:
        ok = path.resolve().is_relative_to(folder.resolve())
    except (OSError, RuntimeError):  # a symlink loop
        ok = False
    if not ok:
        raise EdifyError(f"{what} names {brief(name)}, which leads outside the folder {str(folder)!r}")
    return path


def regular_file(path: Path, max_bytes: int | None = None) -> os.stat_result:
    """stat() of a regular file (not a directory, fifo or device) of at most `max_bytes`."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise EdifyError(f"{path} is missing") from None
    except OSError as err:
        raise EdifyError(f"cannot read {path}: {err.strerror or first_line(err)}") from None
    if not stat.S_ISREG(st.st_mode):
        raise EdifyError(f"{path} is not a regular file")
    if max_bytes is not None and st.st_size > max_bytes:
        raise EdifyError(f"{path} is {st.st_size} bytes, over the limit of {max_bytes}")
    return st


def read_bytes(path: Path, max_bytes: int = MAX_JSON_BYTES) -> bytes:
    regular_file(path, max_bytes)
    try:
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)
    except OSError as err:
        raise EdifyError(f"cannot read {path}: {err.strerror or first_line(err)}") from None
    if len(data) > max_bytes:
        raise EdifyError(f"{path} is over the limit of {max_bytes} bytes")
    return data


def parse_json(data: bytes, path: Path):
    """JSON text (UTF-8) -> Python value; one-line errors for bad bytes, syntax or nesting."""
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise EdifyError(f"{path} is not UTF-8 text (bad byte at offset {err.start})") from None
    except RecursionError:
        raise EdifyError(f"{path} nests its JSON too deeply") from None
    except ValueError as err:  # JSONDecodeError, or an integer too long to convert
        raise EdifyError(f"{path} is not valid JSON: {first_line(err)}") from None


def read_json(path: Path, max_bytes: int = MAX_JSON_BYTES):
    return parse_json(read_bytes(path, max_bytes), path)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(2**20), b""):
            h.update(block)
    return h.hexdigest()


def fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---- JSON -> typed dataclasses --------------------------------------------------------------------

def from_json(cls, data, what: str, prefix: str = ""):
    """An instance of dataclass `cls` from a JSON object, each field checked against its declared type.

    Unknown keys, missing required fields and values of the wrong type raise one-line EdifyErrors
    naming the field (`prefix` + name); the class's own checks run as it is constructed.
    """
    if not isinstance(data, dict):
        raise EdifyError(f"{what} must be a JSON object, got {brief(data)}")
    declared = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(str(k) for k in set(data) - set(declared))
    if unknown:
        shown = ", ".join(brief(k, 40) for k in unknown[:5]) + (", ..." if len(unknown) > 5 else "")
        raise EdifyError(f"unknown {what} keys [{shown}]; known: {sorted(declared)}")
    hints = field_types(cls)
    values = {}
    for name, f in declared.items():
        if name in data:
            values[name] = convert(data[name], hints[name], prefix + name)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise EdifyError(f"{what} lacks the required field {prefix + name!r}")
    try:
        return cls(**values)
    except EdifyError:
        raise
    except (TypeError, ValueError, ArithmeticError) as err:
        raise EdifyError(f"bad {what}: {first_line(err)}") from None


@functools.cache
def field_types(cls) -> dict:
    """The declared (resolved) type of every field of a dataclass."""
    return typing.get_type_hints(cls)


def convert(value, hint, field: str):
    """A JSON value as the Python value of type `hint` (lists become tuples where declared)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return from_json(hint, value, f"field {field!r}", prefix=field + ".")
    if origin in (typing.Union, types.UnionType):
        return _convert_union(value, args, hint, field)
    if origin is typing.Literal:
        if not any(value == a and type(value) is type(a) for a in args):
            _wrong(value, hint, field)
        return value
    if hint is typing.Any or hint is object:
        return value
    if origin in (tuple, list) or hint in (tuple, list):
        return _convert_sequence(value, origin or hint, args, hint, field)
    if origin is dict or hint is dict:
        return _convert_dict(value, args, hint, field)
    return _convert_scalar(value, hint, field)


def _convert_union(value, args, hint, field: str):
    if value is None and type(None) in args:
        return None
    options = [a for a in args if a is not type(None)]
    if len(options) == 1:
        return convert(value, options[0], field)
    for option in options:
        try:
            return convert(value, option, field)
        except EdifyError:
            continue
    _wrong(value, hint, field)


def _convert_sequence(value, kind, args, hint, field: str):
    if not isinstance(value, (list, tuple)):
        _wrong(value, hint, field)
    if kind is tuple and args and args[-1] is not Ellipsis:  # fixed length: tuple[float, float]
        if len(value) != len(args):
            raise EdifyError(f"field {field!r} must be a list of {len(args)} items, got {len(value)}")
        return tuple(convert(v, a, f"{field}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    item = args[0] if args else typing.Any
    items = [convert(v, item, f"{field}[{i}]") for i, v in enumerate(value)]
    return tuple(items) if kind is tuple else items


def _convert_dict(value, args, hint, field: str):
    if not isinstance(value, dict):
        _wrong(value, hint, field)
    if not args:
        return dict(value)
    key_type, value_type = args
    return {convert(k, key_type, f"{field} key"): convert(v, value_type, f"{field}[{k!r}]")
            for k, v in value.items()}


def _convert_scalar(value, hint, field: str):
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            if -INT64 <= value < INT64:
                return value
            raise EdifyError(f"field {field!r} must be a 64-bit integer, got {brief(value)}")
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value) if isinstance(value, float) or abs(value) < INT64 else math.inf
            if math.isfinite(number):
                return number
            raise EdifyError(f"field {field!r} must be a finite number, got {brief(value)}")
    elif isinstance(hint, type) and isinstance(value, hint):
        return value
    _wrong(value, hint, field)


_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string", dict: "a JSON object"}


def describe(hint) -> str:
    """Words for the JSON value a type hint asks for."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint in _NAMES:
        return _NAMES[hint]
    if dataclasses.is_dataclass(hint) or origin is dict:
        return "a JSON object"
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else describe(a) for a in args)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is tuple and args and args[-1] is not Ellipsis:
        return f"a list of {len(args)} items"
    if origin in (tuple, list) and args:
        return f"a list (each item {describe(args[0])})"
    if hint in (tuple, list):
        return "a list"
    return getattr(hint, "__name__", str(hint))


def _wrong(value, hint, field: str):
    raise EdifyError(f"field {field!r} must be {describe(hint)}, got {brief(value)}")


# ---- reading weights --------------------------------------------------------------------------

def model_folder(path) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise EdifyError(f"no model folder at {str(path)!r}")
    return path


@dataclasses.dataclass
class WeightFiles:
    """The weight files of a model folder and what their headers declare (no tensor read yet)."""

    folder: Path
    shapes: dict[str, tuple[int, ...]]  # tensor name -> shape
    files: dict[str, Path]  # tensor name -> the file holding it

    @property
    def num_values(self) -> int:
        return sum(math.prod(s) for s in self.shapes.values())

    def check_count(self, needed: int) -> None:
        """Refuse a config whose network is far larger than the weights (before it is allocated)."""
        held = self.num_values
        if needed > 2 * held + 2**20:
            raise EdifyError(f"weights in {str(self.folder)!r} do not match its config: its network needs "
                             f"{needed:,} values, the weight files hold {held:,}")

    def check_fits(self, expected: dict[str, torch.Tensor]) -> None:
        """Names and shapes against a network's state dict, before any tensor is read."""
        missing = sorted(set(expected) - set(self.shapes))
        unexpected = sorted(set(self.shapes) - set(expected))
        if missing or unexpected:
            raise EdifyError(f"weights in {str(self.folder)!r} do not match its config: {len(missing)} missing "
                             f"(e.g. {brief(missing[:1])}), {len(unexpected)} unexpected "
                             f"(e.g. {brief(unexpected[:1])})")
        for k, shape in self.shapes.items():
            if shape != tuple(expected[k].shape):
                raise EdifyError(f"weights in {str(self.folder)!r} do not match its config: {k!r} has shape "
                                 f"{shape}, the config needs {tuple(expected[k].shape)}")

    def load_into(self, network: torch.nn.Module) -> torch.dtype:
        """Read, check (finite, floating where the network is) and load every tensor; returns the
        dtype the weights were stored in (the most common one)."""
        expected = network.state_dict()
        self.check_fits(expected)
        state = {}
        for file, names in _by_file(self.files).items():
            state.update(_read_checked(file, names, expected))
        network.load_state_dict(state)
        return main_dtype(state)


def _read_checked(file: Path, names: list[str], expected: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    with _open_weights(file) as f:
        for k in names:
            try:
                t = f.get_tensor(k)
            except (SafetensorError, OSError, RuntimeError, ValueError, TypeError) as err:
                raise EdifyError(f"corrupt weights in {file}: tensor {k!r}: {first_line(err)}") from None
            if expected[k].is_floating_point() and not t.is_floating_point():
                raise EdifyError(f"corrupt weights in {file}: tensor {k!r} is {t.dtype}, not floating point")
            if t.is_floating_point() and not torch.isfinite(t).all():
                raise EdifyError(f"corrupt weights in {file}: tensor {k!r} holds non-finite values (NaN or inf)")
            out[k] = t
    return out


@contextlib.contextmanager
def _open_weights(file: Path):
    regular_file(file)
    try:
        handle = safe_open(str(file), framework="pt")
    except (SafetensorError, OSError, RuntimeError, ValueError, TypeError) as err:
        raise EdifyError(f"corrupt weights in {file}: {first_line(err)}") from None
    with handle as f:
        yield f


def _header(file: Path) -> tuple[dict, dict[str, tuple[int, ...]]]:
    """(metadata, {name: shape}) from a safetensors header; the data is not read."""
    with _open_weights(file) as f:
        try:
            return f.metadata() or {}, {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        except (SafetensorError, OSError, RuntimeError, ValueError, TypeError) as err:
            raise EdifyError(f"corrupt weights in {file}: {first_line(err)}") from None


def read_index(folder: Path) -> tuple[dict[str, str], str | None]:
    """(weight_map, save id or None) of the index file, its schema checked."""
    path = inside(folder, INDEX_NAME, "model folder")
    index = read_json(path)
    with naming(path):
        if not isinstance(index, dict):
            raise EdifyError(f"the index must be a JSON object, got {brief(index)}")
        unknown = sorted(set(index) - {"weight_map", "metadata"})
        if unknown:
            raise EdifyError(f"unknown index keys {brief(unknown)}; known: ['metadata', 'weight_map']")
        weight_map = convert(index.get("weight_map"), dict[str, str], "weight_map")
        metadata = convert(index.get("metadata", {}), dict, "metadata")
        if not weight_map:
            raise EdifyError("field 'weight_map' names no tensors")
        save = metadata.get(SAVE_KEY)
        if save is not None and not isinstance(save, str):
            raise EdifyError(f"field 'metadata.{SAVE_KEY}' must be a string, got {brief(save)}")
    return weight_map, save


def scan_weights(folder: Path) -> WeightFiles:
    """The weight files of `folder` (one file, or the shards its index names) and their headers."""
    index = folder / INDEX_NAME
    if not os.path.lexists(index):
        file = inside(folder, WEIGHTS_NAME, "model folder")
        if not os.path.lexists(file):
            raise EdifyError(f"model folder {str(folder)!r} is missing weights: {WEIGHTS_NAME} or {INDEX_NAME}")
        _, shapes = _header(file)
        return WeightFiles(folder, shapes, dict.fromkeys(shapes, file))
    weight_map, save = read_index(folder)
    shapes, files = {}, {}
    for name, listed in _by_file(weight_map).items():
        file = inside(folder, name, str(index))
        meta, held = _header(file)
        if save is not None and meta.get(SAVE_KEY) != save:
            raise EdifyError(f"model folder {str(folder)!r} mixes two saves (an interrupted save?): {name} "
                             f"is not from the save {INDEX_NAME} names")
        if listed - set(held):
            raise EdifyError(f"{index}: tensor {brief(min(listed - set(held)))} is listed for {name}, "
                             f"which does not hold it")
        if set(held) - listed:
            raise EdifyError(f"{index}: {name} holds tensor {brief(min(set(held) - listed))}, which is not "
                             f"listed for it")
        shapes.update(held)
        files.update(dict.fromkeys(held, file))
    return WeightFiles(folder, shapes, files)


def _by_file(files: dict) -> dict:
    """{tensor: file} -> {file: set of tensors}, files in sorted order."""
    out = {}
    for name, file in files.items():
        out.setdefault(file, set()).add(name)
    return dict(sorted(out.items()))


# ---- writing a model folder -------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class SavedModel:
    """What `save_model` wrote."""

    path: Path
    dtype: torch.dtype
    files: tuple[str, ...]
    nbytes: int

    def __str__(self) -> str:
        weights = sum(name.endswith(".safetensors") for name in self.files)
        return (f"wrote {self.path}: {str(self.dtype).removeprefix('torch.')} weights in {weights} "
                f"file(s), {self.nbytes / 2**20:.1f} MiB in all")


def split_shards(state: dict[str, torch.Tensor], max_shard_bytes: int) -> list[dict[str, torch.Tensor]]:
    """Consecutive groups of tensors of at most `max_shard_bytes` data each (a larger tensor alone)."""
    shards, current, size = [], {}, 0
    for k, v in state.items():
        nbytes = v.numel() * v.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[k], size = v, size + nbytes
    shards.append(current)
    return shards


def save_model(folder: str | os.PathLike, config: dict, state: dict[str, torch.Tensor],
               max_shard_bytes: int) -> SavedModel:
    """Write config.json and the weights (sharded above `max_shard_bytes`) into `folder`.

    Every file is written under a temporary name, then renamed into place (the weights first,
    config.json last); weight files of an earlier save that the new one does not use are removed.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    remove_partial_files(folder)
    shards = split_shards(state, max_shard_bytes)
    save = secrets.token_hex(8)
    names = ([WEIGHTS_NAME] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    staged = {}
    try:
        for name, shard in zip(names, shards):
            staged[name] = _stage_shard(shard, folder / name, save)
        if len(shards) > 1:
            weight_map = {k: name for name, shard in zip(names, shards) for k in shard}
            dtype = str(main_dtype(state)).removeprefix("torch.")
            index = {"metadata": {SAVE_KEY: save, "dtype": dtype}, "weight_map": weight_map}
            staged[INDEX_NAME] = _stage_text(folder / INDEX_NAME, json.dumps(index, indent=1) + "\n")
        staged[CONFIG_NAME] = _stage_text(folder / CONFIG_NAME, json.dumps(config, indent=2) + "\n")
    except BaseException:
        remove_partial_files(folder)  # what a killed process could not remove, the next save does
        raise
    _commit(folder, staged, sharded=len(shards) > 1)
    saved = SavedModel(folder, main_dtype(state), tuple(staged), sum((folder / n).stat().st_size for n in staged))
    log.info("%s", saved)
    return saved


def main_dtype(state: dict[str, torch.Tensor]) -> torch.dtype:
    """The dtype most floating-point tensors of a state dict have (float32 if it holds none)."""
    counts = Counter(v.dtype for v in state.values() if v.is_floating_point())
    return counts.most_common(1)[0][0] if counts else torch.float32


def _partial(path: Path) -> Path:
    return path.with_name(f".{path.name}.{secrets.token_hex(4)}{PARTIAL}")


def _stage_shard(state: dict[str, torch.Tensor], file: Path, save: str) -> Path:
    tmp = _partial(file)
    save_file(state, str(tmp), metadata={"format": "pt", SAVE_KEY: save})
    # safetensors creates its files owner-only (0600); give them the mode of any other new file
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    fsync(tmp)
    return tmp


def _stage_text(file: Path, text: str) -> Path:
    tmp = _partial(file)
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    return tmp


def _commit(folder: Path, staged: dict[str, Path], sharded: bool) -> None:
    """Rename the staged files into place: shards, then the index (or its removal), then config.json."""
    weights = [n for n in staged if n not in (INDEX_NAME, CONFIG_NAME)]
    for name in weights:
        os.replace(staged[name], folder / name)
    if sharded:
        os.replace(staged[INDEX_NAME], folder / INDEX_NAME)
    else:
        (folder / INDEX_NAME).unlink(missing_ok=True)
    os.replace(staged[CONFIG_NAME], folder / CONFIG_NAME)
    for old in folder.glob("model*.safetensors"):
        if old.name not in weights:
            old.unlink()
    fsync(folder)


def remove_partial_files(folder: Path) -> None:
    """Delete the temporary files a killed save left behind."""
    for path in folder.glob(f".*{PARTIAL}"):
        if path.is_file() and not path.is_symlink():
            path.unlink(missing_ok=True)
