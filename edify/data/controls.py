"""Control signals for the ControlNets and the inpainting model (section 5), in one place.

The trainer asks for a control by name and gets the hint the ControlNet reads plus the images it
must learn to produce:

    make_control(kind, images, masks, generator) -> (control [B, Cc, H, W], targets [B, 3, H, W])

    kind       Cc  control                                              annotator
    canny      1   binary edges in {-1, +1}                             OpenCV, no weights
    softedge   1   soft edges in [-1, 1]                                classical, or an HED folder
    depth      1   depth in [-1, 1], near = +1, normalised per image    a depth-estimation folder
    inpaint    7   masked image + mask + task one-hot (edify.data.masks)  drawn per task
    upsample   3   the clean image pooled 4x, back at full size (nearest)  none (docs/upscale.md)

Images are float [B, 3, H, W] in [-1, 1], masks [B, 1, H, W] in {0, 1}. Maps that look like images
(edges, depth, the masked image) share the images' [-1, 1] range; indicators (mask, task) are
{0, 1}. The pieces live in `edify.data.annotators` and `edify.data.masks`; docs/controls.md has
the conventions and what a real depth model would need.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import cv2
import numpy as np
import torch
from torch import Tensor

from edify.data.annotators import (CANNY_HIGH, CANNY_LOW, DepthEstimator, HEDConfig, HEDNet, canny_edges,
                                   depth_from_image, load_annotator, load_hed, save_hed, soft_edges)
from edify.data.masks import (MASK_FILL, TASKS, check_images, fit_size, inpaint_control,
                              outpaint_canvas, paste_known, prepare_inpaint, task_onehot, training_masks)
from edify.errors import EdifyError

__all__ = [
    "KINDS", "TASKS", "MASK_FILL", "control_channels", "make_control", "control_from_image",
    "prepare_inpaint", "outpaint_canvas", "paste_known", "task_onehot", "training_masks",
    "canny_edges", "soft_edges", "HEDNet", "HEDConfig", "load_hed", "save_hed", "DepthEstimator",
    "depth_from_image", "load_annotator", "edge_scores", "edge_f1", "EdgeScores",
]

KINDS = ("canny", "softedge", "depth", "inpaint", "upsample")
_CHANNELS = {"canny": 1, "softedge": 1, "depth": 1, "inpaint": 3 + 1 + len(TASKS), "upsample": 3}
UPSAMPLE_FACTOR = 4  # the upsample control: the 4x upsampler's input, up^2(down^2(image))

Annotator = Callable[[Tensor], Tensor]


def check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise EdifyError(f"unknown control {kind!r}; known controls: {', '.join(KINDS)}")
    return kind


def control_channels(kind: str) -> int:
    """Channels of the control tensor of `kind` (the ControlNet hint block's input width)."""
    return _CHANNELS[check_kind(kind)]


def _alphas(masks, images: Tensor, resize: bool) -> Tensor | None:
    """Object masks [B, 1, H, W] matching images, or None."""
    if masks is None:
        return None
    if not isinstance(masks, Tensor) or masks.ndim != 4 or masks.shape[1] != 1 or masks.shape[0] != images.shape[0]:
        shape = tuple(masks.shape) if isinstance(masks, Tensor) else type(masks).__name__
        raise EdifyError(f"masks must be a tensor [{images.shape[0]}, 1, H, W], got {shape}")
    return fit_size(masks.float(), tuple(images.shape[-2:]), "mask", resize)


@torch.no_grad()
def make_control(kind: str, images: Tensor, masks: Tensor | None = None,
                 generator: torch.Generator | Sequence[torch.Generator] | None = None, *,
                 annotator: Annotator | None = None, tasks: Sequence[str] = TASKS,
                 canny_thresholds: tuple[int, int] = (CANNY_LOW, CANNY_HIGH),
                 resize: bool = False) -> tuple[Tensor, Tensor]:
    """(control [B, control_channels(kind), H, W], target images [B, 3, H, W]) for training.

    masks: the objects' alpha masks (the dataset's maskS.png), used by inpaint's "replace" task;
    without them inpaint draws only inpaint and outpaint masks. generator: drives the inpaint
    masks and tasks, so a seed gives the same batch (a list: one generator per sample).
    annotator: the network for softedge (an HEDNet; None = the classical `soft_edges`) or depth
    (a DepthEstimator; required), any callable images -> [B, 1, H, W] in [-1, 1]. Every control
    leaves the target images as they are: the model learns to produce the whole image, known
    pixels included.
    """
    check_kind(kind)
    images = check_images(images)
    if kind == "canny":
        control = canny_edges(images, *canny_thresholds)
    elif kind == "softedge":
        control = soft_edges(images) if annotator is None else annotator(images)
    elif kind == "depth":
        if annotator is None:
            raise EdifyError("the depth control needs a depth estimator: pass "
                             "annotator=DepthEstimator(folder) (a local depth-estimation model)")
        control = annotator(images)
    elif kind == "upsample":
        control = upsample_control(images)
    else:
        mask, task = training_masks(images.shape[0], *images.shape[-2:], _alphas(masks, images, resize),
                                    generator, tasks)
        control = inpaint_control(images, mask.to(images.device), task)
    return _check_control(kind, control, images), images


def upsample_control(images: Tensor, factor: int = UPSAMPLE_FACTOR) -> Tensor:
    """The upsample ControlNet's control: the image pooled `factor`x (2x2 means, the process's down)
    and brought back to full size by nearest-neighbour up, so each stage reads it losslessly."""
    from edify.core.laplacian import down, up

    k = factor.bit_length() - 1
    if factor < 2 or factor != 2**k:
        raise EdifyError(f"the upsampling factor must be a power of 2 >= 2, got {factor}")
    return up(down(images, k), k)


def _check_control(kind: str, control: Tensor, images: Tensor) -> Tensor:
    want = (images.shape[0], control_channels(kind), *images.shape[-2:])
    if not isinstance(control, Tensor) or tuple(control.shape) != want:
        got = tuple(control.shape) if isinstance(control, Tensor) else type(control).__name__
        raise EdifyError(f"the {kind} annotator returned {got}, expected {want}")
    return control.to(images.device, images.dtype)


def control_from_image(kind: str, control, size: tuple[int, int], *, resize: bool = False) -> Tensor:
    """A user's own control map (read from an image file, values in [0, 1]) -> the control tensor.

    canny: thresholded at 0.5 to {-1, +1}; softedge: mapped to [-1, 1]; depth: normalised per image,
    white = near (see depth_from_image). `size` is the (H, W) of the image being generated; another
    size is refused with both sizes unless resize=True. Inpainting takes a mask: prepare_inpaint.
    """
    check_kind(kind)
    if kind == "inpaint":
        raise EdifyError("the inpaint control is built from an image and a mask: use prepare_inpaint")
    if kind == "upsample":
        raise EdifyError("the upsample control is built from the low-resolution image: use upsample_control")
    if kind == "depth":
        return depth_from_image(control, size, resize=resize)
    if not isinstance(control, Tensor):
        raise EdifyError(f"a {kind} map must be a torch tensor [B, 1, H, W], got {type(control).__name__}")
    c = control.float()
    c = c[None, None] if c.ndim == 2 else c[None] if c.ndim == 3 else c
    if c.ndim != 4 or c.shape[1] not in (1, 3):
        raise EdifyError(f"a {kind} map must be [H, W] or [B, 1|3, H, W], got {tuple(control.shape)}")
    c = fit_size(c.mean(1, keepdim=True), size, f"{kind} map", resize, mode="bilinear")
    return (c > 0.5).float() * 2 - 1 if kind == "canny" else c.clamp(0, 1) * 2 - 1


# ---- evaluation ------------------------------------------------------------------------------

class EdgeScores(NamedTuple):
    """Per-image precision, recall and F1 [B] of predicted edge pixels against reference ones."""

    precision: Tensor
    recall: Tensor
    f1: Tensor


def _edge_bool(x: Tensor, threshold: float) -> np.ndarray:
    x = x.detach().float().cpu()
    x = x[None, None] if x.ndim == 2 else x
    if x.ndim != 4 or x.shape[1] != 1:
        raise EdifyError(f"edge maps must be [H, W] or [B, 1, H, W], got {tuple(x.shape)}")
    return (x[:, 0] > threshold).numpy()


def _near(edges: np.ndarray, of: np.ndarray, tolerance_px: float) -> float:
    """Fraction of the True pixels of `edges` within tolerance_px of a True pixel of `of`."""
    if not edges.any():
        return float("nan")
    if not of.any():
        return 0.0
    dist = cv2.distanceTransform((~of).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    return float((dist[edges] <= tolerance_px + 1e-6).mean())


def edge_scores(pred_edges: Tensor, ref_edges: Tensor, tolerance_px: float = 1.0,
                threshold: float = 0.0) -> EdgeScores:
    """Edge precision/recall with a distance tolerance (as in BSDS-style boundary benchmarks).

    precision: share of predicted edge pixels within `tolerance_px` (Euclidean) of a reference edge
    pixel; recall: the reverse. Maps are edges where > `threshold` (0 suits the {-1, +1} maps of
    canny_edges). Two empty maps score 1; one empty map scores 0.
    """
    pred, ref = _edge_bool(pred_edges, threshold), _edge_bool(ref_edges, threshold)
    if pred.shape != ref.shape:
        raise EdifyError(f"edge maps differ in shape: {pred.shape} vs {ref.shape}")
    rows = []
    for p, r in zip(pred, ref):
        if not p.any() and not r.any():
            rows.append((1.0, 1.0, 1.0))
            continue
        precision, recall = _near(p, r, tolerance_px), _near(r, p, tolerance_px)
        precision, recall = (0.0 if np.isnan(precision) else precision), (0.0 if np.isnan(recall) else recall)
        f1 = 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)
        rows.append((precision, recall, f1))
    return EdgeScores(*torch.tensor(rows, dtype=torch.float64).T)


def edge_f1(pred_edges: Tensor, ref_edges: Tensor, tolerance_px: float = 1.0, threshold: float = 0.0) -> Tensor:
    """Per-image F1 [B] of edge_scores: how well generated images keep the edges they were given."""
    return edge_scores(pred_edges, ref_edges, tolerance_px, threshold).f1
