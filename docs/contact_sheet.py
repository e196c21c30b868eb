"""Draw a contact sheet of random training samples from the emoji webdataset shards.

    python docs/contact_sheet.py /path/to/emoji --out docs/emoji_contact_sheet.png

Reads `manifest.json` in the dataset folder, draws `--count` samples (seeded, uniformly over all
training samples) at `--size` px in a grid, each with its caption and style underneath.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import random
import textwrap
from pathlib import Path

import webdataset as wds
from PIL import Image, ImageDraw, ImageFont

CELL_WIDTH = 168
TEXT_LINES = 3
LINE_HEIGHT = 12


def load_training_samples(data: Path, size: int) -> list[tuple[bytes, dict]]:
    """(png bytes at `size`, metadata) for every training sample listed in the manifest."""
    manifest = json.loads((data / "manifest.json").read_text())
    if size not in manifest["sizes"]:
        raise SystemExit(f"size {size} not in the dataset's sizes {manifest['sizes']}")
    urls = [str(data / p) for p in manifest["shards"]["train"]]
    samples = []
    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        samples.append((sample[f"{size}.png"], json.loads(sample["json"])))
    return samples


def draw_sheet(samples: list[tuple[bytes, dict]], size: int, columns: int = 8) -> Image.Image:
    """A grid of images with two wrapped caption lines and the style in grey beneath each."""
    font = ImageFont.load_default(size=10)
    rows = math.ceil(len(samples) / columns)
    cell_height = size + 8 + TEXT_LINES * LINE_HEIGHT + 6
    sheet = Image.new("RGB", (columns * CELL_WIDTH, rows * cell_height), "white")
    draw = ImageDraw.Draw(sheet)
    for index, (png, meta) in enumerate(samples):
        x0, y0 = (index % columns) * CELL_WIDTH, (index // columns) * cell_height
        image = Image.open(io.BytesIO(png)).convert("RGB")
        sheet.paste(image, (x0 + (CELL_WIDTH - size) // 2, y0 + 4))
        draw.rectangle([x0, y0, x0 + CELL_WIDTH - 1, y0 + cell_height - 1], outline=(220, 220, 220))
        lines = textwrap.wrap(meta["caption"], width=28)[: TEXT_LINES - 1]
        for line_index, line in enumerate(lines):
            draw.text((x0 + 4, y0 + size + 8 + line_index * LINE_HEIGHT), line, fill="black", font=font)
        style = f"[{meta['style']}]" + ("" if meta.get("named", True) else " unnamed")
        draw.text((x0 + 4, y0 + size + 8 + (TEXT_LINES - 1) * LINE_HEIGHT), style, fill=(110, 110, 110), font=font)
    return sheet


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path, help="dataset folder holding manifest.json")
    parser.add_argument("--out", type=Path, default=Path("docs/emoji_contact_sheet.png"))
    parser.add_argument("--count", type=int, default=64)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    samples = load_training_samples(args.data, args.size)
    chosen = random.Random(args.seed).sample(samples, min(args.count, len(samples)))
    draw_sheet(chosen, args.size).save(args.out)
    print(f"drew {len(chosen)} of {len(samples)} training samples to {args.out}")


if __name__ == "__main__":
    main()
