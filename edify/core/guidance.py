"""Classifier-free guidance (Ho & Salimans 2022; Edify Image section 3.1) as a denoiser wrapper.

D_w(x) = D_u(x) + w (D_c(x) - D_u(x)), where D_c sees the full condition and D_u the condition
with the fields in `drop` nulled (`Cond.drop`), or a negative-prompt condition. Both branches run
in one batched call; w = 1 skips the unconditional branch. Being a denoiser itself, it plugs into
any sampler unchanged.

Extra guidance terms (`terms`) steer single conditions on top of it, the compositional form of
InstructPix2Pix (Brooks et al. 2023, Eq. 3) and of Liu et al. 2022 ("Compositional Visual
Generation"): each term (fields, w) adds w (D_c(x) - D_{c - fields}(x)), where the second branch
sees the full condition with only `fields` nulled. With a style (media-type) term

    D = D_u + s (D_c - D_u) + w_style (D_c - D_{c without style})

the text is guided by s as before while the style gets w_style more: the style's own direction,
which plain guidance mixes with the text's. Every branch runs in the same batched call; a term of
weight 0 adds no branch, so the default is the two-branch guidance above, bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from edify.conditioning import CONDITION_FIELDS, Cond
from edify.core.precond import Denoiser
from edify.errors import EdifyError


class CFGDenoiser(nn.Module):
    """Guided denoiser D_u + scale (D_c - D_u).

    drop:     condition fields nulled for the unconditional branch (see CONDITION_FIELDS).
    negative: an optional condition used as the unconditional branch instead (negative prompt);
              batch size 1 (broadcast) or the batch size of `cond`.
    terms:    extra guidance terms, each (fields, weight): weight (D_c - D_{cond with fields nulled}).
    """

    def __init__(self, denoiser: Denoiser, scale: float,
                 drop: Sequence[str] = CONDITION_FIELDS, negative: Cond | None = None,
                 terms: Sequence[tuple[Sequence[str], float]] = ()):
        super().__init__()
        unknown = [d for d in [*drop, *(f for fields, _ in terms for f in fields)] if d not in CONDITION_FIELDS]
        if unknown:
            raise EdifyError(f"unknown condition field(s) to drop {unknown}; known: {', '.join(CONDITION_FIELDS)}")
        for fields, weight in terms:
            if not fields or not math.isfinite(float(weight)):
                raise EdifyError(f"a guidance term needs condition fields and a finite weight, got {fields!r}, {weight!r}")
        self.denoiser = denoiser
        self.scale = float(scale)
        self.drop = tuple(drop)
        self.negative = negative
        self.terms = tuple((tuple(fields), float(w)) for fields, w in terms if float(w) != 0)

    def uncond(self, cond: Cond) -> Cond:
        """The condition of the unconditional branch."""
        if self.negative is None:
            return cond.drop(self.drop)
        B, n = cond.batch_size, self.negative.batch_size
        if n == B:
            return self.negative
        if n == 1:
            return self.negative.repeat(B)
        raise EdifyError(f"negative condition batch must be 1 or {B}, got {n}")

    def forward(self, x: Tensor, sigma: Tensor | float, cond: Cond | None = None,
                stage: Tensor | int | None = None) -> Tensor:
        if cond is None or (self.scale == 1 and not self.terms):
            return self.denoiser(x, sigma, cond, stage)  # w = 1: D_w = D_c, no second branch
        branches = [cond] + ([self.uncond(cond)] if self.scale != 1 else [])
        branches += [cond.drop(fields) for fields, _ in self.terms]
        k = len(branches)
        D = self.denoiser(torch.cat([x] * k), _stacked(sigma, x, k), Cond.cat(branches), _stacked(stage, x, k))
        D_c, *rest = D.chunk(k)
        if self.scale != 1:
            D_u, *rest = rest
            out = D_u + self.scale * (D_c - D_u)  # classifier-free guidance
        else:
            out = D_c
        for (_, weight), D_f in zip(self.terms, rest):
            out = out + weight * (D_c - D_f)  # one condition's own direction
        return out


def _stacked(v, x: Tensor, k: int):
    """A per-sample argument ([B] tensor, scalar or None) for the batch of k stacked branches."""
    if v is None:
        return None
    v = torch.as_tensor(v, device=x.device)
    if v.dim() == 0:
        return v
    return torch.cat([v] * k)
