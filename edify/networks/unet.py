"""The Edify Image denoiser network: a Haar-domain U-Net (section 3.1 of the paper).

    x [B, C, H, W] --Haar DWT--> [B, 16C, H/4, W/4] --stem + position encoding--> encoder (residual
    blocks, attention, downsampling; every output kept as a skip) --> middle --> decoder (residual
    blocks on [h, skip] concatenations, attention, upsampling) --> head --Haar IDWT--> [B, C, H, W]

Residual blocks take their scale and shift from the noise/stage embedding; attention blocks do
self-attention and cross-attention on the condition tokens. The network knows nothing about sigma:
EDM preconditioning (c_in, c_skip, c_out, c_noise) wraps it from outside. ControlNets feed
`residuals`, one per skip plus one for the middle, added before the decoder reads them (section 5).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from edify.conditioning import DOF_NAMES, PITCH_NAMES, Cond
from edify.errors import EdifyError
from edify.networks.attention import TransformerBlock
from edify.networks.embedders import (POOLED_TOKENS, ConditionEmbedder, NoiseStageEmbedding, PositionEncoding,
                                      embed_inputs)
from edify.networks.layers import HAAR_FACTOR, Downsample, HaarDWT, HaarIDWT, ResBlock, Upsample
from edify.pipelines.model_io import from_json

# Bounds on a config, checked before anything is allocated: levels and blocks per level (which
# also bound the time to count the weights), and the values in the state dict (16 GB in fp32).
MAX_LEVELS = 16
MAX_RES_BLOCKS = 64
MAX_WEIGHTS = 4 * 10**9


# Fields added after networks were shipped, with their defaults (UNetConfig.to_dict omits them there).
LATER_FIELDS = {"pooled_cond": False}


@dataclass(frozen=True)
class UNetConfig:
    """Hyper-parameters of a U-Net; JSON-able through `to_dict` / `from_dict`.

    widths[i] is the channel count at level i (level 0 = the Haar grid, each further level halves the
    grid). Attention levels index into `widths`; the middle block always has both attentions.
    """

    widths: tuple[int, ...] = (128, 256, 512, 512)
    num_res_blocks: int = 2
    self_attention_levels: tuple[int, ...] = (1, 2, 3)
    cross_attention_levels: tuple[int, ...] = (1, 2, 3)
    head_dim: int = 64
    mlp_ratio: int = 4
    in_channels: int = 3
    out_channels: int = 3
    text_dim: int = 768
    context_dim: int = 768
    num_media_types: int = 8
    num_stages: int = 1
    reference_resolution: int = 256
    fourier_dim: int = 256
    emb_dim: int = 512
    norm_groups: int = 32
    dropout: float = 0.0
    checkpointing: bool = False
    # A noise- and stage-dependent gain on each Haar subband of the input, added to the output
    # (zero at init): per-subband shrinkage of the noise, the part of denoising that is linear,
    # without routing every coefficient through the whole U-Net.
    band_skip: bool = False
    # The condition as one vector added to the noise/stage embedding that scales and shifts every
    # residual block (zero at init): the masked mean of the text tokens with the camera and media
    # tokens, through one linear map. Cross-attention reads the condition only at the attention
    # levels; this path reaches every level, the finest included (Imagen's pooled text embedding,
    # Saharia et al. 2022; class embeddings in adaptive group norm, Dhariwal & Nichol 2021).
    pooled_cond: bool = False

    def __post_init__(self):
        self._check_ranges()
        self._check_structure()
        weights = self.num_weights
        if weights > MAX_WEIGHTS:
            raise EdifyError(f"this network would hold {weights:,} weights, over the limit of {MAX_WEIGHTS:,}")

    def _check_ranges(self) -> None:
        n = len(self.widths)
        if not 1 <= n <= MAX_LEVELS:
            raise EdifyError(f"widths must name 1 to {MAX_LEVELS} levels, got {n}")
        for name in ("in_channels", "out_channels", "text_dim", "context_dim", "num_media_types", "num_stages",
                     "num_res_blocks", "fourier_dim", "emb_dim", "mlp_ratio", "head_dim", "norm_groups",
                     "reference_resolution"):
            if getattr(self, name) < 1:
                raise EdifyError(f"{name} must be >= 1, got {getattr(self, name)}")
        if min(self.widths) < 1:
            raise EdifyError(f"every width must be >= 1, got {min(self.widths)}")
        if self.num_res_blocks > MAX_RES_BLOCKS:
            raise EdifyError(f"num_res_blocks must be <= {MAX_RES_BLOCKS}, got {self.num_res_blocks}")
        if not 0 <= self.dropout < 1:
            raise EdifyError(f"dropout must lie in [0, 1), got {self.dropout}")

    def _check_structure(self) -> None:
        n = len(self.widths)
        for name in ("self_attention_levels", "cross_attention_levels"):
            levels = getattr(self, name)
            bad = [lv for lv in levels if not 0 <= lv < n]
            if bad:
                raise EdifyError(f"{name} must lie in [0, {n - 1}], got {bad[:8]}")
            if len(set(levels)) != len(levels):
                raise EdifyError(f"{name} must not repeat a level, got {list(levels[:8])}")
        for w in self.widths:
            if w % self.norm_groups or w % self.head_dim:
                raise EdifyError(f"every width must be a multiple of norm_groups={self.norm_groups} and "
                                 f"head_dim={self.head_dim}, got {w}")
        if self.band_skip and self.in_channels != self.out_channels:
            raise EdifyError(f"band_skip needs in_channels == out_channels, got {self.in_channels} "
                             f"and {self.out_channels}")
        if self.reference_resolution % self.size_multiple:
            raise EdifyError(f"reference_resolution must be a multiple of {self.size_multiple}, "
                             f"got {self.reference_resolution}")

    @property
    def num_weights(self) -> int:
        """Values in the network's state dict, counted from the config alone (nothing allocated)."""
        w, e, c = self.widths, self.emb_dim, self.context_dim
        n = 2 * self.fourier_dim + _linear(self.fourier_dim, e) + _linear(e, e) + self.num_stages * e
        tokens = len(PITCH_NAMES) + len(DOF_NAMES) + self.num_media_types + 3  # each table has a null row
        n += _linear(self.text_dim, c) + tokens * c + 2 * c
        n += _linear(POOLED_TOKENS * c, e) if self.pooled_cond else 0
        n += _conv(16 * self.in_channels, w[0]) + w[0] * (self.reference_resolution // HAAR_FACTOR) ** 2
        skips, ch = [w[0]], w[0]
        for i, wi in enumerate(w):  # encoder
            for _ in range(self.num_res_blocks):
                n, ch = n + self._level(ch, wi, i), wi
                skips.append(ch)
            if i < len(w) - 1:
                n += _conv(ch, ch)
                skips.append(ch)
        n += 2 * _res_block(ch, ch, e) + _transformer(ch, self, True, True)  # middle
        for i in reversed(range(len(w))):  # decoder
            for _ in range(self.num_res_blocks + 1):
                n, ch = n + self._level(ch + skips.pop(), w[i], i), w[i]
            n += _conv(ch, ch) if i > 0 else 0
        n += 2 * ch + _conv(ch, 16 * self.out_channels)
        return n + (_linear(e, 16 * self.out_channels) if self.band_skip else 0)

    def _level(self, in_ch: int, out_ch: int, level: int) -> int:
        self_attn, cross = level in self.self_attention_levels, level in self.cross_attention_levels
        attn = _transformer(out_ch, self, self_attn, cross) if self_attn or cross else 0
        return _res_block(in_ch, out_ch, self.emb_dim) + attn

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this: 4 for the Haar transform times 2 per downsampling."""
        return HAAR_FACTOR * 2 ** (len(self.widths) - 1)

    def to_dict(self) -> dict:
        """JSON-able fields. A field added after networks were shipped is written only when it
        differs from its default, so the configs (and fingerprints) of those networks stay as they were."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()
                if not (k in LATER_FIELDS and v == LATER_FIELDS[k])}

    @classmethod
    def from_dict(cls, d: dict) -> UNetConfig:
        """A config from its JSON object: each field checked against its declared type (lists become
        tuples), then by the checks above, which bound the network's size before it is built."""
        return from_json(cls, d, "U-Net config")


# Config fields that may differ between a saved network and one that grows it (a warm start keeps the
# saved weights and adds modules whose outputs start at zero): more attention levels, the pooled path.
GROWABLE = frozenset({"self_attention_levels", "cross_attention_levels", "pooled_cond"})


def growth_refusal(saved: UNetConfig, grown: UNetConfig) -> str | None:
    """None when `grown` is `saved` or grows it (every saved module kept, only GROWABLE fields changed,
    attention levels only added, the pooled path only added); else what differs, in one line."""
    old, new = asdict(saved), asdict(grown)
    changed = sorted(k for k in new if new[k] != old[k])
    ok = (set(changed) <= GROWABLE and (new["pooled_cond"] or not old["pooled_cond"])
          and all(set(old[k]) <= set(new[k]) for k in ("self_attention_levels", "cross_attention_levels")))
    if ok:
        return None
    return (f"a network that does not grow the saved one (it may only add attention levels and the pooled "
            f"condition): {({k: old[k] for k in changed})} vs {({k: new[k] for k in changed})}")


def zero_new_attention_outputs(network: nn.Module, state: dict[str, Tensor], added: list[str]) -> None:
    """In `state` (the network's), zero the output projection of every attention block whose weights
    are among `added`: a block added to a trained network then starts as the identity."""
    for name, module in network.named_modules():
        if isinstance(module, TransformerBlock) and f"{name}.proj_out.weight" in added:
            state[f"{name}.proj_out.weight"].zero_()
            state[f"{name}.proj_out.bias"].zero_()


# Values in the state dicts of the layers, for UNetConfig.num_weights.
def _conv(in_ch: int, out_ch: int, k: int = 3) -> int:
    return in_ch * out_ch * k * k + out_ch


def _linear(in_dim: int, out_dim: int, bias: bool = True) -> int:
    return in_dim * out_dim + (out_dim if bias else 0)


def _res_block(in_ch: int, out_ch: int, emb_dim: int) -> int:
    skip = _conv(in_ch, out_ch, 1) if in_ch != out_ch else 0
    return 2 * in_ch + _conv(in_ch, out_ch) + _linear(emb_dim, 2 * out_ch) + 2 * out_ch + _conv(out_ch, out_ch) + skip


def _transformer(d: int, cfg: UNetConfig, self_attention: bool, cross: bool) -> int:
    hidden = cfg.mlp_ratio * d
    n = 2 * d + 2 * _linear(d, d) + 2 * d + _linear(d, hidden) + _linear(hidden, d)  # norms, projections, MLP
    if self_attention:
        n += _linear(d, 3 * d, bias=False) + _linear(d, d) + 2 * d
    if cross:
        n += _linear(d, d, bias=False) + _linear(cfg.context_dim, 2 * d, bias=False) + _linear(d, d) + 2 * d
    return n


class Level(nn.Module):
    """One residual block followed, at attention levels, by a transformer block."""

    def __init__(self, in_ch: int, out_ch: int, cfg: UNetConfig, level: int):
        super().__init__()
        self.res = ResBlock(in_ch, out_ch, cfg.emb_dim, cfg.norm_groups, cfg.dropout)
        self_attn = level in cfg.self_attention_levels
        cross = cfg.context_dim if level in cfg.cross_attention_levels else None
        self.attn = (TransformerBlock(out_ch, cfg.head_dim, cross, self_attn, cfg.mlp_ratio, cfg.norm_groups)
                     if self_attn or cross is not None else None)

    def forward(self, h: Tensor, emb: Tensor, ctx: Tensor, mask: Tensor) -> Tensor:
        h = self.res(h, emb)
        return h if self.attn is None else self.attn(h, ctx, mask)


def build_encoder(cfg: UNetConfig) -> tuple[nn.ModuleList, tuple[int, ...]]:
    """The encoder: num_res_blocks blocks per level, then a downsampling; each output is a skip.
    Returns the blocks and the channels of every skip (the stem's output first). A ControlNet
    builds its copy with the same function, so the base's weights load into it by name."""
    w = cfg.widths
    down, skip_ch, ch = nn.ModuleList(), [w[0]], w[0]
    for i, wi in enumerate(w):
        for _ in range(cfg.num_res_blocks):
            down.append(Level(ch, wi, cfg, i))
            ch = wi
            skip_ch.append(ch)
        if i < len(w) - 1:
            down.append(Downsample(ch))
            skip_ch.append(ch)
    return down, tuple(skip_ch)


def build_middle(cfg: UNetConfig) -> tuple[nn.Module, nn.Module, nn.Module]:
    """The middle block at the coarsest width: residual block, self+cross attention, residual block."""
    ch = cfg.widths[-1]
    return (ResBlock(ch, ch, cfg.emb_dim, cfg.norm_groups, cfg.dropout),
            TransformerBlock(ch, cfg.head_dim, cfg.context_dim, True, cfg.mlp_ratio, cfg.norm_groups),
            ResBlock(ch, ch, cfg.emb_dim, cfg.norm_groups, cfg.dropout))


class UNet(nn.Module):
    """Haar-domain U-Net denoiser network F(x, c_noise, cond, stage) (section 3.1)."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = cfg = config
        w = cfg.widths
        self.dwt = HaarDWT(cfg.in_channels)
        self.idwt = HaarIDWT(cfg.out_channels)
        self.embed = NoiseStageEmbedding(cfg.fourier_dim, cfg.emb_dim, cfg.num_stages)
        self.cond_embed = ConditionEmbedder(cfg.text_dim, cfg.context_dim, cfg.num_media_types,
                                            cfg.emb_dim if cfg.pooled_cond else None)
        self.stem = nn.Conv2d(16 * cfg.in_channels, w[0], 3, padding=1)
        self.pos = PositionEncoding(w[0], cfg.reference_resolution // HAAR_FACTOR)

        self.down, self.skip_channels = build_encoder(cfg)
        skip_ch, ch = list(self.skip_channels), w[-1]
        self.mid_res1, self.mid_attn, self.mid_res2 = build_middle(cfg)

        # Decoder: num_res_blocks + 1 blocks per level, each consuming one skip, then upsampling.
        self.up = nn.ModuleList()
        for i in reversed(range(len(w))):
            for _ in range(cfg.num_res_blocks + 1):
                self.up.append(Level(ch + skip_ch.pop(), w[i], cfg, i))
                ch = w[i]
            if i > 0:
                self.up.append(Upsample(ch))

        self.head_norm = nn.GroupNorm(cfg.norm_groups, ch)
        self.head = nn.Conv2d(ch, 16 * cfg.out_channels, 3, padding=1)
        self.band_gain = None
        if cfg.band_skip:
            self.band_gain = nn.Linear(cfg.emb_dim, 16 * cfg.out_channels)
            nn.init.zeros_(self.band_gain.weight)
            nn.init.zeros_(self.band_gain.bias)

    # -- checks on static shapes only: safe under torch.compile ------------------------------------
    def check_inputs(self, x: Tensor, c_noise: Tensor, stage: Tensor | None) -> None:
        cfg = self.config
        if x.dim() != 4 or x.shape[1] != cfg.in_channels:
            raise EdifyError(f"input must be [B, {cfg.in_channels}, H, W], got {list(x.shape)}")
        for name, side in (("height", x.shape[2]), ("width", x.shape[3])):
            if side % cfg.size_multiple:
                raise EdifyError(f"image {name} must be a multiple of {cfg.size_multiple} "
                                 f"(4 for Haar x 2^{len(cfg.widths) - 1} downsamplings), got {side}")
        if c_noise.shape != (x.shape[0],):
            raise EdifyError(f"c_noise must have shape [{x.shape[0]}], got {list(c_noise.shape)}")
        if stage is not None and stage.shape != (x.shape[0],):
            raise EdifyError(f"stage must have shape [{x.shape[0]}], got {list(stage.shape)}")
        # Value check only where it costs no device sync and no graph break (eager, CPU tensors).
        if stage is not None and stage.device.type == "cpu" and not torch.compiler.is_compiling():
            if stage.numel() and not 0 <= int(stage.min()) <= int(stage.max()) < cfg.num_stages:
                raise EdifyError(f"stage must lie in [0, {cfg.num_stages - 1}], got {stage.tolist()}")

    def _run(self, block: nn.Module, *args) -> Tensor:
        # Activation checkpointing trades one recomputed forward for the block's saved activations.
        if self.config.checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def encode(self, x: Tensor, emb: Tensor, ctx: Tensor, mask: Tensor,
               coef: Tensor | None = None) -> tuple[Tensor, list[Tensor]]:
        """Haar DWT (or its given `coef`), stem and encoder: the bottom features and the skips."""
        h = self.stem(self.dwt(x) if coef is None else coef)
        h = h + self.pos(h.shape[2], h.shape[3]).to(h.dtype)
        skips = [h]
        for block in self.down:
            h = block(h) if isinstance(block, Downsample) else self._run(block, h, emb, ctx, mask)
            skips.append(h)
        return h, skips

    def forward(self, x: Tensor, c_noise: Tensor, cond: Cond | None = None, stage: Tensor | None = None,
                residuals: list[Tensor] | None = None) -> Tensor:
        """x [B, C, H, W], c_noise [B], stage [B] long (None = stage 0) -> [B, C_out, H, W].

        stage j is the Laplacian state at resolution R / 2^j (0 = full resolution), section 2.2.2.

        residuals: optional ControlNet outputs, one per skip then one for the middle block.
        """
        self.check_inputs(x, c_noise, stage)
        b = x.shape[0]
        if stage is None:
            stage = torch.zeros(b, dtype=torch.long, device=x.device)
        emb, ctx, mask = embed_inputs(self.embed, self.cond_embed, c_noise, stage, cond, b, x.device)

        coef = self.dwt(x)
        h, skips = self.encode(x, emb, ctx, mask, coef)
        h = self._run(self.mid_res1, h, emb)
        h = self._run(self.mid_attn, h, ctx, mask)
        h = self._run(self.mid_res2, h, emb)
        if residuals is not None:
            if len(residuals) != len(skips) + 1:
                raise EdifyError(f"residuals must hold {len(skips) + 1} tensors (skips + middle), "
                                 f"got {len(residuals)}")
            skips = [s + r for s, r in zip(skips, residuals[:-1])]
            h = h + residuals[-1]

        for block in self.up:
            if isinstance(block, Upsample):
                h = block(h)
            else:
                h = self._run(block, torch.cat([h, skips.pop()], dim=1), emb, ctx, mask)
        out = self.head(F.silu(self.head_norm(h)))
        if self.band_gain is not None:
            out = out + self.band_gain(F.silu(emb))[:, :, None, None].to(out.dtype) * coef
        return self.idwt(out)
