"""EDM preconditioning (Karras et al. 2022, Table 1) and the mixture of resolution experts.

`EDMPrecond` turns a network F(x_in, c_noise, cond, stage) into a denoiser
D(x, sigma, cond, stage) = c_skip x + c_out F(c_in x, c_noise) ~= E[x0 | x] (Eq. 1 of Edify Image).
Here sigma is the PER-PIXEL noise of the state at its own resolution (sigma_full / 2^stage).
The scalings assume the state is x0 + sigma n with Var[x0] = sigma_data^2 per pixel. A Laplacian
state carries A(sigma) x0 instead of x0 (some bands attenuated), so this is a preconditioning
choice, not an identity; the network absorbs the difference (section 2.2, Appendix B).

Mixture of experts (section 2.2.2): `stage_sigma_ranges` gives the full-res sigma range each
stage's expert is trained on, in one of two modes (`EXPERT_RANGES`):

- "nested", the paper's: the stage-j expert sees every sigma below s_{j+1}* (the coarsest one
  every sigma). A stage-j state below s_j* is a low-resolution image with less noise, so such a
  model can also finish at resolution R / 2^j (section 2.2.3; `final_stage` of the samplers).
- "truncated": stage j only on [s_j*, s_{j+1}*] (s_0* = 0, s_K* = inf), where a full-resolution
  sampler uses it. All the training goes where the sampler needs it, but no stage but the
  finest can finish an image. Model folders written before the option existed are this mode.

`StageDenoisers` routes each stage to its denoiser at sampling time.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping
from typing import Protocol

import torch
from torch import Tensor, nn

from edify.conditioning import Cond
from edify.core.laplacian import LaplacianProcess
from edify.errors import EdifyError


class Denoiser(Protocol):
    """The contract every sampler and wrapper uses: x0_hat = D(x, sigma, cond, stage)."""

    def __call__(self, x: Tensor, sigma: Tensor | float, cond: Cond | None = None,
                 stage: Tensor | int | None = None) -> Tensor: ...


def edm_scalings(sigma: Tensor, sigma_data: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(c_skip, c_out, c_in, c_noise) of EDM (Karras et al. 2022, Table 1)."""
    c_skip = sigma_data**2 / (sigma**2 + sigma_data**2)
    c_out = sigma * sigma_data / (sigma**2 + sigma_data**2).sqrt()
    c_in = 1 / (sigma**2 + sigma_data**2).sqrt()
    c_noise = sigma.log() / 4
    return c_skip, c_out, c_in, c_noise


class EDMPrecond(nn.Module):
    """A network wrapped as an EDM denoiser; math in fp32, the network optionally in bf16.

    dtype: the network's compute dtype. float32 runs it as is; bfloat16/float16 runs it under
    torch.autocast on the input's device. The output is always float32.
    """

    def __init__(self, net: nn.Module, sigma_data: float = 0.5, dtype: torch.dtype = torch.float32):
        super().__init__()
        if not sigma_data > 0:
            raise EdifyError(f"sigma_data must be positive, got {sigma_data}")
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise EdifyError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
        self.net = net
        self.sigma_data = float(sigma_data)
        self.dtype = dtype

    def forward(self, x: Tensor, sigma: Tensor | float, cond: Cond | None = None,
                stage: Tensor | int | None = None) -> Tensor:
        x = x.to(torch.float32)
        B = x.shape[0]
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1).expand(B)
        if (sigma <= 0).any():
            raise EdifyError(f"sigma must be positive, got {sigma.min().item()}")
        if stage is not None:
            stage = torch.as_tensor(stage, dtype=torch.long, device=x.device).reshape(-1).expand(B)
        c_skip, c_out, c_in, c_noise = edm_scalings(sigma, self.sigma_data)
        c_skip, c_out, c_in = (c.reshape(B, 1, 1, 1) for c in (c_skip, c_out, c_in))
        with self._autocast(x.device):
            F_x = self.net(c_in * x, c_noise, cond, stage)
        return c_skip * x + c_out * F_x.to(torch.float32)  # D_x = c_skip x + c_out F_x

    def _autocast(self, device: torch.device):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.dtype)


EXPERT_RANGES = ("nested", "truncated")


def stage_sigma_ranges(process: LaplacianProcess, mode: str = "truncated") -> dict[int, tuple[float, float]]:
    """Full-res sigma range [low, high] each stage's expert is trained on (section 2.2.2).

    "truncated": sampling switches from stage j to j - 1 at s_j*, so a full-resolution sampler
    holds a stage-j state only for s_j* <= sigma <= s_{j+1}* (both ends are evaluated: a
    2-evaluation step of a stage lands on s_j*). "nested": [0, s_{j+1}*], the paper's ranges.
    The coarsest stage ends at inf. Divide by 2^j for the per-pixel sigma.
    """
    if mode not in EXPERT_RANGES:
        raise EdifyError(f"expert ranges must be one of {', '.join(EXPERT_RANGES)}, got {mode!r}")
    edges = (0.0, *process.switch_sigmas, math.inf)
    low = (lambda j: edges[j]) if mode == "truncated" else (lambda j: 0.0)
    return {j: (low(j), edges[j + 1]) for j in range(process.levels)}


def finishing_stages(process: LaplacianProcess, mode: str) -> tuple[int, ...]:
    """Stages at which a sampler may stop with a finished image: every stage whose expert was
    trained down to sigma 0 (section 2.2.3)."""
    ranges = stage_sigma_ranges(process, mode)
    return tuple(j for j, (low, _) in ranges.items() if low == 0)


class StageDenoisers(nn.Module):
    """Routes a batch to the denoiser of its stage: {stage: denoiser}. Mixed stages are split."""

    def __init__(self, denoisers: Mapping[int, nn.Module]):
        super().__init__()
        if not denoisers:
            raise EdifyError("StageDenoisers needs at least one {stage: denoiser}, got none")
        self.denoisers = nn.ModuleDict({str(int(k)): v for k, v in denoisers.items()})

    def forward(self, x: Tensor, sigma: Tensor | float, cond: Cond | None = None,
                stage: Tensor | int | None = None) -> Tensor:
        if stage is None:
            raise EdifyError("StageDenoisers needs the stage of the state, got None")
        B = x.shape[0]
        stage = torch.as_tensor(stage, dtype=torch.long, device=x.device).reshape(-1).expand(B)
        sigma = torch.as_tensor(sigma, device=x.device).reshape(-1).expand(B)
        stages = stage.unique().tolist()
        if len(stages) == 1:
            return self._get(stages[0])(x, sigma, cond, stage)
        out = None
        for j in stages:
            idx = (stage == j).nonzero().squeeze(1)
            D = self._get(j)(x[idx], sigma[idx], None if cond is None else cond.index(idx), stage[idx])
            out = D.new_empty((B, *D.shape[1:])) if out is None else out
            out[idx] = D
        return out

    def _get(self, j: int) -> nn.Module:
        if str(j) not in self.denoisers:
            raise EdifyError(f"no denoiser for stage {j}; have stages {sorted(int(k) for k in self.denoisers)}")
        return self.denoisers[str(j)]
