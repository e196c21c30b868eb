"""`edify finetune`: a new style or concept learned by training only cross-attention (Edify Image section 7).

    edify finetune --base weights/emoji-64 --data data/openmoji --out weights/emoji-64-openmoji
    edify finetune --base weights/emoji-64 --data my-dog/ --caption "a photo of Rex" --out rex \
        --params lora --rank 4 --steps 400

The trainer is `edify.training.loop.Trainer` (resume, EMA, checkpoints, logs, progress, time
budgets, one-line errors), built from a training preset whose network, process, resolution, text
encoder and styles are replaced by the base model folder's, as `edify train-controlnet` does. What
changes:

- the base network is loaded from its folder and everything but the chosen parameters is frozen
  (`edify.pipelines.finetune`: `crossattn`, `crossattn_kv`, `lora` adapters from peft, or `full`); the
  module the optimizer, the EMA and the checkpoints see is `TrainedParameters`, which holds only
  those parameters (calling it runs the whole network), so checkpoints stay small;
- new style names (styles of the data the base does not know, or `--style NAME`) each take a free
  row of the media-type table; only that row trains (the other rows get no gradient and no weight
  decay, so AdamW leaves them bit for bit as they were); it starts from the mean of the base's style
  rows, or from `--init-style`'s row;
- the data is read once into memory (a finetune set is small: from a handful to a few thousand
  images), centre-cropped and resized to the base's square resolution: an image folder with
  captions (`captions.jsonl` / `metadata.jsonl`, or a `.txt` beside each image), or `--caption` for
  every image, or webdataset shards (a folder of .tar files or its train/ split). `--style` gives
  every image one style.

At the end the EMA weights of the last checkpoint become the delta folder `--out`
(finetune.safetensors + finetune.json, `edify.pipelines.finetune`). The run folder (checkpoints,
logs, `finetune-run.json` describing what it trains) is `--run`, by default runs/finetune/<name of
--out>. Nothing here imports torch before `run`, so `--help` stays fast.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import shlex
from pathlib import Path

from edify.errors import EdifyError

RUN_FILE = "finetune-run.json"
DEFAULT_STEPS = 1500  # section 7 of the paper: about 1,500 steps
DEFAULT_LR = 1e-4
MODES = ("crossattn", "crossattn_kv", "lora", "full")  # edify.pipelines.finetune.MODES (kept torch-free here)


# ---- data -------------------------------------------------------------------------------------

@dataclasses.dataclass
class FinetuneData:
    """Images [N, 3, R, R] uint8, one caption and one style (or None) each."""

    images: object
    captions: list[str]
    styles: list[str | None]


def _image_files(root: Path) -> list[Path]:
    from edify.data.datasets import IMAGE_EXTS

    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower().lstrip(".") in IMAGE_EXTS)


def _folder_records(root: Path, cfg, caption: str | None) -> list[dict]:
    """Raw records of an image folder: its own captions, or `caption` for every image."""
    import random

    from edify.data.datasets import ImageFolderDataset, LoaderStats, make_record

    files = _image_files(root)
    if not files:
        raise EdifyError(f"no images in {str(root)!r} (png, jpg, jpeg or webp files)")
    if caption is not None:
        stats = LoaderStats()
        return [r for r in (make_record(p.relative_to(root).as_posix(), p.read_bytes(), {}, caption, cfg, stats,
                                        random.Random(0), True) for p in files) if r is not None]
    hint = "give a captions.jsonl, a .txt beside each image, or --caption for all"
    try:
        ds = ImageFolderDataset(root, cfg, raw=True)
    except EdifyError as err:
        raise EdifyError(f"{err}; {hint}") from None
    missing = ds.index_stats.skipped.get("no_caption", 0)
    if missing:
        raise EdifyError(f"{missing} of {len(files)} images in {str(root)!r} have no caption; {hint}")
    return [r for r in (ds[i] for i in range(len(ds))) if "skip" not in r]


def read_data(spec: str, resolution: int, caption: str | None = None, style: str | None = None) -> FinetuneData:
    """Every image of an image folder or of webdataset shards, square at `resolution`, in memory."""
    import numpy as np
    import torch

    from edify.data.datasets import DataConfig, WebImageDataset
    from edify.training.batches import find_shards

    if caption is not None and not caption.strip():
        raise EdifyError("--caption must not be empty")
    cfg = DataConfig(resolution=resolution, multiple=1, square=True)
    shards = find_shards(spec)
    if shards is not None:
        records = list(WebImageDataset(shards, cfg, shuffle=False, epochs=1, raw=True))
    elif Path(spec).is_dir():
        records = _folder_records(Path(spec), cfg, caption)
    else:
        raise EdifyError(f"--data must be an image folder or webdataset shards, got {spec!r}")
    if not records:
        raise EdifyError(f"no readable images in {spec!r}")
    images = torch.from_numpy(np.stack([r["image"] for r in records])).permute(0, 3, 1, 2).contiguous()
    captions = [caption.strip() if caption is not None else r["caption"] for r in records]
    styles = [style if style is not None else r["style"] for r in records]
    return FinetuneData(images, captions, styles)


def images_stream(data: FinetuneData, micro_batch: int, seed: int, rank: int, world: int,
                  prior: FinetuneData | None = None, prior_share: float = 0.0):
    """A resumable stream over in-memory images (a seeded permutation per epoch).

    With `prior` (prior preservation, as DreamBooth's class images and Custom Diffusion's
    regularisation images), a fixed share of the stream's samples comes from it: sample i is a prior
    sample when floor((i + 1) p) > floor(i p), so every batch holds the share up to rounding; each
    source runs through its own seeded permutation per epoch."""
    import torch

    from edify.training.batches import SyntheticStream

    sources = [data] + ([prior] if prior is not None else [])
    p = prior_share if prior is not None else 0.0

    class ImagesStream(SyntheticStream):
        def __init__(self):
            self.images = torch.cat([d.images for d in sources])
            self.captions = [c for d in sources for c in d.captions]
            self.styles = [st for d in sources for st in d.styles]
            self.weights = torch.ones(len(self.captions))
            self.size, self.micro_batch, self.seed = len(data.captions), micro_batch, seed
            self.rank, self.world_size, self.consumed = rank, world, 0
            self._perms: dict = {}

        def _perm(self, source: int, epoch: int):
            """Source `source`'s permutation of epoch `epoch` (the latest epoch of each is kept)."""
            if self._perms.get(source, (None,))[0] != epoch:
                n = len(sources[source].captions)
                g = torch.Generator().manual_seed(self.seed * 7919 + epoch + 104729 * source)
                self._perms[source] = (epoch, torch.randperm(n, generator=g))
            return self._perms[source][1]

        def _index(self, i: int) -> int:
            before = math.floor(i * p)
            if math.floor((i + 1) * p) > before:  # a prior sample: the before-th of the prior stream
                epoch, offset = divmod(before, len(prior.captions))
                return len(data.captions) + int(self._perm(1, epoch)[offset])
            epoch, offset = divmod(i - before, len(data.captions))
            return int(self._perm(0, epoch)[offset])

        def next(self):
            batch = super().next()
            return dataclasses.replace(batch, image=batch.image.float() / 127.5 - 1)

    return ImagesStream()


# ---- what trains --------------------------------------------------------------------------------

def trained_parameters_module(net, names: list[str]):
    """A module holding only `names` of `net`'s parameters (the same tensors); calling it runs `net`."""
    from torch import nn

    class TrainedParameters(nn.Module):
        """The optimizer, EMA and checkpoints see only these; forward is the whole network's."""

        def __init__(self):
            super().__init__()
            params = dict(net.named_parameters())
            self.params = nn.ParameterDict({n.replace(".", "-"): params[n] for n in names})
            self._network = [net]  # outside the module tree: not saved, not averaged
            self.config = net.config

        def forward(self, *args, **kwargs):
            return self._network[0](*args, **kwargs)

    return TrainedParameters()


def parameter_name(key: str) -> str:
    """A TrainedParameters state-dict key -> the network's parameter name."""
    return key.removeprefix("params.").replace("-", ".")


def select(net, mode: str, rank: int, alpha: float) -> tuple[list[str], list[str]]:
    """Freeze `net` but what `mode` trains (injecting peft's LoRA adapters for "lora"): returns
    (the trained parameter names, the names the delta records: parameters, or adapted modules)."""
    from edify.pipelines import finetune as ft

    if mode == "lora":
        from peft import LoraConfig, inject_adapter_in_model

        targets = ft.lora_targets(net)
        config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0)
        inject_adapter_in_model(config, net, adapter_name=ft.LORA_ADAPTER)
        names = [n for n, _ in net.named_parameters() if f".lora_A.{ft.LORA_ADAPTER}." in n
                 or f".lora_B.{ft.LORA_ADAPTER}." in n]
        recorded = targets
    else:
        names = recorded = ft.trained_names(net, mode)
    net.requires_grad_(False)
    params = dict(net.named_parameters())
    for n in names:
        params[n].requires_grad_(True)
    return names, recorded


def plan_styles(data_styles, base_styles, num_media_types: int) -> list:
    """The data's styles the base does not know, each at a free media-type slot."""
    from edify.pipelines.finetune import NewStyle, free_slots

    new = sorted({s for s in data_styles if s and s not in base_styles})
    free = free_slots(num_media_types, base_styles)
    if len(new) > len(free):
        raise EdifyError(f"the data brings {len(new)} new style(s) {new}, but the base has {len(free)} free "
                         f"media-type slot(s) ({num_media_types} in all, {len(base_styles)} used)")
    return [NewStyle(name, slot) for name, slot in zip(new, free)]


def init_style_rows(table, styles, base_styles, init_style: str | None) -> None:
    """Each new style's row starts as `init_style`'s row, or the mean of the base's style rows."""
    import torch

    if init_style is not None and init_style not in base_styles:
        raise EdifyError(f"--init-style must be one of the base's styles ({', '.join(base_styles)}), "
                         f"got {init_style!r}")
    with torch.no_grad():
        start = (table[list(base_styles).index(init_style)] if init_style is not None else
                 table[: len(base_styles)].mean(0) if base_styles else table[-1])
        for style in styles:
            table[style.slot] = start


# ---- the trainer --------------------------------------------------------------------------------

def session_time(run_dir: Path, wall: float, cpu: float) -> tuple[float, float]:
    """Wall and CPU seconds a finetune part took over every session of its run (the trainer's
    runs.jsonl, one line per session), so that a resumed finetune records its whole cost rather than
    its last session's. `wall` and `cpu` (this session, measured around it) serve where the run has
    no such record."""
    from edify.training.export import read_jsonl

    rows = read_jsonl(Path(run_dir) / "runs.jsonl")
    if not rows or any("cpu_seconds" not in r for r in rows):
        return wall, cpu
    return sum(r["wall_seconds"] for r in rows), sum(r["cpu_seconds"] for r in rows)


def make_trainer(config, base, out_dir, data: FinetuneData, *, mode: str = "crossattn", rank: int = 4,
                 alpha: float | None = None, init_style: str | None = None, resume: bool = False,
                 text_encoder=None, device=None, command: str | None = None, log=print,
                 prior: FinetuneData | None = None, prior_share: float = 0.0, style_lr: float | None = None):
    """A `Trainer` that trains `mode`'s parameters (and any new style rows) of the base model folder;
    with `prior`, `prior_share` of every batch comes from it (`images_stream`). The new style rows
    learn at `style_lr` (default: the config's lr), on the same schedule."""
    import torch

    from edify.core.precond import EDMPrecond
    from edify.pipelines import finetune as ft
    from edify.pipelines.text2image import TextToImagePipeline
    from edify.training import distributed
    from edify.training.controlnet import base_train_config
    from edify.training.ema import EMA
    from edify.training.loop import Trainer

    if mode not in MODES:
        raise EdifyError(f"--params must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "lora" and rank < 1:
        raise EdifyError(f"--rank must be >= 1, got {rank}")
    alpha = float(rank if alpha is None else alpha)
    if not alpha > 0:
        raise EdifyError(f"--alpha must be > 0, got {alpha}")
    pipe = TextToImagePipeline.from_pretrained(base, text_encoder=text_encoder)
    config = base_train_config(config, pipe.config)
    if config.dist == "fsdp":
        raise EdifyError("finetuning runs with dist='none' or 'ddp', got 'fsdp'")
    fingerprint = ft.base_fingerprint(pipe)  # before anything changes
    net = pipe.network
    total = sum(p.numel() for p in net.parameters())
    styles = plan_styles(data.styles, pipe.config.styles, net.config.num_media_types)
    prior_share = prior_share if prior is not None else 0.0
    if prior is not None:
        unknown = sorted({st for st in prior.styles if st and st not in pipe.config.styles})
        if unknown:
            raise EdifyError(f"the prior data's styles must be the base's ({', '.join(pipe.config.styles)}); "
                             f"it has {', '.join(unknown)}")
    names, recorded = select(net, mode, rank, alpha)
    table = dict(net.named_parameters())[ft.MEDIA_TABLE]
    if styles:
        init_style_rows(table, styles, pipe.config.styles, init_style)
        table.requires_grad_(True)
        names = names + [ft.MEDIA_TABLE]
        rows = torch.zeros(table.shape[0], 1)
        rows[[s.slot for s in styles]] = 1
        table.register_hook(lambda g: g * rows.to(g.device, g.dtype))  # only the new rows learn

    micro = config.batch_size // config.grad_accum // distributed.world_size()
    stream = images_stream(data, micro, config.seed, distributed.rank(), distributed.world_size(), prior, prior_share)
    t = Trainer(config, out_dir, resume=False, stream=stream, text_encoder=text_encoder, device=device,
                command=command)
    c = t.config
    t.vocab = ft.StyleSlots(t.vocab, {s.name: s.slot for s in styles}) if styles else t.vocab
    t.net = net.to(t.device).train()
    module = trained_parameters_module(net, names)
    t.model = distributed.wrap_model(module, c.dist, t.device)
    forward = torch.compile(t.model, dynamic=False) if c.compile else t.model
    t.denoiser = EDMPrecond(forward, c.sigma_data, t.network_dtype)
    decayed = [p for n, p in module.params.items() if parameter_name(n) != ft.MEDIA_TABLE]
    groups = [{"params": decayed, "weight_decay": c.weight_decay}]
    style_scale = 1.0 if style_lr is None else style_lr / c.lr
    if styles:  # the key must exist for a checkpoint's optimizer state to load into it
        groups.append({"params": [table], "weight_decay": 0.0, "lr_scale": style_scale})
    t.optimizer = torch.optim.AdamW(groups, lr=c.lr, betas=tuple(c.betas))
    ema_on = c.ema_std == 0 and c.ema_decay == 0
    t.ema = EMA(t.model, c.ema_halflife_images if ema_on else 0.0, c.ema_rampup, c.ema_decay, c.ema_std)

    trained = sum(p.numel() for n, p in module.params.items() if parameter_name(n) != ft.MEDIA_TABLE)
    trained += len(styles) * table.shape[1]
    record = {"base": str(base), "fingerprint": dataclasses.asdict(fingerprint), "mode": mode,
              "rank": rank if mode == "lora" else 0, "alpha": alpha if mode == "lora" else 0.0,
              "parameters": recorded, "styles": [dataclasses.asdict(s) for s in styles],
              "trained_values": trained, "network_values": total,
              "prior_share": prior_share}
    new = ", ".join(f"{s.name!r} in media slot {s.slot}" for s in styles)
    log(f"finetune ({mode}{f', rank {rank}' if mode == 'lora' else ''}): trains {trained:,} of the base's "
        f"{total:,} parameters ({100 * trained / total:.2f}%)" + (f"; new style {new}" if styles else "")
        + (f"; {100 * prior_share:g}% of each batch from {len(prior.captions)} prior images" if prior else ""))
    _resume_or_start(t, record, resume)
    if styles:  # this session's rate (Trainer scales the schedule by lr_scale), also over a resumed optimizer's
        t.optimizer.param_groups[-1]["lr_scale"] = style_scale
    t.finetune_record = record
    return t


def _resume_or_start(t, record: dict, resume: bool) -> None:
    """Load the latest checkpoint of the same finetune (another one is refused), else write the run file."""
    from edify.training.loop import resume_or_record

    def conflict():
        saved = read_run_file(t.out_dir)
        keys = ("fingerprint", "mode", "rank", "alpha", "parameters", "styles")
        if any(saved.get(k) != record[k] for k in keys) or saved.get("prior_share", 0.0) != record["prior_share"]:
            return (f"{t.out_dir} holds another finetune ({saved.get('mode')} of {saved.get('base')}); "
                    f"choose another --run")
        return None

    resume_or_record(t, resume, RUN_FILE, record, conflict)


def read_run_file(run: Path) -> dict:
    from edify.pipelines.model_io import inside, read_json

    file = inside(Path(run), RUN_FILE, f"run folder {run}")
    if not file.is_file():
        raise EdifyError(f"{run} is not a finetune run (no {RUN_FILE})")
    data = read_json(file)
    if not isinstance(data, dict) or not {"fingerprint", "mode", "parameters", "styles"} <= set(data):
        raise EdifyError(f"{file} is not a finetune run description")
    return data


def export_delta(run: str | Path, out: str | Path, use_ema: bool = True, trained: dict | None = None,
                 parts: dict[tuple[int, ...], tuple[str | Path, dict]] | None = None) -> Path:
    """Write the latest checkpoint of a finetune run folder as a delta folder; `parts` ({stages:
    (run folder, trained)}): the runs of the base's stage experts, written as the delta's parts."""
    from edify.pipelines import finetune as ft

    info, tensors = delta_from_run(run, use_ema, trained)
    made = {tuple(stages): delta_from_run(part_run, use_ema, part_trained)
            for stages, (part_run, part_trained) in (parts or {}).items()}
    return ft.save_delta(out, info, tensors, made)


def delta_from_run(run: str | Path, use_ema: bool = True, trained: dict | None = None):
    """The description and tensors of a finetune run folder's latest checkpoint."""
    from edify.pipelines import finetune as ft
    from edify.training import checkpoint

    record = read_run_file(Path(run))
    _, weights = checkpoint.load_weights(run, use_ema=use_ema)
    weights = {parameter_name(k): v for k, v in weights.items()}
    styles = tuple(ft.NewStyle(s["name"], s["slot"]) for s in record["styles"])
    info = ft.FinetuneInfo(format=ft.FORMAT, version=ft.VERSION, mode=record["mode"],
                           base=ft.BaseFingerprint(**record["fingerprint"]), parameters=tuple(record["parameters"]),
                           styles=styles, rank=record["rank"], alpha=record["alpha"], trained=trained or {})
    tensors = {}
    for name in info.parameters:
        if info.mode == "lora":
            for ab in ("lora_A", "lora_B"):
                tensors[f"{name}.{ab}"] = weights[f"{name}.{ab}.{ft.LORA_ADAPTER}.weight"]
        else:
            tensors[name] = weights[name]
    for style in styles:
        tensors[ft.STYLE_PREFIX + style.name] = weights[ft.MEDIA_TABLE][style.slot]
    return info, tensors


# ---- the command --------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    from edify.runtime import add_runtime_arguments
    from edify.training.config import PRESETS

    parser.add_argument("--base", required=True, metavar="MODEL_FOLDER", help="the base model folder")
    parser.add_argument("--data", required=True, metavar="DIR_OR_SHARDS",
                        help="an image folder (captions.jsonl, a .txt beside each image, or --caption) or "
                             "webdataset shards (a folder of .tar files, its train/ split, or a pattern)")
    parser.add_argument("--out", required=True, metavar="DELTA", help="the delta folder to write")
    parser.add_argument("--params", default="crossattn", choices=MODES,
                        help="what trains: all cross-attention projections (default), only their key/value "
                             "projections, LoRA adapters on them (peft), or every parameter but the condition "
                             "embedder (full: a delta as large as the network)")
    parser.add_argument("--rank", type=int, default=4, help="LoRA rank (default 4)")
    parser.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default: the rank)")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"optimizer steps (default {DEFAULT_STEPS})")
    parser.add_argument("--batch-size", type=int, default=None, help="images per step (default: the preset's)")
    parser.add_argument("--lr", type=float, default=DEFAULT_LR, help=f"learning rate (default {DEFAULT_LR:g})")
    parser.add_argument("--style-lr", type=float, default=None, metavar="LR",
                        help="learning rate of a new style's embedding row (default: --lr). Adam moves a row "
                             "by about the rate per step, so at 1e-4 it stays near where it started")
    parser.add_argument("--caption", default=None, help="one caption for every image (instead of the data's)")
    parser.add_argument("--style", default=None, metavar="NAME",
                        help="one style for every image; a name the base lacks becomes a new style")
    parser.add_argument("--init-style", default=None, metavar="NAME",
                        help="a new style starts from this base style's embedding (default: their mean)")
    parser.add_argument("--prior-data", default=None, metavar="DIR_OR_SHARDS",
                        help="prior preservation: images in the base's own styles (e.g. its training data) "
                             "mixed into every batch, so the base's styles and concepts are kept and the "
                             "new style is what tells the data apart")
    parser.add_argument("--prior-share", type=float, default=0.5, metavar="P",
                        help="with --prior-data: the share of every batch it makes up (default 0.5)")
    parser.add_argument("--expert-steps", type=int, default=None, metavar="N",
                        help="optimizer steps of each stage expert's part, for a base with stage experts "
                             "(default: the steps times the share of the stages it serves, i.e. as many "
                             "images of those stages as the main network trains on)")
    parser.add_argument("--no-experts", action="store_true",
                        help="train the main network only, even when the base has stage experts (the "
                             "finetune then runs the main network at every stage)")
    parser.add_argument("--preset", default="emoji-64-cpu", choices=sorted(PRESETS),
                        help="training preset for the optimisation (its network and process come from --base)")
    parser.add_argument("--run", default=None, metavar="DIR",
                        help="run folder for checkpoints and logs (default: runs/finetune/<name of --out>)")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --run")
    parser.add_argument("--overwrite", action="store_true", help="let --out replace an existing delta")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a training config field, e.g. --set ema_std=0.05")
    parser.add_argument("--max-minutes", type=float, default=None,
                        help="stop after this many wall-clock minutes (and write the delta)")
    add_runtime_arguments(parser, device_default=None, quiet=False, workers=True)


def command_line(args: argparse.Namespace) -> str:
    words = ["edify", "finetune", "--base", args.base, "--data", args.data, "--out", args.out,
             "--params", args.params, "--steps", str(args.steps), "--lr", f"{args.lr:g}",
             "--preset", args.preset]
    words += ["--style-lr", f"{args.style_lr:g}"] if args.style_lr is not None else []
    words += ["--rank", str(args.rank)] + (["--alpha", f"{args.alpha:g}"] if args.alpha else []) \
        if args.params == "lora" else []
    if args.prior_data is not None:
        words += ["--prior-data", args.prior_data, "--prior-share", f"{args.prior_share:g}"]
    words += ["--no-experts"] if args.no_experts else []
    for flag in ("expert_steps", "batch_size", "caption", "style", "init_style", "run", "max_minutes"):
        value = getattr(args, flag)
        words += [f"--{flag.replace('_', '-')}", str(value)] if value is not None else []
    for item in args.overrides:
        words += ["--set", item]
    return shlex.join(words)


def check_args(args: argparse.Namespace) -> None:
    """Every argument checked before anything loads."""
    from edify.pipelines.finetune import INFO_FILE

    if args.steps < 1:
        raise EdifyError(f"--steps must be >= 1, got {args.steps}")
    if args.expert_steps is not None and args.expert_steps < 1:
        raise EdifyError(f"--expert-steps must be >= 1, got {args.expert_steps}")
    if args.batch_size is not None and args.batch_size < 1:
        raise EdifyError(f"--batch-size must be >= 1, got {args.batch_size}")
    if not args.lr > 0:
        raise EdifyError(f"--lr must be > 0, got {args.lr}")
    if args.style_lr is not None and not (math.isfinite(args.style_lr) and args.style_lr > 0):
        raise EdifyError(f"--style-lr must be a finite number > 0, got {args.style_lr}")
    if args.max_minutes is not None and not args.max_minutes > 0:
        raise EdifyError(f"--max-minutes must be > 0, got {args.max_minutes}")
    if args.style is not None and not args.style.strip():
        raise EdifyError("--style must not be empty")
    if not Path(args.base).is_dir():
        raise EdifyError(f"no model folder at {args.base!r}")
    for flag in ("data", "prior_data"):
        spec = getattr(args, flag)
        if spec is not None and not Path(spec).exists() and not any(c in spec for c in "*?[{"):
            raise EdifyError(f"--{flag.replace('_', '-')} {spec!r} does not exist")
    if args.prior_data is not None and not (math.isfinite(args.prior_share) and 0 < args.prior_share < 1):
        raise EdifyError(f"--prior-share must be in (0, 1), got {args.prior_share}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise EdifyError(f"--out {args.out!r} exists and is not a folder")
    if (out / INFO_FILE).exists() and not args.overwrite:
        raise EdifyError(f"{args.out} already holds a finetune; pass --overwrite to replace it")


def expert_parts(base: str | Path, steps: int, expert_steps: int | None) -> dict[tuple[int, ...], int]:
    """{stages: optimizer steps} for each stage expert of the base model folder (none without)."""
    from edify.pipelines.model_io import read_json
    from edify.pipelines.text2image import PipelineConfig

    config = PipelineConfig.from_dict(read_json(Path(base) / "config.json"))
    return {tuple(stages): expert_steps or max(1, round(steps * len(stages) / config.levels))
            for stages in config.stage_experts}


def run(args: argparse.Namespace, text_encoder=None) -> int:
    """Train the delta: the main network on every stage, then (for a base with stage experts,
    unless --no-experts) each expert on its own stages, in run subfolders named like the model's
    expert folders; the delta holds them all."""
    import time

    import torch

    from edify.pipelines.text2image import expert_folder
    from edify.runtime import threads
    from edify.training import checkpoint, distributed
    from edify.training.cli import training_device
    from edify.training.config import apply_overrides, get_preset

    check_args(args)
    parts = {} if args.no_experts else expert_parts(args.base, args.steps, args.expert_steps)
    preset = get_preset(args.preset)
    batch = args.batch_size or preset.batch_size

    def config_for(steps: int, stages: tuple[int, ...] | None):
        config = preset.replace(batch_size=batch, grad_accum=1, total_images=steps * batch, lr=args.lr,
                                warmup_images=min(preset.warmup_images, steps * batch // 10), lr_decay_images=0,
                                sample_images=0, data=args.data, data_in_memory=False, text_table="",
                                checkpoint_images=max(batch, steps * batch // 4), init_from="")
        config = apply_overrides(config, args.overrides)
        if stages is not None:  # an expert trains on its own stages only
            config = config.replace(stages=stages, stage_weights=(), stage_dropout=())
        return config.replace(max_minutes=args.max_minutes) if args.max_minutes is not None else config

    run_dir = Path(args.run) if args.run else Path("runs") / "finetune" / (Path(args.out).resolve().name or "delta")
    plan = [(None, Path(args.base), run_dir, config_for(args.steps, None))]
    plan += [(stages, Path(args.base) / expert_folder(stages), run_dir / expert_folder(stages),
              config_for(steps, stages)) for stages, steps in parts.items()]
    for *_, part_run, _ in plan:
        if not args.resume and checkpoint.latest_checkpoint(part_run) is not None:
            raise EdifyError(f"{part_run} already holds checkpoints; pass --resume to continue or choose another --run")
    device = training_device(args.device)
    results = []
    with threads(args.threads):
        from edify.pipelines.model_io import read_json

        resolution = read_json(Path(args.base) / "config.json").get("resolution", 64)
        data = read_data(args.data, int(resolution), args.caption, args.style)
        distributed.print0(f"data: {len(data.captions)} images from {args.data}")
        prior = None
        if args.prior_data is not None:
            prior = read_data(args.prior_data, int(resolution))
            distributed.print0(f"prior data: {len(prior.captions)} images from {args.prior_data}")
        for stages, base, part_run, config in plan:
            if stages is not None:
                distributed.print0(f"the expert of stage {'/'.join(map(str, stages))} ({base}): "
                                   f"{config.total_images // batch} steps on its own stages")
            started, cpu_started = time.perf_counter(), time.process_time()
            trainer = make_trainer(config, str(base), part_run, data, mode=args.params, rank=args.rank,
                                   alpha=args.alpha, init_style=args.init_style, resume=args.resume,
                                   text_encoder=text_encoder, device=device, command=command_line(args),
                                   log=distributed.print0, prior=prior, prior_share=args.prior_share,
                                   style_lr=args.style_lr)
            result = trainer.run()
            seconds, cpu = session_time(part_run, time.perf_counter() - started, time.process_time() - cpu_started)
            distributed.print0(f"trained to {result.images} images ({result.step} steps, stopped by {result.stop}) "
                               f"in {seconds / 60:.1f} min ({cpu / 60:.1f} CPU min, every session of the run); "
                               f"checkpoint: {result.checkpoint}")
            trained = {"steps": result.step, "images": result.images, "data": args.data,
                       "command": command_line(args), "prior_data": args.prior_data,
                       "prior_share": trainer.finetune_record["prior_share"],
                       "wall_minutes": round(seconds / 60, 2), "cpu_minutes": round(cpu / 60, 2),
                       "threads": torch.get_num_threads(),
                       "trained_values": trainer.finetune_record["trained_values"],
                       "network_values": trainer.finetune_record["network_values"]}
            if stages is not None:
                trained["stages"] = list(stages)
            results.append((stages, part_run, trained))
    if distributed.is_main():
        main = results[0][2]
        if len(results) > 1:
            for key in ("wall_minutes", "cpu_minutes"):
                main[f"total_{key}"] = round(sum(r[2][key] for r in results), 2)
            distributed.print0(f"all parts: {main['total_wall_minutes']:.1f} min "
                               f"({main['total_cpu_minutes']:.1f} CPU min)")
        out = export_delta(run_dir, args.out, trained=main,
                           parts={stages: (part_run, trained) for stages, part_run, trained in results[1:]})
        size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
        distributed.print0(f"finetune: {out} ({size / 2**20:.2f} MiB)")
    distributed.shutdown()
    return 0
