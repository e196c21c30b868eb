"""CPU threads against speed: generation seconds per image and training images per second.

    python bench/threads.py                        # 1 and 2 threads, the shipped model, `tiny-cpu`
    python bench/threads.py --threads 1,2,4 --images 4 --train-steps 20

For each thread count (set as `edify --threads N` sets it): the shipped demo model generates
--images 64 px images in one batch at its default steps (after a one-image warm-up; loading and
the text encoder are not timed), and the `tiny-cpu` training preset (synthetic data, no text
encoder) takes --train-steps optimizer steps after two warm-up steps. Prints one line per count.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edify.runtime import available_cpus, threads  # noqa: E402

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # the text encoder's loading bar


def generation_seconds_per_image(pipe, images: int, steps: int | None) -> float:
    pipe("red apple", style="twemoji", seed=0, num_steps=steps)  # warm-up
    start = time.perf_counter()
    pipe("red apple", style="twemoji", seed=1, num_steps=steps, num_images_per_prompt=images)
    return (time.perf_counter() - start) / images


def training_config():
    from edify.training.config import get_preset

    return get_preset("tiny-cpu").replace(text_encoder="none", text_cache=False, data="synthetic:64",
                                          checkpoint_images=0, sample_images=0)


def training_images_per_second(steps: int) -> float:
    from edify.training.loop import Trainer

    config = training_config()
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(config, out, device="cpu")
        for _ in range(2):  # warm-up
            trainer.train_step()
        start = time.perf_counter()
        for _ in range(steps):
            trainer.train_step()
        return steps * config.batch_size / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", default="1,2", help="comma-separated thread counts (default 1,2)")
    parser.add_argument("--images", type=int, default=2, help="images in the timed generation batch")
    parser.add_argument("--steps", type=int, default=None, help="sampler steps (default: the model's)")
    parser.add_argument("--train-steps", type=int, default=10, help="timed training steps")
    args = parser.parse_args(argv)
    import torch

    from edify.pipelines.generate_cli import default_model
    from edify.pipelines.text2image import TextToImagePipeline

    counts = [int(n) for n in args.threads.split(",")]
    pipe = TextToImagePipeline.from_pretrained(default_model()).to("cpu")
    _ = pipe.text_encoder
    print(f"torch {torch.__version__}, {available_cpus()} usable cores, load average {os.getloadavg()[0]:.1f}; "
          f"generation: {default_model().name}, batch {args.images}; "
          f"training: tiny-cpu, batch {training_config().batch_size}")
    print(f"{'threads':>7}  {'generate s/img':>14}  {'train img/s':>11}")
    for n in counts:
        with threads(n):
            seconds = generation_seconds_per_image(pipe, args.images, args.steps)
            rate = training_images_per_second(args.train_steps)
        print(f"{n:>7}  {seconds:>14.3f}  {rate:>11.1f}", flush=True)


if __name__ == "__main__":
    main()
