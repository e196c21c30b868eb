"""Exponential moving average of the network weights, kept in fp32.

Three ways to choose the per-step decay beta:
- a half-life counted in images with a ramp-up (Karras et al. 2022, EDM training loop): the average
  halves its memory every `halflife` images, and early in training the half-life is capped at
  `rampup * images_seen` so the average does not remember the random initialisation;
- a power-function profile (Karras et al. 2024, edm2, section 3.1): beta_t = (1 - 1/t)^(gamma + 1),
  with gamma set by the relative standard deviation `std` of the averaging profile;
- a fixed decay.
Under FSDP2 the shadow weights are sharded like the parameters they follow.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from edify.errors import EdifyError
from edify.training import distributed


def power_gamma(std: float) -> float:
    """Exponent gamma of the power-function EMA with relative std `std` (edm2, Eq. 3).

    The relative std of the profile t^gamma is sqrt((gamma+1) / ((gamma+2)^2 (gamma+3))), which
    decreases monotonically from sqrt(1/12) at gamma = 0; solved here by bisection in log gamma.
    """
    if not 0 < std < math.sqrt(1 / 12):
        raise EdifyError(f"EMA std must be in (0, {math.sqrt(1 / 12):.4f}), got {std}")

    def rel_std(g: float) -> float:
        return math.sqrt((g + 1) / ((g + 2) ** 2 * (g + 3)))

    lo, hi = -20.0, 20.0  # log gamma
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if rel_std(math.exp(mid)) > std:
            lo = mid
        else:
            hi = mid
    return math.exp(0.5 * (lo + hi))


class EMA:
    """fp32 shadow copies of a module's parameters, updated after every optimizer step."""

    def __init__(self, model: nn.Module, halflife_images: float = 0.0, rampup: float = 0.0,
                 decay: float = 0.0, std: float = 0.0):
        if sum(x > 0 for x in (halflife_images, decay, std)) != 1:
            raise EdifyError("EMA needs exactly one of halflife_images, decay, std > 0, got "
                             f"halflife_images={halflife_images}, decay={decay}, std={std}")
        self.halflife_images = halflife_images
        self.rampup = rampup
        self.decay = decay
        self.gamma = power_gamma(std) if std > 0 else None
        module = distributed.unwrap(model)
        self.shadow = {name: p.detach().float().clone() for name, p in module.named_parameters()}

    def beta(self, images_seen: int, batch_images: int) -> float:
        """Decay for the update made after `images_seen` images, the last `batch_images` of them new."""
        if self.decay > 0:
            return self.decay
        if self.gamma is not None:
            t = images_seen / batch_images  # number of optimizer steps so far
            return (1 - 1 / t) ** (self.gamma + 1) if t > 1 else 0.0  # edm2 Eq. 2
        halflife = self.halflife_images
        if self.rampup > 0:
            halflife = min(halflife, images_seen * self.rampup)
        return 0.5 ** (batch_images / max(halflife, 1e-8))  # half-life in images

    @torch.no_grad()
    def update(self, model: nn.Module, images_seen: int, batch_images: int) -> float:
        """shadow <- beta * shadow + (1 - beta) * theta; returns beta."""
        beta = self.beta(images_seen, batch_images)
        for name, p in distributed.unwrap(model).named_parameters():
            self.shadow[name].lerp_(p.detach().float(), 1.0 - beta)
        return beta

    def state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Full (unsharded, CPU) EMA weights with the model's buffers: a loadable model state dict.

        Collective under FSDP2; call it on every rank.
        """
        module = distributed.unwrap(model)
        out = {name: distributed.to_full(t).cpu() for name, t in self.shadow.items()}
        persistent = set(module.state_dict().keys())  # non-persistent buffers are rebuilt, not saved
        for name, b in module.named_buffers():
            if name in persistent:
                out[name] = distributed.to_full(b).detach().cpu()
        return out

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore from full tensors (as written by `state_dict`), resharding if the shadow is sharded."""
        missing = sorted(set(self.shadow) - set(state))
        if missing:
            raise EdifyError(f"EMA state lacks parameter(s): {', '.join(missing[:5])}")
        for name, t in self.shadow.items():
            full = state[name].float()
            if tuple(full.shape) != tuple(t.shape):
                raise EdifyError(f"EMA parameter {name} has shape {tuple(full.shape)}, model has {tuple(t.shape)}")
            t.copy_(distributed.shard_like(full, t))
