"""CPU training throughput: fp32 against bf16 autocast, measured side by side on the trainer's own step.

One `Trainer` (a preset, default `emoji-64-cpu`: the demo network, batch 32) runs whole optimizer
steps of each Laplacian stage in turn, alternating the network's compute dtype between fp32 and
bf16 autocast on the same weights (the EDM math, the loss and AdamW stay fp32 in both). It prints
the median seconds per step of each stage, the images per second of the mix the preset trains
(its `stage_weights`), and the ratio. On a CPU with bf16 dot products (AVX512-BF16 or AMX) bf16
autocast is the faster choice; elsewhere it can be slower, which this bench shows before a run
commits to it (`edify train ... --set precision=bf16`).

It also checks the numerics: the training loss of each stage on the same images, sigmas and noise
in both dtypes (relative difference of the batch mean).

    python bench/cpu_train.py --threads 2                 # the demo preset, synthetic 64 px images
    python bench/cpu_train.py --threads 1 --reps 2        # quicker
    python bench/cpu_train.py --smoke                     # the tiny preset, seconds
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._cli import run_bench  # noqa: E402
from edify.core.precond import EDMPrecond  # noqa: E402
from edify.errors import EdifyError  # noqa: E402
from edify.training.config import get_preset  # noqa: E402
from edify.training.loop import Trainer  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="emoji-64-cpu")
    p.add_argument("--batch", type=int, default=None, help="images per step (default: the preset's)")
    p.add_argument("--reps", type=int, default=4, help="timed steps per stage and dtype")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per stage and dtype first")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--text-encoder", default=None,
                   help="the preset's by default; 'none' leaves out the text tokens (and cross-attention's work)")
    p.add_argument("--stage-weights", default=None,
                   help="the stage mix the img/s figure weighs, e.g. 0.2,0.3,0.5 (default: the preset's, else equal)")
    p.add_argument("--smoke", action="store_true", help="the tiny preset, one timed step per stage")
    args = p.parse_args(argv)
    if args.smoke:
        args.preset, args.reps, args.warmup, args.batch = "tiny-cpu", 1, 0, args.batch or 2
    return args


def build(args, run_dir: Path) -> Trainer:
    config = get_preset(args.preset)
    changes = dict(data=f"synthetic:{config.resolution}", data_in_memory=False, text_cache=True,
                   checkpoint_images=0, log_images=0, sample_images=0, total_images=10**9,
                   styles=("flat", "glossy"), precision="fp32", init_from="")
    if args.batch:
        changes["batch_size"] = args.batch
    if args.text_encoder:
        changes["text_encoder"] = args.text_encoder
    return Trainer(config.replace(**changes), run_dir, device=torch.device("cpu"))


def stage_weights(flag: str | None, preset: tuple, n: int) -> tuple[float, ...]:
    """--stage-weights as floats (n positive numbers), else the preset's, else equal."""
    if flag is None:
        return tuple(preset) or (1.0,) * n
    try:
        weights = tuple(float(v) for v in flag.split(","))
    except ValueError:
        weights = ()
    if len(weights) != n or not all(w > 0 for w in weights):
        raise EdifyError(f"--stage-weights takes {n} positive numbers, comma-separated; got {flag!r}")
    return weights


def loss_agreement(t: Trainer, denoisers: dict, stage: int, seed: int = 0) -> float:
    """|mean loss bf16 - mean loss fp32| / mean loss fp32 on one batch, same sigma and noise draws."""
    batch = t.stream.next()
    cond = t.make_cond(batch.caption, batch.style)
    x0 = batch.image.to(torch.float32)
    means = {}
    with torch.no_grad():
        for name, d in denoisers.items():
            gen = torch.Generator().manual_seed(seed)
            means[name] = float(t.loss_fn(d, x0, cond, stage, generator=gen).mean())
    return abs(means["bf16"] - means["fp32"]) / means["fp32"]


def run(args) -> int:
    if args.reps < 1 or args.warmup < 0:
        raise EdifyError(f"--reps must be >= 1 and --warmup >= 0, got {args.reps} and {args.warmup}")
    with tempfile.TemporaryDirectory() as tmp:
        t = build(args, Path(tmp))
        fp32 = t.denoiser
        denoisers = {"fp32": fp32, "bf16": EDMPrecond(fp32.net, fp32.sigma_data, torch.bfloat16)}
        stages = list(range(t.config.levels))
        weights = stage_weights(args.stage_weights, t.config.stage_weights, len(stages))
        times = {(n, s): [] for n in denoisers for s in stages}
        for rep in range(args.warmup + args.reps):
            for s in stages:
                for name, d in denoisers.items():  # alternate, so both see the same machine state
                    t.denoiser = d
                    t.stage_for = lambda step, s=s: s
                    start = time.perf_counter()
                    t.train_step()
                    if rep >= args.warmup:
                        times[(name, s)].append(time.perf_counter() - start)
        agree = {s: loss_agreement(t, denoisers, s) for s in stages}
    used_threads = torch.get_num_threads()
    batch = t.config.batch_size
    total = sum(weights)
    row = {"bench": "cpu_train", "preset": args.preset, "batch": batch, "threads": used_threads,
           "stage_weights": list(weights), "reps": args.reps}
    print(f"{args.preset}, batch {batch}, {used_threads} thread(s), median of {args.reps} steps per stage")
    print("| dtype | " + " | ".join(f"stage {s} s/step" for s in stages) + " | img/s (stage mix) |")
    print("|---|" + "---|" * (len(stages) + 1))
    for name in denoisers:
        med = [statistics.median(times[(name, s)]) for s in stages]
        mix = sum(w / total * m for w, m in zip(weights, med))
        row[f"{name}_s_per_step"] = [round(m, 4) for m in med]
        row[f"{name}_img_per_s"] = round(batch / mix, 2)
        print(f"| {name} | " + " | ".join(f"{m:.3f}" for m in med) + f" | {batch / mix:.1f} |")
    row["bf16_speedup"] = round(row["bf16_img_per_s"] / row["fp32_img_per_s"], 3)
    row["loss_rel_diff"] = [round(agree[s], 5) for s in stages]
    print(f"bf16 / fp32 throughput: {row['bf16_speedup']:.2f}x; loss relative difference per stage: "
          + ", ".join(f"{agree[s]:.2e}" for s in stages))
    print(json.dumps(row))
    return 0


def main(argv=None) -> int:
    return run_bench("cpu_train", parse_args(argv), run)


if __name__ == "__main__":
    sys.exit(main())
