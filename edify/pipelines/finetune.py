"""Finetune deltas: a new style or concept as a small file on top of a base model (Edify Image section 7).

A finetune trains only a few of the base U-Net's parameters (section 7: cross-attention, about 3% of
the network) and saves only those, so it stays small and leaves every other weight, and every
ControlNet trained on the base, as it was. Four choices of what trains (`MODES`):

- `crossattn`: every cross-attention block's query, key/value and output projections (the
  `q`, `kv` and `out` linears of `edify.networks.attention.Attention` where it reads the condition
  tokens). The shared condition embedder (the text projection and its LayerNorm) stays frozen: a
  ControlNet holds its own copy of it, so changing the base's would not reach the ControlNet.
- `crossattn_kv`: only the key/value projections (`kv`), the part that maps condition tokens into
  the grid's attention (Kumari et al. 2023, Custom Diffusion).
- `lora`: a low-rank adapter W + (alpha / r) B A on each of those `q`, `kv` and `out` linears
  (Hu et al. 2021), built and merged by the `peft` library.
- `full`: every parameter but the condition embedder (DreamBooth's choice, Ruiz et al. 2023): the
  upper bound of what a delta can learn, as large as the network, and with no guarantee that
  ControlNets trained on the base still fit (their copy of the encoder no longer matches).

A finetune may also add **new style names**: each takes a free row of the media-type table (the
network has `num_media_types` rows, the base's styles use the first ones), which trains with the
rest and is saved with the delta.

A delta is a folder holding two files:

    finetune.safetensors   full modes: the finetuned value of each trained parameter, by its name;
                           lora: `<module>.lora_A` [r, in] and `<module>.lora_B` [out, r] per module;
                           each new style's media-table row as `style.<name>` [context_dim]
    finetune.json          format, version, mode, rank and alpha (lora), the trained parameter or
                           module names, the new styles and their slots, the base's fingerprint,
                           a save id shared with the tensors' header, how it was trained, and
                           its parts for the base's stage experts (`experts`: stages, save id)

and, for a base with stage experts, one subfolder per expert named like the model's (`expert-0`),
a delta folder of its own for that expert's network (trained on its stages only). Loading applies
each part to its expert; sampling keeps the experts while every active finetune has parts for them.

The base fingerprint is the sha256 of the base's config (network, process, text encoder, styles) and
the sha256 of its weights as loaded, so a delta made for another base, or for the same network with
other weights, is refused in one line. Files are untrusted input, checked like model folders
(`edify.pipelines.model_io`); they are written under temporary names and renamed into place, the
parts first and the main JSON last.

Loading (`load_finetune(pipe, path, scale)`) keeps a copy of every value it replaces and writes
`lerp(base, finetuned, scale)` into every trained weight (lora: the base plus `scale` times the
adapter, merged by peft), so scale 0 leaves the network bit for bit as it was, scale 1 is the
finetune, and `unload_finetune` puts the copies back exactly. A new style's row is written whole at
any scale but 0 (the base has no value for it: its row of a free slot was never trained, so a lerp
from it would mix an untrained vector into the token), as a new token's embedding is in textual
inversion; the scale is the strength of the weights' change. Two finetunes load together when they touch no common parameter or
style slot; otherwise the second is refused. A ControlNet pipeline's ControlNets keep their weights;
only each new style's row is also written into their media tables, whose row for a free slot was
never trained.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from edify.data.vocab import StyleVocab
from edify.errors import EdifyError
from edify.networks.attention import Attention
from edify.pipelines.model_io import (SAVE_KEY, _open_weights, _stage_shard, _stage_text, brief, first_line,
                                      from_json, fsync, inside, naming, read_json, regular_file)

FORMAT = "edify-finetune"
VERSION = 1
WEIGHTS_FILE = "finetune.safetensors"
INFO_FILE = "finetune.json"
MODES = ("crossattn", "crossattn_kv", "lora", "full")
CONDITION_EMBEDDER = "cond_embed."
MEDIA_TABLE = CONDITION_EMBEDDER + "media.table.weight"
STYLE_PREFIX = "style."
LORA_ADAPTER = "finetune"
NETWORK = "network"  # the owner name of a pipeline's main network (see `networks`)
# The base config fields a finetune depends on (the network, its process, text encoder and styles);
# fields added to model configs later, or sampling defaults, do not change a base's fingerprint.
FINGERPRINT_FIELDS = ("network", "levels", "switch_sigmas", "ramp", "ramp_width", "sigma_data", "resolution",
                      "text_encoder", "text_max_length", "styles")


# ---- what trains ------------------------------------------------------------------------------

def cross_attention_modules(net: nn.Module) -> list[str]:
    """Names of the network's cross-attention modules, in order."""
    return [name for name, m in net.named_modules() if isinstance(m, Attention) and m.cross]


def lora_targets(net: nn.Module) -> list[str]:
    """The linears a LoRA adapter wraps: q, kv and out of every cross-attention."""
    return [f"{p}.{part}" for p in cross_attention_modules(net) for part in ("q", "kv", "out")]


def trained_names(net: nn.Module, mode: str) -> list[str]:
    """The parameter names a full-weight mode trains (`crossattn`, `crossattn_kv` or `full`)."""
    if mode not in MODES or mode == "lora":
        raise EdifyError(f"full-weight finetune modes are crossattn, crossattn_kv and full, got {mode!r}")
    if mode == "full":
        return [n for n, _ in net.named_parameters() if not n.startswith(CONDITION_EMBEDDER)]
    parts = (("q.weight", "kv.weight", "out.weight", "out.bias") if mode == "crossattn" else ("kv.weight",))
    params = dict(net.named_parameters())
    return [f"{p}.{part}" for p in cross_attention_modules(net) for part in parts if f"{p}.{part}" in params]


def free_slots(num_media_types: int, styles) -> list[int]:
    """Media-type rows the base's styles leave unused (row num_media_types is the null row)."""
    return list(range(len(styles), num_media_types))


class StyleSlots(StyleVocab):
    """A base style vocabulary plus new style names, each at its own media-type slot.

    The base's names keep their indices; a new name maps to its slot (past them), so the sorted
    order StyleVocab asks of a base's own names does not apply to the new ones. `names` lists the
    base's names, then the new ones."""

    def __init__(self, base: StyleVocab, extra: dict[str, int]):
        super().__init__(base.names)
        object.__setattr__(self, "base", base)
        object.__setattr__(self, "extra", dict(extra))
        object.__setattr__(self, "names", base.names + tuple(extra))

    def index(self, name: str | None) -> int:
        if isinstance(name, str) and name in self.extra:
            return self.extra[name]
        try:
            return self.base.index(name)
        except EdifyError:
            raise EdifyError(f"unknown style {name!r}; known: {', '.join(self.names)}") from None


# ---- the delta's description ------------------------------------------------------------------

@dataclass(frozen=True)
class NewStyle:
    name: str
    slot: int


@dataclass(frozen=True)
class ExpertPart:
    """The delta's part for one of the base's stage experts (a network of its own serving these
    stages): a delta folder of its own in the subfolder `expert_folder(stages)`, with this save id."""

    stages: tuple[int, ...]
    save: str


@dataclass(frozen=True)
class BaseFingerprint:
    config_sha256: str
    weights_sha256: str


@dataclass(frozen=True)
class FinetuneInfo:
    """The schema of finetune.json."""

    format: str
    version: int
    mode: str
    base: BaseFingerprint
    parameters: tuple[str, ...]  # full modes: parameter names; lora: module names
    styles: tuple[NewStyle, ...] = ()
    rank: int = 0
    alpha: float = 0.0
    save: str = ""
    trained: dict = field(default_factory=dict)  # how it was made (steps, images, data, command)
    experts: tuple[ExpertPart, ...] = ()  # parts for the base's stage experts, each in its subfolder

    def __post_init__(self):
        if self.format != FORMAT:
            raise EdifyError(f"not an {FORMAT} file (format {brief(self.format)})")
        if self.version != VERSION:
            raise EdifyError(f"finetune format version {self.version} is not supported (this edify reads {VERSION})")
        if self.mode not in MODES:
            raise EdifyError(f"field 'mode' must be one of {', '.join(MODES)}, got {brief(self.mode)}")
        if self.mode == "lora" and not (self.rank >= 1 and math.isfinite(self.alpha) and self.alpha > 0):
            raise EdifyError(f"a lora finetune needs rank >= 1 and alpha > 0, got {self.rank} and {self.alpha}")
        names = [s.name for s in self.styles]
        if len(set(names)) != len(names) or len(set(self.parameters)) != len(self.parameters):
            raise EdifyError("field 'styles' or 'parameters' repeats a name")
        if not self.parameters and not self.styles:
            raise EdifyError("the finetune trains nothing (no parameters, no styles)")
        stages = [s for part in self.experts for s in part.stages]
        if (any(not part.stages for part in self.experts) or len(set(stages)) != len(stages)
                or any(isinstance(s, bool) or s < 0 for s in stages)):
            raise EdifyError(f"field 'experts' must list distinct stages >= 0 in non-empty groups, got "
                             f"{[list(part.stages) for part in self.experts]}")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["parameters"] = list(self.parameters)
        d["styles"] = [dataclasses.asdict(s) for s in self.styles]
        d["experts"] = [{"stages": list(part.stages), "save": part.save} for part in self.experts]
        return d

    def tensor_names(self) -> list[str]:
        """The tensors finetune.safetensors must hold."""
        if self.mode == "lora":
            names = [f"{m}.{ab}" for m in self.parameters for ab in ("lora_A", "lora_B")]
        else:
            names = list(self.parameters)
        return names + [STYLE_PREFIX + s.name for s in self.styles]


def base_fingerprint(pipe, owner: str = NETWORK) -> BaseFingerprint:
    """sha256 of the base's config (its FINGERPRINT_FIELDS) and of one of its networks' weights as
    loaded: the main network, or a stage expert (`owner` = its folder name, e.g. "expert-0"; an
    expert's own model folder has the same fingerprint fields as the main one).

    The pipeline's finetunes, if any, are undone in the hash: it is always the base's."""
    config = {k: v for k, v in pipe.config.to_dict().items() if k in FINGERPRINT_FIELDS}
    config_hash = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()
    state = _base_state(pipe, owner)
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().to("cpu").contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return BaseFingerprint(config_hash, h.hexdigest())


def _base_state(pipe, owner: str = NETWORK) -> dict[str, Tensor]:
    """A network's state dict with every loaded finetune's replaced values put back."""
    state = dict(networks(pipe)[owner].state_dict())
    copied = set()
    for loaded in reversed(getattr(pipe, "finetunes", [])):
        for patch in (p for p in loaded.patches if p.owner == owner):
            if patch.row is None:
                state[patch.name] = patch.original
                continue
            if patch.name not in copied:
                state[patch.name] = state[patch.name].clone()
                copied.add(patch.name)
            state[patch.name][patch.row] = patch.original
    return state


# ---- reading and writing ----------------------------------------------------------------------

def save_delta(folder: str | os.PathLike, info: FinetuneInfo, tensors: dict[str, Tensor],
               parts: dict[tuple[int, ...], tuple[FinetuneInfo, dict[str, Tensor]]] | None = None) -> Path:
    """Write finetune.safetensors and finetune.json into `folder`, each under a temporary name
    renamed into place (the JSON last); returns the folder. `parts` ({stages: (info, tensors)}):
    the parts for the base's stage experts, each written first as a delta folder of its own in
    `expert_folder(stages)`, their save ids recorded in the main finetune.json."""
    from edify.pipelines.text2image import expert_folder

    folder = Path(folder)
    recorded = []
    for stages, (part_info, part_tensors) in sorted((parts or {}).items()):
        if part_info.experts:
            raise EdifyError("an expert's part of a finetune cannot hold parts of its own")
        save = _save_one(folder / expert_folder(stages), part_info, part_tensors)
        recorded.append(ExpertPart(tuple(stages), save))
    _save_one(folder, dataclasses.replace(info, experts=tuple(recorded)), tensors)
    return folder


def _save_one(folder: Path, info: FinetuneInfo, tensors: dict[str, Tensor]) -> str:
    """One delta folder's two files; returns their save id."""
    if sorted(tensors) != sorted(info.tensor_names()):
        raise EdifyError(f"the tensors to save do not match the finetune's description: {len(tensors)} given, "
                         f"{len(info.tensor_names())} described")
    folder.mkdir(parents=True, exist_ok=True)
    save = secrets.token_hex(8)
    info = dataclasses.replace(info, save=save)
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in sorted(tensors.items())}
    staged = [(_stage_shard(state, folder / WEIGHTS_FILE, save), folder / WEIGHTS_FILE)]
    staged.append((_stage_text(folder / INFO_FILE, json.dumps(info.to_dict(), indent=2) + "\n"), folder / INFO_FILE))
    for tmp, final in staged:
        os.replace(tmp, final)
    fsync(folder)
    return save


def read_delta(path: str | os.PathLike) -> tuple[FinetuneInfo, dict[str, Tensor]]:
    """The description and tensors of a delta folder (or of its finetune.json), every field,
    name, shape and value checked; any failure is one EdifyError line naming the file."""
    folder = Path(path)
    if folder.name == INFO_FILE:
        folder = folder.parent
    if not folder.is_dir():
        raise EdifyError(f"no finetune at {str(path)!r} (a folder with {INFO_FILE} and {WEIGHTS_FILE})")
    info_path = inside(folder, INFO_FILE, "finetune folder")
    weights_path = inside(folder, WEIGHTS_FILE, "finetune folder")
    for p in (info_path, weights_path):
        if not os.path.lexists(p):
            raise EdifyError(f"finetune folder {str(folder)!r} has no {p.name}")
    with naming(info_path):
        info = from_json(FinetuneInfo, read_json(info_path), "finetune description")
    regular_file(weights_path)
    expected = info.tensor_names()
    tensors = {}
    with _open_weights(weights_path) as f:
        try:
            meta, names = f.metadata() or {}, set(f.keys())
            if meta.get(SAVE_KEY) != info.save:
                raise EdifyError(f"{weights_path} is not from the save {INFO_FILE} names (an interrupted save?)")
            if names != set(expected):
                missing, extra = sorted(set(expected) - names), sorted(names - set(expected))
                raise EdifyError(f"{weights_path} does not match {INFO_FILE}: {len(missing)} tensor(s) missing "
                                 f"(e.g. {brief(missing[:1])}), {len(extra)} unexpected (e.g. {brief(extra[:1])})")
            for name in expected:
                t = f.get_tensor(name)
                if not t.is_floating_point() or not torch.isfinite(t).all():
                    raise EdifyError(f"{weights_path}: tensor {name!r} must hold finite floating-point values")
                tensors[name] = t.float()
        except EdifyError:
            raise
        except Exception as err:  # a corrupt file: the safetensors reader's own error, in one line
            raise EdifyError(f"corrupt finetune weights in {weights_path}: {first_line(err)}") from None
    return info, tensors


def read_parts(path: str | os.PathLike, info: FinetuneInfo) -> dict[tuple[int, ...], tuple[FinetuneInfo, dict[str, Tensor]]]:
    """The parts of a delta for the base's stage experts ({stages: (info, tensors)}), each read like
    a delta folder and checked against the main description (the same save, mode and new styles)."""
    from edify.pipelines.text2image import expert_folder

    folder = Path(path)
    folder = folder.parent if folder.name == INFO_FILE else folder
    parts = {}
    for part in info.experts:
        sub = inside(folder, expert_folder(part.stages), "finetune folder")
        if not sub.is_dir():
            raise EdifyError(f"finetune folder {str(folder)!r} lists a part for the expert of stage "
                             f"{'/'.join(map(str, part.stages))} but has no folder {expert_folder(part.stages)}")
        part_info, tensors = read_delta(sub)
        if part_info.save != part.save:
            raise EdifyError(f"{sub} is not the part {INFO_FILE} in {folder} names (an interrupted save?)")
        if part_info.experts or part_info.mode != info.mode or part_info.styles != info.styles:
            raise EdifyError(f"{sub} does not match the finetune in {folder} (its mode, styles or parts differ)")
        parts[tuple(part.stages)] = (part_info, tensors)
    return parts


def check_fits(info: FinetuneInfo, tensors: dict[str, Tensor], net: nn.Module, base_styles,
               fingerprint: BaseFingerprint, path) -> None:
    """Refuse a delta made for another base, or whose tensors do not fit the network `net`."""
    if info.base != fingerprint:
        what = "config" if info.base.config_sha256 != fingerprint.config_sha256 else "weights"
        raise EdifyError(f"the finetune {str(path)!r} was made for another base model (its {what} differ "
                         f"from this model's); load it on the base it was trained on")
    params = dict(net.named_parameters())
    modules = dict(net.named_modules())
    for name in info.parameters:
        if info.mode == "lora":
            module = modules.get(name)
            if not isinstance(module, nn.Linear):
                raise EdifyError(f"the finetune {str(path)!r} adapts {name!r}, which is no linear layer of this network")
            r = tensors[f"{name}.lora_A"].shape[0]
            if (tuple(tensors[f"{name}.lora_A"].shape) != (r, module.in_features) or r != info.rank
                    or tuple(tensors[f"{name}.lora_B"].shape) != (module.out_features, r)):
                raise EdifyError(f"the finetune {str(path)!r} holds adapter shapes that do not fit {name!r}")
        elif name not in params or tuple(params[name].shape) != tuple(tensors[name].shape):
            raise EdifyError(f"the finetune {str(path)!r} holds {name!r}, which this network lacks or has in "
                             f"another shape")
    table = params[MEDIA_TABLE]
    free = free_slots(table.shape[0] - 1, base_styles)
    for style in info.styles:
        if style.slot not in free:
            raise EdifyError(f"the finetune's style {style.name!r} needs media slot {style.slot}, which this base "
                             f"does not leave free (free: {free})")
        if tuple(tensors[STYLE_PREFIX + style.name].shape) != (table.shape[1],):
            raise EdifyError(f"the finetune's style {style.name!r} row has shape "
                             f"{tuple(tensors[STYLE_PREFIX + style.name].shape)}, the table needs ({table.shape[1]},)")


# ---- loading onto a pipeline ------------------------------------------------------------------

@dataclass
class Patch:
    """One replaced value: a parameter (or one row of it) of network `owner` (a name of
    `networks(pipe)`: the main network, a stage expert or a ControlNet), and the base's value to
    put back."""

    owner: str
    name: str
    row: int | None
    original: Tensor

    @property
    def key(self) -> str:
        return self.name if self.row is None else f"{self.name}[{self.row}]"


@dataclass
class LoadedFinetune:
    path: str
    info: FinetuneInfo
    scale: float
    patches: list[Patch]
    experts: tuple[tuple[int, ...], ...] = ()  # the pipeline's expert groups this finetune changed


def networks(pipe) -> dict[str, nn.Module]:
    """A pipeline's networks by owner name: NETWORK (the main one), each stage expert by its folder
    name (`expert-0`, ...), each ControlNet as `controlnet-<i>`."""
    from edify.pipelines.text2image import expert_folder

    found = {NETWORK: pipe.network}
    found.update((expert_folder(stages), net) for stages, net in expert_groups(pipe).items())
    found.update((f"controlnet-{i}", cn) for i, cn in enumerate(getattr(pipe, "controlnets", [])))
    return found


def expert_groups(pipe) -> dict[tuple[int, ...], nn.Module]:
    """The pipeline's stage experts as {stages it serves: network} (text2image.expert_groups)."""
    from edify.pipelines.text2image import expert_groups as groups

    return groups(getattr(pipe, "experts", {}))


def check_scale(scale) -> float:
    try:
        value = float(scale)
    except (TypeError, ValueError):
        raise EdifyError(f"the finetune scale must be a finite number, got {brief(scale)}") from None
    if not math.isfinite(value):
        raise EdifyError(f"the finetune scale must be a finite number, got {value}")
    return value


def lora_merged(linear: nn.Linear, lora_a: Tensor, lora_b: Tensor, rank: int, alpha: float,
                scale: float) -> Tensor:
    """W + scale (alpha / r) B A for one linear, computed by peft's merge on a copy of the layer."""
    from peft import LoraConfig, inject_adapter_in_model

    holder = nn.ModuleDict({"layer": nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None)})
    with torch.no_grad():
        holder["layer"].weight.copy_(linear.weight)
        if linear.bias is not None:
            holder["layer"].bias.copy_(linear.bias)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=["layer"], lora_dropout=0.0)
    holder = inject_adapter_in_model(config, holder, adapter_name=LORA_ADAPTER)
    layer = holder["layer"]
    with torch.no_grad():
        layer.lora_A[LORA_ADAPTER].weight.copy_(lora_a)
        layer.lora_B[LORA_ADAPTER].weight.copy_(lora_b)
    layer.set_scale(LORA_ADAPTER, scale)
    layer.merge(safe_merge=True, adapter_names=[LORA_ADAPTER])
    return layer.base_layer.weight.detach().clone()


def new_values(info: FinetuneInfo, tensors: dict[str, Tensor], net: nn.Module, scale: float) -> dict[str, Tensor]:
    """The value each touched base parameter takes at `scale` (style rows aside)."""
    params = dict(net.named_parameters())
    if info.mode == "lora":
        modules = dict(net.named_modules())
        return {f"{m}.weight": lora_merged(modules[m], tensors[f"{m}.lora_A"], tensors[f"{m}.lora_B"], info.rank,
                                           info.alpha, scale) for m in info.parameters}
    return {name: torch.lerp(params[name].detach().float(), tensors[name].to(params[name].device), scale)
            for name in info.parameters}


def load_finetune(pipe, path: str | os.PathLike, scale: float = 1.0) -> LoadedFinetune:
    """Apply a delta folder to `pipe` at `scale`; see the module docstring.

    A delta with parts for stage experts changes each of the pipeline's experts it has a part for;
    parts for experts the pipeline lacks are not used (its main part was trained on every stage)."""
    from edify.pipelines.text2image import expert_folder

    scale = check_scale(scale)
    info, tensors = read_delta(path)
    parts = read_parts(path, info)
    loaded_list = getattr(pipe, "finetunes", [])
    if not loaded_list:
        pipe._finetune_bases = {}
    groups = expert_groups(pipe)
    # (owner, its network, the delta's description and tensors for it)
    targets = [(NETWORK, pipe.network, info, tensors)]
    targets += [(expert_folder(stages), groups[stages], *parts[stages]) for stages in groups if stages in parts]
    for owner, net, part_info, part_tensors in targets:
        if owner not in pipe._finetune_bases:
            pipe._finetune_bases[owner] = base_fingerprint(pipe, owner)
        where = str(path) if owner == NETWORK else f"{path}/{owner}"
        check_fits(part_info, part_tensors, net, pipe.config.styles, pipe._finetune_bases[owner], where)
    taken = {(p.owner, p.key): f.path for f in loaded_list for p in f.patches if not p.owner.startswith("controlnet-")}
    taken_styles = {name: f.path for f in loaded_list for name in (s.name for s in f.info.styles)}
    for owner, _, part_info, _ in targets:
        keys = [f"{m}.weight" for m in part_info.parameters] if part_info.mode == "lora" else list(part_info.parameters)
        keys += [f"{MEDIA_TABLE}[{s.slot}]" for s in part_info.styles]
        for key in keys:
            if (owner, key) in taken:
                what = key if owner == NETWORK else f"{key} of {owner}"
                raise EdifyError(f"the finetunes {taken[owner, key]!r} and {str(path)!r} both change {what}: "
                                 f"load one at a time")
    for style in info.styles:
        if style.name in taken_styles:
            raise EdifyError(f"the finetunes {taken_styles[style.name]!r} and {str(path)!r} both add the style "
                             f"{style.name!r}: load one at a time")
        if style.name in pipe.config.styles:
            raise EdifyError(f"the finetune {str(path)!r} adds the style {style.name!r}, which the base already has")

    patches = []
    with torch.no_grad():
        # a ControlNet gets the main network's new style rows (it reads the same condition embedder)
        controlnets = [(f"controlnet-{i}", cn, info, tensors) for i, cn in enumerate(getattr(pipe, "controlnets", []))]
        for owner, net, part_info, part_tensors in targets + controlnets:
            params = dict(net.named_parameters())
            if not owner.startswith("controlnet-"):
                values = new_values(part_info, part_tensors, net, scale) if scale != 0 else {}
                for name, value in values.items():
                    patches.append(Patch(owner, name, None, params[name].detach().clone()))
                    params[name].copy_(value.to(params[name].dtype))
            table = params[MEDIA_TABLE]
            for style in part_info.styles:
                patches.append(Patch(owner, MEDIA_TABLE, style.slot, table[style.slot].detach().clone()))
                if scale != 0:  # whole: the base's row of a free slot is untrained (module docstring)
                    table[style.slot] = part_tensors[STYLE_PREFIX + style.name].to(table.device, table.dtype)
    changed = tuple(stages for stages in groups if stages in parts)
    loaded = LoadedFinetune(str(path), info, scale, patches, changed)
    pipe.finetunes = loaded_list + [loaded]
    _update_vocab(pipe)
    return loaded


def unload_finetune(pipe, path: str | os.PathLike | None = None) -> None:
    """Undo one loaded finetune (by its path), or all of them (path None), restoring the exact values."""
    loaded_list = list(getattr(pipe, "finetunes", []))
    if path is not None:
        chosen = [f for f in loaded_list if f.path == str(path)]
        if not chosen:
            raise EdifyError(f"no finetune {str(path)!r} is loaded (loaded: {[f.path for f in loaded_list]})")
    else:
        chosen = loaded_list
    owners = networks(pipe)
    with torch.no_grad():
        for loaded in reversed(chosen):
            for patch in loaded.patches:
                target = dict(owners[patch.owner].named_parameters())[patch.name]
                (target if patch.row is None else target[patch.row]).copy_(patch.original)
    pipe.finetunes = [f for f in loaded_list if f not in chosen]
    _update_vocab(pipe)


def experts_kept(pipe) -> bool:
    """Whether sampling may use the pipeline's stage experts: yes unless a loaded finetune at a
    scale other than 0 changed the main network but not every expert (then the main network, which
    the finetune trained on every stage, serves every stage)."""
    groups = set(expert_groups(pipe))
    return all(f.scale == 0 or groups <= set(f.experts) for f in getattr(pipe, "finetunes", []))


def _update_vocab(pipe) -> None:
    """The pipeline's style names: the base's plus every loaded finetune's new ones."""
    base = StyleVocab(tuple(pipe.config.styles))
    extra = {s.name: s.slot for f in pipe.finetunes for s in f.info.styles}
    pipe.vocab = StyleSlots(base, extra) if extra else base
