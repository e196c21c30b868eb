"""Masks and hints for the inpainting model (section 5): three tasks, one network.

The paper trains one model for inpainting, outpainting and object replacement; its hint is the
masked image, the mask and a one-hot task label. Conventions (docs/controls.md):

    mask        [B, 1, H, W] in {0, 1}; 1 = unknown (to generate), 0 = known (kept)
    control     [B, 7, H, W] = masked image (3, in [-1, 1], unknown pixels = MASK_FILL)
                               + mask (1, {0, 1}) + task one-hot (3, {0, 1}, constant over the image)

Training masks are drawn per sample from a `torch.Generator`, so a seed gives the same masks:

    inpaint   1-4 shapes, each a random box or a brush stroke (a thick random walk);
              coverage in (0, MAX_INPAINT]
    outpaint  keep a random box (40-75% of each side) or one half of the image; generate the rest
    replace   generate the object, keep the background: the object's alpha mask, grown by a few px

`paste_known` puts the known pixels back after sampling, with a seam feathered on the unknown side.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from edify.errors import EdifyError

TASKS = ("replace", "inpaint", "outpaint")
MASK_FILL = 0.0  # value of unknown pixels in the masked image: mid-grey in [-1, 1]
MAX_INPAINT = 0.75  # an inpaint mask keeping less than a quarter of the image is an outpaint
MIN_REPLACE, MAX_REPLACE = 0.01, 0.95  # object masks outside this coverage fall back to inpaint
OUTPAINT_KEEP = (0.4, 0.75)  # side fraction of the kept box in the "border" outpaint mode
_REDRAWS = 20


# ---- validation shared by every control ------------------------------------------------------

def check_images(images, what: str = "images") -> Tensor:
    """A float [B, 3, H, W] tensor (the project's [-1, 1] images), else one EdifyError line."""
    if not isinstance(images, Tensor):
        raise EdifyError(f"{what} must be a torch tensor [B, 3, H, W], got {type(images).__name__}")
    if images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
        raise EdifyError(f"{what} must be a float tensor [B, 3, H, W], got {images.dtype} {tuple(images.shape)}")
    return images


def fit_size(x: Tensor, size: tuple[int, int], what: str, resize: bool, mode: str = "nearest") -> Tensor:
    """x [B, C, h, w] at `size`: refuse a mismatch with both sizes, or resize when asked."""
    have = tuple(x.shape[-2:])
    if have == tuple(size):
        return x
    if not resize:
        raise EdifyError(f"{what} is {have[0]}x{have[1]} but the image is {size[0]}x{size[1]}; "
                         "pass resize=True to resize it")
    kwargs = {} if mode == "nearest" else {"align_corners": False}
    return F.interpolate(x.float(), size=tuple(size), mode=mode, **kwargs)


def check_mask(mask, size: tuple[int, int], batch: int, *, resize: bool = False, what: str = "mask") -> Tensor:
    """A user mask as float {0, 1} [B, 1, H, W] (1 = unknown), thresholded at 0.5.

    Accepts [H, W], [1, H, W], [1|B, 1, H, W] or a bool tensor; a mask with nothing or everything
    unknown is refused, since the model then has nothing to generate or nothing to keep.
    """
    if not isinstance(mask, Tensor):
        raise EdifyError(f"{what} must be a torch tensor [B, 1, H, W], got {type(mask).__name__}")
    m = mask.float()
    m = m[None, None] if m.ndim == 2 else m[None] if m.ndim == 3 else m
    if m.ndim != 4 or m.shape[1] != 1 or m.shape[0] not in (1, batch):
        raise EdifyError(f"{what} must be [B, 1, H, W] with B in (1, {batch}), got {tuple(mask.shape)}")
    m = (fit_size(m, size, what, resize) > 0.5).float().expand(batch, -1, -1, -1)
    cover = m.mean(dim=(1, 2, 3))
    if bool((cover == 0).any()):
        raise EdifyError(f"{what} is empty (no unknown pixel) for sample {int((cover == 0).nonzero()[0])}: "
                         "nothing to generate")
    if bool((cover == 1).any()):
        raise EdifyError(f"{what} is full (no known pixel) for sample {int((cover == 1).nonzero()[0])}: "
                         "nothing to keep; generate from text instead")
    return m


def task_index(task: str) -> int:
    if task not in TASKS:
        raise EdifyError(f"unknown inpainting task {task!r}; known tasks: {', '.join(TASKS)}")
    return TASKS.index(task)


# ---- the hint --------------------------------------------------------------------------------

def task_onehot(tasks: Tensor, height: int, width: int) -> Tensor:
    """[B] task indices -> [B, 3, H, W] one-hot planes, constant over the image."""
    onehot = F.one_hot(tasks.long(), len(TASKS)).float()
    return onehot[:, :, None, None].expand(-1, -1, height, width)


def inpaint_control(images: Tensor, mask: Tensor, tasks: Tensor) -> Tensor:
    """[B, 7, H, W] hint: masked image (unknown = MASK_FILL), mask, task one-hot."""
    mask = mask.to(images)
    masked = images * (1 - mask) + MASK_FILL * mask
    onehot = task_onehot(tasks.to(images.device), *images.shape[-2:]).to(images)
    return torch.cat([masked, mask, onehot], dim=1)


def prepare_inpaint(images: Tensor, mask, task: str, *, resize: bool = False) -> tuple[Tensor, Tensor]:
    """Inference inputs from a user mask + task: (control [B, 7, H, W], mask [B, 1, H, W])."""
    images = check_images(images)
    index = task_index(task)
    m = check_mask(mask, tuple(images.shape[-2:]), images.shape[0], resize=resize).to(images)
    tasks = torch.full((images.shape[0],), index, dtype=torch.long, device=images.device)
    return inpaint_control(images, m, tasks), m


def outpaint_canvas(images: Tensor, pad: Sequence[int], fill: float = MASK_FILL) -> tuple[Tensor, Tensor]:
    """Grow images by `pad = (left, top, right, bottom)` px: (canvas [B, 3, H', W'], mask).

    The new border is unknown (mask 1) and filled with `fill`; the original image is known.
    """
    images = check_images(images)
    if len(pad) != 4 or any(not isinstance(p, int) or p < 0 for p in pad):
        raise EdifyError(f"outpaint pad must be four integers >= 0 (left, top, right, bottom), got {tuple(pad)}")
    if sum(pad) == 0:
        raise EdifyError("outpaint pad is (0, 0, 0, 0): nothing to generate")
    left, top, right, bottom = pad
    canvas = F.pad(images, (left, right, top, bottom), value=fill)
    mask = torch.ones_like(canvas[:, :1])
    mask[:, :, top:top + images.shape[2], left:left + images.shape[3]] = 0
    return canvas, mask


# ---- training masks --------------------------------------------------------------------------

def _uniform(g: torch.Generator | None, low: float = 0.0, high: float = 1.0) -> float:
    return low + (high - low) * float(torch.rand((), generator=g, device=None if g is None else g.device))


def _randint(g: torch.Generator | None, low: int, high: int) -> int:
    """An integer in [low, high] inclusive."""
    return int(torch.randint(low, high + 1, (), generator=g, device=None if g is None else g.device))


def _box(height: int, width: int, g) -> Tensor:
    """A box with sides of 15-50% of the image, anywhere inside it."""
    h = max(1, round(_uniform(g, 0.15, 0.5) * height))
    w = max(1, round(_uniform(g, 0.15, 0.5) * width))
    top, left = _randint(g, 0, height - h), _randint(g, 0, width - w)
    m = torch.zeros(height, width)
    m[top:top + h, left:left + w] = 1
    return m


def _stroke(height: int, width: int, g) -> Tensor:
    """A brush stroke: a random walk of 2-8 segments drawn with a round brush 2-6% of the size.

    Pixels whose centre lies within the brush radius of any segment are set (a capsule per segment).
    """
    size = min(height, width)
    radius = max(1.0, _uniform(g, 0.02, 0.06) * size)
    point = torch.tensor([_uniform(g, 0, height), _uniform(g, 0, width)])
    angle = _uniform(g, 0, 2 * math.pi)
    ys, xs = torch.meshgrid(torch.arange(height) + 0.5, torch.arange(width) + 0.5, indexing="ij")
    grid = torch.stack([ys, xs], dim=-1)
    m = torch.zeros(height, width, dtype=torch.bool)
    for _ in range(_randint(g, 2, 8)):
        angle += _uniform(g, -math.pi / 3, math.pi / 3)  # a walk that bends, not a scribble
        step = _uniform(g, 0.1, 0.3) * size * torch.tensor([math.sin(angle), math.cos(angle)])
        end = (point + step).clamp(torch.zeros(2), torch.tensor([float(height), float(width)]))
        seg = end - point
        t = ((grid - point) @ seg / seg.dot(seg).clamp_min(1e-6)).clamp(0, 1)
        m |= (grid - point - t[..., None] * seg).norm(dim=-1) <= radius
        point = end
    return m.float()


def inpaint_mask(height: int, width: int, g: torch.Generator | None = None) -> Tensor:
    """[H, W] union of 1-4 boxes / brush strokes, redrawn until it covers at most MAX_INPAINT."""
    for _ in range(_REDRAWS):
        m = torch.zeros(height, width)
        for _ in range(_randint(g, 1, 4)):
            m = torch.maximum(m, _box(height, width, g) if _uniform(g) < 0.5 else _stroke(height, width, g))
        if 0 < m.mean() <= MAX_INPAINT:
            return m
    return _box(height, width, g)  # a single box covers at most 25%


def outpaint_mask(height: int, width: int, g: torch.Generator | None = None) -> Tensor:
    """[H, W]: keep a random box (sides 40-75%) or one half; the rest is unknown."""
    m = torch.ones(height, width)
    if _uniform(g) < 0.5:
        h = max(1, round(_uniform(g, *OUTPAINT_KEEP) * height))
        w = max(1, round(_uniform(g, *OUTPAINT_KEEP) * width))
        top, left = _randint(g, 0, height - h), _randint(g, 0, width - w)
        m[top:top + h, left:left + w] = 0
        return m
    side = _randint(g, 0, 3)  # keep the left, top, right or bottom half
    if side == 0:
        m[:, : width // 2] = 0
    elif side == 1:
        m[: height // 2] = 0
    elif side == 2:
        m[:, width - width // 2:] = 0
    else:
        m[height - height // 2:] = 0
    return m


def replace_mask(alpha: Tensor, grow_px: int | None = None) -> Tensor:
    """[H, W]: the object (alpha > 0.5) grown by `grow_px` (default size/32, >= 1) to cover its
    anti-aliased rim, so no trace of the old object's outline stays in the known pixels."""
    grow = max(1, round(min(alpha.shape[-2:]) / 32)) if grow_px is None else grow_px
    m = (alpha.float() > 0.5).float()[None, None]
    if grow > 0:
        m = F.max_pool2d(m, 2 * grow + 1, stride=1, padding=grow)
    return m[0, 0]


def _per_sample(generator, batch: int) -> list:
    """One generator (or None) shared by the batch, or a list with one per sample."""
    if generator is None or isinstance(generator, torch.Generator):
        return [generator] * batch
    generator = list(generator)
    if len(generator) != batch:
        raise EdifyError(f"need one generator per sample: batch {batch}, got {len(generator)} generators")
    return generator


def training_masks(batch: int, height: int, width: int, alphas: Tensor | None = None,
                   generator: torch.Generator | Sequence[torch.Generator] | None = None,
                   tasks: Sequence[str] = TASKS) -> tuple[Tensor, Tensor]:
    """(mask [B, 1, H, W], task index [B]) with each sample's task uniform over `tasks`.

    "replace" needs the object's alpha: without `alphas` it is not drawn, and a sample whose object
    covers less than MIN_REPLACE or more than MAX_REPLACE of the image gets an inpaint mask instead.
    `generator`: one for the batch, or a list with one per sample (edify.core.seeding's convention),
    with which a sample's mask and task depend only on its own generator.
    """
    gens = _per_sample(generator, batch)
    indices = [task_index(t) for t in dict.fromkeys(tasks)]
    alphas = None if alphas is None else alphas.detach().cpu()
    if alphas is None:
        indices = [i for i in indices if TASKS[i] != "replace"] or [TASKS.index("inpaint")]
    masks, chosen = [], []
    for b, g in enumerate(gens):
        task = TASKS[indices[_randint(g, 0, len(indices) - 1)]]
        m = replace_mask(alphas[b, 0]) if task == "replace" else None
        if m is not None and not MIN_REPLACE <= float(m.mean()) <= MAX_REPLACE:
            task, m = "inpaint", None
        if m is None:
            m = (inpaint_mask if task == "inpaint" else outpaint_mask)(height, width, g)
        masks.append(m)
        chosen.append(TASKS.index(task))
    return torch.stack(masks)[:, None], torch.tensor(chosen, dtype=torch.long)


# ---- after sampling ------------------------------------------------------------------------

def feather_weights(mask: Tensor, feather_px: float) -> Tensor:
    """[B, 1, H, W] weight of the generated image: 0 on known pixels, rising linearly with the
    distance d to the nearest known pixel as d / (feather_px + 1), 1 from there on.

    The ramp lies wholly on the unknown side, so known pixels are never touched.
    """
    m = (mask > 0.5).cpu().numpy().astype(np.uint8)
    out = np.ones(m.shape, dtype=np.float32)
    for b in range(m.shape[0]):
        if m[b, 0].all():  # no known pixel: nothing to blend towards
            continue
        d = cv2.distanceTransform(m[b, 0], cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
        out[b, 0] = np.clip(d / (feather_px + 1), 0, 1)
    return torch.from_numpy(out).to(mask.device)


def paste_known(generated: Tensor, image: Tensor, mask: Tensor, feather_px: float = 2.0) -> Tensor:
    """Known pixels from `image` exactly, generated pixels elsewhere, blended in a band of
    `feather_px` px on the unknown side of the seam (0 = a hard paste).

    Why: a sampler only approximately keeps the known pixels; pasting them back makes the kept
    region exact, and the feather hides a step where the generated side drifted.
    """
    generated, image = check_images(generated, "generated"), check_images(image, "image")
    if generated.shape != image.shape:
        raise EdifyError(f"generated {tuple(generated.shape)} and image {tuple(image.shape)} differ in shape")
    if feather_px < 0:
        raise EdifyError(f"feather_px must be >= 0, got {feather_px}")
    m = mask.float()
    m = m[None, None] if m.ndim == 2 else m
    m = fit_size(m, tuple(image.shape[-2:]), "mask", resize=False).expand(image.shape[0], 1, -1, -1)
    w = feather_weights(m, feather_px).to(image)
    blend = w * generated + (1 - w) * image
    return torch.where(m.to(image.device) > 0.5, blend, image)
