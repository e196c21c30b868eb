"""Annotators: images -> control maps for the ControlNets of section 5 (edges, soft edges, depth).

Every annotator maps float images [B, 3, H, W] in [-1, 1] to one map [B, 1, H, W] in [-1, 1] at
the same size, -1 meaning "no edge" / "far" and +1 "edge" / "near", like an image would carry it:

    canny_edges      OpenCV Canny, binary {-1, +1}; runs anywhere, no weights
    soft_edges       multi-scale Gaussian gradient magnitude, no weights (a classical stand-in)
    HEDNet           an HED-style network (VGG stages, side outputs fused) from a local folder
    DepthEstimator   a transformers depth-estimation model from a local folder
    depth_from_image a user's own depth map, normalised

Weights are read only from local folders (safetensors + config.json, nothing pickled); a missing
folder or one holding another model is one EdifyError line naming the folder.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from edify.data.masks import check_images, fit_size
from edify.errors import EdifyError

# Canny hysteresis thresholds on the Sobel gradient magnitude of 8-bit images. ControlNet's
# 100/200 suits 512 px photos; emoji at 64-256 px are flat-shaded, and light shapes on their white
# background (wings, clouds) have weak outlines that 100/200 drops, so the defaults are lower.
CANNY_LOW, CANNY_HIGH = 60, 120
SOFT_EDGE_SIGMAS = (1.0, 2.0)
# soft_edges never divides by less than the response to a step of this contrast (in [0, 1] units),
# so a nearly flat image stays dark instead of having its noise stretched to full edges.
SOFT_EDGE_MIN_CONTRAST = 0.05
HED_TYPE = "edify-hed"


def to_uint8(images: Tensor) -> np.ndarray:
    """[-1, 1] [B, 3, H, W] -> uint8 [B, H, W, 3] (round to nearest)."""
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round()
    return x.to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


# ---- Canny -----------------------------------------------------------------------------------

def canny_edges(images: Tensor, low: int = CANNY_LOW, high: int = CANNY_HIGH) -> Tensor:
    """Binary Canny edges [B, 1, H, W] in {-1, +1} (+1 on an edge).

    cv2.Canny on the RGB image takes, per pixel, the channel with the largest gradient, so an edge
    between two colours of equal brightness is still found. L2 gradient magnitude, 3x3 Sobel.
    """
    images = check_images(images)
    if not 0 <= low <= high:
        raise EdifyError(f"Canny thresholds must satisfy 0 <= low <= high, got low={low}, high={high}")
    rgb = to_uint8(images)
    edges = np.stack([cv2.Canny(np.ascontiguousarray(im), low, high, L2gradient=True) for im in rgb])
    return (torch.from_numpy(edges).to(images.device, images.dtype)[:, None] / 127.5 - 1)


# ---- classical soft edges --------------------------------------------------------------------

def _gaussian_blur(x: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur with reflected borders (radius ceil(3 sigma))."""
    r = max(1, math.ceil(3 * sigma))
    k = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=x.dtype, device=x.device) / sigma) ** 2)
    k = (k / k.sum()).repeat(x.shape[1], 1)
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="reflect"), k[:, None, None, :], groups=x.shape[1])
    return F.conv2d(F.pad(x, (0, 0, r, r), mode="reflect"), k[:, None, :, None], groups=x.shape[1])


def _gradient_magnitude(x: Tensor) -> Tensor:
    """Per-channel central-difference gradient magnitude (per pixel, so a unit ramp gives 1)."""
    p = F.pad(x, (1, 1, 1, 1), mode="replicate")
    gx = (p[..., 1:-1, 2:] - p[..., 1:-1, :-2]) / 2
    gy = (p[..., 2:, 1:-1] - p[..., :-2, 1:-1]) / 2
    return (gx ** 2 + gy ** 2).sqrt()


def soft_edges(images: Tensor, sigmas: tuple[float, ...] = SOFT_EDGE_SIGMAS) -> Tensor:
    """Soft edge map [B, 1, H, W] in [-1, 1]: scale-normalised Gaussian gradient magnitude.

    At each scale sigma the image (in [0, 1]) is blurred, its gradient magnitude taken per channel
    (max over RGB) and multiplied by sigma, so a step edge answers alike at every scale (Lindeberg's
    normalisation); the scales are averaged, and the map is divided by its maximum (at least the
    answer to a SOFT_EDGE_MIN_CONTRAST step). Wide, graded edges like HED's, but it answers to any
    change of intensity in proportion to its contrast, texture and shading included.
    """
    images = check_images(images)
    x = (images.float() + 1) / 2
    m = sum(s * _gradient_magnitude(_gaussian_blur(x, s)).amax(1, keepdim=True) for s in sigmas) / len(sigmas)
    step = 1 / math.sqrt(2 * math.pi)  # peak of sigma |grad| of a unit step blurred at sigma
    scale = m.amax(dim=(1, 2, 3), keepdim=True).clamp_min(SOFT_EDGE_MIN_CONTRAST * step)
    return ((m / scale).clamp(0, 1) * 2 - 1).to(images.dtype)


# ---- HED-style network -------------------------------------------------------------------------

@dataclass(frozen=True)
class HEDConfig:
    """Stages of 3x3 conv + ReLU (2x max-pool between stages), each with a 1x1 side output.

    The defaults are HED's VGG-16 trunk (Xie and Tu, 2015). fuse: "conv" learns a 1x1 fusion of
    the side outputs (HED's fused output); "mean" averages them.
    """

    channels: tuple[int, ...] = (64, 128, 256, 512, 512)
    convs: tuple[int, ...] = (2, 2, 3, 3, 3)
    fuse: str = "conv"

    def __post_init__(self):
        if len(self.channels) != len(self.convs) or not self.channels or self.fuse not in ("conv", "mean"):
            raise EdifyError(f"bad HED config: channels {self.channels}, convs {self.convs}, fuse {self.fuse!r}")


class HEDStage(nn.Module):
    def __init__(self, cin: int, cout: int, n: int):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(cin if i == 0 else cout, cout, 3, padding=1) for i in range(n))
        self.side = nn.Conv2d(cout, 1, 1)

    def forward(self, h: Tensor) -> tuple[Tensor, Tensor]:
        for conv in self.convs:
            h = F.relu(conv(h))
        return h, self.side(h)


class HEDNet(nn.Module):
    """Images [B, 3, H, W] in [-1, 1] -> soft edges [B, 1, H, W] in [-1, 1].

    The input is brought to 0-255 and the stored `pixel_mean` (per RGB channel) subtracted, the
    input convention of VGG-trained edge detectors, so their weights can be converted to this layout.
    """

    def __init__(self, config: HEDConfig = HEDConfig()):
        super().__init__()
        self.config = config
        self.register_buffer("pixel_mean", torch.zeros(3))
        cins = (3,) + tuple(config.channels[:-1])
        self.stages = nn.ModuleList(HEDStage(a, b, n) for a, b, n in zip(cins, config.channels, config.convs))
        self.fuse = nn.Conv2d(len(config.channels), 1, 1) if config.fuse == "conv" else None

    def forward(self, images: Tensor) -> Tensor:
        size = images.shape[-2:]
        h = (images + 1) * 127.5 - self.pixel_mean[None, :, None, None]
        sides = []
        for i, stage in enumerate(self.stages):
            h, side = stage(F.max_pool2d(h, 2, ceil_mode=True) if i else h)
            sides.append(F.interpolate(side, size=size, mode="bilinear", align_corners=False))
        logits = self.fuse(torch.cat(sides, 1)) if self.fuse is not None else torch.stack(sides).mean(0)
        return torch.sigmoid(logits) * 2 - 1


def save_hed(net: HEDNet, folder: str | Path) -> Path:
    """Write config.json (model_type edify-hed) and model.safetensors into `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"model_type": HED_TYPE, **asdict(net.config)}, indent=2))
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(folder / "model.safetensors"))
    return folder


def _read_config(folder: Path, what: str) -> dict:
    if not folder.is_dir():
        raise EdifyError(f"{what} folder does not exist: {str(folder)!r}")
    path = folder / "config.json"
    if not path.is_file():
        raise EdifyError(f"{what} folder {str(folder)!r} has no config.json")
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise EdifyError(f"{what} folder {str(folder)!r} has an unreadable config.json: {err}") from None
    if not isinstance(config, dict):
        raise EdifyError(f"{what} folder {str(folder)!r} has a config.json that is not an object")
    return config


def load_hed(folder: str | Path, device=None) -> HEDNet:
    """An HEDNet from `folder` (config.json + model.safetensors), in eval mode, fp32."""
    folder = Path(folder).expanduser()
    config = _read_config(folder, "HED")
    if config.get("model_type") != HED_TYPE:
        raise EdifyError(f"HED folder {str(folder)!r} holds a {config.get('model_type')!r} model, "
                         f"not {HED_TYPE!r} (config.json model_type)")
    try:
        net = HEDNet(HEDConfig(tuple(config.get("channels", HEDConfig.channels)),
                               tuple(config.get("convs", HEDConfig.convs)), config.get("fuse", "conv")))
    except TypeError as err:
        raise EdifyError(f"HED folder {str(folder)!r} has a bad config.json: {err}") from None
    path = folder / "model.safetensors"
    if not path.is_file():
        raise EdifyError(f"HED folder {str(folder)!r} has no model.safetensors")
    try:
        state = load_file(str(path))
    except Exception as err:
        raise EdifyError(f"HED weights {str(path)!r} are not readable safetensors: {err}") from None
    _check_state(net.state_dict(), state, folder)
    net.load_state_dict(state)
    return net.float().eval().requires_grad_(False).to(device or "cpu")


def _check_state(want: dict, have: dict, folder: Path) -> None:
    """Same keys and shapes, else one line naming the first difference."""
    missing, unexpected = sorted(set(want) - set(have)), sorted(set(have) - set(want))
    if missing or unexpected:
        parts = [f"{len(keys)} {what} (first {keys[0]})" for keys, what in ((missing, "missing"),
                                                                         (unexpected, "unexpected")) if keys]
        raise EdifyError(f"HED weights in {str(folder)!r} do not match its config.json: {', '.join(parts)}")
    for k, v in want.items():
        if have[k].shape != v.shape:
            raise EdifyError(f"HED weights in {str(folder)!r} do not match its config.json: {k} is "
                             f"{tuple(have[k].shape)}, expected {tuple(v.shape)}")


# ---- depth -----------------------------------------------------------------------------------

def normalize_map(x: Tensor) -> Tensor:
    """Per image min-max to [-1, 1]; a constant map becomes -1."""
    low = x.amin(dim=(1, 2, 3), keepdim=True)
    span = (x.amax(dim=(1, 2, 3), keepdim=True) - low).clamp_min(torch.finfo(x.dtype).tiny)
    return (x - low) / span * 2 - 1


# model types whose predicted_depth is a distance (large = far); the others predict relative
# inverse depth (large = near), like MiDaS, DPT and Depth Anything
_METRIC_TYPES = ("zoedepth", "depth_pro", "glpn")


class DepthEstimator:
    """A transformers depth-estimation model (AutoModelForDepthEstimation) from a local folder.

    Returns depth maps [B, 1, H, W] in [-1, 1], normalised per image, near = +1 (ControlNet's
    convention: near is bright). `near_is_large` says whether the model's output grows towards the
    camera; None guesses from the model type (or `depth_estimation_type: metric` in its config).
    """

    def __init__(self, folder: str | Path, device=None, near_is_large: bool | None = None):
        folder = Path(folder).expanduser()
        config = _read_config(folder, "depth model")
        from transformers import AutoConfig, AutoImageProcessor, AutoModelForDepthEstimation
        from transformers.models.auto.modeling_auto import MODEL_FOR_DEPTH_ESTIMATION_MAPPING_NAMES as known
        kind = config.get("model_type")
        if kind not in known:
            raise EdifyError(f"depth model folder {str(folder)!r} holds a {kind!r} model, not a depth "
                             f"estimator (known: {', '.join(known)})")
        if not (folder / "preprocessor_config.json").is_file():
            raise EdifyError(f"depth model folder {str(folder)!r} has no preprocessor_config.json "
                             "(its image processor)")
        if not any(folder.glob("*.safetensors")):
            raise EdifyError(f"depth model folder {str(folder)!r} has no .safetensors weights "
                             "(pickled weights are never loaded)")
        try:
            self.processor = AutoImageProcessor.from_pretrained(folder, local_files_only=True)
            cfg = AutoConfig.from_pretrained(folder, local_files_only=True)
            model = AutoModelForDepthEstimation.from_pretrained(folder, config=cfg, local_files_only=True,
                                                                use_safetensors=True)
        except (OSError, ValueError, TypeError) as err:
            line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise EdifyError(f"depth model folder {str(folder)!r} is not loadable: {line}") from None
        self.model = model.float().eval().requires_grad_(False).to(device or "cpu")
        metric = kind in _METRIC_TYPES or getattr(cfg, "depth_estimation_type", None) == "metric"
        self.near_is_large = (not metric) if near_is_large is None else near_is_large

    @torch.no_grad()
    def __call__(self, images: Tensor) -> Tensor:
        images = check_images(images)
        inputs = self.processor(images=list(to_uint8(images)), return_tensors="pt")
        device = next(self.model.parameters()).device
        depth = self.model(pixel_values=inputs["pixel_values"].to(device)).predicted_depth
        depth = F.interpolate(depth[:, None].float(), size=images.shape[-2:], mode="bicubic", align_corners=False)
        depth = normalize_map(depth if self.near_is_large else -depth)
        return depth.to(images.device, images.dtype)


def depth_from_image(depth, size: tuple[int, int] | None = None, *, near_is_white: bool = True,
                     resize: bool = False) -> Tensor:
    """A user's own depth map -> [B, 1, H, W] in [-1, 1], near = +1, normalised per image.

    Takes a tensor [H, W], [B, 1|3, H, W] or [1|3, H, W] in any range, a numpy array or a PIL
    image (grayscale or RGB; RGB is averaged). `size` (H, W) is the image it controls: another size
    is refused unless resize=True (bilinear).
    """
    if not isinstance(depth, Tensor):
        depth = torch.from_numpy(np.asarray(depth, dtype=np.float32).copy())
        depth = depth.permute(2, 0, 1) if depth.ndim == 3 else depth
    d = depth.float()
    d = d[None, None] if d.ndim == 2 else d[None] if d.ndim == 3 else d
    if d.ndim != 4 or d.shape[1] not in (1, 3):
        raise EdifyError(f"a depth map must be [H, W] or [B, 1|3, H, W], got {tuple(depth.shape)}")
    d = d.mean(1, keepdim=True)
    if size is not None:
        d = fit_size(d, size, "depth map", resize, mode="bilinear")
    return normalize_map(d if near_is_white else -d)


def load_annotator(kind: str, folder: str | Path, device=None):
    """The network annotator of a control kind from a local folder: softedge -> HED, depth -> depth model."""
    if kind == "softedge":
        return load_hed(folder, device)
    if kind == "depth":
        return DepthEstimator(folder, device)
    raise EdifyError(f"no network annotator for control {kind!r}; folders load for: softedge, depth")
