"""An on-disk cache of prompt embeddings, so training encodes each caption once.

Key: sha256 of (encoder.name, text), so encoders with different weights, tokenizers or max_length
never share entries. Each entry is one safetensors file holding the states of the real tokens only
([n, D] float32; the mask is n True values), under a two-hex-digit shard folder:

    cache_dir/ab/ab12...ef.safetensors      metadata: {"encoder": name, "text": text}

Writes are atomic (temp file in the same folder, then os.replace), so concurrent writers and
interrupted runs leave either a whole entry or none. Nothing is unpickled. An optional in-memory
LRU layer sits in front of the disk.

A cache hit returns the bytes the encoder produced when the entry was written. Transformer
encoders are deterministic for a given batch but not bitwise batch-invariant (a prompt encoded next
to a longer one differs in the last float bits), so outputs equal the uncached encoder's bitwise for
the batch that filled the cache, and to float tolerance otherwise.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from edify.errors import EdifyError
from edify.text.encoders import TextEncoder


def entry_key(encoder_name: str, text: str) -> str:
    """sha256 hex of the encoder id and the text, NUL-separated."""
    return hashlib.sha256(f"{encoder_name}\0{text}".encode("utf-8")).hexdigest()


class CachedTextEncoder(TextEncoder):
    """Wraps a TextEncoder with a disk (and optional memory) cache; same interface and outputs."""

    def __init__(self, encoder: TextEncoder, cache_dir: str | Path, memory_items: int = 0):
        if memory_items < 0:
            raise EdifyError(f"memory_items must be >= 0, got {memory_items}")
        self.encoder = encoder
        self.cache_dir = Path(cache_dir)
        self.memory_items = memory_items
        self._memory: OrderedDict[str, Tensor] = OrderedDict()
        self.hits = 0
        self.misses = 0
        try:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise EdifyError(f"cannot create the text cache folder, got {str(self.cache_dir)!r}: {err}") from err

    # The interface, delegated.
    @property
    def dim(self) -> int:
        return self.encoder.dim

    @property
    def max_length(self) -> int:
        return self.encoder.max_length

    @property
    def name(self) -> str:
        return self.encoder.name

    @property
    def device(self) -> torch.device:
        return self.encoder.device

    def to(self, device) -> CachedTextEncoder:
        self.encoder.to(device)
        return self

    # Entries.
    def path(self, text: str) -> Path:
        key = entry_key(self.encoder.name, text)
        return self.cache_dir / key[:2] / f"{key}.safetensors"

    def contains(self, text: str) -> bool:
        return self.path(text).is_file()

    def _read(self, text: str) -> Tensor | None:
        key = entry_key(self.encoder.name, text)
        if key in self._memory:
            self._memory.move_to_end(key)
            return self._memory[key]
        path = self.path(text)
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                # A different (encoder, text) under the same key would be a sha256 collision or a
                # foreign file; either way it is not our entry.
                if meta.get("encoder") != self.encoder.name or meta.get("text") != text:
                    return None
                states = f.get_tensor("states")
        except (OSError, SafetensorError):  # an unreadable entry (e.g. a full disk truncated it) is re-encoded
            return None
        if states.dtype != torch.float32 or states.dim() != 2 or states.shape[1] != self.encoder.dim:
            return None
        self._remember(key, states)
        return states

    def _write(self, text: str, states: Tensor) -> None:
        path = self.path(text)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".safetensors")
        os.close(fd)
        try:
            save_file({"states": states.contiguous()}, tmp, metadata={"encoder": self.encoder.name, "text": text})
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self._remember(entry_key(self.encoder.name, text), states)

    def _remember(self, key: str, states: Tensor) -> None:
        if self.memory_items == 0:
            return
        self._memory[key] = states
        self._memory.move_to_end(key)
        while len(self._memory) > self.memory_items:
            self._memory.popitem(last=False)

    def _encode_missing(self, texts: list[str]) -> dict[str, Tensor]:
        """Encode `texts` (unique) in one batch and store each one's real-token states."""
        states, mask = self.encoder.encode(texts)
        states, mask = states.cpu(), mask.cpu()
        out = {}
        for i, text in enumerate(texts):
            n = int(mask[i].sum())
            if not bool(mask[i, :n].all()):
                raise EdifyError(f"text encoder {self.encoder.name!r} must right-pad its masks, got a gap in {text!r}")
            out[text] = states[i, :n].clone()
            self._write(text, out[text])
        return out

    def encode(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        """Cached `encoder.encode`: hits load from disk, misses are encoded in one batch and stored."""
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise EdifyError(f"encode expects a list of strings, got {type(texts).__name__}")
        if len(texts) == 0:
            raise EdifyError("encode expects at least one text, got an empty list")
        found: dict[str, Tensor] = {}
        for text in dict.fromkeys(texts):
            states = self._read(text)
            if states is not None:
                found[text] = states
        missing = [t for t in dict.fromkeys(texts) if t not in found]
        self.hits += sum(t in found for t in texts)
        self.misses += len(missing)
        if missing:
            found.update(self._encode_missing(missing))
        return _pad([found[t] for t in texts], self.encoder.dim, self.device)


def _pad(rows: list[Tensor], dim: int, device) -> tuple[Tensor, Tensor]:
    """Right-pad [n_i, D] states to the longest n: (states [B, L, D] zero-padded, mask [B, L])."""
    length = max(r.shape[0] for r in rows)
    states = torch.zeros(len(rows), length, dim, dtype=torch.float32)
    mask = torch.zeros(len(rows), length, dtype=torch.bool)
    for i, r in enumerate(rows):
        states[i, : r.shape[0]] = r
        mask[i, : r.shape[0]] = True
    return states.to(device), mask.to(device)


def precompute(encoder: CachedTextEncoder, texts: Iterable[str], batch_size: int = 64,
               progress: bool = False) -> int:
    """Fill the cache for every text not yet in it; returns how many were encoded.

    Texts are deduplicated and batched by length, so little compute goes to padding.
    """
    if not isinstance(encoder, CachedTextEncoder):
        raise EdifyError(f"precompute needs a CachedTextEncoder, got {type(encoder).__name__}")
    if batch_size < 1:
        raise EdifyError(f"batch_size must be >= 1, got {batch_size}")
    todo = sorted((t for t in dict.fromkeys(texts) if not encoder.contains(t)), key=len)
    batches = range(0, len(todo), batch_size)
    if progress:
        from tqdm import tqdm
        batches = tqdm(batches, desc="encoding captions", unit="batch")
    for start in batches:
        encoder._encode_missing(todo[start:start + batch_size])
    return len(todo)
