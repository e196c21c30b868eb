"""Training configuration: one frozen dataclass, a registry of named presets, JSON round trip.

Training length, checkpoint, log and sample intervals are counted in images (as in edm2), so a run
means the same thing at any batch size or device count. `apply_overrides` turns the CLI's
`--set key=value` strings into a new config, checking each value against the field's type.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path

from edify.condition_fields import CONDITION_FIELDS
from edify.errors import EdifyError


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run depends on; saved beside every checkpoint as JSON."""

    name: str = "custom"
    # Network: a preset name of edify.networks.presets or a network config dict.
    model: str | dict = "tiny"
    # Laplacian process (section 2.2): pyramid levels and switch levels s1* < s2* < ... (full-res units).
    resolution: int = 16
    levels: int = 2
    switch_sigmas: tuple[float, ...] = (2.0,)
    # Mixture of experts (section 2.2.2): stages to train (empty = all), picked per step.
    stages: tuple[int, ...] = ()
    stage_sampling: str = "random"  # "random" (by stage_weights) | "round_robin"
    # empty = equal. May change when a run resumes (`--resume --set stage_weights=...`): a long run
    # can move its compute between stages, e.g. away from one that has begun to overfit.
    stage_weights: tuple[float, ...] = ()
    # Dropout in the residual blocks while each stage trains (one value per trained stage, in the
    # order of `stages`; empty = the network's own `dropout` for all). EDM's remedy for a stage that
    # memorises its training images (a coarse stage sees few distinct layouts) without slowing the
    # stages that do not. May change when a run resumes. Sampling never uses dropout.
    stage_dropout: tuple[float, ...] = ()
    # Noise range of each expert (edify.core.precond.stage_sigma_ranges): "nested" (the paper's:
    # stage j on every sigma below s_{j+1}*, so a model can also finish at a low resolution) or
    # "truncated" (stage j only where a full-resolution sampler uses it). A saved config without
    # this field is "truncated", the only mode before it existed.
    # Default truncated: at a fixed 12-CPU-minute budget the nested ranges trained the demo to FID
    # 359 against 320 (bench/recipe.md).
    expert_ranges: str = "truncated"
    # A cascade upsampler (section 2.3) is trained only on the noise it will see: sigma <= max_sigma
    # (full-res units; its largest entry sigma, edify.core.cascade). Stages wholly above it are not
    # trained. 0 = every sigma.
    max_sigma: float = 0.0
    # The lowest sigma trained (full-res units; 0 = down to 0): a model whose sampling ends at
    # sigma_min >= min_sigma never evaluates below it (the demo's default end is 0.4), and with the
    # EDM log-normal most of the finest stage's examples would lie there. Recorded in the exported
    # config; the pipeline refuses a sigma_min below it. May change when a run resumes.
    min_sigma: float = 0.0
    # Weight of each stage's finest band in the loss's squared error (edify.core.losses; 1 = the
    # plain EDM loss). Training only: the exported model does not depend on it. May change when a
    # run resumes.
    fine_band_weight: float = 1.0
    # Train on random crop x crop windows of the resolution-px images (0 = whole images), aligned
    # to the coarsest stage's Haar grid: valid for the fine stages of an upsampler (docs/upscale.md).
    crop: int = 0
    # EDM loss (Karras et al. 2022): log-normal sigma and data standard deviation.
    P_mean: float = -1.2
    P_std: float = 1.2
    sigma_data: float = 0.5
    # Optimisation.
    batch_size: int = 8  # global images per optimizer step
    grad_accum: int = 1
    lr: float = 2e-4
    warmup_images: int = 0
    lr_decay_images: int = 0  # inverse square-root decay after this many images (edm2); 0 = constant
    # Linear cool-down to 0 over the last cooldown_images before total_images (0 = none). It may be
    # set or changed when a run resumes: `--resume --set total_images=N --set cooldown_images=M`
    # ends a long run with M images of annealing, whatever schedule it had so far.
    cooldown_images: int = 0
    betas: tuple[float, ...] = (0.9, 0.99)
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # 0 = off
    max_nonfinite: int = 8  # consecutive non-finite steps before the run stops
    # EMA: half-life in images with a ramp-up (EDM); or, if set > 0, an edm2 power-function
    # profile of relative std ema_std, or a fixed decay ema_decay (these two override the half-life).
    ema_halflife_images: float = 5000.0
    ema_rampup: float = 0.05
    ema_std: float = 0.0
    ema_decay: float = 0.0
    # Length and intervals, in images (0 = never).
    total_images: int = 1024
    checkpoint_images: int = 512
    keep_last: int = 3
    log_images: int = 64
    sample_images: int = 0
    # Precision and speed.
    precision: str = "fp32"  # "fp32" | "bf16" (bf16 autocast; may change when a run resumes)
    compile: bool = False
    peak_tflops: float = 0.0  # accelerator peak for MFU; 0 = do not report MFU
    max_minutes: float = 0.0  # wall-clock budget from the trainer's start; then checkpoint and stop (0 = none)
    # CPU-time budget of the training loop (time.process_time: this process, all threads, from the
    # start of Trainer.run); then checkpoint and stop (0 = none). Unlike max_minutes it does not
    # shrink when other work shares the machine: fixed-budget comparisons (bench/recipe.py).
    max_cpu_minutes: float = 0.0
    # Conditioning (section 3.1): per-field dropout probabilities for classifier-free guidance.
    cond_drop: dict = field(default_factory=lambda: {"text": 0.1, "media": 0.1})
    weight_key: str = "weight"  # per-sample loss weight key in the data ("" = unweighted)
    # Data and text.
    data: str = "synthetic"
    # Load every sample once onto the training device and encode each unique caption once
    # (edify.training.memory_data); for datasets that fit in device memory, e.g. the emoji demo.
    data_in_memory: bool = False
    # Read the objects' alpha masks (`maskS.png` beside `S.png`) into Batch.mask: only the
    # inpainting ControlNet uses them, so they cost nothing otherwise.
    data_masks: bool = False
    # A caption table file (python -m edify.training.memory_data) that replaces the text encoder's
    # weights in training, e.g. on a machine without them; "" = encode with text_encoder.
    text_table: str = ""
    text_encoder: str = "minilm"  # "minilm" | "t5:/path/to/folder" | "none"
    text_cache: bool = True  # cache caption embeddings under <out>/text-cache
    styles: tuple[str, ...] = ()  # media-type vocabulary (sorted); empty = no media token
    num_workers: int = 0
    sample_prompts: tuple[str, ...] = ("a red heart", "a smiling face")
    sample_steps: int = 8  # sampler steps per Laplacian stage
    sample_guidance: float = 2.0
    seed: int = 0
    # A warm start: an exported model folder (`--export`) whose weights start the network and its
    # EMA, e.g. to continue a run whose checkpoints are gone. Ignored when a checkpoint is resumed.
    init_from: str = ""
    dist: str = "none"  # "none" | "ddp" | "fsdp"

    def __post_init__(self):
        validate(self)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @staticmethod
    def from_dict(d: dict) -> TrainConfig:
        known = {f.name for f in fields(TrainConfig)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise EdifyError(f"unknown training config key(s): {', '.join(unknown)}")
        d = {"expert_ranges": "truncated", **d}  # saved before the option: the ranges it trained with
        return TrainConfig(**{k: _coerce(k, v) for k, v in d.items()})

    @staticmethod
    def from_json(text: str) -> TrainConfig:
        return TrainConfig.from_dict(json.loads(text))

    def replace(self, **changes) -> TrainConfig:
        return dataclasses.replace(self, **changes)


# Fields that may change between a checkpoint and its resumption: bookkeeping, limits and a few
# schedule knobs for the rest of the run (cool-down, precision, stage weights, lowest sigma, fine-band weight).
RESUMABLE_FIELDS = frozenset({
    "name", "total_images", "checkpoint_images", "keep_last", "log_images", "sample_images",
    "compile", "peak_tflops", "max_nonfinite", "num_workers", "sample_prompts", "sample_steps",
    "sample_guidance", "data", "data_masks", "text_cache", "dist", "max_minutes", "text_table", "max_cpu_minutes",
    "cooldown_images", "precision", "stage_weights", "min_sigma", "stage_dropout", "fine_band_weight",
})


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise EdifyError(message)


def validate(c: TrainConfig) -> None:
    """One-line EdifyError for the first constraint the config breaks."""
    _check(c.resolution > 0 and c.resolution % (2 ** (c.levels - 1)) == 0,
           f"resolution must be a positive multiple of 2**(levels-1)={2 ** (c.levels - 1)}, got {c.resolution}")
    _check(c.levels >= 1, f"levels must be >= 1, got {c.levels}")
    _check(len(c.switch_sigmas) == c.levels - 1,
           f"switch_sigmas needs levels-1={c.levels - 1} values, got {list(c.switch_sigmas)}")
    _check(all(a < b for a, b in zip(c.switch_sigmas, c.switch_sigmas[1:])) and all(s > 0 for s in c.switch_sigmas),
           f"switch_sigmas must be positive and increasing, got {list(c.switch_sigmas)}")
    _check(all(0 <= s < c.levels for s in c.stages), f"stages must be in [0, {c.levels}), got {list(c.stages)}")
    _check(len(set(c.stages)) == len(c.stages), f"stages must not repeat, got {list(c.stages)}")
    _check(c.stage_sampling in ("random", "round_robin"),
           f"stage_sampling must be 'random' or 'round_robin', got {c.stage_sampling!r}")
    n_stages = len(c.stages) or c.levels
    _check(not c.stage_weights or (len(c.stage_weights) == n_stages and all(w > 0 for w in c.stage_weights)),
           f"stage_weights needs {n_stages} positive values, got {list(c.stage_weights)}")
    _check(not c.stage_dropout or (len(c.stage_dropout) == n_stages and all(0 <= p < 1 for p in c.stage_dropout)),
           f"stage_dropout needs {n_stages} values in [0, 1), got {list(c.stage_dropout)}")
    _check(c.P_std > 0, f"P_std must be > 0, got {c.P_std}")
    _check(c.sigma_data > 0, f"sigma_data must be > 0, got {c.sigma_data}")
    _check(c.batch_size > 0, f"batch_size must be > 0, got {c.batch_size}")
    _check(c.grad_accum > 0, f"grad_accum must be > 0, got {c.grad_accum}")
    _check(c.batch_size % c.grad_accum == 0,
           f"batch_size must be a multiple of grad_accum={c.grad_accum}, got {c.batch_size}")
    _check(c.lr > 0, f"lr must be > 0, got {c.lr}")
    _check(c.warmup_images >= 0, f"warmup_images must be >= 0, got {c.warmup_images}")
    _check(c.lr_decay_images >= 0, f"lr_decay_images must be >= 0, got {c.lr_decay_images}")
    _check(0 <= c.cooldown_images <= c.total_images,
           f"cooldown_images must be in [0, total_images={c.total_images}], got {c.cooldown_images}")
    _check(len(c.betas) == 2 and all(0 <= b < 1 for b in c.betas), f"betas must be two values in [0, 1), got {list(c.betas)}")
    _check(c.weight_decay >= 0, f"weight_decay must be >= 0, got {c.weight_decay}")
    _check(c.grad_clip >= 0, f"grad_clip must be >= 0, got {c.grad_clip}")
    _check(c.max_nonfinite >= 1, f"max_nonfinite must be >= 1, got {c.max_nonfinite}")
    _check(c.ema_halflife_images >= 0, f"ema_halflife_images must be >= 0, got {c.ema_halflife_images}")
    _check(c.ema_rampup >= 0, f"ema_rampup must be >= 0, got {c.ema_rampup}")
    _check(0 <= c.ema_decay < 1, f"ema_decay must be in [0, 1), got {c.ema_decay}")
    _check(0 <= c.ema_std < (1 / 12) ** 0.5, f"ema_std must be in [0, 0.2887), got {c.ema_std}")
    _check(c.ema_halflife_images > 0 or c.ema_decay > 0 or c.ema_std > 0,
           "one of ema_halflife_images, ema_decay, ema_std must be > 0, got all 0")
    _check(c.total_images > 0, f"total_images must be > 0, got {c.total_images}")
    for name in ("checkpoint_images", "log_images", "sample_images"):
        _check(getattr(c, name) >= 0, f"{name} must be >= 0, got {getattr(c, name)}")
    _check(c.keep_last >= 1, f"keep_last must be >= 1, got {c.keep_last}")
    _check(c.precision in ("fp32", "bf16"), f"precision must be 'fp32' or 'bf16', got {c.precision!r}")
    _check(c.peak_tflops >= 0, f"peak_tflops must be >= 0, got {c.peak_tflops}")
    _check(c.max_minutes >= 0, f"max_minutes must be >= 0, got {c.max_minutes}")
    _check(c.expert_ranges in ("nested", "truncated"),
           f"expert_ranges must be 'nested' or 'truncated', got {c.expert_ranges!r}")
    _check(c.max_sigma >= 0, f"max_sigma must be >= 0 (0 = every sigma), got {c.max_sigma}")
    _check(math.isfinite(c.fine_band_weight) and c.fine_band_weight > 0,
           f"fine_band_weight must be finite and positive, got {c.fine_band_weight}")
    _check(0 <= c.min_sigma < (c.max_sigma or math.inf) and math.isfinite(c.min_sigma),
           f"min_sigma must be >= 0 and below max_sigma, got {c.min_sigma}")
    _check(0 <= c.crop <= c.resolution, f"crop must be in [0, resolution={c.resolution}], got {c.crop}")
    _check(c.max_cpu_minutes >= 0, f"max_cpu_minutes must be >= 0, got {c.max_cpu_minutes}")
    for key, p in c.cond_drop.items():
        _check(key in CONDITION_FIELDS, f"cond_drop field must be one of {', '.join(CONDITION_FIELDS)}, got {key!r}")
        _check(isinstance(p, (int, float)) and 0 <= p <= 1, f"cond_drop.{key} must be in [0, 1], got {p}")
    _check(c.dist in ("none", "ddp", "fsdp"), f"dist must be 'none', 'ddp' or 'fsdp', got {c.dist!r}")
    _check(c.sample_steps > 0, f"sample_steps must be > 0, got {c.sample_steps}")
    _check(c.sample_guidance >= 0, f"sample_guidance must be >= 0, got {c.sample_guidance}")
    _check(list(c.styles) == sorted(set(c.styles)), f"styles must be sorted and unique, got {list(c.styles)}")
    _check(c.text_encoder in ("minilm", "none") or c.text_encoder.startswith("t5:"),
           f"text_encoder must be 'minilm', 't5:/path' or 'none', got {c.text_encoder!r}")


PRESETS: dict[str, TrainConfig] = {
    # Seconds on a laptop CPU: 16px, 2 levels (8/16), the `tiny` network, synthetic data.
    "tiny-cpu": TrainConfig(
        name="tiny-cpu", model="tiny", resolution=16, levels=2, switch_sigmas=(2.0,), batch_size=4,
        lr=1e-3, total_images=64, checkpoint_images=32, log_images=16, ema_halflife_images=64.0,
        text_encoder="minilm", data="synthetic", styles=("flat", "glossy"), sample_steps=4,
    ),
    # The demo base model: 64px emoji, 3 levels (16/32/64), MiniLM text tokens and a style token.
    # Data: `edify data emoji --permissive-only --out data/emoji` (its train/ split, 18,070 images,
    # is loaded once onto the device). Sized for 15-20 minutes of one H100 (scripts/train_demo_gpu.sh):
    # - batch 512: the 21.9M-param U-Net costs only 0.4-4.2 GFLOP per image per step (16-64 px
    #   stages), so small batches leave the GPU waiting on launches; 512 still gives ~35 steps per
    #   epoch and tens of thousands of steps in the budget.
    # - lr 5e-4: edm2's ~1e-2 assumes its magnitude-preserving layers; with standard layers and
    #   AdamW, 2e-4 at batch 128 (DDPM) to 1e-3 is the stable range; 5e-4 at batch 512 sits in it,
    #   with a 250k-image (~490-step) linear warm-up and gradient clipping at 1, and decays as
    #   1/sqrt(images / 4M) past 4M images (edm2's schedule shape).
    # - EMA: edm2's power-function profile, relative std 0.10 (gamma 6.94): the averaged weights'
    #   mean age is 1/(gamma+2) = 11% of the images seen, whatever the length, so a run cut short
    #   by max_minutes still ends with a sound average.
    # - total_images 30M is a ceiling; on a time budget, --max-minutes decides where the run stops.
    # - no torch.compile: measured on one H200 (torch 2.11, bf16, batch 512), compiling the three
    #   stages' graphs took the first 425 s (102,400 images) and the compiled steps then ran at
    #   2,785 img/s, while eager steps ran at 2,960-3,210 img/s from the first log interval on
    #   (scripts/README.md); `--set compile=true` turns it back on.
    "emoji-64": TrainConfig(
        name="emoji-64", model="emoji-64", resolution=64, levels=3, switch_sigmas=(1.0, 5.0),
        batch_size=512, lr=5e-4, warmup_images=250_000, lr_decay_images=4_000_000,
        total_images=30_000_000, checkpoint_images=2_000_000, keep_last=2, log_images=102_400,
        sample_images=5_000_000, ema_std=0.10, precision="bf16", compile=False,
        text_encoder="minilm", data="data/emoji", data_in_memory=True, num_workers=8,
        cond_drop={"text": 0.1, "media": 0.2}, expert_ranges="truncated",
        styles=("emojione", "fluent-emoji", "fluent-emoji-flat", "fxemoji", "noto", "noto-v1", "twemoji"),
        sample_prompts=("grinning face", "red heart", "rocket", "flag: Malta"),
    ),
}
# The same model trained on a CPU (the shipped demo when no accelerator is at hand): batch 32 and
# fp32, no compile; every other choice as emoji-64, scaled to ~60 images/s on 2 cores.
PRESETS["emoji-64-cpu"] = PRESETS["emoji-64"].replace(
    name="emoji-64-cpu", batch_size=32, lr=4e-4, warmup_images=5_000, lr_decay_images=0,
    total_images=10_000_000, checkpoint_images=40_000, log_images=3_200, sample_images=0,
    precision="fp32", compile=False, num_workers=0,
)


# The demo 4x cascade upsampler (section 2.3; docs/upscale.md): a 256 px Laplacian model whose
# coarsest stage is the 64 px input (3 levels, 64/128/256), trained only on sigma <= 2.0, the
# largest entry sigma (per-pixel 0.5 = sigma_data on the 64 px input; the default entry is s_2* =
# 0.8, per-pixel 0.2). The switches sit low (per pixel 0.4 at 128 px, 0.3 at 256 px): the bands an
# upsampler adds are faint detail, born there from noise of about their own size.
PRESETS["emoji-up-64-256"] = PRESETS["emoji-64"].replace(
    name="emoji-up-64-256", model="emoji-up-64-256", resolution=256, levels=3, switch_sigmas=(0.3, 0.8),
    max_sigma=2.0, stages=(0, 1, 2), stage_weights=(0.5, 0.3, 0.2), batch_size=128, lr=5e-4,
    warmup_images=100_000, lr_decay_images=2_000_000, total_images=10_000_000, checkpoint_images=1_000_000,
    log_images=25_600, sample_images=0,
)
# On the CPU: random 128 px windows of the 256 px images (edify.training.crops; docs/upscale.md says
# why that is valid for an upsampler's fine stages), a quarter of the pixels per image; batch 16, fp32.
# The model then runs on 128 px tiles (its train_size) at inference.
PRESETS["emoji-up-64-256-cpu"] = PRESETS["emoji-up-64-256"].replace(
    name="emoji-up-64-256-cpu", crop=128, batch_size=16, lr=4e-4, warmup_images=2_000, lr_decay_images=0,
    total_images=10_000_000, checkpoint_images=10_000, log_images=800, precision="fp32", compile=False,
    num_workers=0,
)


def get_preset(name: str) -> TrainConfig:
    if name not in PRESETS:
        raise EdifyError(f"unknown training preset {name!r}; known: {', '.join(PRESETS)}")
    return PRESETS[name]


def load_config(path: str | Path) -> TrainConfig:
    """A TrainConfig from a JSON file (the format of a checkpoint's config.json)."""
    try:
        return TrainConfig.from_json(Path(path).read_text())
    except json.JSONDecodeError as err:
        raise EdifyError(f"training config {path} is not valid JSON: {err}") from None
    except FileNotFoundError:
        raise EdifyError(f"training config file not found: {path}") from None


_HINTS = typing.get_type_hints(TrainConfig)


def _coerce(key: str, value):
    """`value` (from JSON or a CLI string) converted to the declared type of field `key`."""
    try:
        return _coerce_unchecked(key, value)
    except json.JSONDecodeError:
        raise EdifyError(f"{key} must be valid JSON, got {value!r}") from None


def _coerce_unchecked(key: str, value):
    hint = _HINTS[key]
    if key == "model":
        if isinstance(value, dict):
            return value
        if isinstance(value, str):
            return json.loads(value) if value.lstrip().startswith("{") else value
        raise EdifyError(f"model must be a preset name or a config dict, got {value!r}")
    if key == "cond_drop":
        if isinstance(value, str):
            value = json.loads(value)
        if not isinstance(value, dict):
            raise EdifyError(f"cond_drop must be a dict of field -> probability, got {value!r}")
        return {k: _scalar(f"cond_drop.{k}", float, v) for k, v in value.items()}
    origin = typing.get_origin(hint)
    if origin is tuple:
        (item_type, _) = typing.get_args(hint)
        if isinstance(value, str):
            value = [] if not value.strip() else (json.loads(value) if value.lstrip().startswith("[")
                                                  else value.split(","))
        if not isinstance(value, (list, tuple)):
            raise EdifyError(f"{key} must be a list, got {value!r}")
        return tuple(_scalar(key, item_type, v) for v in value)
    if origin in (typing.Union, types.UnionType):
        raise AssertionError(f"no coercion rule for {key}")  # pragma: no cover - every union handled above
    return _scalar(key, hint, value)


def _scalar(key: str, typ: type, value):
    if isinstance(value, str) and typ is not str:
        text = value.strip()
        try:
            if typ is bool:
                if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError
                return text.lower() in ("true", "1", "yes")
            if typ is int:
                return _parse_int(text)
            return typ(text)
        except ValueError:
            raise EdifyError(f"{key} must be {typ.__name__}, got {value!r}") from None
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
        raise EdifyError(f"{key} must be {typ.__name__}, got {value!r}")
    return value


def _parse_int(text: str) -> int:
    """An int from "12", "1_000_000" or an integral float such as "2e6"."""
    try:
        return int(text)
    except ValueError:
        value = float(text)
        if not value.is_integer():
            raise
        return int(value)


def apply_overrides(config: TrainConfig, overrides: list[str]) -> TrainConfig:
    """`config` with each "key=value" applied (dotted keys set one entry of a dict field)."""
    changes = {}
    for item in overrides:
        if "=" not in item:
            raise EdifyError(f"--set expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        key = key.strip()
        head, _, sub = key.partition(".")
        if head not in _HINTS:
            raise EdifyError(f"unknown training config key {head!r}; known: {', '.join(sorted(_HINTS))}")
        if sub:
            if head != "cond_drop":
                raise EdifyError(f"only cond_drop takes a dotted key, got {key!r}")
            current = dict(changes.get(head, getattr(config, head)))
            current[sub] = _scalar(key, float, value)
            changes[head] = current
        else:
            changes[head] = _coerce(head, value)
    return dataclasses.replace(config, **changes)


def diff(a: TrainConfig, b: TrainConfig, ignore=RESUMABLE_FIELDS) -> list[str]:
    """Human-readable field differences "key: a -> b", skipping the ignored fields."""
    da, db = a.to_dict(), b.to_dict()
    return [f"{k}: {da[k]!r} -> {db[k]!r}" for k in sorted(da) if k not in ignore and da[k] != db[k]]
