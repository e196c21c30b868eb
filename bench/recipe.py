"""A CPU training recipe measured at a fixed budget: train a candidate for N CPU minutes, then score it.

    python bench/recipe.py --list
    python bench/recipe.py --data data/emoji --out runs/recipe --cpu-minutes 12 --candidate baseline
    python bench/recipe.py --data data/emoji --out runs/recipe --cpu-minutes 12 --candidate b16
    python bench/recipe.py --data data/emoji --out runs/recipe --cpu-minutes 12 --candidate b16 \\
        --eval-only --guidance 5                     # the trained candidate again, another guidance
    python bench/recipe.py --data data/emoji --out runs/recipe --model weights/emoji-64   # a model folder
    python bench/recipe.py --table --out runs/recipe  # results.jsonl as a markdown table
    python bench/recipe.py --smoke                    # seconds: tiny random model, tiny made-up data

Protocol (the same for every candidate, so that they differ only in their recipe):

- Training: the `emoji-64-cpu` preset (the shipped demo's recipe) with the candidate's `--set`
  overrides, on the train/ split of --data, seed 0, in this process at --threads (default 1) intra-op
  threads, stopped by the trainer's `max_cpu_minutes` budget: CPU time of the process (all threads,
  `time.process_time`) since the training loop started, so other load on the machine changes the
  wall time but not the work done. Data loading and caption encoding come before the loop and are
  not charged. The EMA weights of the final checkpoint are exported (fp32) and evaluated.
- Sampling: --sampler (dpmpp_2m) with --steps (24) steps over all stages, guidance --guidance (3),
  one image per validation sample: --num-samples (924 = the whole val/ split, each caption and style
  once, in `edify eval`'s seeded order; image i with seed i).
- FID and KID of the generated images against the 924 real validation images, Inception-v3 pool
  features (edify.eval; real features cached). KID is edify eval's (the unbiased MMD^2 of the full
  sets); kid_std is the standard deviation of the same estimate over 100 random subsets of half the
  samples of each set (462): a conservative error bar for the full-set figure.
- Prompt retrieval top-1 / top-5 (edify.eval.retrieval): a generated image is a hit at k when a real
  validation image of its caption (any style) is among the k nearest real validation images by
  cosine similarity of Inception features. Chance (a ranking independent of the image), averaged over
  the generated images: 1 - C(N - m, k) / C(N, k) with N = 924 real images and m the real images of
  the caption.
- Style separation: can the requested style be read off the generated image? A k-nearest-neighbour
  classifier (k = 5, cosine similarity of Inception features; majority vote, a tie going to the
  style whose tied neighbours have the larger summed similarity) is fit on a reference set of REAL
  TRAINING images: for each style, --style-ref-per-style (200) images drawn with seed 0, so 1,400 for
  the 7 emoji sets. Training images, not validation ones: the split is by emoji (all styles of an
  emoji fall in one split), so the reference shares no emoji with the validation captions and the
  classifier must recognise the style, not the drawing. style_acc = the fraction of generated
  images whose predicted style is the requested one. Chance: style_chance = sum_s q_s p_s with q the
  requested and p the predicted style frequencies (the accuracy of predictions independent of the
  request with the same marginals, as in Cohen's kappa); 1/7 = 0.143 for a uniform guess.
  style_kappa = (style_acc - style_chance) / (1 - style_chance). The same classifier on the 924 real
  validation images gives the ceiling, style_acc_real.

Each candidate prints one JSON line, which is also appended to <out>/results.jsonl; its run folder is
<out>/<candidate>-cpu<N>m (checkpoint, exported model/, samples.png: the first 49 generated images).
Choose among candidates here; do not tune further on the validation split.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edify.core.samplers import STOCHASTIC  # noqa: E402
from edify.pipelines.generate_cli import eta_value, guidance_value  # noqa: E402

PRESET = "emoji-64-cpu"
STYLE_K = 5
GRID = 49  # generated images kept for samples.png


def _network(**changes) -> str:
    """A `--set model=...` value: the emoji-64 network config with `changes`, as JSON."""
    from edify.networks.presets import get_config

    return json.dumps(dataclasses.replace(get_config("emoji-64"), **changes).to_dict(), separators=(",", ":"))


# name -> (what it tests, overrides of the emoji-64-cpu preset). The baseline runs first; every
# other candidate changes one thing against it. Stage 0 is the 64 px stage (4.2 GFLOP per image per
# training step with the emoji-64 network), stage 1 32 px (1.2), stage 2 16 px (0.4).
CANDIDATES: dict[str, tuple[str, tuple[str, ...]]] = {
    "baseline": ("the emoji-64-cpu preset as is (batch 32, lr 4e-4, EMA std 0.10, equal stage weights)", ()),
    "b16": ("batch 16 at the same lr: twice the optimizer steps for the same images", ("batch_size=16",)),
    "b64": ("batch 64 at the same lr: half the optimizer steps per image, less per-step overhead",
            ("batch_size=64",)),
    "lr1e-3": ("lr 1e-3 instead of 4e-4", ("lr=1e-3",)),
    "stages-coarse": ("stage weights 1:2:4 (64:32:16 px): the cheap coarse experts trained more often",
                      ("stage_weights=1,2,4",)),
    "wide96": ("finest U-Net level 96 channels instead of 64 (widths 96,128,256)",
               ("model=widths:96,128,256",)),
    "ema-short": ("EMA power profile std 0.05 instead of 0.10 (a shorter average)", ("ema_std=0.05",)),
    "noise-wide": ("training noise log-normal P_mean -0.8, P_std 1.6 instead of -1.2, 1.2 (more mass at "
                   "the ends of each stage's range)", ("P_mean=-0.8", "P_std=1.6")),
    "nested": ("expert ranges nested (coarse expert on all sigmas, next on sigma < s2*, finest on "
               "sigma < s1*) instead of truncated", ("expert_ranges=nested",)),
    "wide128": ("finest U-Net level 128 channels (widths 128,128,256)", ("model=widths:128,128,256",)),
    "pooled": ("the pooled condition (mean text token, camera and media tokens) added to the noise embedding "
               "of every residual block", ("model=pooled",)),
    "xattn0": ("cross-attention also at U-Net level 0 (the 16 x 16 Haar grid of a 64 px image)", ("model=xattn0",)),
    "grow": ("pooled and xattn0 together; with --init-from, the saved network grown by both", ("model=pooled+xattn0",)),
}


def candidate_overrides(name: str) -> list[str]:
    """The `--set` strings of a candidate, with network shorthands ("model=widths:a,b,c") expanded."""
    if name not in CANDIDATES:
        raise SystemExit(f"unknown candidate {name!r}; known: {', '.join(CANDIDATES)}")
    from edify.networks.presets import get_config

    out = []
    for item in CANDIDATES[name][1]:
        if item.startswith("model=widths:"):
            item = "model=" + _network(widths=tuple(int(w) for w in item.split(":", 1)[1].split(",")))
        elif item.startswith("model="):
            changes = {}
            for part in item.split("=", 1)[1].split("+"):
                if part == "pooled":
                    changes["pooled_cond"] = True
                elif part == "xattn0":
                    changes["cross_attention_levels"] = (0, *get_config("emoji-64").cross_attention_levels)
            item = "model=" + _network(**changes)
        out.append(item)
    return out


# A continuation (--init-from MODEL): the recipe that continued the shipped model, the same for
# every candidate; a candidate's network change must grow the saved network (Trainer.warm_start).
CONTINUATION = ("lr_decay_images=40000", "stage_weights=0.2,0.3,0.5")


def train_config(args, name: str):
    from edify.training.config import apply_overrides, get_preset

    base = get_preset(PRESET).replace(data=args.data, sample_images=0, max_cpu_minutes=args.cpu_minutes,
                                      name=f"recipe-{name}")
    if args.smoke:
        from edify.networks.presets import get_config

        base = base.replace(model=dataclasses.replace(get_config("tiny"), num_media_types=8).to_dict(),
                            batch_size=4, warmup_images=0, checkpoint_images=0, log_images=8,
                            text_cache=False)
    overrides = candidate_overrides(name)
    if args.smoke:  # the tiny network stays tiny
        overrides = [o for o in overrides if not o.startswith("model=")]
    if args.init_from:
        overrides = [f"init_from={args.init_from}", *CONTINUATION, *overrides]
    return apply_overrides(base, overrides)


# ---- metrics beyond edify.eval -----------------------------------------------------------------

def retrieval_chance(fake_captions: list[str], real_captions: list[str], k: int) -> float:
    """Mean over generated images of P(a caption's real image is in the top k of a random ranking)."""
    n = len(real_captions)
    counts: dict[str, int] = {}
    for c in real_captions:
        counts[c] = counts.get(c, 0) + 1
    total = 0.0
    for c in fake_captions:
        m, miss = counts[c], 1.0
        for t in range(min(k, n)):
            miss *= max(n - m - t, 0) / (n - t)
        total += 1.0 - miss
    return total / len(fake_captions)


def knn_styles(query, ref_features, ref_labels: list[str], k: int = STYLE_K) -> list[str]:
    """Style of each query row: majority of its k most cosine-similar reference rows (see docstring)."""
    import torch

    from edify.eval.retrieval import cosine_similarity_matrix

    names = sorted(set(ref_labels))
    lab = torch.tensor([names.index(s) for s in ref_labels])
    k = min(k, len(ref_labels))
    sim = cosine_similarity_matrix(query, ref_features)
    vals, idx = sim.topk(k, dim=1)
    votes = torch.zeros(query.shape[0], len(names), dtype=torch.float64)
    votes.scatter_add_(1, lab[idx], torch.ones_like(vals))
    sims = torch.zeros_like(votes).scatter_add_(1, lab[idx], vals)
    score = votes * (2 * k + 1) + sims + k * (votes > 0)  # votes first, then summed similarity
    return [names[i] for i in score.argmax(1).tolist()]


def style_scores(predicted: list[str], requested: list[str | None]) -> dict:
    pairs = [(p, r) for p, r in zip(predicted, requested) if r is not None]
    n = len(pairs)
    acc = sum(p == r for p, r in pairs) / n
    styles = sorted({r for _, r in pairs} | {p for p, _ in pairs})
    q = {s: sum(r == s for _, r in pairs) / n for s in styles}
    p = {s: sum(x == s for x, _ in pairs) / n for s in styles}
    chance = sum(q[s] * p[s] for s in styles)
    return {"style_acc": acc, "style_chance": chance,
            "style_kappa": (acc - chance) / (1 - chance) if chance < 1 else 0.0, "style_n": n}


def style_reference(args, extractor, cache, train=None):
    """(features [M, 2048], styles) of the classifier's reference: per style, --style-ref-per-style
    training images drawn with seed 0 (cached beside the real validation features). `train`: the
    training split if already loaded."""
    import torch

    from edify.eval.evaluate import load_split
    from edify.eval.fid import cache_key, reference_stats

    if train is None:
        train = load_split(args.data, "train", args.resolution)
    picked: list[int] = []
    for style in sorted({s for s in train.styles if s is not None}):
        rows = [i for i, s in enumerate(train.styles) if s == style]
        order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(0)).tolist()
        picked += sorted(rows[j] for j in order[:args.style_ref_per_style])
    picked.sort()
    labels = [train.styles[i] for i in picked]
    key = cache_key(str(Path(args.data).resolve()), "train", args.resolution, extractor.id,
                    train.fingerprint + f";style reference {args.style_ref_per_style} per style, seed 0")

    def compute():
        return extractor(train.images[picked]), {"styles": labels, "indices": picked}

    stats, meta = reference_stats(key, cache, compute)
    if meta.get("styles") != labels:
        raise SystemExit("cached style reference does not match the split; delete it from the cache")
    return stats.features, labels


class RecordingExtractor:
    """InceptionFeatures that also keeps every feature row it returns and the first GRID images."""

    def __init__(self, inner):
        self.inner, self.features, self.images = inner, [], []

    @property
    def id(self) -> str:
        return self.inner.id

    def __call__(self, images):
        f = self.inner(images)
        self.features.append(f)
        if sum(x.shape[0] for x in self.images) < GRID:
            self.images.append(images.detach().cpu()[:GRID])
        return f


def shrink_rule_value(text: str) -> str:
    """--shrink-rule's argparse type (bench/fine_band.py's)."""
    from bench.fine_band import rule_value

    return rule_value(text)


def shrink_value(text: str) -> float:
    """--shrink's argparse type (bench/fine_band.py's)."""
    from bench.fine_band import levels_value

    return levels_value(text)


# ---- one candidate -----------------------------------------------------------------------------

def cpu_probe() -> float:
    """CPU seconds of a fixed piece of work (200 fp32 512x512 matmuls, ~54 GFLOP): how much work a
    CPU second buys right now. Time slicing does not change it, but other load on the SMT sibling
    and the shared caches does, and so it changes what a CPU-minute budget trains; recorded before
    and after each training run so rows trained under different load can be told apart."""
    import torch

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(512, 512, generator=g), torch.randn(512, 512, generator=g)
    t = time.process_time()
    for _ in range(200):
        a @ b
    return round(time.process_time() - t, 3)


def run_dir_of(args, name: str) -> Path:
    start = f"-from-{Path(args.init_from).name}" if args.init_from else ""
    return Path(args.out) / f"{name}{start}-cpu{args.cpu_minutes:g}m"


def train_candidate(args, name: str, run_dir: Path) -> dict:
    import torch

    from edify.training.checkpoint import latest_checkpoint
    from edify.training.export import export_pipeline
    from edify.training.loop import Trainer

    config = train_config(args, name)
    if latest_checkpoint(run_dir) is not None:
        raise SystemExit(f"{run_dir} already holds checkpoints: evaluate it with --eval-only, or move it away")
    wall0 = time.perf_counter()
    trainer = Trainer(config, run_dir, device=torch.device("cpu"), command="python " + " ".join(sys.argv))
    setup_wall = time.perf_counter() - wall0
    probe_before = cpu_probe()
    cpu0, wall1 = time.process_time(), time.perf_counter()
    result = trainer.run()
    train_cpu, train_wall = time.process_time() - cpu0, time.perf_counter() - wall1
    probe_after = cpu_probe()
    model_dir = export_pipeline(run_dir, run_dir / "model")
    # per-stage mean loss over the last quarter of the steps (the stages trained differ by candidate)
    n = len(result.losses)
    first_step = result.step - n
    tail = range(n - max(1, n // 4), n)
    by_stage: dict[int, list[float]] = {}
    for i in tail:
        by_stage.setdefault(trainer.stage_for(first_step + i), []).append(result.losses[i])
    stage_steps = {s: 0 for s in trainer.stages}
    for i in range(n):
        stage_steps[trainer.stage_for(first_step + i)] += 1
    summary = {
        "images": result.images, "steps": result.step, "stop": result.stop,
        "train_cpu_minutes": round(train_cpu / 60, 2), "train_wall_minutes": round(train_wall / 60, 2),
        "setup_wall_minutes": round(setup_wall / 60, 2),
        "final_loss": round(sum(result.losses[i] for i in tail) / len(tail), 4) if n else None,
        "final_loss_by_stage": {str(s): round(sum(v) / len(v), 4) for s, v in sorted(by_stage.items())},
        "steps_by_stage": {str(s): c for s, c in stage_steps.items()},
        "img_per_cpu_s": round(result.images / max(train_cpu, 1e-9), 2),
        "cpu_probe_seconds": [probe_before, probe_after],
        "params_M": round(sum(p.numel() for p in trainer.net.parameters()) / 1e6, 2),
        "model": str(model_dir),
    }
    (run_dir / "recipe-train.json").write_text(json.dumps(summary, indent=2))
    return summary


def evaluate_candidate(args, model_dir: Path, grid_dir: Path, real, extractor, real_stats, style_ref) -> dict:
    import torch

    from edify.eval.evaluate import draw_prompts, evaluate_pipeline
    from edify.core.guidance import check_guidance
    from edify.eval.fid import kid
    from edify.pipelines.text2image import TextToImagePipeline, expert_folder
    from edify.training.monitor import save_grid

    pipe = TextToImagePipeline.from_pretrained(model_dir).to("cpu")
    # sampling settings other than the model's defaults: where the schedule ends, a stochastic
    # sampler's noise, thresholding of the guided estimate, the split of the steps across the stages
    overrides = {key: getattr(args, key) for key in ("sigma_min", "eta", "threshold", "shrink", "shrink_rule",
                                                       "stage_weights")
                 if getattr(args, key) is not None}
    pipe.config = dataclasses.replace(pipe.config, defaults=dataclasses.replace(pipe.config.defaults, **overrides))
    sigma_min = pipe.config.defaults.sigma_min
    # --guide-model DIR: one guide for every stage; STAGES=DIR (repeatable): a guide per stage
    guide = None
    if args.guide_model:
        loaded = {folder: TextToImagePipeline.from_pretrained(folder).to("cpu") for _, folder in args.guide_model}
        if len(args.guide_model) == 1 and args.guide_model[0][0] is None:
            guide = loaded[args.guide_model[0][1]]
        elif any(stages is None for stages, _ in args.guide_model):
            raise SystemExit("--guide-model: either one DIR for every stage or STAGES=DIR per stage")
        else:
            guide = {s: loaded[folder] for stages, folder in args.guide_model for s in stages}
    # --expert: these stages' experts instead of the model's own (None: the model's, as saved in its folder)
    experts = {}
    for stages, folder in args.expert:  # one model per folder, however many stages it serves
        experts.update(dict.fromkeys(stages, TextToImagePipeline.from_pretrained(folder).to("cpu")))
    recorder = RecordingExtractor(extractor)
    wall0, cpu0 = time.perf_counter(), time.process_time()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # FID below 2048 samples: the same counts for every candidate
        metrics = evaluate_pipeline(pipe, real, args.num_samples, sampler=args.sampler, steps=args.steps,
                                    guidance=args.guidance, style_guidance=args.style_guidance, seed=args.seed, metrics=("fid", "kid", "swd", "retrieval"),
                                    batch_size=args.batch, extractor=recorder, real_stats=real_stats, guide=guide,
                                    guide_uncond=args.guide_uncond, experts=experts or None,
                                    guide_weight=args.guide_weight)
    fake = torch.cat(recorder.features)
    indices = draw_prompts(real, args.num_samples, args.seed)
    # KID's spread: edify eval's KID uses the full sets (one subset, no spread); kid_std is the std of
    # the unbiased MMD^2 over 100 random subsets of half the samples of each set.
    half = max(2, min(fake.shape[0], real_stats.count) // 2)
    metrics["kid_half_mean"], metrics["kid_std"] = kid(real_stats.features, fake, 100, half, args.seed)
    metrics["kid_std_subset_size"] = half
    known = set(pipe.vocab.names)
    requested = [real.styles[j] if real.styles[j] in known else None for j in indices]
    ref_features, ref_labels = style_ref
    out = {**metrics, **style_scores(knn_styles(fake, ref_features, ref_labels), requested)}
    captions = [real.captions[j] for j in indices]
    out["retrieval_top1_chance"] = retrieval_chance(captions, real.captions, 1)
    out["retrieval_top5_chance"] = retrieval_chance(captions, real.captions, 5)
    out["sigma_min"] = sigma_min
    out["eta"] = pipe.config.defaults.eta if args.sampler in STOCHASTIC else None
    out["threshold"] = pipe.config.defaults.threshold
    out["shrink"] = pipe.config.defaults.shrink
    out["shrink_rule"] = pipe.config.defaults.shrink_rule if pipe.config.defaults.shrink else None
    out["stage_steps"] = list(pipe.stage_steps(args.steps))
    out["guide_model"] = None if not args.guide_model else (
        args.guide_model[0][1] if args.guide_model[0][0] is None
        else {stage_key(stages): folder for stages, folder in args.guide_model})
    out["guide_uncond"] = args.guide_uncond
    if not args.guide_model and pipe.config.stage_guides:  # the model's own guides, at its default or --guide-weight
        weight = pipe.config.defaults.guide_weight if args.guide_weight is None else args.guide_weight
        if any(check_guidance(weight)):
            out["guide_model"] = {k: f"{model_dir}/guide" if v == "guide" else "main"
                                  for k, v in pipe.config.stage_guides.items()}
        weight_used = weight
    else:
        weight_used = args.guide_weight
    out["guide_weight"] = list(weight_used) if isinstance(weight_used, (list, tuple)) else weight_used
    out["experts"] = {stage_key(stages): folder for stages, folder in args.expert} or \
        ({stage_key(g): f"{model_dir}/{expert_folder(g)}" for g in pipe.config.stage_experts} or None)
    out["eval_wall_minutes"] = round((time.perf_counter() - wall0) / 60, 2)
    out["eval_cpu_minutes"] = round((time.process_time() - cpu0) / 60, 2)
    grid = torch.cat(recorder.images)[:GRID]
    suffix = ("" if args.sampler == "dpmpp_2m" else f"-{args.sampler}") + \
        ("" if args.eta is None else f"-eta{scales_text(args.eta)}") + \
        ("" if args.threshold is None else f"-thr{args.threshold:g}") + \
        ("" if args.shrink is None else f"-shrink{args.shrink:g}") + \
        ("" if args.shrink_rule is None else f"-{args.shrink_rule}") + \
        ("" if args.guidance == 3.0 else f"-g{scales_text(args.guidance)}") + \
        ("" if args.style_guidance == 0 else f"-sg{args.style_guidance:g}") + \
        ("" if args.sigma_min is None else f"-smin{args.sigma_min:g}") + \
        ("" if args.stage_weights is None else f"-split{scales_text(args.stage_weights)}") + \
        "".join(f"-auto{'' if st is None else ''.join(map(str, st))}-{Path(f).name}" for st, f in args.guide_model) + \
        ("-uncond" if args.guide_uncond else "") + \
        ("" if args.guide_weight is None else f"-gw{scales_text(args.guide_weight)}") + \
        "".join(f"-expert{''.join(map(str, stages))}-{Path(folder).name}" for stages, folder in args.expert)
    save_grid(grid, grid_dir / f"samples{suffix}.png", columns=7)
    torch.save({"features": fake, "indices": indices, "requested_styles": requested},
               grid_dir / f"eval-features{suffix}.pt")  # for later metrics without regenerating
    return out


def real_swd_floor(real, train, cache: Path | None = None, seed: int = 0) -> dict:
    """SWD per scale between the validation images and as many training images drawn with `seed`:
    what two real sets of this size differ by (the split is by emoji, so no drawing is shared).
    A few CPU minutes; kept in `cache` under the two splits' fingerprints."""
    import hashlib

    import torch

    from edify.eval.swd import swd

    key = hashlib.sha1(f"{real.fingerprint}|{train.fingerprint}|{seed}".encode()).hexdigest()[:16]
    path = None if cache is None else Path(cache) / f"swd-floor-{key}.json"
    if path is not None and path.is_file():
        return json.loads(path.read_text())
    n = min(len(real.captions), len(train.captions))
    pick = torch.randperm(len(train.captions), generator=torch.Generator().manual_seed(seed))[:n]
    result = {f"{k}_real": v for k, v in swd(real.images[:n], train.images[pick]).items() if k != "swd"}
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(result))
        tmp.replace(path)
    return result


def real_style_ceiling(real, real_stats, style_ref) -> dict:
    ref_features, ref_labels = style_ref
    s = style_scores(knn_styles(real_stats.features, ref_features, ref_labels), list(real.styles))
    return {"style_acc_real": s["style_acc"], "style_kappa_real": s["style_kappa"]}


# ---- the table -----------------------------------------------------------------------------------

# (row key, table heading, format); rows written before a column existed show "-"
COLUMNS = (("candidate", "candidate", "{}"), ("sampler", "sampler", "{}"), ("eta", "eta", "{:g}"),
           ("threshold", "threshold", "{:g}"), ("shrink", "shrink", "{:g}"),
           ("shrink_rule", "shrink rule", "{}"),
           ("guidance", "guidance", "{:g}"),
           ("style_guidance", "style guidance", "{:g}"), ("sigma_min", "last sigma", "{:g}"),
           ("stage_steps", "steps per stage", "{}"), ("guide_model", "guide model", "{}"),
           ("experts", "stage experts", "{}"),
           ("images", "images seen", "{:,}"), ("train_cpu_minutes", "train CPU min", "{:.1f}"),
           ("wall_minutes", "wall min (all)", "{:.1f}"), ("final_loss", "final loss", "{:.4f}"),
           ("fid", "FID", "{:.1f}"), ("kid", "KID", "{:.4f}"), ("kid_std", "KID std", "{:.4f}"),
           ("retrieval_top1", "top-1", "{:.3f}"), ("retrieval_top5", "top-5", "{:.3f}"),
           ("style_acc", "style acc", "{:.3f}"), ("style_chance", "style chance", "{:.3f}"),
           ("swd_64", "SWD 64", "{:.1f}"), ("swd_32", "SWD 32", "{:.1f}"), ("swd_16", "SWD 16", "{:.1f}"))


def stage_weights_value(text: str) -> tuple[float, ...]:
    """An argparse type: '0.55,0.25,0.2' -> (0.55, 0.25, 0.2), each > 0."""
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"numbers separated by commas, finest stage first; got {text!r}") from None
    if not all(v > 0 and v < float("inf") for v in values):
        raise argparse.ArgumentTypeError(f"every stage weight must be finite and > 0, got {text!r}")
    return values


def stage_key(stages) -> str:
    """The stages an expert serves as a row key: (1, 2) -> '1,2' (the form --expert takes)."""
    return ",".join(map(str, stages))


def expert_value(text: str) -> tuple[tuple[int, ...], str]:
    """An argparse type: '0=runs/expert' -> ((0,), 'runs/expert'); '1,2=DIR' -> ((1, 2), 'DIR')."""
    stages, sep, folder = text.partition("=")
    stages = stages.split(",")
    if not sep or not all(s.strip().isdigit() for s in stages) or not folder.strip():
        raise argparse.ArgumentTypeError(f"STAGES=DIR with stage numbers (0 = finest), got {text!r}")
    return tuple(int(s) for s in stages), folder.strip()


def guide_value(text: str) -> tuple[tuple[int, ...] | None, str]:
    """An argparse type: 'DIR' -> (None, 'DIR'), a guide for every stage; 'STAGES=DIR' as --expert."""
    return expert_value(text) if "=" in text else (None, text)


def scales_text(v) -> str:
    """A guidance scale as written on the command line: 7 or 1,7,7 (one per stage)."""
    return ",".join(f"{x:g}" for x in v) if isinstance(v, (list, tuple)) else f"{v:g}"


def table(rows: list[dict]) -> str:
    head = [label for _, label, _ in COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = []
        for key, _, fmt in COLUMNS:
            v = r.get(key, 0.0 if key == "style_guidance" else None)  # rows before the option: none
            if key == "candidate" and r.get("eval_only") and not v.startswith("model:"):
                v += " (eval only)"
            if key == "guide_model" and v is not None:  # autoguidance: the guide, or one per stage
                v = ", ".join(f"{stage}={Path(folder).name}" for stage, folder in v.items()) if isinstance(v, dict) \
                    else Path(v).name + (" (uncond)" if r.get("guide_uncond") else "")
                if r.get("guide_weight") is not None:
                    v += f" x {scales_text(r['guide_weight'])}"
            if key == "experts" and v is not None:
                v = ", ".join(f"{stage}={Path(folder).name}" for stage, folder in v.items())
            cells.append("-" if v is None else scales_text(v) if isinstance(v, (list, tuple)) else fmt.format(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---- smoke data ----------------------------------------------------------------------------------

def smoke_dataset(folder: Path, n: int = 16, resolution: int = 64) -> Path:
    """<folder>/{train,val}/smoke-0000.tar: n coloured shapes each, two styles (disc / square)."""
    import io
    import tarfile

    from PIL import Image, ImageDraw

    for split in ("train", "val"):
        (folder / split).mkdir(parents=True, exist_ok=True)
        with tarfile.open(folder / split / "smoke-0000.tar", "w") as tf:
            for i in range(n):
                im = Image.new("RGB", (resolution, resolution), "white")
                r, c = 8 + 3 * (i % 6), resolution // 2
                style = ("noto", "twemoji")[i % 2]
                shape = ImageDraw.Draw(im).ellipse if style == "noto" else ImageDraw.Draw(im).rectangle
                shape((c - r, c - r, c + r, c + r), fill=((40 * i) % 256, 90, 200 - 10 * i))
                buf = io.BytesIO()
                im.save(buf, "PNG")
                meta = json.dumps({"caption": f"shape number {i // 2}", "style": style}).encode()
                for name, payload in ((f"{i:04d}.{resolution}.png", buf.getvalue()), (f"{i:04d}.json", meta)):
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tf.addfile(info, io.BytesIO(payload))
    return folder


# ---- main ----------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="data/emoji", help="dataset folder with train/ and val/ (emoji layout)")
    parser.add_argument("--out", default="runs/recipe", help="run folders and results.jsonl go here")
    parser.add_argument("--cpu-minutes", type=float, default=None, help="training budget in CPU minutes")
    parser.add_argument("--candidate", action="append", default=[],
                        help="candidate name (repeatable or comma-separated; run in order); see --list")
    parser.add_argument("--init-from", default=None, metavar="MODEL",
                        help="continue this model folder instead of training from scratch (the continuation "
                             "recipe: " + ", ".join(CONTINUATION) + ")")
    parser.add_argument("--list", action="store_true", help="print the candidates and exit")
    parser.add_argument("--table", action="store_true", help="print <out>/results.jsonl as a markdown table")
    parser.add_argument("--eval-only", action="store_true",
                        help="evaluate an already trained candidate (its run folder) again, e.g. at another guidance")
    parser.add_argument("--model", default=None, metavar="DIR",
                        help="evaluate this model folder instead (no training; e.g. weights/emoji-64 for reference)")
    parser.add_argument("--sampler", default="dpmpp_2m")
    parser.add_argument("--eta", type=eta_value, default=None,
                        help="a stochastic sampler's fresh noise per step (default: the model's, 1)")
    parser.add_argument("--threshold", type=float, default=None,
                        help="thresholding of the guided estimate: 0 off, p in (0, 1) dynamic, 1 static "
                             "(default: the model's)")
    parser.add_argument("--shrink", type=shrink_value, default=None, metavar="LEVELS",
                        help="the finished images' finest band shrunk at this many 8-bit levels "
                             "(edify.core.thresholding.shrink_finest_band; 0: as sampled; default: the model's)")
    parser.add_argument("--shrink-rule", type=shrink_rule_value, default=None, metavar="RULE",
                        help="how --shrink treats the band: garrote, soft or hard (default: the model's)")
    parser.add_argument("--steps", type=int, default=24, help="sampler steps over all stages")
    parser.add_argument("--guidance", type=guidance_value, default=3.0,
                        help="guidance scale, or one per stage finest first (e.g. 1,7,7)")
    parser.add_argument("--style-guidance", type=float, default=0.0,
                        help="extra guidance along the style's direction (edify.core.guidance)")
    parser.add_argument("--sigma-min", type=float, default=None,
                        help="end the sampling schedule at this sigma (default: the model's defaults.sigma_min)")
    parser.add_argument("--guide-model", type=guide_value, action="append", default=[], metavar="[STAGES=]DIR",
                        help="autoguidance: guide with this weaker model (edify.core.guidance) instead of "
                             "the unconditional branch; STAGES=DIR (repeatable, with --guide-weight): the "
                             "guide of those stages only")
    parser.add_argument("--guide-uncond", action="store_true",
                        help="with --guide-model: the guide's unconditional estimate is the second branch")
    parser.add_argument("--guide-weight", type=guidance_value, default=None, metavar="A",
                        help="with --guide-model: add the autoguidance term A (D_c - D_guide) on top of "
                             "guidance instead of replacing its unconditional branch; one per stage, finest "
                             "first (e.g. 1,0,0: the scored model itself as the guide of its 64 px expert)")
    parser.add_argument("--expert", type=expert_value, action="append", default=[], metavar="STAGES=DIR",
                        help="a separate expert model for one stage or several (0 = finest, 1,2 = the "
                             "two coarser; docs/laplacian.md), "
                             "the scored model serving the others; repeatable")
    parser.add_argument("--stage-weights", type=stage_weights_value, default=None, metavar="W0,W1,W2",
                        help="split the steps across the stages by these weights, finest first "
                             "(default: the model's defaults.stage_weights)")
    parser.add_argument("--num-samples", type=int, default=924, help="generated images (924 = the val split)")
    parser.add_argument("--max-real", type=int, default=None, help="first N real validation images only")
    parser.add_argument("--style-ref-per-style", type=int, default=200,
                        help="real training images per style in the style classifier's reference")
    parser.add_argument("--seed", type=int, default=0, help="caption draw and sampling seed")
    parser.add_argument("--batch", type=int, default=32, help="generation / feature batch")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--cache", default=None, help="real-feature cache folder (default: edify eval's)")
    parser.add_argument("--smoke", action="store_true",
                        help="seconds-long check: tiny random network, made-up data, 3 CPU s of training, 8 samples")
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    names = [n.strip() for item in args.candidate for n in item.split(",") if n.strip()]

    if args.list:
        for name, (what, _) in CANDIDATES.items():
            print(f"{name:<14} {what}")
            for item in candidate_overrides(name):
                print(f"{'':<14}   --set {item if len(item) < 100 else item[:97] + '...'}")
        return
    results = Path(args.out) / "results.jsonl"
    if args.table:
        rows = [json.loads(x) for x in results.read_text().splitlines() if x.strip()]
        print(table(rows))
        return

    import torch

    torch.set_num_threads(args.threads)
    from edify.eval.cli import default_cache
    from edify.eval.evaluate import load_split, real_reference
    from edify.eval.features import InceptionFeatures

    tmp = tempfile.TemporaryDirectory(prefix="edify-recipe-")
    if args.smoke:
        args.data = str(smoke_dataset(Path(tmp.name) / "data"))
        args.out = str(Path(tmp.name) / "runs")
        args.cache = str(Path(tmp.name) / "cache")
        args.cpu_minutes = args.cpu_minutes or 0.05
        args.num_samples, args.steps, args.batch, args.style_ref_per_style = 8, 6, 8, 4
        names = names or ["baseline", "b16"]
        results = Path(args.out) / "results.jsonl"
    if args.model:
        names, args.eval_only, args.cpu_minutes = [f"model:{Path(args.model).name}"], True, args.cpu_minutes or 0.0
    elif not names:
        raise SystemExit("name a --candidate (see --list)")
    elif not args.cpu_minutes or args.cpu_minutes <= 0:
        raise SystemExit("--cpu-minutes must be > 0")
    for name in names if not args.model else []:
        candidate_overrides(name)  # unknown names fail before any work
        train_config(args, name)  # so do unknown config keys (e.g. a field this version lacks)
    print("command: python " + " ".join(sys.argv), flush=True)
    args.resolution = 64
    cache = Path(args.cache) if args.cache else default_cache()

    t0 = time.perf_counter()
    real = load_split(args.data, "val", args.resolution, max_images=args.max_real)
    extractor = InceptionFeatures("cpu", batch_size=args.batch)
    real_stats = real_reference(real, args.data, "val", args.resolution, extractor, cache)
    train = load_split(args.data, "train", args.resolution)
    style_ref = style_reference(args, extractor, cache, train)
    ceiling = {**real_style_ceiling(real, real_stats, style_ref), **real_swd_floor(real, train, cache)}
    del train
    floor = " / ".join(f"{ceiling[f'swd_{r}_real']:.1f}" for r in (64, 32, 16) if f"swd_{r}_real" in ceiling)
    print(f"references ready in {time.perf_counter() - t0:.0f} s: {real_stats.count} real val images, "
          f"style reference {len(style_ref[1])} train images; classifier on real val: "
          f"{ceiling['style_acc_real']:.3f}; real-vs-real SWD 64 / 32 / 16: {floor}", flush=True)

    for name in names:
        run_dir = Path(args.model) if args.model else run_dir_of(args, name)
        wall0 = time.perf_counter()
        if args.model:
            summary = {"model": str(run_dir)}
        elif args.eval_only:
            summary_file = run_dir / "recipe-train.json"
            if not summary_file.is_file():
                raise SystemExit(f"{run_dir} has no trained candidate (recipe-train.json); train it first")
            summary = json.loads(summary_file.read_text())
        else:
            print(f"[{name}] training for {args.cpu_minutes:g} CPU minutes into {run_dir}", flush=True)
            summary = train_candidate(args, name, run_dir)
            print(f"[{name}] trained: {json.dumps(summary)}", flush=True)
        model_dir = run_dir if args.model else run_dir / "model"
        grid_dir = Path(args.out) / name.replace(":", "-") if args.model else run_dir
        metrics = evaluate_candidate(args, model_dir, grid_dir, real, extractor, real_stats, style_ref)
        row = {"candidate": name, "cpu_budget_minutes": None if args.model else args.cpu_minutes,
               "init_from": None if args.model else args.init_from,
               "overrides": [] if args.model else candidate_overrides(name),
               **summary, "sampler": args.sampler, "sample_steps": args.steps, "guidance": args.guidance,
               "style_guidance": args.style_guidance,
               "seed": args.seed, **metrics, **ceiling, "style_ref_per_style": args.style_ref_per_style,
               "threads": args.threads, "eval_only": args.eval_only,
               "wall_minutes": round((time.perf_counter() - wall0) / 60, 2),
               "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        if args.eval_only:
            row["wall_minutes"] = row["eval_wall_minutes"]
        print(json.dumps(row), flush=True)
        results.parent.mkdir(parents=True, exist_ok=True)
        with open(results, "a") as f:
            f.write(json.dumps(row) + "\n")
    if args.smoke:
        print(table([json.loads(x) for x in results.read_text().splitlines()]))
    tmp.cleanup()


if __name__ == "__main__":
    main()
