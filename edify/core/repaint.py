"""Inpainting without a trained inpainting model: replacement of the known pixels (RePaint-style).

`RePaintDenoiser(denoiser, known, mask)` has the `Denoiser` contract of `edify.core.precond`, so it
plugs into every sampler of `edify.core.samplers` and around (or inside) classifier-free guidance.
It keeps the network's estimate where the image is unknown and puts the known image where it is
known: with m = mask (1 = unknown, 0 = known) at full resolution and a stage-j state,

    D'(x) = down^j((1 - m) x_known) + down^j(m) D(x)

(`edify.core.laplacian.down`, 2x2 average pooling applied j times). A pooled pixel whose block is
all known gets the known image's pooled value, one whose block is all unknown the network's, and a
block on the seam the known part of its mean plus the network's estimate for the rest.

Replacement in the x0-prediction, and why it is the state replacement of RePaint here
-------------------------------------------------------------------------------------------
RePaint (Lugmayr et al. 2022) replaces the known region of the *state* after every step with the
known image diffused to the current noise level. The samplers here report the state to their
`callback(info)` after each step, but the callback returns nothing and the state it sees is not
documented as writable (a multistep sampler also keeps its own history of D), so the replacement
is made where the samplers' contract allows it: in the denoiser's output D.

For the exponential integrators (`euler`, `dpmpp_2m`, `dpmpp_3m`, `exp_trapezoid`) this gives the
known pixels their exact forward marginal at every step. Per band i the first-order step is

    x_i' = (s'/s) x_i + (a_i(s') - a_i(s) s'/s) D_i,

so if x_i = a_i(s) x0_i + s e_i and D_i = x0_i, then x_i' = a_i(s') x0_i + s' e_i: the state stays
A(sigma) x0 + sigma e with the same e from step to step (the multistep and trapezoid updates weight
their D's by coefficients that sum to the first-order one, so they keep it too). That is the
forward-diffused known image, `LaplacianProcess.noisy_state(x0, sigma, e, j)`, with its noise drawn
once (the initial noise, and the fresh band of each resolution switch) instead of afresh at every
step. It holds exactly where every band's support is known, i.e. away from the seam by the
coarsest band's block size; on the seam the network sees a blend. EDM's Heun (`heun`) integrates
linearly in sigma and keeps the marginal only approximately where a band's attenuation is
ramping. At sigma = 0 the state is D' itself, so the known pixels come out as the known image (up
to the rounding of the band arithmetic); pipelines paste them back exactly afterwards
(`edify.data.masks.paste_known`).

Not implemented: RePaint's resampling (jumping back to a higher noise level and denoising again to
harmonise the seam), which multiplies the network evaluations; this baseline costs exactly the
evaluations of the sampler it runs in, so it compares with the inpainting ControlNet at equal NFE.

Classifier-free guidance: D' is affine in D with the same known part for every branch, so wrapping
the guided denoiser and wrapping the one inside the guidance give the same result; the known image
and mask are stacked to the batch the way control images are (a batch of k B takes k copies).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from edify.conditioning import Cond
from edify.core.laplacian import down
from edify.core.precond import Denoiser
from edify.errors import EdifyError


class RePaintDenoiser(nn.Module):
    """A denoiser whose estimate is replaced by the known image on the known pixels.

    denoiser: any `Denoiser` (an `EDMPrecond`, a `ControlledDenoiser`, a `CFGDenoiser`, ...).
    known:    the image [1 or B, 3, H, W] in [-1, 1] at FULL resolution; only its known pixels are read.
    mask:     [1 or B, 1, H, W] (or [H, W]) with 1 = unknown (to generate), 0 = known, thresholded at
              0.5 (the convention of `edify.data.masks`).
    """

    def __init__(self, denoiser: Denoiser, known: Tensor, mask: Tensor):
        super().__init__()
        if not isinstance(known, Tensor) or known.dim() != 4 or not known.is_floating_point():
            raise EdifyError(f"the known image must be a float [B, C, H, W] tensor, got "
                             f"{tuple(getattr(known, 'shape', ()))}")
        if not isinstance(mask, Tensor):
            raise EdifyError(f"the mask must be a tensor [B, 1, H, W], got {type(mask).__name__}")
        m = mask.float()
        m = m[None, None] if m.dim() == 2 else m
        if m.dim() != 4 or m.shape[1] != 1 or m.shape[-2:] != known.shape[-2:]:
            raise EdifyError(f"the mask must be [B, 1, {known.shape[2]}, {known.shape[3]}] like the known image, "
                             f"got {tuple(mask.shape)}")
        if m.shape[0] not in (1, known.shape[0]) and known.shape[0] != 1:
            raise EdifyError(f"mask batch {m.shape[0]} and known image batch {known.shape[0]} do not match")
        self.denoiser = denoiser
        self.mask = (m > 0.5).float()
        self.kept = known.float() * (1 - self.mask)  # (1 - m) x_known: zero where unknown
        self._stages: dict[tuple[int, torch.device], tuple[Tensor, Tensor]] = {}

    def forward(self, x: Tensor, sigma: Tensor | float, cond: Cond | None = None,
                stage: Tensor | int | None = None) -> Tensor:
        kept, unknown = self.at_stage(_one_stage(stage, x), x)
        D = self.denoiser(x, sigma, cond, stage)
        return kept + unknown * D.to(torch.float32)

    def at_stage(self, stage: int, x: Tensor) -> tuple[Tensor, Tensor]:
        """(down^j((1 - m) x_known), down^j(m)) for a stage-`stage` state x, batch matched."""
        H, W = self.kept.shape[-2:]
        h, w = x.shape[-2:]
        if (H, W) != (h << stage, w << stage):
            raise EdifyError(f"the known image is {H}x{W}; a stage-{stage} state of {h}x{w} needs "
                             f"{h << stage}x{w << stage} (full resolution)")
        key = (stage, x.device)
        if key not in self._stages:
            self._stages[key] = (down(self.kept, stage).to(x.device), down(self.mask, stage).to(x.device))
        kept, unknown = self._stages[key]
        return _batch(kept, x.shape[0], "known image"), _batch(unknown, x.shape[0], "mask")


def _one_stage(stage, x: Tensor) -> int:
    """The single stage of a denoiser call (an int, or a [B] tensor holding one value)."""
    if stage is None:
        return 0
    s = torch.as_tensor(stage).reshape(-1)
    j = int(s[0])
    if bool((s != j).any()):
        raise EdifyError(f"a RePaint denoiser needs one stage per call, got stages {s.unique().tolist()}")
    return j


def _batch(t: Tensor, B: int, what: str) -> Tensor:
    """t [n, ...] for a batch of B: as is (n = B), broadcast (n = 1) or stacked copies (B = k n)."""
    n = t.shape[0]
    if n == B or n == 1:
        return t
    if B % n == 0:
        return torch.cat([t] * (B // n))  # [cond; uncond] of classifier-free guidance
    raise EdifyError(f"{what} batch must be 1 or divide the batch {B}, got {n}")
