"""How much faint pixel noise moves the multi-scale SWD: a yardstick for the finest band's figure.

`edify.eval.swd` normalises each image set's patch descriptors per colour channel and pyramid
level (as Karras et al. 2018 do), so a band's SWD compares the *shape* of its patch distribution,
not its energy. For flat-shaded drawings such as emoji, the finest band is zero almost everywhere
and large only at edges; a faint speckle over the flat fills changes that shape much more than its
size suggests. This bench measures it on real images: the SWD between the validation split and as
many training images drawn with seed 0 (the real-vs-real floor of bench/recipe.py, whose first row
this reproduces), then the same with Gaussian noise of each `--noise` std added to the training
images (values in [-1, 1], so std 0.01 is about 1.3 / 255), clamped to [-1, 1].

    python bench/swd_noise.py --data data/emoji --threads 2
    python bench/swd_noise.py --smoke                   # seconds: made-up flat images

One JSON line per noise level, then a table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _cli import run_bench  # noqa: E402

DEFAULT_NOISE = "0,0.005,0.01,0.02,0.03,0.05"


def noise_levels(text: str) -> list[float]:
    from edify.errors import EdifyError

    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or not all(0 <= v < float("inf") for v in values):
        raise EdifyError(f"--noise takes finite stds >= 0, comma-separated; got {text!r}")
    return values


def swd_under_noise(real, reference, stds: list[float], seed: int = 0) -> list[dict]:
    """SWD per scale between `real` and `reference` + N(0, std^2) (clamped to [-1, 1]) for each std;
    the noise of each level is drawn from its own seeded generator."""
    import torch

    from edify.eval.swd import swd

    rows = []
    for i, std in enumerate(stds):
        g = torch.Generator().manual_seed(seed * 1_000 + i)
        noisy = (reference + std * torch.randn(reference.shape, generator=g)).clamp(-1, 1) if std else reference
        result = swd(real, noisy)
        rows.append({"noise_std": std, **{k: round(v, 2) for k, v in result.items()}})
    return rows


def flat_images(n: int, size: int, seed: int):
    """Made-up flat-shaded images: each a background and one axis-aligned box of random colours."""
    import torch

    g = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 3, 1, 1, generator=g).mul(2).sub(1).expand(n, 3, size, size).clone()
    for k in range(n):
        y, x = torch.randint(0, size // 2, (2,), generator=g).tolist()
        h, w = torch.randint(size // 4, size // 2, (2,), generator=g).tolist()
        images[k, :, y:y + h, x:x + w] = torch.rand(3, 1, 1, generator=g).mul(2).sub(1)
    return images


def table(rows: list[dict]) -> str:
    scales = [k for k in rows[0] if k.startswith("swd_")]
    head = "| noise std | SWD " + " / ".join(k[4:] for k in scales) + " |\n|---|---|\n"
    return head + "\n".join(f"| {r['noise_std']:g} | " + " / ".join(f"{r[k]:.1f}" for k in scales) + " |"
                            for r in rows)


def run(args) -> int:
    import torch

    stds = noise_levels(args.noise)
    if args.smoke:
        real, train = flat_images(64, 32, seed=1), flat_images(64, 32, seed=2)
    else:
        from edify.eval.evaluate import load_split

        real = load_split(args.data, "val", args.resolution).images
        train = load_split(args.data, "train", args.resolution).images
    n = min(real.shape[0], train.shape[0])
    pick = torch.randperm(train.shape[0], generator=torch.Generator().manual_seed(0))[:n]
    rows = swd_under_noise(real[:n], train[pick], stds, seed=args.seed)
    for row in rows:
        print(json.dumps({"bench": "swd_noise", "images": n, **row}), flush=True)
    print(table(rows))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="data/emoji", help="a dataset with val/ and train/ splits")
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--noise", default=DEFAULT_NOISE, help=f"noise stds, comma-separated (default {DEFAULT_NOISE})")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise draws")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--smoke", action="store_true", help="made-up flat images instead of --data")
    return run_bench("swd_noise", p.parse_args(argv), run)


if __name__ == "__main__":
    sys.exit(main())
