"""Named U-Net presets (one registry, the CLI's choices) and the network factory.

- `tiny`: for tests; runs in milliseconds on a CPU.
- `base-256`: the benchmark configuration of docs/benchmarks.md (widths 128-256-512-512 on the Haar
  48 x 64 x 64 input of a 256px image), comparable in size to the diffusers anchor (161M params).
- `emoji-64`: the demo base model; one network serves the three Laplacian stages 16/32/64 px through
  its stage embedding; text tokens from the bundled 384-dim MiniLM encoder; with `band_skip`
  (a noise-dependent gain per Haar subband, from input to output).
- `emoji-up-64-256`: the demo 4x upsampler (64 -> 256 px): three stages (64, 128, 256 px), the
  coarsest being the input's (the cascade enters there, edify.core.cascade).
"""

from __future__ import annotations

from edify.errors import EdifyError
from edify.networks.unet import UNet, UNetConfig

PRESETS: dict[str, UNetConfig] = {
    "tiny": UNetConfig(
        widths=(16, 32), num_res_blocks=1, self_attention_levels=(1,), cross_attention_levels=(1,),
        head_dim=8, mlp_ratio=2, text_dim=384, context_dim=32, num_media_types=4, num_stages=3,
        reference_resolution=64, fourier_dim=16, emb_dim=32, norm_groups=8),
    "base-256": UNetConfig(
        widths=(128, 256, 512, 512), num_res_blocks=2, self_attention_levels=(1, 2, 3),
        cross_attention_levels=(1, 2, 3), head_dim=64, mlp_ratio=4, text_dim=768, context_dim=768,
        num_media_types=8, num_stages=3, reference_resolution=256, fourier_dim=256, emb_dim=512),
    "emoji-64": UNetConfig(
        widths=(64, 128, 256), num_res_blocks=2, self_attention_levels=(1, 2),
        cross_attention_levels=(1, 2), head_dim=32, mlp_ratio=2, text_dim=384, context_dim=256,
        num_media_types=8, num_stages=3, reference_resolution=64, fourier_dim=128, emb_dim=256,
        band_skip=True),
    "emoji-up-64-256": UNetConfig(
        widths=(64, 128, 192, 256), num_res_blocks=1, self_attention_levels=(2, 3),
        cross_attention_levels=(2, 3), head_dim=32, mlp_ratio=2, text_dim=384, context_dim=256,
        num_media_types=8, num_stages=3, reference_resolution=256, fourier_dim=128, emb_dim=256,
        band_skip=True),
}


def get_config(name: str) -> UNetConfig:
    if name not in PRESETS:
        raise EdifyError(f"unknown network preset {name!r}; known: {', '.join(PRESETS)}")
    return PRESETS[name]


def build_network(name_or_config: str | UNetConfig) -> UNet:
    """A freshly initialised U-Net from a preset name or a config."""
    config = get_config(name_or_config) if isinstance(name_or_config, str) else name_or_config
    if not isinstance(config, UNetConfig):
        raise EdifyError(f"expected a preset name or UNetConfig, got {type(name_or_config).__name__}")
    return UNet(config)


def count_parameters(module) -> int:
    return sum(p.numel() for p in module.parameters())


def time_forward(name: str, side: int, batch: int, repeats: int = 20) -> float:
    """Median seconds of one inference forward at side x side on the current device (CPU)."""
    import time

    import torch

    from edify.conditioning import Cond

    net = build_network(name).eval()
    cfg = net.config
    x, c_noise = torch.randn(batch, cfg.in_channels, side, side), torch.randn(batch)
    cond = Cond(text=torch.randn(batch, 16, cfg.text_dim), text_mask=torch.ones(batch, 16, dtype=torch.bool))
    times = []
    with torch.inference_mode():
        for i in range(repeats + 3):
            t0 = time.perf_counter()
            net(x, c_noise, cond)
            if i >= 3:  # the first calls pick kernels
                times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


if __name__ == "__main__":
    # python -m edify.networks.presets [--time PRESET]: parameter counts, optional CPU forward times.
    import sys

    import torch

    for preset in PRESETS:
        with torch.device("meta"):
            print(f"{preset:18s} {count_parameters(build_network(preset)) / 1e6:8.2f}M parameters")
    if len(sys.argv) == 3 and sys.argv[1] == "--time":
        name = sys.argv[2]
        print(f"{name} forward, CPU, {torch.get_num_threads()} threads, median of 20:")
        for batch in (1, 2):
            side = get_config(name).reference_resolution
            print(f"  {side}x{side} batch {batch}: {1e3 * time_forward(name, side, batch):.1f} ms")
