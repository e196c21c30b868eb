"""Seconds for the cascade to make a 256 px image on the CPU, and what the upsampler cost to train.

    python bench/upscale_speed.py --threads 2 [--upscaler weights/emoji-up-256] [--run runs/up]
    python bench/upscale_speed.py --smoke          # < 1 min: tiny random models

Runs `edify generate --upscale PROMPT` (the shipped base model, then the upsampler) --repeats times
in a fresh process each, and prints the median of the time the command reports for making the
image (after loading) and of the whole command's wall time (start-up and loading included); the
target is <= 30 s on 2 quiet cores. With --run (the upsampler's training run folder) it also prints
the training cost from the run's runs.jsonl: images seen and wall / CPU minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def time_cascade(prompt: str, threads: int, repeats: int, extra: list[str]) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    made, walls = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(repeats):
            started = time.perf_counter()
            result = subprocess.run([sys.executable, "-m", "edify.cli", "generate", prompt, "--upscale", *extra,
                                     "--threads", str(threads), "--seed", str(i), "--quiet", "-o",
                                     str(Path(tmp) / "out.png")], capture_output=True, text=True, env=env, cwd=ROOT)
            walls.append(time.perf_counter() - started)
            if result.returncode != 0:
                raise SystemExit(f"upscale_speed: the cascade failed: {result.stderr.strip()}")
            made.append(float(re.search(r"each, ([0-9.]+) s", result.stdout).group(1)))
    return {"bench": "upscale_speed", "threads": threads, "repeats": repeats, "seconds_median": round(
        statistics.median(made), 2), "wall_seconds_median": round(statistics.median(walls), 2),
        "target_seconds": 30}


def training_cost(run: Path) -> dict:
    rows = [json.loads(line) for line in (run / "runs.jsonl").read_text().splitlines() if line.strip()]
    return {"bench": "upscale_training_cost", "run": str(run), "images": rows[-1]["images"],
            "wall_minutes": round(sum(r["wall_seconds"] for r in rows) / 60, 1),
            "cpu_minutes": round(sum(r.get("cpu_seconds", 0) for r in rows) / 60, 1),
            "devices": sorted({r["gpu"] for r in rows})}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompt", default="red heart")
    p.add_argument("--style", default="twemoji")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--model", default=None, help="base model folder (default: the shipped one)")
    p.add_argument("--upscaler", default=None, help="upsampler folder (default: weights/emoji-up-256)")
    p.add_argument("--run", default=None, help="the upsampler's training run folder (for its cost)")
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args(argv)
    extra = [args.upscaler] if args.upscaler else []
    extra += ["--model", args.model] if args.model else []
    extra += ["--style", args.style] if args.style else []
    if args.smoke:
        sys.path.insert(0, str(ROOT / "tests"))
        from test_cli import save_tiny_model
        from test_upscale import save_tiny_upscaler

        with tempfile.TemporaryDirectory() as tmp:
            base, up = save_tiny_model(Path(tmp) / "base"), save_tiny_upscaler(Path(tmp) / "up")
            print(json.dumps(time_cascade(args.prompt, 1, 1, [str(up), "--model", str(base), "--steps", "3"])))
        return 0
    print(json.dumps(time_cascade(args.prompt, args.threads, args.repeats, extra)))
    if args.run:
        print(json.dumps(training_cost(Path(args.run))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
