"""Categorical conditions and the builder of a Cond batch (section 3.1).

Besides text, the paper conditions on camera attributes (pitch, depth of field) and a media type,
each a token the network reads through cross-attention and each dropped at random in training.
This module maps raw dataset values to the indices `edify.conditioning.Cond` carries:

- `StyleVocab`: the media-type names seen in the data (for the emoji demo, the emoji set's name),
  sorted, index 0..N-1; stored in a model's config.json so sampling uses the training indices.
- `parse_pitch`, `parse_dof`: free-form camera labels -> indices into PITCH_NAMES / DOF_NAMES.
- `make_cond`: captions + labels -> one Cond batch.

Missing values (None, "") map to the null index -1 everywhere.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from edify.conditioning import DOF_NAMES, NULL, PITCH_NAMES, Cond
from edify.errors import EdifyError

# Accepted spellings, after lower-casing and folding "-", "_" and runs of spaces to one space.
PITCH_ALIASES: dict[str, str] = {
    "ascending": "ascending", "up": "ascending", "looking up": "ascending", "low angle": "ascending",
    "worm's eye": "ascending", "worms eye": "ascending",
    "eye level": "eye level", "eyelevel": "eye level", "level": "eye level", "straight": "eye level",
    "descending": "descending", "down": "descending", "looking down": "descending",
    "high angle": "descending", "bird's eye": "descending", "birds eye": "descending",
}
DOF_ALIASES: dict[str, str] = {
    "shallow": "shallow", "shallow dof": "shallow", "shallow depth of field": "shallow", "bokeh": "shallow",
    "deep": "deep", "deep dof": "deep", "deep depth of field": "deep", "deep focus": "deep",
}


def _missing(value) -> bool:
    return value is None or (isinstance(value, str) and value.strip() == "")


@dataclass(frozen=True)
class StyleVocab:
    """Media-type (style) names, index i <-> names[i]; None maps to the null index -1."""

    names: tuple[str, ...]

    def __post_init__(self):
        if not all(isinstance(n, str) and n for n in self.names):
            raise EdifyError(f"style names must be non-empty strings, got {list(self.names)!r}")
        if list(self.names) != sorted(set(self.names)):
            raise EdifyError(f"style names must be sorted and unique, got {list(self.names)!r}")

    @staticmethod
    def from_values(values: Iterable[str | None]) -> StyleVocab:
        """The sorted unique names among `values`; missing values (None, "") are skipped."""
        names = set()
        for v in values:
            if _missing(v):
                continue
            if not isinstance(v, str):
                raise EdifyError(f"style values must be strings, got {v!r}")
            names.add(v)
        return StyleVocab(tuple(sorted(names)))

    def __len__(self) -> int:
        return len(self.names)

    def index(self, name: str | None) -> int:
        """The index of `name`; None (or "") -> -1, the null media type."""
        if _missing(name):
            return NULL
        try:
            return self.names.index(name)
        except ValueError:
            raise EdifyError(f"unknown style {name!r}; known: {', '.join(self.names) or '(none)'}") from None

    def indices(self, names: Sequence[str | None]) -> torch.Tensor:
        """[B] long tensor of `index` over `names`."""
        return torch.tensor([self.index(n) for n in names], dtype=torch.long)

    def to_dict(self) -> dict:
        return {"names": list(self.names)}

    @staticmethod
    def from_dict(d: dict) -> StyleVocab:
        if not isinstance(d, dict) or not isinstance(d.get("names"), list):
            raise EdifyError(f"a style vocabulary is a dict with a 'names' list, got {d!r}")
        return StyleVocab(tuple(d["names"]))


def _parse(value, names: tuple[str, ...], aliases: dict[str, str], what: str) -> int:
    if _missing(value):
        return NULL
    if isinstance(value, bool):
        raise EdifyError(f"{what} must be one of {', '.join(names)}, got {value!r}")
    if isinstance(value, int):
        if not (value == NULL or 0 <= value < len(names)):
            raise EdifyError(f"{what} index must be in [-1, {len(names) - 1}], got {value}")
        return value
    if not isinstance(value, str):
        raise EdifyError(f"{what} must be a string, got {value!r}")
    key = re.sub(r"[\s_\-]+", " ", value.strip().lower())
    if key not in aliases:
        raise EdifyError(f"{what} must be one of {', '.join(names)}, got {value!r}")
    return names.index(aliases[key])


def parse_pitch(value) -> int:
    """Camera pitch label -> index into PITCH_NAMES ("ascending", "eye level", "descending"); -1 if missing."""
    return _parse(value, PITCH_NAMES, PITCH_ALIASES, "camera pitch")


def parse_dof(value) -> int:
    """Depth-of-field label -> index into DOF_NAMES ("shallow", "deep"); -1 if missing."""
    return _parse(value, DOF_NAMES, DOF_ALIASES, "depth of field")


def make_cond(encoder, captions: Sequence[str | None], styles: Sequence[str | None] | None = None,
              vocab: StyleVocab | None = None, pitch: Sequence | None = None, dof: Sequence | None = None,
              device=None) -> Cond:
    """One Cond batch from captions and labels.

    A None caption is the null prompt: its mask row is all False (states 0). A None `styles`,
    `pitch` or `dof` leaves that field None for the whole batch; None entries inside them are -1.
    """
    if isinstance(captions, str):
        raise EdifyError(f"captions must be a list of strings, got the string {captions!r}")
    batch = len(captions)
    if batch == 0:
        raise EdifyError("make_cond needs at least one caption, got 0")
    for label, values in (("styles", styles), ("pitch", pitch), ("dof", dof)):
        if values is not None and len(values) != batch:
            raise EdifyError(f"{label} must have one value per caption ({batch}), got {len(values)}")
    if styles is not None and vocab is None:
        raise EdifyError("styles were given without a StyleVocab to index them")

    states, mask = encoder.encode(["" if c is None else c for c in captions])
    null = torch.tensor([c is None for c in captions], device=mask.device)
    mask = mask & ~null[:, None]
    states = states.masked_fill(~mask[..., None], 0.0)
    cond = Cond(
        text=states,
        text_mask=mask,
        media=None if styles is None else vocab.indices(styles),
        pitch=None if pitch is None else torch.tensor([parse_pitch(v) for v in pitch], dtype=torch.long),
        dof=None if dof is None else torch.tensor([parse_dof(v) for v in dof], dtype=torch.long),
    )
    return cond.to(device if device is not None else mask.device)
