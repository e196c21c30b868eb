"""Text-to-image with a Laplacian diffusion model: the diffusers-shaped entry point.

    pipe = TextToImagePipeline.from_pretrained("weights/emoji-64").to("cpu")
    images = pipe("red apple", style="twemoji", seed=0).images

A model folder holds `config.json` (network, process, sampling defaults, style vocabulary, text
encoder) and the weights as safetensors (one file, or shards named in `model.safetensors.index.json`).
Sampling starts at the coarsest stage and switches up (section 2.2); the pipeline only composes the
pieces of `edify.core`: a preconditioned network, classifier-free guidance, a schedule and a sampler.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image

from edify.conditioning import Cond
from edify.core.cascade import entry_sigmas
from edify.core.guidance import CFGDenoiser, check_guidance, unguided
from edify.core.laplacian import LaplacianProcess
from edify.core.precond import EDMPrecond, StageDenoisers, finishing_stages
from edify.core.samplers import SAMPLERS, STOCHASTIC, initial_state, sampler_nfe, stage_etas
from edify.core.schedules import SAMPLING, default_stage_weights, laplacian_sigmas, split_steps
from edify.core.seeding import generators
from edify.core.thresholding import (check_shrink, check_shrink_rule, check_threshold, maybe_threshold,
                                     shrink_finest_band)
from edify.data.vocab import StyleVocab, make_cond
from edify.errors import EdifyError
from edify.networks.unet import UNet, UNetConfig
from edify.pipelines.model_io import (CONFIG_NAME, SavedModel, from_json, inside, model_folder, naming, read_json,
                                      save_model, scan_weights)

FORMAT = "edify-text2image"


@dataclass(frozen=True)
class SamplingDefaults:
    """What a call uses when it does not say: steps are sampler steps summed over all stages,
    split across the stages by `stage_weights` (finest first; empty = the measured default,
    `edify.core.schedules.default_stage_weights`) and placed in each stage with `rho` and
    `ramp_weight` (`edify.core.schedules.laplacian_sigmas`)."""

    num_steps: int = 24
    # one scale, or one per stage (finest first; a stage at 1 runs no unconditional branch)
    guidance_scale: float | tuple[float, ...] = 3.0
    # extra guidance along the style's own direction (edify.core.guidance; 0 = plain guidance)
    style_guidance: float = 0.0
    sampler: str = SAMPLING.sampler
    # the noise of a stochastic sampler (edify.core.samplers.STOCHASTIC; 1 = the reverse SDE)
    eta: float | tuple[float, ...] = 1.0
    # thresholding of the guided estimate (edify.core.thresholding): 0 off, p in (0, 1) dynamic, 1 static
    threshold: float = 0.0
    # the finished image's finest Laplacian band shrunk at this many 8-bit levels by shrink_rule
    # (edify.core.thresholding.shrink_finest_band: garrote, soft or hard; shrink 0 = off)
    shrink: float = 0.0
    shrink_rule: str = "garrote"
    sigma_min: float = SAMPLING.sigma_min
    sigma_max: float = SAMPLING.sigma_max
    rho: float = SAMPLING.rho
    ramp_weight: float = SAMPLING.ramp_weight
    stage_weights: tuple[float, ...] = SAMPLING.stage_weights
    # the autoguidance term's weight (edify.core.guidance: guide_weight), one or one per stage
    # (finest first), with the model's own guides (PipelineConfig.stage_guides); 0 = off
    guide_weight: float | tuple[float, ...] = 0.0
    # a cascade upsampler's reconstruction guidance weight when a call gives none (edify.core.reconstruction;
    # 0 = off); a text-to-image model ignores it
    reconstruction_guidance: float = 0.0


@dataclass(frozen=True)
class PipelineConfig:
    """Everything but the weights: JSON in `config.json`."""

    network: dict
    levels: int = 3
    switch_sigmas: tuple[float, ...] = (1.0, 5.0)
    ramp: str = "cosine"
    ramp_width: float = 2.0
    sigma_data: float = 0.5
    resolution: int = 64
    text_encoder: str = "minilm"
    text_max_length: int = 77
    styles: tuple[str, ...] = ()
    defaults: SamplingDefaults = field(default_factory=SamplingDefaults)
    # the experts' noise ranges (edify.core.precond.stage_sigma_ranges); "nested" models can also
    # finish at a coarse stage. Folders written before the field existed are "truncated".
    expert_ranges: str = "truncated"
    # A cascade upsampler (edify.core.cascade) was trained only on sigma <= max_sigma (full-res
    # units; 0 = every sigma, a text-to-image model) and on train_size px windows (0 = resolution):
    # larger outputs run in tiles of that size.
    max_sigma: float = 0.0
    train_size: int = 0
    # The lowest sigma the model was trained on (full-res units; 0 = down to 0): a sampling call
    # must end at sigma_min >= min_sigma. Folders written before the field existed have 0.
    min_sigma: float = 0.0
    # Separate expert networks (section 2.2.2's mixture of experts; stage 0 = finest): one entry per
    # network, the stages it serves, saved in the subfolder `expert-<stages joined by '-'>` (a model
    # folder of its own, the same network config); the main network serves the other stages. A bare
    # stage number stands for a network of that stage alone. Empty: one network for every stage.
    stage_experts: tuple[tuple[int, ...], ...] = ()
    # The model's own autoguidance guides, used with defaults.guide_weight: {stage: "main" | "guide"}
    # (stage as a string key, 0 = finest). "main": the main network guides that stage's expert (the
    # network it was trained on from); "guide": the network in the subfolder `guide/` (a model folder
    # of its own, of the same task; e.g. this model trained for less long) guides the main network.
    # A guide that is the network serving its stage in a call is skipped (its term would be 0).
    stage_guides: dict[str, Literal["main", "guide"]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["switch_sigmas"], d["styles"] = list(self.switch_sigmas), list(self.styles)
        d["stage_experts"] = [group[0] if len(group) == 1 else list(group) for group in self.stage_experts]
        return {"format": FORMAT, **d}

    @staticmethod
    def from_dict(d: dict) -> PipelineConfig:
        """The config of a `config.json` object: each field checked against its declared type (lists
        become tuples), then the network config, the Laplacian process and the style list it holds."""
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise EdifyError(f"not an {FORMAT} config (missing or wrong 'format' field)")
        d = {k: v for k, v in d.items() if k != "format"}
        if isinstance(d.get("stage_experts"), list):  # a bare stage number is a one-stage group
            d["stage_experts"] = [[s] if isinstance(s, int) and not isinstance(s, bool) else s
                                  for s in d["stage_experts"]]
        config = from_json(PipelineConfig, d, "pipeline config")
        with naming("field 'network'"):
            UNetConfig.from_dict(config.network)
        _ = config.process, StyleVocab(config.styles)  # their own checks: a bad process or style list
        with naming("field 'defaults'"):
            stage_etas(config.defaults.eta, config.levels)
            check_threshold(config.defaults.threshold)
            check_shrink(config.defaults.shrink)
            check_shrink_rule(config.defaults.shrink_rule)
        if not (math.isfinite(config.min_sigma) and 0 <= config.min_sigma < config.defaults.sigma_max):
            raise EdifyError(f"field 'min_sigma' must be a number in [0, sigma_max), got {config.min_sigma}")
        stages = [s for group in config.stage_experts for s in group]
        if any(not 0 <= s < config.levels for s in stages) or len(set(stages)) != len(stages) or \
                not all(config.stage_experts):
            raise EdifyError(f"field 'stage_experts' must list distinct stages in 0..{config.levels - 1}, "
                             f"got {config.to_dict()['stage_experts']}")
        bad = [k for k in config.stage_guides if not (k.isdigit() and int(k) < config.levels)]
        if bad:
            raise EdifyError(f"field 'stage_guides' must have stage keys in 0..{config.levels - 1}, got {bad}")
        with naming("field 'defaults'"):
            weights = check_guidance(config.defaults.guide_weight, "guide_weight")
        if len(weights) not in (1, config.levels):
            raise EdifyError(f"field 'defaults': guide_weight needs 1 or {config.levels} values, got {len(weights)}")
        if config.min_sigma > config.defaults.sigma_min:
            raise EdifyError(f"field 'defaults': sigma_min {config.defaults.sigma_min:g} is below the model's "
                             f"min_sigma {config.min_sigma:g}")
        return config

    @property
    def process(self) -> LaplacianProcess:
        return LaplacianProcess(self.levels, self.switch_sigmas, self.ramp, self.ramp_width)


@dataclass
class TextToImageOutput:
    images: list  # PIL images, or one float tensor [B, 3, H, W] in [-1, 1] with output_type="tensor"
    seeds: list[int]
    nfe: int  # network evaluations per image (guidance doubles the batch, not the count)


class TextToImagePipeline:
    """Prompt -> image with a Laplacian diffusion model and classifier-free guidance."""

    def __init__(self, network: UNet, config: PipelineConfig, text_encoder=None):
        self.network = network.eval().requires_grad_(False)
        self.config = config
        self.process = config.process
        self.vocab = StyleVocab(config.styles)
        self._text_encoder = text_encoder
        self.device = torch.device("cpu")
        self.dtype = torch.float32
        # separate expert networks of some stages ({stage: UNet}; config.stage_experts when saved)
        self.experts: dict[int, UNet] = {}
        # the network of `guide/` (PipelineConfig.stage_guides), a model of the same task
        self.guide_model: TextToImagePipeline | None = None

    # -- loading and saving --------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, text_encoder=None) -> TextToImagePipeline:
        """Load a model folder. Its files are untrusted input: sizes, types, paths and values are checked
        before use (see edify.pipelines.model_io); every failure is a one-line EdifyError."""
        folder = model_folder(path)
        config_path = inside(folder, CONFIG_NAME, "model folder")
        if not os.path.lexists(config_path):
            raise EdifyError(f"model folder {str(folder)!r} has no {CONFIG_NAME}")
        data = read_json(config_path)
        with naming(config_path):
            config = PipelineConfig.from_dict(data)
        net_config = UNetConfig.from_dict(config.network)
        network, weights_dtype = load_network(folder, net_config)
        pipe = cls(network, config, text_encoder)
        pipe.weights_dtype = weights_dtype  # what save_pretrained writes unless told
        for stages in config.stage_experts:
            sub = inside(folder, expert_folder(stages), "field 'stage_experts'")
            if not sub.is_dir():
                raise EdifyError(f"model folder {str(folder)!r} lists an expert for stage "
                                 f"{'/'.join(map(str, stages))} but has no folder {expert_folder(stages)}")
            expert = load_network(sub, net_config)[0].eval().requires_grad_(False)
            pipe.experts.update(dict.fromkeys(stages, expert))
        if "guide" in config.stage_guides.values():
            sub = inside(folder, GUIDE_FOLDER, "field 'stage_guides'")
            if not sub.is_dir():
                raise EdifyError(f"model folder {str(folder)!r} lists a guide network in 'stage_guides' but has "
                                 f"no folder {GUIDE_FOLDER}")
            guide = TextToImagePipeline.from_pretrained(sub)
            pipe.partner_denoiser(guide, f"the guide network in {GUIDE_FOLDER}/")  # of the same task
            pipe.guide_model = guide
        return pipe

    def save_pretrained(self, path: str | os.PathLike, dtype: torch.dtype | None = None,
                        max_shard_bytes: int = 16 * 2**20) -> SavedModel:
        """Write config.json and the weights (sharded above `max_shard_bytes`), each file atomically.

        The weights are written in `dtype`: by default the dtype of the weights the model was loaded
        from, else the network's own. The returned SavedModel (also logged) says what was written.
        """
        if dtype is None:
            dtype = getattr(self, "weights_dtype", None) or next(self.network.parameters()).dtype
        groups = expert_groups(self.experts)  # one folder per network, however many stages it serves
        config = dataclasses.replace(self.config, stage_experts=tuple(groups))
        alone = dataclasses.replace(config, stage_experts=()).to_dict()
        for stages, expert in groups.items():  # each a model folder of its own
            save_model(Path(path) / expert_folder(stages), alone, network_state(expert, dtype), max_shard_bytes)
        if self.guide_model is not None:  # in the dtype it was loaded in
            self.guide_model.save_pretrained(Path(path) / GUIDE_FOLDER, max_shard_bytes=max_shard_bytes)
        return save_model(path, config.to_dict(), network_state(self.network, dtype), max_shard_bytes)

    def load_finetune(self, path: str | os.PathLike, scale: float = 1.0) -> TextToImagePipeline:
        """Apply a finetune delta folder at `scale` (0 = the base bit for bit, 1 = the finetune);
        its new style names join `vocab`. See edify.pipelines.finetune."""
        from edify.pipelines.finetune import load_finetune

        load_finetune(self, path, scale)
        return self

    def unload_finetune(self, path: str | os.PathLike | None = None) -> TextToImagePipeline:
        """Undo one loaded finetune (or all of them), restoring the base's exact weights."""
        from edify.pipelines.finetune import unload_finetune

        unload_finetune(self, path)
        return self

    def to(self, device=None, dtype: torch.dtype | None = None) -> TextToImagePipeline:
        """Move the network; `dtype` bfloat16/float16 runs it under autocast (math stays fp32)."""
        if device is not None:
            self.device = torch.device(device)
            self.network.to(self.device)
            for expert in self.experts.values():
                expert.to(self.device)
            if self.guide_model is not None:
                self.guide_model.network.to(self.device)
            if self._text_encoder is not None:
                self._text_encoder.to(self.device)
        if dtype is not None:
            self.dtype = dtype
        return self

    @property
    def text_encoder(self):
        if self._text_encoder is None:  # loaded on first use: it is the slowest part of start-up
            from edify.text.encoders import load_text_encoder
            self._text_encoder = load_text_encoder(self.config.text_encoder, self.config.text_max_length,
                                                   device=self.device)
        return self._text_encoder

    # -- inputs ----------------------------------------------------------------------------------

    @property
    def size_multiple(self) -> int:
        """Sides must survive levels-1 poolings and then the network's own downsampling."""
        return UNetConfig.from_dict(self.config.network).size_multiple * 2 ** (self.process.levels - 1)

    def check_inputs(self, prompts: list[str], style, height: int, width: int, num_steps: int,
                     guidance_scale: float | tuple[float, ...], sampler: str, final_stage: int = 0,
                     steps_per_stage: tuple[int, ...] | None = None) -> None:
        for p in prompts:
            if not isinstance(p, str) or not p.strip():
                raise EdifyError("prompt must be a non-empty string, got an empty one")
        styles = style if isinstance(style, list) else [style]
        for s in styles:
            self.vocab.index(s)  # raises, listing the known styles
        m = self.size_multiple
        for name, v in (("height", height), ("width", width)):
            if not isinstance(v, int) or v <= 0 or v % m:
                raise EdifyError(f"{name} must be a positive multiple of {m} for this model, got {v}")
        self.check_final_stage(final_stage)
        stages = self.process.levels - final_stage
        if steps_per_stage is not None:
            if len(steps_per_stage) != self.process.levels:
                raise EdifyError(f"steps per stage needs {self.process.levels} values (finest first), "
                                 f"got {len(steps_per_stage)}")
            if any(not isinstance(n, int) or n < 1 for n in steps_per_stage[final_stage:]):
                raise EdifyError(f"every stage needs at least one step, got steps per stage {tuple(steps_per_stage)}")
        elif not isinstance(num_steps, int) or num_steps < stages:
            raise EdifyError(f"num_steps must be an integer >= {stages} (one per stage), got {num_steps}")
        self.guidance(guidance_scale)
        if sampler not in SAMPLERS:
            raise EdifyError(f"unknown sampler {sampler!r}; known: {', '.join(SAMPLERS)}")

    def guidance(self, scale) -> float | tuple[float, ...]:
        """A guidance scale checked for this model: a number, or a tuple of one per stage."""
        scales = check_guidance(scale)
        if len(scales) == 1:
            return scales[0]
        if len(scales) != self.process.levels:
            raise EdifyError(f"per-stage guidance needs one scale per stage ({self.process.levels}, finest "
                             f"first), got {len(scales)}")
        return scales

    def check_final_stage(self, final_stage) -> None:
        """A model stops at stage j only if its stage-j expert was trained down to sigma 0."""
        K = self.process.levels
        if not isinstance(final_stage, int) or not 0 <= final_stage < K:
            raise EdifyError(f"final stage must be an integer in 0..{K - 1} for this {K}-level model, "
                             f"got {final_stage!r}")
        if final_stage not in finishing_stages(self.process, self.config.expert_ranges):
            raise EdifyError(f"this model cannot finish at stage {final_stage} "
                             f"({self.config.resolution >> final_stage} px): its experts were trained with "
                             f"{self.config.expert_ranges} noise ranges, which end at stage 0; a model "
                             f"trained with expert_ranges=nested can")

    def encode(self, prompts: list[str], styles: list[str | None]) -> Cond:
        """Conditions for a batch; the network's null text is an all-False mask (see Cond)."""
        vocab = self.vocab if len(self.vocab) else None
        return make_cond(self.text_encoder, prompts, styles if vocab else None, vocab, device=self.device)

    # -- sampling --------------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(self, prompt: str | list[str], negative_prompt: str | None = None,
                 style: str | list[str] | None = None, num_steps: int | None = None,
                 guidance_scale: float | Sequence[float] | None = None, seed: int | list[int] | None = None,
                 height: int | None = None, width: int | None = None, sampler: str | None = None,
                 num_images_per_prompt: int = 1, output_type: str = "pil",
                 callback=None, final_stage: int = 0,
                 steps_per_stage: tuple[int, ...] | None = None, denoiser_wrapper=None,
                 style_guidance: float | None = None, sigma_min: float | None = None,
                 guide: TextToImagePipeline | Mapping[int, TextToImagePipeline] | None = None,
                 guide_uncond: bool = False,
                 guide_weight: float | Sequence[float] | None = None,
                 eta: float | Sequence[float] | None = None,
                 threshold: float | None = None, shrink: float | None = None, shrink_rule: str | None = None,
                 experts: Mapping[int, TextToImagePipeline | UNet] | None = None,
                 image=None, start_sigma: float | None = None) -> TextToImageOutput:
        """Images for the prompts. num_steps: sampler steps over all stages, split by the model's
        `defaults.stage_weights` (or give `steps_per_stage`, finest first). guidance_scale: one
        classifier-free guidance scale, or one per stage (finest first, e.g. (1, 7, 7): no guidance
        at the finest stage, which then runs one network branch instead of two). final_stage = j returns
        the finished image at (height / 2^j, width / 2^j) for a model with nested expert ranges
        (section 2.2.3): a preview at a fraction of the cost. denoiser_wrapper(denoiser) -> denoiser
        wraps the preconditioned network before guidance (ControlNets, inpainting constraints).
        style_guidance: extra guidance along the style's own direction, w (D_c - D_{c without style}),
        on top of guidance_scale (one more network branch per step where it is not 0; default: the
        model's `defaults.style_guidance`); it acts on the images given a style. sigma_min: the
        full-resolution noise level where the schedule ends and the last denoised estimate is
        returned (default: the model's `defaults.sigma_min`). guide: autoguidance
        (`edify.core.guidance`): a weaker model of the same kind (e.g. this one trained for less long)
        whose conditional estimate replaces the unconditional one in guidance; with guide_uncond its
        unconditional estimate does (classifier-free guidance against the weaker model); with
        guide_weight a (one number, or one per stage) it adds a (D_c - D_guide) on top of
        classifier-free guidance instead (its main network against this model's stage expert: `guide=`
        this model itself, a at the expert's stage); guide may also be {stage: model}, one guide per
        stage (stages whose guide_weight is 0 need none). eta: the
        fresh noise of a stochastic sampler (`euler_sde`, `dpmpp_2m_sde`; 0 = its deterministic
        counterpart, 1 = the reverse SDE; or one per stage, finest first; default: the model's
        `defaults.eta`). threshold: Imagen's
        thresholding of the guided estimate (`edify.core.thresholding`: 0 off, p in (0, 1) dynamic at
        the p-quantile, 1 static; default: the model's `defaults.threshold`). shrink, shrink_rule: the
        returned image's finest Laplacian band shrunk at this many 8-bit levels by the rule
        ("garrote", "soft" or "hard"), its 2x2 block means kept
        (`edify.core.thresholding.shrink_finest_band`; shrink 0 = as sampled; default: the model's
        `defaults.shrink` and `defaults.shrink_rule`). experts: {stage:
        model or network}, a separate expert for a stage (stage 0 is the finest; section 2.2.2's
        mixture of experts): a model of the same task, checked like the guide, or a network of this
        model's config; this model's network serves the other stages. Default: the model's own
        (`self.experts`, saved in its folder), none while a finetune without parts for them is
        loaded at a scale other than 0 (it changed the main network only; at scale 0 it changed
        nothing); True the same default; {} or False runs the main network at every stage. image,
        start_sigma: image to image (SDEdit, Meng et al. 2022): sampling starts from `image` (a PIL
        image or a float tensor [B, 3, H, W] in [-1, 1], one for all prompts or one per image) put
        through the forward process to the full-resolution noise level start_sigma, at the stage
        that level belongs to (the 16 px stage of the demo model above 5, its 32 px stage from 1 to 5),
        and num_steps are spread over the stages from there down; the lower start_sigma, the more
        of the image is kept."""
        d = self.config.defaults
        if self.config.max_sigma and d.sigma_max > self.config.max_sigma:
            raise EdifyError(f"this model is an upsampler, trained only up to sigma {self.config.max_sigma:g}: "
                             f"it starts from an image (UpscalePipeline, `edify upscale`), not from noise")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
        num_steps = d.num_steps if num_steps is None else num_steps
        guidance_scale = self.guidance(d.guidance_scale if guidance_scale is None else guidance_scale)
        style_guidance = d.style_guidance if style_guidance is None else float(style_guidance)
        if not math.isfinite(style_guidance):
            raise EdifyError(f"style_guidance must be finite, got {style_guidance}")
        sigma_min = d.sigma_min if sigma_min is None else float(sigma_min)
        if not (math.isfinite(sigma_min) and 0 < sigma_min < d.sigma_max):
            raise EdifyError(f"sigma_min must be a number in (0, {d.sigma_max:g}), got {sigma_min}")
        if sigma_min < self.config.min_sigma:
            raise EdifyError(f"sigma_min must be >= {self.config.min_sigma:g}, the lowest noise level this model "
                             f"was trained on, got {sigma_min:g}")
        threshold = check_threshold(d.threshold if threshold is None else threshold)
        shrink = check_shrink(d.shrink if shrink is None else shrink)
        shrink_rule = check_shrink_rule(d.shrink_rule if shrink_rule is None else shrink_rule)
        sampler = d.sampler if sampler is None else sampler
        if eta is not None and sampler not in STOCHASTIC:
            raise EdifyError(f"eta applies only to the stochastic samplers ({', '.join(sorted(STOCHASTIC))}), "
                             f"not {sampler!r}")
        noise = {"eta": d.eta if eta is None else eta} if sampler in STOCHASTIC else {}
        height = self.config.resolution if height is None else height
        width = self.config.resolution if width is None else width
        self.check_inputs(prompts, style, height, width, num_steps, guidance_scale, sampler, final_stage,
                          steps_per_stage)
        styles = style if isinstance(style, list) else [style] * len(prompts)
        if len(styles) != len(prompts):
            raise EdifyError(f"style list must have one entry per image ({len(prompts)}), got {len(styles)}")
        seeds = _seeds(seed, len(prompts))

        cond = self.encode(prompts, styles)
        negative = None
        if negative_prompt is not None and not unguided(guidance_scale):
            negative = self.encode([negative_prompt], [None])
        denoiser = EDMPrecond(self.network, self.config.sigma_data, dtype=self.dtype)
        if experts is None or experts is True:  # the model's own, unless a finetune changed the main network only
            experts = self.experts if self.experts_kept() else {}
        elif experts is False:
            experts = {}
        if experts:
            denoiser = self.with_experts(denoiser, experts)
        if guide is None:
            guide, guide_weight = self.own_guides(experts, guide_weight, denoiser_wrapper is not None)
        guide_denoiser = None if guide is None else self.guide_denoiser(guide, guide_weight)
        if denoiser_wrapper is not None:
            denoiser = wrap_stages(denoiser, denoiser_wrapper)
            guide_denoiser = None if guide_denoiser is None else wrap_stages(guide_denoiser, denoiser_wrapper)
        styled = style_guidance != 0 and any(s is not None for s in styles) and len(self.vocab) > 0
        guided = CFGDenoiser(denoiser, guidance_scale, negative=negative,
                             terms=[(("media",), style_guidance)] if styled else (),
                             guide=guide_denoiser, guide_uncond=guide_uncond, guide_weight=guide_weight)
        guided = maybe_threshold(guided, threshold)
        gens = generators(seeds, device="cpu")
        if image is None:
            if start_sigma is not None:
                raise EdifyError("start_sigma needs an image to start from")
            sigmas = laplacian_sigmas(self.process, self.stage_steps(num_steps, final_stage, steps_per_stage),
                                      sigma_min, d.sigma_max, d.rho, d.ramp_weight, final_stage)
            x = initial_state(self.process, d.sigma_max, (len(prompts), 3, height, width), gens).to(self.device)
        else:
            x, sigmas = self.start_state(image, start_sigma, len(prompts), (height, width), num_steps, sigma_min,
                                         final_stage, steps_per_stage, gens)
        x = SAMPLERS[sampler](guided, x, sigmas, self.process, cond, gens, callback, final_stage=final_stage,
                              **noise)
        x = shrink_finest_band(x.clamp(-1, 1), shrink, shrink_rule).clamp(-1, 1)
        images = x.cpu() if output_type == "tensor" else to_pil(x)
        return TextToImageOutput(images=images, seeds=seeds, nfe=sampler_nfe(sampler, len(sigmas) - 1))

    def start_state(self, image, start_sigma, batch: int, size: tuple[int, int], num_steps: int,
                    sigma_min: float, final_stage: int, steps_per_stage, gens) -> tuple[torch.Tensor, torch.Tensor]:
        """(state, schedule) of image to image: `image` at the full-resolution noise level
        start_sigma, at its stage (`edify.core.cascade.entry_state`), and the schedule from there."""
        from edify.core.cascade import entry_state
        from edify.core.laplacian import down
        from edify.pipelines.control import image_tensor

        d = self.config.defaults
        if start_sigma is None:
            raise EdifyError("image to image needs start_sigma, the noise level sampling starts from")
        try:
            start = float(start_sigma)
        except (TypeError, ValueError):
            raise EdifyError(f"start_sigma must be a number, got {start_sigma!r}") from None
        if not (math.isfinite(start) and sigma_min < start <= d.sigma_max):
            raise EdifyError(f"start_sigma must be in ({sigma_min:g}, {d.sigma_max:g}] (the schedule's end and "
                             f"start), got {start_sigma}")
        if final_stage != 0:
            raise EdifyError("image to image finishes at full resolution: final_stage must be 0")
        x0 = image_tensor(image).float()
        if x0.shape[0] not in (1, batch):
            raise EdifyError(f"give one image for all {batch} images or one per image, got {x0.shape[0]}")
        if tuple(x0.shape[-2:]) != tuple(size):
            raise EdifyError(f"the image is {x0.shape[-1]}x{x0.shape[-2]}; this call makes {size[1]}x{size[0]} "
                             f"images (set height and width to the image's size)")
        x0 = x0.expand(batch, -1, -1, -1).clamp(-1, 1)
        stage = self.process.stage(start)
        if steps_per_stage is not None:
            sigmas = laplacian_sigmas(self.process, tuple(steps_per_stage), sigma_min, start, d.rho, d.ramp_weight)
        else:
            weights = d.stage_weights or default_stage_weights(self.process.levels)
            sigmas = entry_sigmas(self.process, start, num_steps, weights, sigma_min, d.rho, d.ramp_weight)
        x = entry_state(down(x0, stage), start, self.process, stage, generator=gens)
        return x.to(self.device), sigmas

    def experts_kept(self) -> bool:
        """Whether sampling uses the model's stage experts with the loaded finetunes: unless one at a
        scale other than 0 changed the main network but not every expert (edify.pipelines.finetune)."""
        from edify.pipelines.finetune import experts_kept

        return experts_kept(self)

    def with_experts(self, shared: EDMPrecond, experts: Mapping[int, TextToImagePipeline | UNet]) -> StageDenoisers:
        """`shared` for every stage but those in `experts` ({stage: model or network}), which get that
        model's preconditioned network (`edify.core.precond.StageDenoisers` routes each call by its stage)."""
        levels = self.process.levels
        for s in experts:
            if not isinstance(s, int) or not 0 <= s < levels:
                raise EdifyError(f"an expert's stage must be an integer in 0..{levels - 1} (0 = finest), got {s!r}")

        def expert(s: int, e) -> EDMPrecond:
            if isinstance(e, UNet):
                if e.config != UNetConfig.from_dict(self.config.network):
                    raise EdifyError(f"the expert network of stage {s} has another config than this model's network")
                return EDMPrecond(e.to(self.device), self.config.sigma_data, dtype=self.dtype)
            return self.partner_denoiser(e, "a stage expert")
        return StageDenoisers({s: expert(s, experts[s]) if s in experts else shared for s in range(levels)})

    def own_guides(self, experts: Mapping, guide_weight, wrapped: bool = False):
        """(guide, guide_weight) of a call that names no guide: the model's `stage_guides` with
        `defaults.guide_weight` (or the call's weight), the weight 0 at stages left without a guide.
        A "main" guide applies where an expert serves its stage in this call (`experts`); the `guide/`
        network is left out while a finetune is loaded at a scale other than 0 (it does not carry the
        finetune, so its term would scale the finetune's change up). Under a denoiser wrapper
        (`wrapped`: ControlNets, inpainting) the model's guides are off unless the call gives a weight."""
        if guide_weight is None and wrapped:
            return None, None
        weights = self.stage_guide_weights(self.config.defaults.guide_weight if guide_weight is None else guide_weight)
        if not any(weights):
            return None, None
        if not self.config.stage_guides:
            raise EdifyError("this model has no guides of its own (its config's 'stage_guides'): "
                             "give guide_weight with a guide model")
        finetuned = any(f.scale != 0 for f in getattr(self, "finetunes", []))
        guides = {}
        for key, kind in self.config.stage_guides.items():
            s = int(key)
            if kind == "main" and s in experts:
                guides[s] = self
            elif kind == "guide" and self.guide_model is not None and not finetuned:
                guides[s] = self.guide_model
        weights = tuple(a if s in guides else 0.0 for s, a in enumerate(weights))
        return (guides, weights) if guides and any(weights) else (None, None)

    def stage_guide_weights(self, guide_weight) -> tuple[float, ...]:
        """A guide weight (one number or one per stage) as one weight per stage, finest first."""
        weights = check_guidance(guide_weight, "guide_weight")
        levels = self.process.levels
        if len(weights) not in (1, levels):
            raise EdifyError(f"guide_weight needs 1 or {levels} values (finest first), got {len(weights)}")
        return weights * levels if len(weights) == 1 else weights

    def guide_denoiser(self, guide, guide_weight=None):
        """The autoguidance guide's denoiser: a model's main network at every stage, or
        {stage: model} routed by stage (`StageDenoisers`); every stage with a guide weight other
        than 0 needs its guide."""
        if not isinstance(guide, Mapping):
            return self.partner_denoiser(guide, "the guide")
        levels = self.process.levels
        for s in guide:
            if not isinstance(s, int) or not 0 <= s < levels:
                raise EdifyError(f"a guide's stage must be an integer in 0..{levels - 1} (0 = finest), got {s!r}")
        if not guide:
            raise EdifyError("guide: a {stage: model} mapping needs at least one stage")
        if guide_weight is None:
            raise EdifyError("a guide per stage ({stage: model}) adds its term with guide_weight; give one")
        weights = self.stage_guide_weights(guide_weight)
        missing = [s for s, a in enumerate(weights) if a != 0 and s not in guide]
        if missing:
            raise EdifyError(f"guide_weight is not 0 at stage(s) {missing}, which have no guide; guides are "
                             f"given for stages {sorted(guide)}")
        partners: dict[int, EDMPrecond] = {}
        for s, g in guide.items():  # one denoiser per distinct guide model
            partners[id(g)] = partners.get(id(g)) or self.partner_denoiser(g, f"the guide of stage {s}")
        return StageDenoisers({s: partners[id(g)] for s, g in guide.items()})

    def partner_denoiser(self, other: TextToImagePipeline, role: str = "the guide") -> EDMPrecond:
        """The preconditioned denoiser of another model that joins this one's sampling (the
        autoguidance guide, a stage expert), once it is checked to do this model's task: the same
        Laplacian process, resolution, text encoder and styles."""
        if not isinstance(other, TextToImagePipeline):
            raise EdifyError(f"{role} must be a TextToImagePipeline, got {type(other).__name__}")
        a, b = self.config, other.config
        for name in ("levels", "switch_sigmas", "ramp", "ramp_width", "sigma_data", "resolution",
                     "text_encoder", "text_max_length", "styles"):
            if getattr(a, name) != getattr(b, name):
                raise EdifyError(f"{role} differs from this model in {name} ({getattr(b, name)!r} vs "
                                 f"{getattr(a, name)!r}): it needs a model of the same task")
        return EDMPrecond(other.network.to(self.device), b.sigma_data, dtype=self.dtype)

    def stage_steps(self, num_steps: int, final_stage: int = 0,
                    steps_per_stage: tuple[int, ...] | None = None) -> tuple[int, ...]:
        """Steps per stage (finest first): `steps_per_stage`, or num_steps split over the stages
        from `final_stage` up by the model's `defaults.stage_weights`."""
        if steps_per_stage is not None:
            return tuple(steps_per_stage)
        weights = self.config.defaults.stage_weights or default_stage_weights(self.process.levels)
        if len(weights) != self.process.levels:
            raise EdifyError(f"the model's stage_weights need {self.process.levels} values, got {len(weights)}")
        used = split_steps(num_steps, weights[final_stage:])
        return (1,) * final_stage + used  # stages below final_stage are never run


GUIDE_FOLDER = "guide"


def load_network(folder: Path, net_config: UNetConfig) -> tuple[UNet, torch.dtype]:
    """A network of `net_config` with the weights of `folder` (counted before it is allocated) and
    the dtype they were stored in."""
    weights = scan_weights(folder)
    weights.check_count(net_config.num_weights)
    network = UNet(net_config)
    return network, weights.load_into(network)


def wrap_stages(denoiser, wrapper):
    """`wrapper(denoiser)`; for a StageDenoisers (a model with experts) each distinct stage
    denoiser wrapped on its own, so that a wrapper that needs a plain preconditioned network (a
    ControlNet's) reaches every stage's."""
    if not isinstance(denoiser, StageDenoisers):
        return wrapper(denoiser)
    wrapped: dict[int, torch.nn.Module] = {}
    for stage, d in denoiser.denoisers.items():
        wrapped[id(d)] = wrapped.get(id(d)) or wrapper(d)
    return StageDenoisers({int(stage): wrapped[id(d)] for stage, d in denoiser.denoisers.items()})


def network_state(net: torch.nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A network's state dict as saved: on the CPU, contiguous, floating-point tensors in `dtype`."""
    return {k: (v.detach().to("cpu", dtype) if v.is_floating_point() else v.detach().cpu()).contiguous()
            for k, v in net.state_dict().items()}


def expert_groups(experts: Mapping[int, torch.nn.Module]) -> dict[tuple[int, ...], torch.nn.Module]:
    """Stage experts {stage: network} as {the stages a network serves: network}, one entry per network."""
    groups: dict[int, list[int]] = {}
    for stage, net in sorted(experts.items()):
        groups.setdefault(id(net), []).append(stage)
    return {tuple(stages): experts[stages[0]] for stages in groups.values()}


def expert_folder(stages: tuple[int, ...]) -> str:
    """The subfolder of a model folder that holds the expert network of these stages."""
    return "expert-" + "-".join(str(int(s)) for s in stages)


def to_pil(x: torch.Tensor) -> list[Image.Image]:
    """[-1, 1] float images [B, 3, H, W] -> 8-bit PIL images."""
    arr = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(np.ascontiguousarray(a)) for a in arr]


def _seeds(seed, n: int) -> list[int]:
    if seed is None:
        base = int(torch.randint(0, 2**31 - 1, ()).item())
        return [base + i for i in range(n)]
    if isinstance(seed, int):
        return [seed + i for i in range(n)]
    seeds = [int(s) for s in seed]
    if len(seeds) != n:
        raise EdifyError(f"seed list must have one seed per image ({n}), got {len(seeds)}")
    return seeds
