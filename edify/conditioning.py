"""The conditioning passed from pipelines through denoisers to the network.

One batch of conditions (section 3.1 of the paper): text token states, camera fields (pitch, depth
of field) and a media-type label. Each field may be absent per sample ("null"), which is how
training drops conditions for classifier-free guidance and how guidance builds its unconditional
branch. Categorical fields use the index -1 for null; text uses an all-False mask row.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor

from edify.condition_fields import CONDITION_FIELDS
from edify.errors import EdifyError


PITCH_NAMES = ("ascending", "eye level", "descending")
DOF_NAMES = ("shallow", "deep")
NULL = -1


@dataclass(frozen=True)
class Cond:
    """A batch of conditions. Any field may be None (null for the whole batch).

    text:      [B, L, D] float token states of the text encoder.
    text_mask: [B, L] bool, True where a token is real; an all-False row is a null prompt.
    media:     [B] long media-type (style) index, -1 = null.
    pitch:     [B] long camera pitch index into PITCH_NAMES, -1 = null.
    dof:       [B] long depth-of-field index into DOF_NAMES, -1 = null.
    """

    text: Tensor | None = None
    text_mask: Tensor | None = None
    media: Tensor | None = None
    pitch: Tensor | None = None
    dof: Tensor | None = None

    def __post_init__(self):
        if (self.text is None) != (self.text_mask is None):
            raise EdifyError("Cond: text and text_mask must be given together")

    @property
    def batch_size(self) -> int | None:
        for f in fields(self):
            v = getattr(self, f.name)
            if v is not None:
                return v.shape[0]
        return None

    def to(self, device=None, dtype=None) -> Cond:
        """Move tensors; `dtype` applies to the float text states only."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if v is not None:
                v = v.to(device=device, dtype=dtype if v.is_floating_point() else None)
            out[f.name] = v
        return Cond(**out)

    def drop(self, names, where: Tensor | None = None) -> Cond:
        """Null the named fields, for the samples where `where` ([B] bool) is True (all if None)."""
        out = {}
        for name in names:
            if name not in CONDITION_FIELDS:
                raise EdifyError(f"unknown condition {name!r}; known: {', '.join(CONDITION_FIELDS)}")
            if name == "text":
                if self.text_mask is None:
                    continue
                keep = torch.zeros_like(self.text_mask[:, 0]) if where is None else ~where.to(self.text_mask.device)
                out["text_mask"] = self.text_mask & keep[:, None]
            else:
                v = getattr(self, name)
                if v is None:
                    continue
                out[name] = torch.full_like(v, NULL) if where is None else torch.where(where.to(v.device), NULL, v)
        return replace(self, **out)

    def repeat(self, n: int) -> Cond:
        """Each sample repeated n times along the batch (sample i -> rows i*n ... i*n+n-1)."""
        return self._map(lambda v: v.repeat_interleave(n, dim=0))

    def index(self, idx) -> Cond:
        return self._map(lambda v: v[idx])

    def _map(self, fn) -> Cond:
        return Cond(**{f.name: (None if getattr(self, f.name) is None else fn(getattr(self, f.name)))
                       for f in fields(self)})

    @staticmethod
    def cat(conds: list[Cond]) -> Cond:
        """Concatenate along the batch; text is right-padded (masked) to the longest length."""
        out = {}
        for f in fields(Cond):
            vals = [getattr(c, f.name) for c in conds]
            if all(v is None for v in vals):
                out[f.name] = None
                continue
            if any(v is None for v in vals):
                raise EdifyError(f"Cond.cat: field {f.name!r} is set in some conditions and None in others")
            if f.name in ("text", "text_mask"):
                length = max(v.shape[1] for v in vals)
                vals = [torch.nn.functional.pad(v, (0, 0, 0, length - v.shape[1]) if v.dim() == 3
                                                else (0, length - v.shape[1])) for v in vals]
            out[f.name] = torch.cat(vals, dim=0)
        return Cond(**out)


def random_drop(cond: Cond, probs: dict[str, float], generator: torch.Generator | None = None) -> Cond:
    """Training-time condition dropout for classifier-free guidance (section 3.1).

    Each field in `probs` is nulled independently per sample with its own probability.
    """
    batch = cond.batch_size
    if batch is None:
        return cond
    device = next(getattr(cond, f.name) for f in fields(cond) if getattr(cond, f.name) is not None).device
    for name, p in probs.items():
        if not 0.0 <= p <= 1.0:
            raise EdifyError(f"drop probability for {name!r} must be in [0, 1], got {p}")
        where = torch.rand(batch, generator=generator,
                           device=generator.device if generator is not None else "cpu") < p
        cond = cond.drop([name], where.to(device))
    return cond
