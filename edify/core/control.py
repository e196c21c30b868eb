"""ControlNet residuals as a denoiser wrapper (Edify Image section 5; Zhang et al. 2023).

`ControlledDenoiser(base, controls)` has the `Denoiser` contract of `edify.core.precond`. `base` is
a frozen U-Net under its EDM preconditioning (`EDMPrecond`); each `Control` is a ControlNet, its
control image at full resolution, a weight w_c and a full-resolution sigma range. With the EDM
scalings of the per-pixel sigma the state carries,

    r      = sum_c w_c 1[sigma_min_c <= sigma <= sigma_max_c] R_c(c_in x, c_noise, image_c)
    D(x)   = c_skip x + c_out F(c_in x, c_noise; residuals r)

where R_c is ControlNet c, j the state's stage and sigma = 2^j sigma_px its full-resolution noise
level (section 2.2). Every stage gets the FULL-resolution control: the ControlNet moves it onto
the stage-j grid by space-to-depth (`edify.networks.controlnet.stage_control`, a permutation of
its pixels), so a coarse stage conditions on every known pixel. Pooling it like the state
(down^j) would lose what lies inside each pooled block; the coarse stages would then commit to
structure the fine stages cannot undo (tests/test_control_closed_form.py measures both). The
residuals of all active controls are summed before the base adds them to its skips (the
"multi-ControlNet" sum).

- Where no control is active (weight 0, or sigma outside every range) the base denoiser itself is
  called: the output is the base's, bit for bit. Rows of a batch whose sigma lies outside a range
  get that control's residuals times exactly 0, which leaves their skips unchanged bit for bit.
- Classifier-free guidance (`edify.core.guidance.CFGDenoiser`) stacks [conditional; unconditional]
  along the batch. A control image of batch B serves a batch of k B as k stacked copies, so both
  branches see the same control. As in diffusers, the unconditional branch keeps the control: it
  is a constraint on the image, not part of the prompt, so guidance extrapolates the prompt while
  both branches share the structure (and, for inpainting, the known pixels); a control seen by
  the conditional branch only would be extrapolated too, `scale` times too strongly.
- Any U-Net of the base's config is accepted (a base finetuned later); one of another
  architecture is refused with a one-line EdifyError.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from edify.conditioning import Cond
from edify.core.precond import EDMPrecond, edm_scalings
from edify.errors import EdifyError


@dataclass(frozen=True, eq=False)
class Control:
    """One ControlNet with its input for a sampling run (or a training batch).

    net:       a ControlNet (possibly under DDP or torch.compile).
    image:     the control image [B or 1, Cc, H, W] at FULL resolution, which every stage sees whole.
    weight:    w_c, the control's strength (0 = off).
    sigma_min, sigma_max: the full-resolution noise levels where it is active (both ends included).
    """

    net: nn.Module
    image: Tensor
    weight: float = 1.0
    sigma_min: float = 0.0
    sigma_max: float = math.inf

    def __post_init__(self):
        if not math.isfinite(self.weight):
            raise EdifyError(f"control weight must be finite, got {self.weight}")
        if not 0 <= self.sigma_min <= self.sigma_max:
            raise EdifyError(f"control sigma range must satisfy 0 <= sigma_min <= sigma_max, "
                             f"got [{self.sigma_min}, {self.sigma_max}]")
        if not isinstance(self.image, Tensor) or self.image.dim() != 4:
            raise EdifyError(f"control image must be a [B, C, H, W] tensor, got shape "
                             f"{list(getattr(self.image, 'shape', []))}")
        channels = inner(self.net).config.control_channels
        if self.image.shape[1] != channels:
            raise EdifyError(f"this ControlNet takes {channels}-channel control images, got {self.image.shape[1]}")


def inner(module: nn.Module) -> nn.Module:
    """The module inside DDP (`.module`) and torch.compile (`._orig_mod`) wrappers."""
    while True:
        if hasattr(module, "_orig_mod"):
            module = module._orig_mod
        elif hasattr(module, "no_sync") and hasattr(module, "module"):
            module = module.module
        else:
            return module


class ControlledDenoiser(nn.Module):
    """A frozen base denoiser plus the weighted residuals of one or several ControlNets."""

    def __init__(self, base: EDMPrecond, controls: Sequence[Control]):
        super().__init__()
        if not isinstance(base, EDMPrecond):
            raise EdifyError(f"the base must be a U-Net under EDMPrecond, got {type(base).__name__}")
        base_config = getattr(inner(base.net), "config", None)
        if base_config is None:
            raise EdifyError(f"the base network must carry its config, got {type(inner(base.net)).__name__}")
        for c in controls:
            if not isinstance(c, Control):
                raise EdifyError(f"controls must be Control objects, got {type(c).__name__}")
            inner(c.net).config.check_base(base_config)
        self.base = base
        self.controls = list(controls)
        self.nets = nn.ModuleList(c.net for c in self.controls)  # so that .to() moves them

    def weights(self, sigma_full: Tensor) -> list[Tensor]:
        """Per control, its weight per sample: w_c inside its sigma range, else 0."""
        return [c.weight * ((sigma_full >= c.sigma_min) & (sigma_full <= c.sigma_max)).to(torch.float32)
                for c in self.controls]

    def forward(self, x: Tensor, sigma: Tensor | float, cond: Cond | None = None,
                stage: Tensor | int | None = None) -> Tensor:
        x = x.to(torch.float32)
        B = x.shape[0]
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1).expand(B)
        stage_t = torch.as_tensor(0 if stage is None else stage, dtype=torch.long,
                                  device=x.device).reshape(-1).expand(B)
        sigma_full = sigma * 2.0 ** stage_t.to(torch.float32)  # per-pixel -> full-res (exact: powers of 2)
        active = [(c, w) for c, w in zip(self.controls, self.weights(sigma_full)) if bool((w != 0).any())]
        if not active:
            return self.base(x, sigma, cond, stage)  # the base itself: bit for bit
        if (sigma <= 0).any():
            raise EdifyError(f"sigma must be positive, got {sigma.min().item()}")
        j = int(stage_t[0])
        if bool((stage_t != j).any()):
            raise EdifyError(f"a controlled denoiser needs one stage per call, got stages {stage_t.unique().tolist()}")
        c_skip, c_out, c_in, c_noise = edm_scalings(sigma, self.base.sigma_data)  # EDM, Table 1
        c_skip, c_out, c_in = (c.reshape(B, 1, 1, 1) for c in (c_skip, c_out, c_in))
        x_in = c_in * x
        residuals = None
        with self.base._autocast(x.device):
            for c, w in active:
                r = c.net(x_in, c_noise, cond, stage_t, control=self.image_at(c, j, x))
                w = w.reshape(B, 1, 1, 1)
                r = [w.to(t.dtype) * t for t in r]  # w_c 1[sigma in range] R_c
                residuals = r if residuals is None else [a + b for a, b in zip(residuals, r)]
            F_x = self.base.net(x_in, c_noise, cond, stage_t, residuals=residuals)
        return c_skip * x + c_out * F_x.to(torch.float32)  # D_x = c_skip x + c_out F_x

    @staticmethod
    def image_at(control: Control, stage: int, x: Tensor) -> Tensor:
        """The full-resolution control image for a stage-`stage` state x, on x's device, batch matched
        (not pooled: the ControlNet reshapes it to the stage's grid without loss)."""
        image = control.image.to(x.device, torch.float32)
        H, W = image.shape[-2:]
        h, w = x.shape[-2:]
        if (H, W) != (h << stage, w << stage):
            raise EdifyError(f"the control image is {H}x{W}; a stage-{stage} state of {h}x{w} needs "
                             f"{h << stage}x{w << stage} (full resolution)")
        n, B = image.shape[0], x.shape[0]
        if n == B:
            return image
        if n == 1:
            return image.expand(B, -1, -1, -1)
        if B % n == 0:
            return torch.cat([image] * (B // n))  # [cond; uncond] of classifier-free guidance
        raise EdifyError(f"control image batch must be 1 or divide the batch {B}, got {n}")
