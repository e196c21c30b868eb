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

Autoguidance (Karras et al. 2024, "Guiding a diffusion model with a bad version of itself"): with
a `guide` denoiser, a weaker model of the same task (e.g. the same network trained for less long),
the second branch is that model under the full condition, D = D_g + w (D_c - D_g): it pushes the
sample away from the errors the weaker model makes more, not from the unconditional distribution,
so it sharpens without narrowing the distribution the way classifier-free guidance does.

Autoguidance as a term on top of classifier-free guidance (`guide_weight` a): the guide does not
replace the unconditional branch but adds its own direction,

    D = D_u + s (D_c - D_u) + a (D_c - D_g),

with D_g the guide under the full condition. Text guidance keeps its scale s; the term extrapolates
away from the weaker model's errors. `a` may be one number per stage like the scale: a stage whose
a is 0 runs no guide call, so a guide that is only weaker at some stages (a model's main network
against the stage expert trained on from it) is asked only there.

Per-stage guidance: `scale` may be one number per Laplacian stage (finest first), looked up from
the `stage` each call gets. Each stage is a band of noise levels, so this is the Laplacian form of
guidance in a limited interval (Kynkaanniemi et al. 2024): a stage whose scale is 1 gets the
conditional denoiser alone and runs no unconditional branch (half the cost of its steps).
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

    scale:    one guidance scale, or one per stage (finest first; the stage of each sample selects it).
    drop:     condition fields nulled for the unconditional branch (see CONDITION_FIELDS).
    negative: an optional condition used as the unconditional branch instead (negative prompt);
              batch size 1 (broadcast) or the batch size of `cond`.
    terms:    extra guidance terms, each (fields, weight): weight (D_c - D_{cond with fields nulled}).
    guide:    autoguidance: a weaker denoiser of the same task whose conditional estimate replaces the
              unconditional branch (its own network call; no negative prompt with it).
    guide_uncond: the guide sees the unconditional condition (`drop` nulled) instead: classifier-free
              guidance whose unconditional branch is the weaker model.
    guide_weight: with a guide, add the autoguidance term guide_weight (D_c - D_g) on top of
              classifier-free guidance instead of replacing its unconditional branch; one number,
              or one per stage (finest first; 0 = no guide call at that stage).
    """

    def __init__(self, denoiser: Denoiser, scale: float | Sequence[float],
                 drop: Sequence[str] = CONDITION_FIELDS, negative: Cond | None = None,
                 terms: Sequence[tuple[Sequence[str], float]] = (), guide: Denoiser | None = None,
                 guide_uncond: bool = False, guide_weight: float | Sequence[float] | None = None):
        super().__init__()
        if guide_weight is not None and guide is None:
            raise EdifyError("guide_weight needs a guide model")
        if guide_weight is not None and guide_uncond:
            raise EdifyError("guide_weight adds the guide's conditional estimate; it takes no guide_uncond")
        if guide is not None and negative is not None and guide_weight is None:
            raise EdifyError("autoguidance replaces the unconditional branch, so it takes no negative prompt")
        unknown = [d for d in [*drop, *(f for fields, _ in terms for f in fields)] if d not in CONDITION_FIELDS]
        if unknown:
            raise EdifyError(f"unknown condition field(s) to drop {unknown}; known: {', '.join(CONDITION_FIELDS)}")
        for fields, weight in terms:
            if not fields or not math.isfinite(float(weight)):
                raise EdifyError(f"a guidance term needs condition fields and a finite weight, got {fields!r}, {weight!r}")
        self.denoiser = denoiser
        self.scales = check_guidance(scale)
        self.drop = tuple(drop)
        self.negative = negative
        self.terms = tuple((tuple(fields), float(w)) for fields, w in terms if float(w) != 0)
        self.guide, self.guide_uncond = guide, bool(guide_uncond)
        self.guide_weights = None if guide_weight is None else check_guidance(guide_weight, "guide_weight")

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
        w = self.scale_of(stage, x)
        guided = isinstance(w, Tensor) or w != 1
        a = 0.0 if self.guide_weights is None else per_stage(self.guide_weights, stage, x, "guide_weight", "weights")
        term = isinstance(a, Tensor) or a != 0  # the autoguidance term on top of guidance
        auto = guided and self.guide is not None and self.guide_weights is None
        if not auto and not term and (cond is None or (not guided and not self.terms)):
            return self.denoiser(x, sigma, cond, stage)  # w = 1: D_w = D_c, no second branch
        branches = [] if cond is None else [cond] + [cond.drop(fields) for fields, _ in self.terms]
        if guided and not auto:
            branches.insert(1, self.uncond(cond))
        k = max(1, len(branches))
        D = self.denoiser(torch.cat([x] * k), _stacked(sigma, x, k), Cond.cat(branches) if branches else None,
                          _stacked(stage, x, k))
        D_c, *rest = D.chunk(k)
        out = D_c
        if guided:
            D_u = self.guide(x, sigma, self.uncond(cond) if self.guide_uncond and cond is not None else cond,
                             stage).to(D_c.dtype) if auto else rest.pop(0)
            out = D_u + w * (D_c - D_u)  # classifier-free guidance, or autoguidance
        for (_, weight), D_f in zip(self.terms, rest):
            out = out + weight * (D_c - D_f)  # one condition's own direction
        if term:
            D_g = self.guide(x, sigma, cond, stage).to(D_c.dtype)
            out = out + a * (D_c - D_g)  # autoguidance on top: away from the weaker model's errors
        return out

    def scale_of(self, stage, x: Tensor) -> float | Tensor:
        """The guidance scale of the batch: a number when every sample has the same one, else
        per-sample scales [B, 1, 1, 1] (per-stage guidance over a batch that mixes stages)."""
        return per_stage(self.scales, stage, x, "guidance", "scales")


def per_stage(values: tuple[float, ...], stage, x: Tensor, what: str, unit: str = "values") -> float | Tensor:
    """The batch's value of a setting given once or per stage (finest first): a number when every
    sample has the same one, else per-sample values [B, 1, 1, 1] (a batch that mixes stages)."""
    if len(values) == 1:
        return values[0]
    if stage is None:
        raise EdifyError(f"per-stage {what} needs the stage of each sample; the sampler gave none")
    st = torch.as_tensor(stage, device=x.device).reshape(-1).long()
    if int(st.min()) < 0 or int(st.max()) >= len(values):
        raise EdifyError(f"per-stage {what} has {len(values)} {unit}, got stage {int(st.max())}")
    w = torch.tensor(values, dtype=x.dtype, device=x.device)[st]
    if bool((w == w[0]).all()):
        return values[int(st[0])]
    return w.expand(x.shape[0]).view(-1, 1, 1, 1)


def check_guidance(scale, what: str = "guidance scale") -> tuple[float, ...]:
    """A guidance scale (a number, or one per stage) as a tuple of finite numbers >= 0."""
    values = (scale,) if isinstance(scale, (int, float)) or (isinstance(scale, Tensor) and scale.dim() == 0) \
        else tuple(scale)
    try:
        values = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise EdifyError(f"{what} must be a number or one number per stage, got {scale!r}") from None
    if not values or any(not math.isfinite(v) or v < 0 for v in values):
        raise EdifyError(f"{what} must be finite and >= 0 (one number or one per stage), got {scale!r}")
    return values


def unguided(scale) -> bool:
    """Whether a guidance scale (one number or one per stage) is 1 everywhere: no second branch."""
    return all(v == 1 for v in check_guidance(scale))


def _stacked(v, x: Tensor, k: int):
    """A per-sample argument ([B] tensor, scalar or None) for the batch of k stacked branches."""
    if v is None:
        return None
    v = torch.as_tensor(v, device=x.device)
    if v.dim() == 0:
        return v
    return torch.cat([v] * k)
