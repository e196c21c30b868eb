"""ControlNet for the Haar U-Net (Edify Image section 5; Zhang et al. 2023).

A ControlNet is a trainable copy of the encoder half of a frozen base U-Net: its noise/stage and
condition embedders, stem, position encoding, encoder levels and middle block, initialised from the
base's weights. A control image enters through a small hint encoder in the Haar domain.

The control is always the FULL-resolution image, whatever the stage. A stage-j state lives on a
grid 2^j times coarser (section 2.2), so the hint encoder first moves the control onto that grid by
space-to-depth, S_j = pixel_unshuffle by 2^j (4^j Cc channels at H/2^j: a permutation of its
pixels, nothing is pooled away), and reads it with an input convolution of its own per stage:

    c_hint = Z_h(convs(in_j(Haar(S_j(control)))))   control [B, Cc, 2^j h, 2^j w], state [B, C, h, w]
    h_0    = stem(Haar(x_in)) + c_hint + pos         (the copy's stem output plus the hint)

and every encoder output h_k (one per skip of the base, then the middle block's output) leaves
through its own 1x1 projection Z_k:

    r_k = Z_k(h_k),   the residual the base adds to skip k (the last one to the middle)

Z_h and every Z_k start at zero, so a new ControlNet adds nothing: the controlled model starts
exactly as the base and training moves it from there. `forward` returns the list the U-Net's
`residuals` argument takes.

`ControlNetConfig` records the base network's config and its fingerprint; a ControlNet is refused
(one-line EdifyError) beside a base of another config. Weights are saved as safetensors beside a
JSON config (`save_pretrained` / `from_pretrained`), never pickled; the config carries the format
version, and a folder of another version (format 1 read the control pooled to each stage) is
refused with a one-line EdifyError.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from edify.conditioning import Cond
from edify.errors import EdifyError
from edify.networks.embedders import ConditionEmbedder, NoiseStageEmbedding, PositionEncoding, embed_inputs
from edify.networks.layers import HAAR_FACTOR, Downsample, HaarDWT
from edify.networks.unet import UNet, UNetConfig, build_encoder, build_middle
from edify.pipelines.model_io import (CONFIG_NAME, SavedModel, brief, from_json, inside, model_folder, naming,
                                      read_json, save_model, scan_weights)

FORMAT = "edify-controlnet"
# 2: the hint reads the full-resolution control at every stage (space-to-depth, one input conv per
# stage); 1 (no "version" field) pooled it to the stage's resolution.
FORMAT_VERSION = 2
# Base-config fields that change neither the weights nor the function: a base may differ in them.
RUNTIME_FIELDS = ("checkpointing", "dropout")
# The copied modules, named as in the U-Net so that the base's state dict loads into them.
COPIED = ("embed", "cond_embed", "stem", "pos", "down", "mid_res1", "mid_attn", "mid_res2")
MAX_CONTROL_CHANNELS = 64
MAX_HINT_LAYERS = 8
MAX_HINT_WIDTH = 4096


def base_fingerprint(config: UNetConfig) -> str:
    """16 hex digits identifying a base network's architecture (its config minus RUNTIME_FIELDS)."""
    d = {k: v for k, v in config.to_dict().items() if k not in RUNTIME_FIELDS}
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class ControlNetConfig:
    """A ControlNet's hyper-parameters; JSON-able through `to_dict` / `from_dict`.

    network:          the base U-Net's config (`UNetConfig.to_dict()`), which the copy mirrors.
    control_channels: channels Cc of the control image (e.g. 1 for edges or depth).
    hint_widths:      widths of the hint encoder's convolutions on the Haar grid (16 4^j Cc channels
                      in at stage j, one input conv per stage of the base).
    kind:             what the control is ("canny", "depth", "inpaint", ...): a label for pipelines.
    base_fingerprint: `base_fingerprint(network)`; filled in when empty, checked when given.
    """

    network: dict
    control_channels: int = 3
    hint_widths: tuple[int, ...] = (64, 64)
    kind: str = "custom"
    base_fingerprint: str = field(default="")

    def __post_init__(self):
        with naming("field 'network'"):
            base = UNetConfig.from_dict(self.network)
        if not 1 <= self.control_channels <= MAX_CONTROL_CHANNELS:
            raise EdifyError(f"control_channels must be in [1, {MAX_CONTROL_CHANNELS}], got {self.control_channels}")
        if not 1 <= len(self.hint_widths) <= MAX_HINT_LAYERS:
            raise EdifyError(f"hint_widths must name 1 to {MAX_HINT_LAYERS} widths, got {len(self.hint_widths)}")
        if not all(1 <= w <= MAX_HINT_WIDTH for w in self.hint_widths):
            raise EdifyError(f"every hint width must be in [1, {MAX_HINT_WIDTH}], got {list(self.hint_widths)}")
        actual = base_fingerprint(base)
        if self.base_fingerprint and self.base_fingerprint != actual:
            raise EdifyError(f"base_fingerprint {self.base_fingerprint!r} does not match its network config "
                             f"({actual!r}): the config was edited")
        object.__setattr__(self, "base_fingerprint", actual)

    @classmethod
    def for_base(cls, base: UNetConfig, control_channels: int = 3, hint_widths: tuple[int, ...] = (64, 64),
                 kind: str = "custom") -> ControlNetConfig:
        return cls(base.to_dict(), control_channels, tuple(hint_widths), kind)

    @property
    def base(self) -> UNetConfig:
        return UNetConfig.from_dict(self.network)

    def check_base(self, base: UNetConfig) -> None:
        """Refuse a base network of another architecture than the one this ControlNet copies."""
        got = base_fingerprint(base)
        if got != self.base_fingerprint:
            raise EdifyError(f"this {self.kind} ControlNet was made for another base network (fingerprint "
                             f"{self.base_fingerprint}, the base's is {got}); train one for this base")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["hint_widths"] = list(self.hint_widths)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ControlNetConfig:
        return from_json(cls, d, "ControlNet config")


def stage_control(control: Tensor, stage: int) -> Tensor:
    """S_j: the full-resolution control on the stage-j grid, losslessly (section 2.2's grid).

    [B, C, H, W] -> [B, 4^j C, H/2^j, W/2^j] by space-to-depth: channel c 4^j + 2^j p + q holds
    the pixels (2^j y + p, 2^j x + q) of channel c; a permutation, so no pixel is lost."""
    return F.pixel_unshuffle(control, 2**stage) if stage else control


class StageInputs(nn.Module):
    """in_j: one 3x3 conv per stage j, on `channels[j]` inputs, all `width` wide.

    The stages' weights are slices of one tensor (as the U-Net's stage embedding is one table), so
    every training step, whatever its stage, updates the same parameters: the optimiser's state and
    DDP's gradient buckets cover all of them from the first step."""

    def __init__(self, channels: tuple[int, ...], width: int):
        super().__init__()
        self.channels = tuple(channels)
        self.offsets = [sum(self.channels[:j]) for j in range(len(self.channels) + 1)]
        self.weight = nn.Parameter(torch.empty(width, self.offsets[-1], 3, 3))
        self.bias = nn.Parameter(torch.empty(len(self.channels), width))
        with torch.no_grad():
            for j, c in enumerate(self.channels):  # nn.Conv2d's default init, per stage
                bound = 1 / (9 * c) ** 0.5
                self.weight[:, self.offsets[j]:self.offsets[j + 1]].uniform_(-bound, bound)
                self.bias[j].uniform_(-bound, bound)

    def forward(self, z: Tensor, stage: int) -> Tensor:
        w = self.weight[:, self.offsets[stage]:self.offsets[stage + 1]]
        return F.conv2d(z, w, self.bias[stage], padding=1)


class HintEncoder(nn.Module):
    """Full-resolution control -> stem-sized features at stage j: S_j, Haar DWT, the stage's input
    conv, shared 3x3 convs with SiLU, a zero-initialised last conv."""

    def __init__(self, control_channels: int, widths: tuple[int, ...], out_channels: int, stages: int):
        super().__init__()
        cs = [4**j * control_channels for j in range(stages)]  # channels of S_j(control)
        self.dwts = nn.ModuleList(HaarDWT(c) for c in cs)  # the U-Net's 2-level Haar transform
        self.inputs = StageInputs(tuple(HAAR_FACTOR**2 * c for c in cs), widths[0])
        layers, ch = [nn.SiLU()], widths[0]
        for w in widths[1:]:
            layers += [nn.Conv2d(ch, w, 3, padding=1), nn.SiLU()]
            ch = w
        self.convs = nn.Sequential(*layers)
        self.out = zero_module(nn.Conv2d(ch, out_channels, 3, padding=1))

    def forward(self, control: Tensor, stage: int) -> Tensor:
        z = self.dwts[stage](stage_control(control, stage))
        return self.out(self.convs(self.inputs(z, stage)))


def zero_module(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ControlNet(nn.Module):
    """Trainable encoder copy of a base U-Net plus a hint encoder; outputs the base's residuals."""

    def __init__(self, config: ControlNetConfig):
        super().__init__()
        self.config = config
        # Sampling settings measured best with this ControlNet (e.g. {"guidance_scale": 3.0}), kept in
        # its config.json; pipelines use them where the caller gives none (edify.pipelines.control).
        self.defaults: dict = {}
        self.base_config = cfg = config.base
        self._check = SimpleNamespace(config=cfg)  # for UNet.check_inputs, which reads only `config`
        w = cfg.widths
        self.dwt = HaarDWT(cfg.in_channels)
        self.embed = NoiseStageEmbedding(cfg.fourier_dim, cfg.emb_dim, cfg.num_stages)
        self.cond_embed = ConditionEmbedder(cfg.text_dim, cfg.context_dim, cfg.num_media_types,
                                            cfg.emb_dim if cfg.pooled_cond else None)
        self.stem = nn.Conv2d(16 * cfg.in_channels, w[0], 3, padding=1)
        self.pos = PositionEncoding(w[0], cfg.reference_resolution // HAAR_FACTOR)
        self.hint = HintEncoder(config.control_channels, config.hint_widths, w[0], cfg.num_stages)

        # The encoder exactly as the U-Net builds it (same module names, so the base's weights load).
        self.down, self.skip_channels = build_encoder(cfg)
        self.mid_res1, self.mid_attn, self.mid_res2 = build_middle(cfg)

        # Z_k: zero-initialised 1x1 projections onto every skip, then the middle (section 5).
        self.zero_convs = nn.ModuleList(zero_module(nn.Conv2d(c, c, 1)) for c in self.skip_channels)
        self.zero_mid = zero_module(nn.Conv2d(w[-1], w[-1], 1))

    @classmethod
    def from_base(cls, base: UNet, config: ControlNetConfig | None = None, **kwargs) -> ControlNet:
        """A new ControlNet whose copy starts from `base`'s weights (kwargs: those of `for_base`)."""
        config = config or ControlNetConfig.for_base(base.config, **kwargs)
        config.check_base(base.config)
        net = cls(config).to(next(base.parameters()).device)
        state = {k: v for k, v in base.state_dict().items() if k.split(".", 1)[0] in COPIED}
        missing, unexpected = net.load_state_dict(state, strict=False)  # copies the values
        not_copied = [k for k in missing if k.split(".", 1)[0] in COPIED]
        if not_copied or unexpected:  # pragma: no cover - the encoder is built exactly as the U-Net's
            raise EdifyError(f"the base's encoder does not fit its copy: {len(not_copied)} missing, "
                             f"{len(unexpected)} unexpected")
        return net

    def _run(self, block: nn.Module, *args) -> Tensor:
        if self.base_config.checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def forward(self, x: Tensor, c_noise: Tensor, cond: Cond | None = None, stage: Tensor | None = None,
                control: Tensor | None = None) -> list[Tensor]:
        """x [B, C, h, w] (the base's preconditioned input at stage j), c_noise [B], stage [B] (all j)
        and control [B, Cc, 2^j h, 2^j w] at FULL resolution -> residuals: one per skip of the base,
        then the middle. The stage of the hint is read from the sizes (so compiled graphs need no
        sync) and checked against `stage`."""
        UNet.check_inputs(self._check, x, c_noise, stage)
        j, stage = self.control_stage(x, control, stage)
        b = x.shape[0]
        emb, ctx, mask = embed_inputs(self.embed, self.cond_embed, c_noise, stage, cond, b, x.device)

        h = self.stem(self.dwt(x)) + self.hint(control.to(x.dtype), j)  # h_0 = stem + Z_h(hint), section 5
        h = h + self.pos(h.shape[2], h.shape[3]).to(h.dtype)
        out = [self.zero_convs[0](h)]
        for block, zero in zip(self.down, self.zero_convs[1:]):
            h = block(h) if isinstance(block, Downsample) else self._run(block, h, emb, ctx, mask)
            out.append(zero(h))  # r_k = Z_k(h_k)
        h = self._run(self.mid_res1, h, emb)
        h = self._run(self.mid_attn, h, ctx, mask)
        h = self._run(self.mid_res2, h, emb)
        out.append(self.zero_mid(h))
        return out

    def control_stage(self, x: Tensor, control: Tensor | None, stage: Tensor | None) -> tuple[int, Tensor]:
        """(j, stage [B]): j such that the control is the full-resolution image of the stage-j state x
        (2^j times larger); `stage` checked against it (when it can be read without a sync), or made."""
        b, cc, (h, w), stages = x.shape[0], self.config.control_channels, x.shape[2:], self.base_config.num_stages
        j = next((j for j in range(stages) if control is not None and tuple(control.shape) == (b, cc, h << j, w << j)),
                 None)
        if j is None:
            got = None if control is None else list(control.shape)
            raise EdifyError(f"the control image must be [{b}, {cc}, {h} 2^j, {w} 2^j] (the state's batch, full "
                             f"resolution of a stage j < {stages}), got {got}")
        if stage is None:
            return j, torch.full((b,), j, dtype=torch.long, device=x.device)
        if stage.device.type == "cpu" and not torch.compiler.is_compiling() and bool((stage != j).any()):
            raise EdifyError(f"a {h}x{w} state with a {h << j}x{w << j} control is at stage {j}, but stage is "
                             f"{stage.unique().tolist()}")
        return j, stage

    # -- files ------------------------------------------------------------------------------------

    def save_pretrained(self, path: str | os.PathLike, dtype: torch.dtype = torch.float32,
                        max_shard_bytes: int = 16 * 2**20) -> SavedModel:
        """config.json ({"format": "edify-controlnet", "version": 2, ...config}) and safetensors weights,
        atomically."""
        state = {k: (v.detach().to("cpu", dtype) if v.is_floating_point() else v.detach().cpu()).contiguous()
                 for k, v in self.state_dict().items()}
        extra = {"defaults": dict(self.defaults)} if self.defaults else {}
        return save_model(path, {"format": FORMAT, "version": FORMAT_VERSION, **self.config.to_dict(), **extra},
                          state, max_shard_bytes)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, base: UNetConfig | None = None) -> ControlNet:
        """Load a ControlNet folder (untrusted input: every file checked, one-line errors); with
        `base`, refuse it unless it was made for that base network config."""
        folder = model_folder(path)
        config = load_controlnet_config(folder)
        if base is not None:
            config.check_base(base)
        weights = scan_weights(folder)
        with torch.device("meta"):  # count the weights before anything is allocated
            needed = sum(t.numel() for t in cls(config).state_dict().values())
        weights.check_count(needed)
        net = cls(config)
        weights.load_into(net)
        net.defaults = load_controlnet_defaults(folder)
        return net


def residual_shapes(net: ControlNet, height: int, width: int) -> list[tuple[int, int, int]]:
    """(channels, h, w) of each residual for an input of height x width (skips, then the middle)."""
    cfg, h, w = net.base_config, height // HAAR_FACTOR, width // HAAR_FACTOR
    shapes = [(net.skip_channels[0], h, w)]
    for block, ch in zip(net.down, net.skip_channels[1:]):
        if isinstance(block, Downsample):
            h, w = (h + 1) // 2, (w + 1) // 2
        shapes.append((ch, h, w))
    return shapes + [(cfg.widths[-1], h, w)]


def load_controlnet_config(path: str | Path) -> ControlNetConfig:
    """The config of a ControlNet folder, checked, without its weights."""
    folder = model_folder(path)
    file = inside(folder, CONFIG_NAME, "ControlNet folder")
    if not os.path.lexists(file):
        raise EdifyError(f"ControlNet folder {str(folder)!r} has no {CONFIG_NAME}")
    data = read_json(file)
    with naming(file):
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise EdifyError(f"not an {FORMAT} config (missing or wrong 'format' field)")
        check_version(data.get("version", 1))
        fields = {k: v for k, v in data.items() if k not in ("format", "version", "defaults")}
        return ControlNetConfig.from_dict(fields)


DEFAULT_KEYS = ("guidance_scale", "sigma_min", "experts")


def load_controlnet_defaults(path: str | Path) -> dict:
    """The optional "defaults" of a ControlNet folder's config.json, checked: {} when absent;
    "guidance_scale": a finite number >= 0, "sigma_min" (where the sampler's schedule ends): a finite
    number > 0, "experts": true or false (whether the base model's stage experts run under this
    ControlNet, or the main network it was trained on serves every stage)."""
    file = inside(model_folder(path), CONFIG_NAME, "ControlNet folder")
    data = read_json(file)
    defaults = data.get("defaults", {}) if isinstance(data, dict) else {}
    with naming(file):
        if not isinstance(defaults, dict) or set(defaults) - set(DEFAULT_KEYS):
            raise EdifyError(f"'defaults' must be an object with the keys {', '.join(DEFAULT_KEYS)} only, "
                             f"got {brief(defaults)}")
        for key, v in defaults.items():
            if key == "experts":
                if not isinstance(v, bool):
                    raise EdifyError(f"defaults.experts must be true or false, got {brief(v)}")
                continue
            positive = key == "sigma_min"
            if (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
                    or v < 0 or (positive and v == 0)):
                raise EdifyError(f"defaults.{key} must be a finite number {'> 0' if positive else '>= 0'}, "
                                 f"got {brief(v)}")
    return {k: v if k == "experts" else float(v) for k, v in defaults.items()}


def check_version(version) -> None:
    """Refuse a ControlNet of another format version than FORMAT_VERSION (one line)."""
    if version != FORMAT_VERSION:
        raise EdifyError(f"ControlNet format version {brief(version)} is not readable (this version reads "
                         f"{FORMAT_VERSION}: the hint takes the full-resolution control at every stage); "
                         f"train the ControlNet again")
