"""What a training run reports: scalars, loss by stage and noise level, throughput, MFU, sample grids.

Scalars go to TensorBoard when the optional `tensorboard` package is installed, and always to
`scalars.jsonl` in the run folder (one JSON object per log point), so a run is inspectable with
no extra dependency. MFU = counted training FLOPs per image x images per second / peak FLOP/s;
the FLOPs of one forward + backward are counted once per stage with torch.utils.flop_counter.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

# Edges of the noise-level bins (full-resolution sigma) the loss is reported in.
SIGMA_BIN_EDGES = (0.05, 0.2, 0.5, 1.0, 2.0, 5.0, 20.0)


def sigma_bin_names() -> list[str]:
    edges = ("0",) + tuple(f"{e:g}" for e in SIGMA_BIN_EDGES) + ("inf",)
    return [f"{lo}-{hi}" for lo, hi in zip(edges[:-1], edges[1:])]


class LossStats:
    """Running sums of the per-sample loss by stage and by sigma bin, between two log points."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)

    def add(self, loss: Tensor, sigma: Tensor, stage: int) -> None:
        loss, sigma = loss.detach().float().cpu(), sigma.detach().float().cpu()
        bins = torch.bucketize(sigma, torch.tensor(SIGMA_BIN_EDGES))
        names = sigma_bin_names()
        self.sums[f"loss/stage{stage}"] += float(loss.sum())
        self.counts[f"loss/stage{stage}"] += loss.numel()
        for b in bins.unique().tolist():
            sel = loss[bins == b]
            key = f"loss_sigma/{names[b]}"
            self.sums[key] += float(sel.sum())
            self.counts[key] += sel.numel()

    def means(self) -> dict[str, float]:
        return {k: self.sums[k] / self.counts[k] for k in sorted(self.sums) if self.counts[k]}


class ScalarWriter:
    """scalars.jsonl (always) and TensorBoard event files (when tensorboard is installed)."""

    def __init__(self, out_dir: str | Path, enabled: bool = True):
        self.enabled = enabled
        self.path = Path(out_dir) / "scalars.jsonl"
        self.tb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(Path(out_dir) / "tensorboard"))
        except ImportError:  # optional dependency
            self.tb = None

    def write(self, images: int, step: int, scalars: dict[str, float]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"images": images, "step": step, **scalars}) + "\n")
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, images)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def count_training_flops(denoiser, x: Tensor, sigma: Tensor, cond, stage: int) -> int:
    """FLOPs of one forward + backward of `denoiser` on the batch x (counted, not estimated)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    stage_t = torch.full((x.shape[0],), stage, dtype=torch.long, device=x.device)
    with counter:
        denoiser(x, sigma, cond, stage_t).float().square().mean().backward()
    for p in denoiser.parameters():
        p.grad = None
    return int(counter.get_total_flops())


def mfu(flops_per_image: float, images_per_s: float, peak_tflops: float) -> float:
    """Model FLOPs utilisation: achieved training FLOP/s over the accelerator's peak."""
    return flops_per_image * images_per_s / (peak_tflops * 1e12)


def save_grid(images: Tensor, path: str | Path, columns: int | None = None) -> Path:
    """Images [N, 3, H, W] in [-1, 1] tiled into one PNG (rows of `columns`)."""
    n, _, h, w = images.shape
    columns = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    x = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
    grid = torch.full((3, rows * h, columns * w), 255, dtype=torch.uint8)
    for i in range(n):
        r, c = divmod(i, columns)
        grid[:, r * h:(r + 1) * h, c * w:(c + 1) * w] = x[i]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(grid.permute(1, 2, 0).numpy())).save(path)
    return path
