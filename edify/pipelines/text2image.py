"""Text-to-image with a Laplacian diffusion model: the diffusers-shaped entry point.

    pipe = TextToImagePipeline.from_pretrained("weights/emoji-64").to("cpu")
    images = pipe("red apple", style="twemoji", seed=0).images

A model folder holds `config.json` (network, process, sampling defaults, style vocabulary, text
encoder) and the weights as safetensors (one file, or shards named in `model.safetensors.index.json`).
Sampling starts at the coarsest stage and switches up (section 2.2); the pipeline only composes the
pieces of `edify.core`: a preconditioned network, classifier-free guidance, a schedule and a sampler.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from edify.conditioning import Cond
from edify.core.guidance import CFGDenoiser
from edify.core.laplacian import LaplacianProcess
from edify.core.precond import EDMPrecond
from edify.core.samplers import SAMPLERS, initial_state
from edify.core.schedules import laplacian_sigmas
from edify.core.seeding import generators
from edify.data.vocab import StyleVocab, make_cond
from edify.errors import EdifyError
from edify.networks.unet import UNet, UNetConfig

FORMAT = "edify-text2image"
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"


@dataclass(frozen=True)
class SamplingDefaults:
    """What a call uses when it does not say: steps are sampler steps summed over all stages."""

    num_steps: int = 24
    guidance_scale: float = 3.0
    sampler: str = "dpmpp_2m"
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0


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

    def to_dict(self) -> dict:
        d = asdict(self)
        d["switch_sigmas"], d["styles"] = list(self.switch_sigmas), list(self.styles)
        return {"format": FORMAT, **d}

    @staticmethod
    def from_dict(d: dict) -> PipelineConfig:
        d = dict(d)
        if d.pop("format", None) != FORMAT:
            raise EdifyError(f"not an {FORMAT} config (missing or wrong 'format' field)")
        try:
            d["defaults"] = SamplingDefaults(**d.get("defaults", {}))
            d["switch_sigmas"] = tuple(d.get("switch_sigmas", ()))
            d["styles"] = tuple(d.get("styles", ()))
            return PipelineConfig(**d)
        except TypeError as err:
            raise EdifyError(f"bad pipeline config: {err}") from None

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

    # -- loading and saving --------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, text_encoder=None) -> TextToImagePipeline:
        path = Path(path)
        if not path.is_dir():
            raise EdifyError(f"no model folder at {str(path)!r}")
        config_path = path / CONFIG_NAME
        try:
            config = PipelineConfig.from_dict(json.loads(config_path.read_text()))
        except FileNotFoundError:
            raise EdifyError(f"model folder {str(path)!r} has no {CONFIG_NAME}") from None
        except json.JSONDecodeError as err:
            raise EdifyError(f"corrupt {config_path}: {err}") from None
        network = UNet(UNetConfig.from_dict(config.network))
        state = _load_weights(path)
        expected = network.state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        if missing or unexpected:
            raise EdifyError(f"weights in {str(path)!r} do not match its config: {len(missing)} missing "
                             f"(e.g. {missing[:1]}), {len(unexpected)} unexpected (e.g. {unexpected[:1]})")
        for k, v in state.items():
            if v.shape != expected[k].shape:
                raise EdifyError(f"weights in {str(path)!r} do not match its config: {k!r} has shape "
                                 f"{tuple(v.shape)}, the config needs {tuple(expected[k].shape)}")
        network.load_state_dict({k: v.float() for k, v in state.items()})
        return cls(network, config, text_encoder)

    def save_pretrained(self, path: str | os.PathLike, dtype: torch.dtype = torch.float32,
                        max_shard_bytes: int = 16 * 2**20) -> None:
        """Write config.json and the weights (in `dtype`, sharded above `max_shard_bytes`)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().to("cpu", dtype).contiguous() for k, v in self.network.state_dict().items()}
        _save_weights(state, path, max_shard_bytes)
        (path / CONFIG_NAME).write_text(json.dumps(self.config.to_dict(), indent=2) + "\n")

    def to(self, device=None, dtype: torch.dtype | None = None) -> TextToImagePipeline:
        """Move the network; `dtype` bfloat16/float16 runs it under autocast (math stays fp32)."""
        if device is not None:
            self.device = torch.device(device)
            self.network.to(self.device)
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
                     guidance_scale: float, sampler: str) -> None:
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
        if not isinstance(num_steps, int) or num_steps < self.process.levels:
            raise EdifyError(f"num_steps must be an integer >= {self.process.levels} (one per stage), got {num_steps}")
        if not math.isfinite(guidance_scale) or guidance_scale < 0:
            raise EdifyError(f"guidance_scale must be finite and >= 0, got {guidance_scale}")
        if sampler not in SAMPLERS:
            raise EdifyError(f"unknown sampler {sampler!r}; known: {', '.join(SAMPLERS)}")

    def encode(self, prompts: list[str], styles: list[str | None]) -> Cond:
        """Conditions for a batch; the network's null text is an all-False mask (see Cond)."""
        vocab = self.vocab if len(self.vocab) else None
        return make_cond(self.text_encoder, prompts, styles if vocab else None, vocab, device=self.device)

    # -- sampling --------------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(self, prompt: str | list[str], negative_prompt: str | None = None,
                 style: str | list[str] | None = None, num_steps: int | None = None,
                 guidance_scale: float | None = None, seed: int | list[int] | None = None,
                 height: int | None = None, width: int | None = None, sampler: str | None = None,
                 num_images_per_prompt: int = 1, output_type: str = "pil",
                 callback=None) -> TextToImageOutput:
        d = self.config.defaults
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
        num_steps = d.num_steps if num_steps is None else num_steps
        guidance_scale = d.guidance_scale if guidance_scale is None else float(guidance_scale)
        sampler = d.sampler if sampler is None else sampler
        height = self.config.resolution if height is None else height
        width = self.config.resolution if width is None else width
        self.check_inputs(prompts, style, height, width, num_steps, guidance_scale, sampler)
        styles = style if isinstance(style, list) else [style] * len(prompts)
        if len(styles) != len(prompts):
            raise EdifyError(f"style list must have one entry per image ({len(prompts)}), got {len(styles)}")
        seeds = _seeds(seed, len(prompts))

        cond = self.encode(prompts, styles)
        negative = None
        if negative_prompt is not None and guidance_scale != 1:
            negative = self.encode([negative_prompt], [None])
        denoiser = EDMPrecond(self.network, self.config.sigma_data, dtype=self.dtype)
        guided = CFGDenoiser(denoiser, guidance_scale, negative=negative)
        sigmas = laplacian_sigmas(self.process, _split_steps(num_steps, self.process.levels),
                                  d.sigma_min, d.sigma_max, d.rho)
        gens = generators(seeds, device="cpu")
        x = initial_state(self.process, d.sigma_max, (len(prompts), 3, height, width), gens).to(self.device)
        x = SAMPLERS[sampler](guided, x, sigmas, self.process, cond, gens, callback)
        nfe = (len(sigmas) - 1) * (2 if sampler == "heun" else 1) - (1 if sampler == "heun" else 0)
        x = x.clamp(-1, 1)
        images = x.cpu() if output_type == "tensor" else to_pil(x)
        return TextToImageOutput(images=images, seeds=seeds, nfe=nfe)


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


def _split_steps(num_steps: int, levels: int) -> tuple[int, ...]:
    """num_steps spread over the stages, the remainder to the coarse (cheap) stages first."""
    base, extra = divmod(num_steps, levels)
    return tuple(base + (1 if levels - 1 - j < extra else 0) for j in range(levels))


def _save_weights(state: dict[str, torch.Tensor], path: Path, max_shard_bytes: int) -> None:
    shards, current, size = [], {}, 0
    for k, v in state.items():
        nbytes = v.numel() * v.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[k], size = v, size + nbytes
    shards.append(current)
    for old in list(path.glob("model*.safetensors")) + [path / INDEX_NAME]:
        old.unlink(missing_ok=True)
    if len(shards) == 1:
        _save_shard(shards[0], path / WEIGHTS_NAME)
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        _save_shard(shard, path / name)
        weight_map.update({k: name for k in shard})
    (path / INDEX_NAME).write_text(json.dumps({"weight_map": weight_map}, indent=1) + "\n")


def _save_shard(state: dict[str, torch.Tensor], file: Path) -> None:
    save_file(state, str(file), metadata={"format": "pt"})
    # safetensors creates its files owner-only (0600); give them the mode of any other new file
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(file, 0o666 & ~umask)


def _load_weights(path: Path) -> dict[str, torch.Tensor]:
    try:
        if (path / INDEX_NAME).exists():
            weight_map = json.loads((path / INDEX_NAME).read_text())["weight_map"]
            state = {}
            for name in sorted(set(weight_map.values())):
                state.update(load_file(str(path / name)))
            return state
        return load_file(str(path / WEIGHTS_NAME))
    except FileNotFoundError as err:
        raise EdifyError(f"model folder {str(path)!r} is missing weights: {Path(err.filename or '').name or err}") from None
    except (OSError, ValueError, KeyError, SafetensorError) as err:
        raise EdifyError(f"corrupt weights in {str(path)!r}: {str(err).splitlines()[0]}") from None
