"""Upscaling with a cascade upsampler (Edify Image sections 2.3 and 4): the diffusers-shaped entry point.

    pipe = UpscalePipeline.from_pretrained("weights/emoji-up-256").to("cpu")
    out = pipe(low_res_image, prompt="red apple", entry_sigma=0.8, seed=0)            # cascade upsampler
    pipe = UpscalePipeline.from_pretrained("weights/emoji-up-256", controlnet="weights/controlnet-up-256")
    out = pipe(low_res_image, guidance_weight=1.0, tile=128, overlap=32)    # + ControlNet, guidance, tiles

The model folder is a Laplacian model at the high resolution trained only on sigma <= max_sigma
(its config's `max_sigma`); the input image is a state of its stage k (side R / 2^k, scale 2^k),
forward-diffused to the entry sigma (`edify.core.cascade`) and sampled down to sigma 0 through the
switches. Each of these wraps the preconditioned denoiser, alone or together:

- an "upsample" ControlNet reading the clean input brought to full size (`up^k(y)`, nearest;
  `edify.core.control`), with its control weight;
- reconstruction guidance toward the input (`edify.core.reconstruction`, Ho et al. 2022), weight w;
- tiles for outputs larger than the model's training size (`edify.core.tiling`), the ControlNet's
  control cropped like the state.

Classifier-free guidance runs outside them, only when a prompt is given (the caption is optional:
without one the null prompt is used and the guidance scale is 1). Inputs whose sides the model
cannot take are padded (edge pixels repeated) and the output cropped back.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from edify.conditioning import Cond
from edify.core.cascade import check_entry_sigma, entry_range, entry_sigmas, upsample
from edify.core.control import Control, ControlledDenoiser
from edify.core.guidance import CFGDenoiser, unguided
from edify.core.laplacian import up
from edify.core.precond import EDMPrecond
from edify.core.reconstruction import ReconstructionGuidance
from edify.core.repaint import _batch
from edify.core.samplers import SAMPLERS, STOCHASTIC, sampler_nfe
from edify.core.schedules import default_stage_weights
from edify.core.seeding import generators
from edify.core.tiling import TiledDenoiser, make_tiles
from edify.errors import EdifyError
from edify.networks.controlnet import ControlNet
from edify.pipelines.control import ControlNetPipeline, image_tensor
from edify.pipelines.text2image import _seeds, to_pil

UPSAMPLE_KINDS = ("upsample", "custom")


@dataclass
class UpscaleOutput:
    images: list  # PIL images, or a float tensor [B, 3, s h, s w] in [-1, 1] with output_type="tensor"
    seeds: list[int]
    nfe: int  # network evaluations per image and tile (reconstruction guidance adds a backward pass each)
    tiles: int  # tiles per evaluation (1 = untiled)
    entry_sigma: float
    guidance_weight: float = 0.0  # the reconstruction guidance weight used


class UpscalePipeline(ControlNetPipeline):
    """Low-resolution image (+ optional prompt) -> image `scale` times larger."""

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, controlnet: str | os.PathLike | None = None,
                        text_encoder=None, **kwargs) -> UpscalePipeline:
        """The upsampler's model folder, and optionally an "upsample" ControlNet folder made for it."""
        return super().from_pretrained(path, controlnets=[] if controlnet is None else [controlnet],
                                       text_encoder=text_encoder, **kwargs)

    def add_controlnet(self, net: ControlNet) -> None:
        if self.controlnets:
            raise EdifyError("an upscaling pipeline takes one ControlNet")
        if net.config.kind not in UPSAMPLE_KINDS or net.config.control_channels != 3:
            raise EdifyError(f"this is a {net.config.kind} ControlNet with {net.config.control_channels} control "
                             f"channels, not an upsample one (3 channels: the input at full size)")
        super().add_controlnet(net)

    # -- what the model supports -------------------------------------------------------------------

    @property
    def max_sigma(self) -> float:
        return self.config.max_sigma or math.inf

    @property
    def scales(self) -> tuple[int, ...]:
        """Upscaling factors 2^k: input stages k whose entry range the training covered."""
        return tuple(2**k for k in range(1, self.process.levels)
                     if entry_range(self.process, k, self.max_sigma)[0] <= self.max_sigma)

    @property
    def train_size(self) -> int:
        return self.config.train_size or self.config.resolution

    def check_scale(self, scale: int) -> int:
        """k = log2(scale), or a one-line EdifyError listing the supported scales."""
        if scale not in self.scales:
            raise EdifyError(f"this upsampler supports scale {' or '.join(map(str, self.scales)) or 'none'}, "
                             f"got {scale!r}")
        return int(scale).bit_length() - 1

    def default_entry(self, scale: int) -> float:
        """The lowest entry sigma of a scale: s_k*, which keeps the most of the input."""
        return entry_range(self.process, self.check_scale(scale), self.max_sigma)[0]

    # -- sampling ----------------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(self, image, prompt: str | list[str] | None = None, negative_prompt: str | None = None,
                 style: str | list[str] | None = None,
                 scale: int | None = None, entry_sigma: float | None = None, num_steps: int | None = None,
                 guidance_scale: float | Sequence[float] | None = None, guidance_weight: float | None = None, control_weight: float = 1.0,
                 tile: int | None = None, overlap: int | None = None, feather: bool = True, max_tiles: int | None = None,
                 seed: int | list[int] | None = None, sampler: str | None = None, output_type: str = "pil",
                 callback=None) -> UpscaleOutput:
        """The input image(s) [B, 3, h, w] (or a PIL image) upscaled by `scale` (default: the largest).

        entry_sigma: full-resolution sigma where sampling enters (default s_k*, the lowest: keeps the
        most of the input; higher lets the model repaint). guidance_weight: reconstruction guidance w
        (0 = off; default: the model's `defaults.reconstruction_guidance`). control_weight: the
        ControlNet's weight, if the pipeline has one. tile / overlap: tile side and overlap in output
        pixels (default: tiles of the model's training size when the output is larger, overlapping by
        a quarter of it, at most 32 px). guidance_scale: classifier-free guidance (default 1 without a
        prompt).
        """
        d = self.config.defaults
        y = image_tensor(image, "the input image").float()
        scale = max(self.scales, default=0) if scale is None else scale
        k = self.check_scale(scale)
        entry = self.default_entry(scale) if entry_sigma is None else check_entry_sigma(
            self.process, k, entry_sigma, self.max_sigma)
        num_steps = d.num_steps if num_steps is None else num_steps
        guidance_weight = d.reconstruction_guidance if guidance_weight is None else guidance_weight
        guidance_scale = self.guidance((d.guidance_scale if prompt is not None else 1.0) if guidance_scale is None
                                       else guidance_scale)
        sampler = d.sampler if sampler is None else sampler
        self.check_inputs(["-"] if prompt is None else [prompt] if isinstance(prompt, str) else list(prompt), style, self.size_multiple, self.size_multiple, num_steps,
                          guidance_scale, sampler)
        B, (h, w) = y.shape[0], y.shape[-2:]
        y_pad = pad_to(y, self.size_multiple // scale).to(self.device)
        H, W = y_pad.shape[-2] * scale, y_pad.shape[-1] * scale
        tile = tile if tile is not None else (self.train_size if max(H, W) > self.train_size else max(H, W))
        overlap = min(32, tile // 4) if overlap is None else overlap
        tiles = make_tiles(H, W, tile, overlap, self.size_multiple, 4 * 2 ** (self.process.levels - 1))
        seeds = _seeds(seed, B)

        cond = self.condition(prompt, style, B)
        use_negative = negative_prompt is not None and not unguided(guidance_scale)
        negative = self.encode([negative_prompt], [None]) if use_negative else None
        denoiser = self.denoiser(y_pad, scale, control_weight, guidance_weight, (H, W), tile, overlap, feather,
                                 max_tiles)
        guided = CFGDenoiser(denoiser, guidance_scale, negative=negative)
        weights = d.stage_weights or default_stage_weights(self.process.levels)
        sigmas = entry_sigmas(self.process, entry, num_steps, weights, d.sigma_min, d.rho, d.ramp_weight)
        x = upsample(SAMPLERS[sampler], guided, y_pad, entry, self.process, sigmas, cond,
                     generators(seeds, device="cpu"), callback, **({"eta": d.eta} if sampler in STOCHASTIC else {}))
        x = x[..., :h * scale, :w * scale].clamp(-1, 1)
        images = x.cpu() if output_type == "tensor" else to_pil(x)
        return UpscaleOutput(images, seeds, sampler_nfe(sampler, len(sigmas) - 1), len(tiles), entry, guidance_weight)

    def condition(self, prompt: str | list[str] | None, style: str | list[str] | None, batch: int) -> Cond:
        """The prompts' condition (one for all or one per image), or the null prompt (no text encoder
        needed) when there is none."""
        styles = list(style) if isinstance(style, (list, tuple)) else [style] * batch
        prompts = [prompt] * batch if prompt is None or isinstance(prompt, str) else list(prompt)
        if len(styles) != batch or len(prompts) != batch:
            raise EdifyError(f"give one prompt and style for all images or one per image ({batch}), got "
                             f"{len(prompts)} and {len(styles)}")
        if prompt is not None:
            return self.encode(prompts, styles)
        dim = self.network.config.text_dim
        media = self.vocab.indices(styles) if len(self.vocab) else None
        return Cond(text=torch.zeros(batch, 1, dim), text_mask=torch.zeros(batch, 1, dtype=torch.bool),
                    media=media).to(self.device)

    def denoiser(self, y: Tensor, scale: int, control_weight: float, guidance_weight: float, size: tuple[int, int],
                 tile: int, overlap: int, feather: bool = True, max_tiles: int | None = None):
        """The preconditioned network with the ControlNet (if any), tiles and reconstruction guidance."""
        base = EDMPrecond(self.network, self.config.sigma_data, dtype=self.dtype)
        k = self.check_scale(scale)
        control = up(y, k) if self.controlnets else None  # the clean input at full size, read losslessly

        def plain(crop=None, rows: int = 0):
            if control is None:
                return base
            image = control if crop is None else torch.cat([_batch(c.crop(control), rows, "control") for c in crop])
            return ControlledDenoiser(base, [Control(self.controlnets[0], image, control_weight)])

        H, W = size
        if max(H, W) <= tile:
            denoiser = plain()
        else:
            denoiser = TiledDenoiser(None, H, W, tile, overlap, self.size_multiple, 4 * 2 ** (self.process.levels - 1),
                                     feather, max_tiles, tile_denoisers=plain)
        return ReconstructionGuidance(denoiser, y, guidance_weight) if guidance_weight else denoiser


def pad_to(y: Tensor, multiple: int) -> Tensor:
    """y padded on the right and bottom (edge pixels repeated) to sides that are multiples of `multiple`."""
    h, w = y.shape[-2:]
    if h == 0 or w == 0:
        raise EdifyError(f"the input image is empty ({h}x{w})")
    ph, pw = -h % multiple, -w % multiple
    return F.pad(y, (0, pw, 0, ph), mode="replicate") if ph or pw else y
