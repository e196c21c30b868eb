"""From a training run to a model folder that `TextToImagePipeline.from_pretrained` loads.

The folder gets the EMA weights (or the raw ones) and a pipeline config carrying what sampling
needs from the training config: the network config, the Laplacian process (levels, switch
sigmas, ramp), sigma_data, the resolution, the text encoder and the style vocabulary.

For shipping, the weights can be written in bf16 and sharded under a per-file byte limit, with a
model card (README.md) filled from a template (docs/model_card_template.md) with the dataset's
licenses and attribution (its manifest.json) and the run's own logs: the commands, the GPU, images
seen, wall time, img/s and MFU as the trainer measured them. A number the logs lack is written
as "not recorded", never estimated.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import string
from pathlib import Path

import torch

from edify.core.guidance import check_guidance
from edify.errors import EdifyError
from edify.networks.presets import build_network
from edify.networks.unet import UNet, UNetConfig
from edify.pipelines.model_io import CONFIG_NAME, INDEX_NAME
from edify.pipelines.text2image import PipelineConfig, SamplingDefaults, TextToImagePipeline
from edify.training import checkpoint
from edify.training.config import TrainConfig

T5_DEFAULT_LENGTH = 512


def build_net(config: TrainConfig) -> UNet:
    """A freshly initialised network of a training config (preset name or config dict)."""
    model = config.model
    return build_network(UNetConfig.from_dict(model) if isinstance(model, dict) else model)


def pipeline_config(config: TrainConfig, net: UNet, text_max_length: int | None = None) -> PipelineConfig:
    """The sampling-side description of a model trained with `config`."""
    if config.text_encoder == "none":
        raise EdifyError("a text-to-image model needs a text encoder, got text_encoder='none'")
    if text_max_length is None:
        from edify.text.encoders import MINILM_DEFAULT_LENGTH

        text_max_length = MINILM_DEFAULT_LENGTH if config.text_encoder == "minilm" else T5_DEFAULT_LENGTH
    from edify.core.laplacian import LaplacianProcess

    process = LaplacianProcess(config.levels, config.switch_sigmas)
    return PipelineConfig(
        network=net.config.to_dict(), levels=config.levels, switch_sigmas=tuple(config.switch_sigmas),
        ramp=process.ramp, ramp_width=process.ramp_width, sigma_data=config.sigma_data,
        resolution=config.resolution, text_encoder=config.text_encoder, text_max_length=text_max_length,
        styles=tuple(config.styles), expert_ranges=config.expert_ranges,
        max_sigma=config.max_sigma, train_size=config.crop, min_sigma=config.min_sigma,
        defaults=floored(SamplingDefaults(num_steps=config.sample_steps * config.levels,
                                          guidance_scale=config.sample_guidance), config.min_sigma))


def floored(defaults: SamplingDefaults, min_sigma: float) -> SamplingDefaults:
    """`defaults` with the schedule's end raised to the lowest sigma the model was trained on."""
    return defaults if defaults.sigma_min >= min_sigma else dataclasses.replace(defaults, sigma_min=min_sigma)


INIT_NAME = "init_model.json"


def init_snapshot(folder: str | Path) -> dict:
    """What a warm start needs to remember of the model folder it started from: its path, its
    config.json and its training history (training.json, None when it has none). Written into the
    run folder (`INIT_NAME`) at the run's first checkpoint, so that an export reads the model as it
    was when the run started, even after that folder is replaced (e.g. by an export of this run)."""
    folder = Path(folder)
    out = {"model": str(folder), "config": None, "history": None}
    for key, name in (("config", CONFIG_NAME), ("history", HISTORY_NAME)):
        try:
            out[key] = json.loads((folder / name).read_text()) if (folder / name).is_file() else None
        except (ValueError, OSError):
            out[key] = None
    return out


def write_init_snapshot(run: Path, snapshot: dict) -> None:
    """`init_snapshot` into the run folder, once (written under a temporary name, then renamed)."""
    path = Path(run) / INIT_NAME
    if path.exists():
        return
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(snapshot, indent=1) + "\n")
    os.replace(tmp, path)


def read_init_snapshot(run: Path) -> dict | None:
    """The run's `init_snapshot`, or None for a run that has none (not warm-started, or older)."""
    path = Path(run) / INIT_NAME
    if not path.is_file():
        return None
    try:
        snap = json.loads(path.read_text())
    except (ValueError, OSError) as err:
        raise EdifyError(f"{path} is not a warm-start record: {err}") from None
    if not isinstance(snap, dict) or "model" not in snap:
        raise EdifyError(f"{path} is not a warm-start record (no 'model' field)")
    return snap


def inherited_defaults(config: TrainConfig, pipe_config: PipelineConfig,
                       run: str | Path | None = None) -> SamplingDefaults | None:
    """The sampling defaults of the model folder a run started from (`init_from`) as the run
    recorded it when it started (`init_snapshot`), else as that folder holds them now, when it
    describes the same model (network, Laplacian process, resolution, text encoder, styles): a
    continued model keeps the sampler settings measured for the model it continues, rather than
    falling back to the training preset's sample settings. None otherwise."""
    if not config.init_from:
        return None
    snap = read_init_snapshot(Path(run)) if run is not None else None
    saved = (snap if snap is not None else init_snapshot(config.init_from)).get("config")
    if saved is None:
        return None
    try:
        base = PipelineConfig.from_dict(saved)
    except EdifyError:
        return None
    same = ("network", "levels", "switch_sigmas", "ramp", "ramp_width", "sigma_data", "resolution",
            "text_encoder", "styles", "expert_ranges")
    if any(getattr(base, f) != getattr(pipe_config, f) for f in same):
        return None
    return base.defaults


def export_pipeline(run_or_checkpoint: str | Path, out: str | Path, use_ema: bool = True,
                    dtype: torch.dtype = torch.float32, max_shard_bytes: int = 16 * 2**20,
                    card: bool = False, manifest: str | Path | None = None,
                    template: str | Path | None = None, overwrite: bool = False,
                    inherit_defaults: bool = True) -> Path:
    """Write the latest checkpoint of a run folder (or the given checkpoint) as a model folder.

    The sampling defaults in its config are the training preset's sample settings (steps,
    guidance), or, for a run started from a model folder (`init_from`) of the same model, that
    model's defaults as the run recorded them at its start (`init_model.json`; for an older run, as
    the folder holds them now): `inherited_defaults`, `inherit_defaults=False` turns it off.

    Weights are cast to `dtype` and sharded so that no weight file exceeds `max_shard_bytes` on
    disk (safetensors headers included). With `card`, README.md is filled from the run's own
    logs (see `model_card`). A folder that already holds a model is replaced only with `overwrite`."""
    out = Path(out)
    check_target(out, overwrite)
    config, weights = checkpoint.load_weights(run_or_checkpoint, use_ema=use_ema)
    net = build_net(config)
    missing, unexpected = net.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise EdifyError(f"checkpoint weights do not fit its network config: {len(missing)} missing, "
                         f"{len(unexpected)} unexpected")
    state = net.state_dict()
    # A safetensors file = 8 bytes + a JSON header (under 160 bytes per tensor besides its name) + data.
    header = 1024 + sum(len(k) + 160 for k in state)
    largest = max(v.numel() for v in state.values()) * torch.empty((), dtype=dtype).element_size()
    if largest + header > max_shard_bytes:
        raise EdifyError(f"max_shard_bytes must hold the largest tensor and a header ({largest + header} bytes), "
                         f"got {max_shard_bytes}")
    pipe_config = pipeline_config(config, net)
    run = Path(run_or_checkpoint)
    ckpt = checkpoint.latest_checkpoint(run) if (run / checkpoint.LATEST).is_file() else run
    run = run if ckpt != run else run.parent
    inherited = inherited_defaults(config, pipe_config, run) if inherit_defaults else None
    if inherited is not None:
        pipe_config = dataclasses.replace(pipe_config, defaults=floored(inherited, config.min_sigma))
    TextToImagePipeline(net, pipe_config).save_pretrained(
        out, dtype=dtype, max_shard_bytes=max_shard_bytes - header)
    too_big = [p.name for p in out.glob("model*.safetensors") if p.stat().st_size > max_shard_bytes]
    if too_big:  # pragma: no cover - the header bound above holds for any tensor name and shape
        raise EdifyError(f"weight files over {max_shard_bytes} bytes: {too_big}")
    history = training_history(run, ckpt, config)
    (out / HISTORY_NAME).write_text(json.dumps(history, indent=1) + "\n")
    if card:
        text = model_card(run, ckpt, out, config, manifest=manifest, template=template, history=history)
        (out / "README.md").write_text(text)
    return out


HISTORY_NAME = "training.json"


def training_history(run: Path, ckpt: Path, config: TrainConfig) -> dict:
    """What made the exported weights: this run, after the history of the model it was warm-started
    from (`init_from`: its training.json as the run recorded it at its start, `init_snapshot`, else
    as that folder holds it now; an entry without numbers when it has none). Every number is read
    from the runs' logs."""
    earlier: list[dict] = []
    snap = read_init_snapshot(run) if config.init_from else None
    if snap is not None:
        history = snap.get("history")
        try:
            earlier = history["runs"] if history is not None else [{"model": snap["model"], "images": None}]
        except (KeyError, TypeError) as err:
            raise EdifyError(f"{run / INIT_NAME} holds no training history: {err}") from None
    elif config.init_from:
        previous = Path(config.init_from) / HISTORY_NAME
        try:
            earlier = json.loads(previous.read_text())["runs"] if previous.is_file() else [
                {"model": str(config.init_from), "images": None}]
        except (ValueError, KeyError, TypeError, OSError) as err:
            raise EdifyError(f"{previous} is not a training history: {err}") from None
    meta = checkpoint.read_meta(ckpt)
    n = run_numbers(run, upto=meta["images"])
    this = {"run": run.name, "init_from": config.init_from or None, "images": meta["images"], "steps": meta["step"],
            "batch_size": config.batch_size, "accelerator": ", ".join(n["gpus"]) or None,
            "wall_minutes": None if n["wall_seconds"] is None else round(n["wall_seconds"] / 60, 1),
            "train_minutes": None if n["train_seconds"] is None else round(n["train_seconds"] / 60, 1),
            "commands": n["commands"]}
    runs = earlier + [this]
    known = [r["images"] for r in runs if r.get("images") is not None]
    return {"runs": runs, "images_total": sum(known) if len(known) == len(runs) else None}


def history_section(history: dict | None) -> str:
    """The card's paragraph on earlier training, empty for a model trained from scratch."""
    runs = (history or {}).get("runs", [])
    if len(runs) < 2:
        return ""
    lines = ["This model continues earlier training (a warm start from an exported model: weights and EMA "
             "carried over, optimizer state and counters afresh). All of it, oldest first:", "",
             "| run | images seen | optimizer steps | time in training steps | accelerator |", "|---|---|---|---|---|"]
    for r in runs:
        images = NOT_RECORDED if r.get("images") is None else f"{r['images']:,}"
        steps = NOT_RECORDED if r.get("steps") is None else f"{r['steps']:,}"
        minutes = _fmt(r.get("train_minutes"), ".1f", " min")
        lines.append(f"| {r.get('run') or r.get('model')} | {images} | {steps} | {minutes} | "
                     f"{r.get('accelerator') or NOT_RECORDED} |")
    total = history.get("images_total")
    lines += ["", f"Images seen in all: {NOT_RECORDED if total is None else f'{total:,}'}. The table below is the "
              f"last run's.", "", ""]
    return "\n".join(lines)


def check_target(out: Path, overwrite: bool) -> None:
    """Refuse an export into a folder that holds a model, unless `overwrite`, or onto a file."""
    if out.exists() and not out.is_dir():
        raise EdifyError(f"cannot export to {out}: it exists and is not a folder")
    if overwrite or not out.is_dir():
        return
    if any(os.path.lexists(out / n) for n in (CONFIG_NAME, INDEX_NAME)) or any(out.glob("model*.safetensors")):
        raise EdifyError(f"{out} already holds a model; pass overwrite=True (edify train --overwrite) to replace it")


# ---- model card -------------------------------------------------------------------------------

TEMPLATE = Path(__file__).resolve().parents[2] / "docs" / "model_card_template.md"
NOT_RECORDED = "not recorded"


def read_jsonl(path: Path) -> list[dict]:
    """The rows of a JSON-lines log (a run's runs.jsonl, scalars.jsonl); none if it is missing."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_numbers(run: Path, upto: int | None = None) -> dict:
    """Throughput and MFU from the run's scalars.jsonl, wall time and GPU from its runs.jsonl.

    img/s over the whole run = sum of interval images / sum of interval training seconds (steps
    only: no checkpoints or samples, compilation included); MFU likewise, time-weighted; the
    steady-state figures are the medians over log intervals. Missing logs give None.

    With `upto` (the image count of an exported checkpoint), only what led to that checkpoint
    counts: log intervals up to it, and the sessions (runs.jsonl lines) that started before it. A
    session that went on past the checkpoint contributes its logged interval seconds up to it to
    the time in training steps; its wall time up to the checkpoint was not recorded, so the wall
    time is then None rather than an estimate."""
    rows = {}
    for row in read_jsonl(run / "scalars.jsonl"):
        rows[row["images"]] = row  # a resumed run that repeats a log point replaces it
    rows = [rows[k] for k in sorted(rows) if "interval_seconds" in rows[k] and (upto is None or k <= upto)]
    runs = read_jsonl(run / "runs.jsonl")
    if upto is not None:
        runs = [r for r in runs if r.get("start_images", 0) < upto]
    out = {"img_per_s": None, "img_per_s_median": None, "mfu": None, "mfu_median": None, "final_loss": None,
           "wall_seconds": None, "train_seconds": None, "gpus": [], "commands": [], "runs": len(runs),
           "precisions": []}
    if rows:
        seconds = sum(r["interval_seconds"] for r in rows)
        out["img_per_s"] = sum(r["interval_images"] for r in rows) / seconds
        out["img_per_s_median"] = statistics.median(r["img_per_s"] for r in rows)
        out["final_loss"] = rows[-1]["loss"]
        if all("mfu" in r for r in rows):
            out["mfu"] = sum(r["mfu"] * r["interval_seconds"] for r in rows) / seconds
            out["mfu_median"] = statistics.median(r["mfu"] for r in rows)
    if runs:
        whole = [r for r in runs if upto is None or r["images"] <= upto]
        out["wall_seconds"] = sum(r["wall_seconds"] for r in whole) if len(whole) == len(runs) else None
        out["train_seconds"] = sum(r["train_seconds"] for r in whole) + sum(
            row["interval_seconds"] for part in runs if part not in whole for row in rows
            if part.get("start_images", 0) < row["images"])
        out["gpus"] = sorted({r["gpu"] for r in runs})
        out["precisions"] = sorted({r["precision"] for r in runs if "precision" in r})
        out["commands"] = [r["command"] for r in runs if r.get("command")]
    return out


def _fmt(value, spec: str, suffix: str = "") -> str:
    return NOT_RECORDED if value is None else f"{value:{spec}}{suffix}"


def _manifest(config: TrainConfig, manifest: str | Path | None) -> dict:
    path = Path(manifest) if manifest else Path(config.data) / "manifest.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def data_section(config: TrainConfig, manifest: str | Path | None) -> str:
    """The data paragraph: sets, counts, licenses and attribution from the dataset manifest."""
    m = _manifest(config, manifest)
    if not m:
        return f"Training data: `{config.data}` (no dataset manifest found, so no attribution is recorded)."
    lines = ["| set | title | version | license | author | train images |", "|---|---|---|---|---|---|"]
    for name, s in sorted(m.get("sets", {}).items()):
        author = f"[{s.get('author', '')}]({s['author_url']})" if s.get("author_url") else s.get("author", "")
        license_ = f"[{s['license']}]({s['license_url']})" if s.get("license_url") else s.get("license", "")
        lines.append(f"| {name} | {s.get('title', '')} | {s.get('version', '')} | {license_} | {author} | "
                     f"{s.get('train', NOT_RECORDED)} |")
    counts = m.get("counts", {})
    return "\n".join([f"Licenses of the training images: {', '.join(m.get('licenses', [])) or NOT_RECORDED}. "
                      f"{counts.get('train', NOT_RECORDED)} training images rendered at {m.get('sizes')} px "
                      f"(split rule: {m.get('split', {}).get('rule', NOT_RECORDED)}).", ""] + lines)


def model_card(run: Path, ckpt: Path, model_dir: Path, config: TrainConfig, manifest: str | Path | None = None,
               template: str | Path | None = None, history: dict | None = None) -> str:
    """README.md of a model folder, every number read from the run's own logs (never estimated)."""
    template_path = Path(template) if template else TEMPLATE
    # the sampling defaults the folder was written with (a continuation's may be inherited)
    defaults = PipelineConfig.from_dict(json.loads((Path(model_dir) / CONFIG_NAME).read_text())).defaults
    if not template_path.is_file():
        raise EdifyError(f"model card template not found: {template_path}")
    meta = checkpoint.read_meta(ckpt)
    n = run_numbers(run, upto=meta["images"])
    weights = sorted(p for p in model_dir.glob("model*.safetensors"))
    params = sum(v.numel() for v in build_net(config).state_dict().values())
    commands = "\n".join(n["commands"]) or NOT_RECORDED
    manifest_counts = _manifest(config, manifest).get("counts", {})
    style = "twemoji" if "twemoji" in config.styles else (config.styles[0] if config.styles else "")
    values = {
        "name": config.name,
        "params_millions": f"{params / 1e6:.1f}",
        "resolution": str(config.resolution),
        "levels": str(config.levels),
        "stage_sides": "/".join(str(config.resolution >> j) for j in reversed(range(config.levels))),
        "switch_sigmas": ", ".join(f"{s:g}" for s in config.switch_sigmas),
        "text_encoder": config.text_encoder,
        "styles": ", ".join(config.styles) or "none",
        "weights_dtype": str(next(iter(_first_tensor_dtypes(weights)), NOT_RECORDED)),
        "weight_files": ", ".join(f"{p.name} ({p.stat().st_size / 2**20:.1f} MiB)" for p in weights),
        "data": data_section(config, manifest),
        "commands": commands,
        "gpu": ", ".join(n["gpus"]) or NOT_RECORDED,
        "images_seen": f"{meta['images']:,}",
        "steps": f"{meta['step']:,}",
        "batch_size": str(config.batch_size),
        "lr": f"{config.lr:g}",
        "warmup_images": f"{config.warmup_images:,}",
        "lr_decay": (f", then lr / sqrt(images / {config.lr_decay_images:,}) past {config.lr_decay_images:,} "
                     f"images" if config.lr_decay_images > 0 else ", then constant")
                    + (f", cooled down linearly to 0 over the last {config.cooldown_images:,} images"
                       if config.cooldown_images > 0 else ""),
        "ema": (f"power function, std {config.ema_std:g}" if config.ema_std > 0 else
                f"decay {config.ema_decay:g}" if config.ema_decay > 0 else
                f"half-life {config.ema_halflife_images:,.0f} images"),
        "precision": ", ".join(n["precisions"]) or NOT_RECORDED,
        "train_images": f"{manifest_counts['train']:,}" if "train" in manifest_counts else NOT_RECORDED,
        "style_flag": f" --style {style}" if style else "",
        "style_arg": f", style={style!r}" if style else "",
        "wall_time": _fmt(None if n["wall_seconds"] is None else n["wall_seconds"] / 60, ".1f", " min"),
        "train_time": _fmt(None if n["train_seconds"] is None else n["train_seconds"] / 60, ".1f", " min"),
        "runs": str(n["runs"]),
        "img_per_s": _fmt(n["img_per_s"], ",.0f"),
        "img_per_s_median": _fmt(n["img_per_s_median"], ",.0f"),
        "mfu": _fmt(None if n["mfu"] is None else 100 * n["mfu"], ".1f", "%"),
        "mfu_median": _fmt(None if n["mfu_median"] is None else 100 * n["mfu_median"], ".1f", "%"),
        "peak_tflops": f"{config.peak_tflops:g} TFLOP/s" if config.peak_tflops > 0 else NOT_RECORDED,
        "final_loss": _fmt(n["final_loss"], ".4f"),
        "sampling_steps": str(defaults.num_steps),
        "guidance": ", ".join(f"{g:g}" for g in check_guidance(defaults.guidance_scale)),
        "history": history_section(history),
    }
    try:
        return string.Template(template_path.read_text()).substitute(values)
    except (KeyError, ValueError) as err:
        raise EdifyError(f"model card template {template_path} has an unknown or bad placeholder: {err}") from None


def _first_tensor_dtypes(files: list[Path]) -> list[str]:
    from safetensors import safe_open

    for path in files[:1]:
        with safe_open(str(path), framework="pt") as f:
            return [str(f.get_slice(k).get_dtype()) for k in list(f.keys())[:1]]
    return []
