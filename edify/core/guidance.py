"""Classifier-free guidance (Ho & Salimans 2022; Edify Image section 3.1) as a denoiser wrapper.

D_w(x) = D_u(x) + w (D_c(x) - D_u(x)), where D_c sees the full condition and D_u the condition
with the fields in `drop` nulled (`Cond.drop`), or a negative-prompt condition. Both branches run
in one batched call; w = 1 skips the unconditional branch. Being a denoiser itself, it plugs into
any sampler unchanged.
"""

from __future__ import annotations

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
    """

    def __init__(self, denoiser: Denoiser, scale: float,
                 drop: Sequence[str] = CONDITION_FIELDS, negative: Cond | None = None):
        super().__init__()
        unknown = [d for d in drop if d not in CONDITION_FIELDS]
        if unknown:
            raise EdifyError(f"unknown condition field(s) to drop {unknown}; known: {', '.join(CONDITION_FIELDS)}")
        self.denoiser = denoiser
        self.scale = float(scale)
        self.drop = tuple(drop)
        self.negative = negative

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
        if self.scale == 1 or cond is None:
            return self.denoiser(x, sigma, cond, stage)  # w = 1: D_w = D_c, no second branch
        both = Cond.cat([cond, self.uncond(cond)])
        D = self.denoiser(torch.cat([x, x]), _twice(sigma, x), both, _twice(stage, x))
        D_c, D_u = D.chunk(2)
        return D_u + self.scale * (D_c - D_u)  # classifier-free guidance


def _twice(v, x: Tensor):
    """A per-sample argument ([B] tensor, scalar or None) for the doubled batch."""
    if v is None:
        return None
    v = torch.as_tensor(v, device=x.device)
    if v.dim() == 0:
        return v
    return torch.cat([v, v])
