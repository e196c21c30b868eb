"""Wall-clock per image: Laplacian multi-resolution sampling vs single-resolution sampling.

    python bench/sample_speed.py                                   # GPU: base-256, batch 64, bf16
    python bench/sample_speed.py --device cpu --preset tiny --size 64 --batch 1 --steps 12   # CPU smoke

Both runs use the same network (random weights of `--preset`; speed does not depend on them), the
same sampler and the same number of sampler steps, hence the same NFE: the multi-resolution run
(levels=3, switch sigmas 1 and 5, section 2.2) spends its early steps at 1/4 and 1/2 resolution;
the single-resolution run (levels=1: standard EDM in pixel space) spends every step at full
resolution. Text encoding is left out (a constant stand-in encoder), so only sampling is timed.
Target (docs/benchmarks.md): multi / single <= 0.45 at 256 px on the H100.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edify.networks.presets import build_network  # noqa: E402
from edify.pipelines.text2image import PipelineConfig, SamplingDefaults, TextToImagePipeline  # noqa: E402


class ConstantText:
    """Text encoder stand-in: the same 16 random token states for every prompt."""

    name, max_length = "constant", 16

    def __init__(self, dim: int, device):
        self.dim, self.device = dim, torch.device(device)
        self.states = torch.randn(1, 16, dim, generator=torch.Generator().manual_seed(0)).to(self.device)

    def to(self, device):
        self.device = torch.device(device)
        self.states = self.states.to(self.device)
        return self

    def encode(self, texts):
        B = len(texts)
        return self.states.expand(B, -1, -1), torch.ones(B, 16, dtype=torch.bool, device=self.device)


def make_pipeline(net, levels: int, size: int, device, dtype) -> TextToImagePipeline:
    switches = {1: (), 2: (1.0,), 3: (1.0, 5.0)}[levels]
    config = PipelineConfig(network=net.config.to_dict(), levels=levels, switch_sigmas=switches, resolution=size,
                            defaults=SamplingDefaults(guidance_scale=1.0))
    pipe = TextToImagePipeline(net, config, text_encoder=ConstantText(net.config.text_dim, device))
    return pipe.to(device, dtype=dtype)


def time_sampling(pipe, batch: int, steps: int, sampler: str, guidance: float, repeats: int,
                  device) -> tuple[float, int]:
    """Median seconds per image over `repeats` batches (after one warm-up batch), and the NFE."""
    prompts = ["a red heart"] * batch

    def once(seed):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        out = pipe(prompts, num_steps=steps, guidance_scale=guidance, sampler=sampler,
                   seed=list(range(seed, seed + batch)), output_type="tensor")
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t, out.nfe

    once(0)
    times, nfe = [], 0
    for r in range(repeats):
        t, nfe = once(1000 * (r + 1))
        times.append(t / batch)
    return statistics.median(times), nfe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--preset", default=None, help="network preset (default: base-256 on GPU, tiny on CPU)")
    parser.add_argument("--size", type=int, default=None, help="image side (default: 256 on GPU, 64 on CPU)")
    parser.add_argument("--batch", type=int, default=None, help="images per batch (default: 64 on GPU, 1 on CPU)")
    parser.add_argument("--steps", type=int, default=24, help="sampler steps, the same for both runs")
    parser.add_argument("--sampler", default="dpmpp_2m")
    parser.add_argument("--guidance", type=float, default=1.0, help="1 = no guidance batch doubling")
    parser.add_argument("--levels", type=int, default=3, help="pyramid levels of the multi-resolution run")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", default=None, help="bfloat16 or float32 (default: bfloat16 on GPU)")
    args = parser.parse_args()
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    preset = args.preset or ("base-256" if gpu else "tiny")
    size = args.size or (256 if gpu else 64)
    batch = args.batch or (64 if gpu else 1)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if gpu else torch.float32)
    print("command: python " + " ".join(sys.argv))
    torch.manual_seed(0)
    net = build_network(preset).to(device)

    rows = []
    for name, levels in (("multi-resolution", args.levels), ("single-resolution", 1)):
        pipe = make_pipeline(net, levels, size, device, dtype)
        seconds, nfe = time_sampling(pipe, batch, args.steps, args.sampler, args.guidance, args.repeats, device)
        rows.append((name, levels, nfe, seconds))
    if rows[0][2] != rows[1][2]:
        raise SystemExit(f"NFE differ: {rows[0][2]} vs {rows[1][2]}")
    where = torch.cuda.get_device_name(device) if gpu else f"CPU, {torch.get_num_threads()} threads"
    print(f"preset {preset}, {size}px, batch {batch}, {args.sampler} {args.steps} steps, "
          f"guidance {args.guidance}, {str(dtype).removeprefix('torch.')}, {where}")
    print(f"{'run':<18} {'levels':>6} {'NFE':>4} {'s/image':>10}")
    for name, levels, nfe, seconds in rows:
        print(f"{name:<18} {levels:>6} {nfe:>4} {seconds:>10.4f}")
    ratio = rows[0][3] / rows[1][3]
    print(f"ratio multi/single: {ratio:.3f}  (target <= 0.45 at 256px on the GPU)")


if __name__ == "__main__":
    main()
