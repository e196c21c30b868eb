"""From a training run to a model folder that `TextToImagePipeline.from_pretrained` loads.

The folder gets the EMA weights (or the raw ones) and a pipeline config carrying what sampling
needs from the training config: the network config, the Laplacian process (levels, switch
sigmas, ramp), sigma_data, the resolution, the text encoder and the style vocabulary.
"""

from __future__ import annotations

from pathlib import Path

import torch

from edify.errors import EdifyError
from edify.networks.presets import build_network
from edify.networks.unet import UNet, UNetConfig
from edify.pipelines.text2image import PipelineConfig, SamplingDefaults, TextToImagePipeline
from edify.training import checkpoint
from edify.training.config import TrainConfig

T5_DEFAULT_LENGTH = 512


def build_net(config: TrainConfig) -> UNet:
    """A freshly initialised network of a training config (preset name or config dict)."""
    model = config.model
    return build_network(UNetConfig.from_dict(model) if isinstance(model, dict) else model)


def pipeline_config(config: TrainConfig, net: UNet, text_max_length: int | None = None) -> PipelineConfig:
    """The sampling-side description of a model trained with `config`."""
    if config.text_encoder == "none":
        raise EdifyError("a text-to-image model needs a text encoder, got text_encoder='none'")
    if text_max_length is None:
        from edify.text.encoders import MINILM_DEFAULT_LENGTH

        text_max_length = MINILM_DEFAULT_LENGTH if config.text_encoder == "minilm" else T5_DEFAULT_LENGTH
    from edify.core.laplacian import LaplacianProcess

    process = LaplacianProcess(config.levels, config.switch_sigmas)
    return PipelineConfig(
        network=net.config.to_dict(), levels=config.levels, switch_sigmas=tuple(config.switch_sigmas),
        ramp=process.ramp, ramp_width=process.ramp_width, sigma_data=config.sigma_data,
        resolution=config.resolution, text_encoder=config.text_encoder, text_max_length=text_max_length,
        styles=tuple(config.styles),
        defaults=SamplingDefaults(num_steps=config.sample_steps * config.levels,
                                  guidance_scale=config.sample_guidance))


def export_pipeline(run_or_checkpoint: str | Path, out: str | Path, use_ema: bool = True,
                    dtype: torch.dtype = torch.float32) -> Path:
    """Write the latest checkpoint of a run folder (or the given checkpoint) as a model folder."""
    config, weights = checkpoint.load_weights(run_or_checkpoint, use_ema=use_ema)
    net = build_net(config)
    missing, unexpected = net.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise EdifyError(f"checkpoint weights do not fit its network config: {len(missing)} missing, "
                         f"{len(unexpected)} unexpected")
    TextToImagePipeline(net, pipeline_config(config, net)).save_pretrained(out, dtype=dtype)
    return Path(out)
