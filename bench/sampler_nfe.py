"""FID of each sampler at 4, 8, 16, 32 and 64 network evaluations (NFE) with one model folder.

    python bench/sampler_nfe.py --data data/emoji --device cuda --num-samples 924      # the shipped model
    python bench/sampler_nfe.py --model runs/x/model --data data/emoji --nfe 8,16,64
    python bench/sampler_nfe.py --smoke                                                 # CPU, tiny random model

Every cell generates the same captions and seeds (drawn from the split, `edify eval`'s rule) and
compares them with the split's real images (Inception features cached as in `edify eval`).
Euler and DPM-Solver++(2M) spend one network call per step; Heun two per step but one on the last,
so its NFE is 2 * steps - 1 (the nearest to the target is used; the table shows the real NFE).
Every sampler needs at least one step per Laplacian stage, so a cell below that is skipped.
Target (docs/benchmarks.md): a 16-NFE sampler comes within 10% of the FID of a 64-NFE Heun run.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edify.eval.cli import default_cache  # noqa: E402
from edify.eval.evaluate import evaluate_pipeline, load_split, real_reference  # noqa: E402
from edify.eval.features import InceptionFeatures  # noqa: E402
from edify.pipelines.generate_cli import default_model  # noqa: E402
from edify.pipelines.text2image import TextToImagePipeline  # noqa: E402

SAMPLERS = ("euler", "heun", "dpmpp_2m")


def steps_for(sampler: str, nfe: int) -> int:
    """Sampler steps whose NFE is closest to `nfe` (Heun: 2 * steps - 1)."""
    return max(1, round((nfe + 1) / 2)) if sampler == "heun" else nfe


def tiny_model(folder: Path, resolution: int = 64) -> Path:
    """A random `tiny` network as a model folder (3 levels, MiniLM text, the emoji styles)."""
    from edify.networks.presets import build_network
    from edify.pipelines.text2image import PipelineConfig, SamplingDefaults

    torch.manual_seed(0)
    net = build_network("tiny")
    styles = ("emojione", "fluent-emoji", "noto", "twemoji")
    config = PipelineConfig(network=net.config.to_dict(), levels=3, switch_sigmas=(1.0, 5.0), resolution=resolution,
                            styles=styles, defaults=SamplingDefaults(num_steps=6, guidance_scale=2.0))
    TextToImagePipeline(net, config).save_pretrained(folder)
    return folder


def smoke_data(folder: Path, n: int = 16, resolution: int = 64) -> Path:
    """<folder>/val/smoke-0000.tar: n coloured-disc images with captions, when no emoji data exists."""
    import io
    import tarfile

    from PIL import Image, ImageDraw

    (folder / "val").mkdir(parents=True, exist_ok=True)
    with tarfile.open(folder / "val" / "smoke-0000.tar", "w") as tf:
        for i in range(n):
            im = Image.new("RGB", (resolution, resolution), "white")
            r = 8 + 3 * (i % 6)
            c = resolution // 2
            ImageDraw.Draw(im).ellipse((c - r, c - r, c + r, c + r), fill=((40 * i) % 256, 90, 200 - 10 * i))
            buf = io.BytesIO()
            im.save(buf, "PNG")
            meta = json.dumps({"caption": f"disc number {i}", "style": "noto"}).encode()
            for name, payload in ((f"{i:04d}.{resolution}.png", buf.getvalue()), (f"{i:04d}.json", meta)):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tf.addfile(info, io.BytesIO(payload))
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model folder (default: the shipped weights/emoji-64)")
    parser.add_argument("--data", default="data/emoji", help="dataset folder with split subfolders")
    parser.add_argument("--split", default="val")
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--max-real", type=int, default=None, help="first N real images only (default: all)")
    parser.add_argument("--nfe", default="4,8,16,32,64", help="comma-separated NFE targets")
    parser.add_argument("--samplers", default=",".join(SAMPLERS))
    parser.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the model's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--cache", default=None, help=f"real-feature cache (default: {default_cache()})")
    parser.add_argument("--smoke", action="store_true",
                        help="CPU check: tiny random model, 8 samples, 16 real images, NFE 4 and 8")
    args = parser.parse_args()
    print("command: python " + " ".join(sys.argv))
    tmp = tempfile.TemporaryDirectory(prefix="edify-sampler-nfe-")
    if args.smoke:
        args.model = str(tiny_model(Path(tmp.name) / "model"))
        if not (Path(args.data) / args.split).is_dir():
            args.data = str(smoke_data(Path(tmp.name) / "data"))
        args.num_samples, args.max_real, args.nfe, args.batch = 8, 16, "4,8", 8
        args.cache = str(Path(tmp.name) / "cache")
    model = Path(args.model) if args.model else default_model()
    nfes = [int(v) for v in args.nfe.split(",")]
    samplers = [s.strip() for s in args.samplers.split(",")]

    pipe = TextToImagePipeline.from_pretrained(model).to(args.device)
    guidance = pipe.config.defaults.guidance_scale if args.guidance is None else args.guidance
    resolution, levels = pipe.config.resolution, pipe.config.levels
    real = load_split(args.data, args.split, resolution, max_images=args.max_real)
    extractor = InceptionFeatures(args.device, batch_size=args.batch)
    real_stats = real_reference(real, args.data, args.split, resolution, extractor,
                                Path(args.cache) if args.cache else default_cache())
    print(f"model {model} ({resolution}px, {levels} levels), data {args.data}/{args.split}: "
          f"{args.num_samples} generated vs {real_stats.count} real, guidance {guidance}, seed {args.seed}")

    table: dict[tuple[str, int], dict] = {}
    for sampler in samplers:
        for target in nfes:
            steps = steps_for(sampler, target)
            if steps < levels:
                print(f"skip {sampler} at NFE {target}: needs >= {levels} steps (one per stage)")
                continue
            t = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the sample-count warning repeats for every cell
                r = evaluate_pipeline(pipe, real, args.num_samples, sampler=sampler, steps=steps,
                                      guidance=guidance, seed=args.seed, metrics=("fid", "kid"),
                                      batch_size=args.batch, extractor=extractor, real_stats=real_stats)
            r["seconds"] = round(time.perf_counter() - t, 2)
            table[(sampler, target)] = r
            print(json.dumps({"sampler": sampler, "target_nfe": target, "steps": steps, **r}))

    print(f"\nFID ({args.num_samples} samples vs {real_stats.count} real; NFE actually used in brackets)")
    print(f"{'sampler':<10}" + "".join(f"{'NFE ' + str(n):>16}" for n in nfes))
    for sampler in samplers:
        cells = [f"{table[(sampler, n)]['fid']:9.2f} [{table[(sampler, n)]['nfe']:>2}]" if (sampler, n) in table
                 else "-" for n in nfes]
        print(f"{sampler:<10}" + "".join(f"{c:>16}" for c in cells))
    anchor = table.get(("heun", 64))
    if anchor:
        best16 = min((table[(s, 16)]["fid"], s) for s in samplers if (s, 16) in table)
        print(f"best 16-NFE FID / 64-NFE Heun FID: {best16[0] / anchor['fid']:.3f} ({best16[1]}; target <= 1.10)")
    tmp.cleanup()


if __name__ == "__main__":
    main()
