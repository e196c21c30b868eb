"""Controlled text-to-image and inpainting (Edify Image section 5): the diffusers-shaped entry points.

    pipe = ControlNetPipeline.from_pretrained("weights/emoji-64", controlnets=["weights/controlnet-canny-64"])
    images = pipe("red apple", control_image=edges, control_weight=0.8, seed=0).images

    pipe = InpaintPipeline.from_pretrained("weights/emoji-64", controlnet="weights/inpaint-64")
    images = pipe("green apple", image=photo, mask=mask, task="inpaint", seed=0).images
    images = pipe("green apple", image=photo, task="outpaint", pad=(16, 0, 16, 0)).images
    images = pipe("green apple", image=photo, mask=mask, method="repaint").images   # no ControlNet

Both are a `TextToImagePipeline` whose preconditioned denoiser is wrapped before guidance: by a
`ControlledDenoiser` (`edify.core.control`: one or several ControlNets, each with its control image
at full resolution, a weight and the sigma range where it acts) and, for `method="repaint"`, by a
`RePaintDenoiser` (`edify.core.repaint`: the known pixels replace the network's estimate), and for
the default `method="controlnet+repaint"` by both (measured best on every task: docs/controls.md).
The schedule, sampler, seeds and guidance are the text-to-image pipeline's, so with every control
weight 0 the controlled images are the text-to-image ones bit for bit (at the same guidance scale),
and the three inpainting methods cost the same network evaluations. One exception: a ControlNet
folder may carry its own measured sampling defaults (`"defaults": {"guidance_scale": G,
"sigma_min": S}` in its config.json); where the call gives none and every ControlNet in use has
one, the smallest guidance scale and the largest schedule end among them replace the base model's
defaults; and `"experts": false` in any of them runs the main network (the one the ControlNets were
trained on) at every stage instead of the base model's stage experts, unless the call passes
`experts` itself.

Sigmas are full-resolution units, as everywhere in `edify.core`: a control acts while sampling
runs from `control_start` (the larger sigma, default infinity) down to `control_end` (default 0).
Control images are tensors in the control's own range (`edify.data.controls`: edges and depth in
[-1, 1]) or PIL images of a map (white = edge / near), at the size of the images being generated.
Inpainting masks are white (1) where the image is regenerated and black (0) where it is kept; the
kept pixels are pasted back exactly, with a seam feathered on the generated side
(`edify.data.masks.paste_known`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from edify.core.control import Control, ControlledDenoiser
from edify.core.precond import EDMPrecond
from edify.core.repaint import RePaintDenoiser
from edify.data.controls import KINDS, control_from_image, outpaint_canvas, paste_known, prepare_inpaint
from edify.data.masks import TASKS, fit_size, task_index
from edify.errors import EdifyError
from edify.networks.controlnet import ControlNet
from edify.networks.unet import UNetConfig
from edify.pipelines.text2image import TextToImageOutput, TextToImagePipeline, to_pil

INPAINT_METHODS = ("controlnet", "repaint", "controlnet+repaint")
DenoiserWrapper = Callable[[EDMPrecond], torch.nn.Module]


# ---- images in ---------------------------------------------------------------------------------

def image_tensor(image, what: str = "image") -> Tensor:
    """A PIL image (transparency composited on white), or a float tensor [3, H, W] / [B, 3, H, W]
    in [-1, 1], as [B, 3, H, W] in [-1, 1]."""
    if isinstance(image, Image.Image):
        if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
            rgba = image.convert("RGBA")
            image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
        arr = np.asarray(image.convert("RGB"), dtype=np.float32)
        return torch.from_numpy(arr.copy()).permute(2, 0, 1)[None] / 127.5 - 1
    if isinstance(image, Tensor) and image.is_floating_point() and image.dim() in (3, 4) \
            and image.shape[-3] == 3:
        return image[None] if image.dim() == 3 else image
    shape = tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__
    raise EdifyError(f"{what} must be a PIL image or a float tensor [B, 3, H, W] in [-1, 1], got {shape}")


def map_tensor(image, what: str = "mask") -> Tensor:
    """A single-channel map (a mask, an edge or depth map) as a float [B, 1, H, W] tensor in [0, 1]:
    a PIL image is read as grey levels / 255, a tensor [H, W], [1, H, W] or [B, 1, H, W] is taken as is."""
    if isinstance(image, Image.Image):
        arr = np.asarray(image.convert("L"), dtype=np.float32) / 255
        return torch.from_numpy(arr.copy())[None, None]
    if isinstance(image, Tensor) and image.dim() in (2, 3, 4):
        m = image.float()
        m = m[None, None] if m.dim() == 2 else m[None] if m.dim() == 3 else m
        if m.shape[1] == 1:
            return m
    shape = tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__
    raise EdifyError(f"{what} must be a PIL image or a tensor [B, 1, H, W], got {shape}")


def _per_control(value, n: int, name: str) -> list[float]:
    """One float per ControlNet: a number for all, or a list of n."""
    values = list(value) if isinstance(value, (list, tuple)) else [value] * n
    if len(values) != n:
        raise EdifyError(f"{name} needs one value per ControlNet ({n}), got {len(values)}")
    try:
        return [float(v) for v in values]
    except (TypeError, ValueError):
        raise EdifyError(f"{name} must be numbers, got {values}") from None


# ---- controlled text-to-image --------------------------------------------------------------------

class ControlNetPipeline(TextToImagePipeline):
    """Prompt + control images -> images: a text-to-image model steered by one or several ControlNets."""

    def __init__(self, network, config, text_encoder=None, controlnets: Sequence[ControlNet] = ()):
        super().__init__(network, config, text_encoder)
        self.controlnets: list[ControlNet] = []
        for net in controlnets:
            self.add_controlnet(net)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, controlnets: Sequence[str | os.PathLike] = (),
                        text_encoder=None, **kwargs):
        """The model folder, then each ControlNet folder (refused in one line when made for another
        base network config, before its weights are read)."""
        if isinstance(controlnets, (str, os.PathLike)):
            controlnets = [controlnets]
        pipe = super().from_pretrained(path, text_encoder=text_encoder, **kwargs)
        base = UNetConfig.from_dict(pipe.config.network)
        for folder in controlnets:
            pipe.add_controlnet(ControlNet.from_pretrained(folder, base=base))
        return pipe

    def add_controlnet(self, net: ControlNet) -> None:
        if not isinstance(net, ControlNet):
            raise EdifyError(f"controlnets must be ControlNet modules, got {type(net).__name__}")
        net.config.check_base(UNetConfig.from_dict(self.config.network))
        self.controlnets.append(net.eval().requires_grad_(False).to(self.device))

    def to(self, device=None, dtype: torch.dtype | None = None):
        super().to(device, dtype)
        for net in self.controlnets:
            net.to(self.device)
        return self

    def controls(self, control_image, size: tuple[int, int], control_weight=1.0, control_start=math.inf,
                 control_end=0.0, resize: bool = False) -> list[Control]:
        """One `Control` per ControlNet of the pipeline, in order: its image (see `control_tensor`),
        weight and sigma range [control_end, control_start]."""
        n = len(self.controlnets)
        if n == 0:
            if control_image is not None:
                raise EdifyError("a control image was given but the pipeline has no ControlNet")
            return []
        if control_image is None:
            raise EdifyError(f"the pipeline's {n} ControlNet(s) need a control image each (control_image)")
        images = list(control_image) if isinstance(control_image, (list, tuple)) else [control_image]
        if len(images) != n:
            raise EdifyError(f"control_image needs one image per ControlNet ({n}), got {len(images)}")
        weights = _per_control(control_weight, n, "control_weight")
        starts = _per_control(control_start, n, "control_start")
        ends = _per_control(control_end, n, "control_end")
        for start, end in zip(starts, ends):
            if not 0 <= end <= start:
                raise EdifyError(f"a control acts from control_start down to control_end (full-resolution "
                                 f"sigmas, start >= end >= 0), got start {start} and end {end}")
        return [Control(net, self.control_tensor(net, image, size, resize), weight, end, start)
                for net, image, weight, start, end in zip(self.controlnets, images, weights, starts, ends)]

    def control_guidance(self) -> float | None:
        """The guidance scale to use when the caller gives none: the smallest of the ControlNets'
        measured defaults (`ControlNet.defaults["guidance_scale"]`) when every ControlNet of the
        pipeline has one, else None (the base model's default)."""
        return self._control_default("guidance_scale", min)

    def control_sigma_min(self) -> float | None:
        """Where the schedule ends when the caller gives no sigma_min: the largest of the
        ControlNets' measured `defaults["sigma_min"]` when every ControlNet has one, else None (the
        base model's default)."""
        return self._control_default("sigma_min", max)

    def control_experts(self):
        """Which networks run under the ControlNets when the caller does not say: {} (the main
        network, the one the ControlNets were trained on, at every stage) when any of them has the
        measured default `"experts": false`, else None (the model's stage experts, as text-to-image)."""
        return {} if any(net.defaults.get("experts") is False for net in self.controlnets) else None

    def with_control_defaults(self, guidance_scale: float | None, sigma_min: float | None, experts=None):
        """(guidance_scale, sigma_min, experts) with each one the caller left None replaced by the
        ControlNets' measured default, where they carry one (else still None: the model's)."""
        if guidance_scale is None:
            guidance_scale = self.control_guidance()
        if sigma_min is None:
            sigma_min = self.control_sigma_min()
        if experts is None:
            experts = self.control_experts()
        return guidance_scale, sigma_min, experts

    def _control_default(self, key: str, reduce) -> float | None:
        values = [net.defaults.get(key) for net in self.controlnets]
        if not values or any(v is None for v in values):
            return None
        return reduce(values)

    @staticmethod
    def control_tensor(net: ControlNet, image, size: tuple[int, int], resize: bool = False) -> Tensor:
        """A control image for `net` at `size` (H, W): a tensor [1|B, Cc, H, W] in the control's range,
        or, for edge and depth ControlNets, a PIL image of the map. Another size is refused with both
        sizes unless resize=True."""
        kind = net.config.kind
        if isinstance(image, Image.Image):
            if kind not in KINDS or kind == "inpaint":
                raise EdifyError(f"a {kind} ControlNet takes its control image as a tensor "
                                 f"[B, {net.config.control_channels}, H, W], not a picture")
            return control_from_image(kind, map_tensor(image, f"{kind} map"), size, resize=resize)
        if not isinstance(image, Tensor) or image.dim() not in (3, 4) or not image.is_floating_point():
            shape = tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__
            raise EdifyError(f"a control image must be a PIL image or a float tensor [B, C, H, W], got {shape}")
        image = image[None] if image.dim() == 3 else image
        mode = "nearest" if kind in ("canny", "inpaint") else "bilinear"
        return fit_size(image.float(), size, f"the {kind} control image", resize, mode=mode)

    @torch.no_grad()
    def __call__(self, prompt: str | list[str], control_image=None, negative_prompt: str | None = None,
                 style: str | list[str] | None = None, num_steps: int | None = None,
                 guidance_scale: float | Sequence[float] | None = None, seed: int | list[int] | None = None,
                 height: int | None = None, width: int | None = None, sampler: str | None = None,
                 num_images_per_prompt: int = 1, output_type: str = "pil", callback=None,
                 final_stage: int = 0, steps_per_stage: tuple[int, ...] | None = None,
                 control_weight: float | Sequence[float] = 1.0,
                 control_start: float | Sequence[float] = math.inf,
                 control_end: float | Sequence[float] = 0.0, resize: bool = False,
                 style_guidance: float | None = None, sigma_min: float | None = None,
                 eta: float | Sequence[float] | None = None, threshold: float | None = None,
                 shrink: float | None = None, shrink_rule: str | None = None,
                 experts=None, guide_weight=None) -> TextToImageOutput:
        """Images for the prompts, steered by one control image per ControlNet (a list for several).

        control_weight, control_start, control_end: a number for every ControlNet or a list of one
        each. experts: as for `TextToImagePipeline.__call__` (default: the model's stage experts,
        each stage's network receiving the ControlNets' residuals as the main network does, unless a
        ControlNet's measured defaults say `"experts": false`; `{}` or False runs the main network,
        the one the ControlNets were trained on, at every stage; True the model's experts whatever
        the ControlNets' defaults). guide_weight: the model's own autoguidance guides
        (`PipelineConfig.stage_guides`), off under control unless given. The other arguments are those
        of `TextToImagePipeline.__call__`."""
        height = self.config.resolution if height is None else height
        width = self.config.resolution if width is None else width
        controls = self.controls(control_image, (height, width), control_weight, control_start, control_end,
                                 resize)
        wrap = partial(ControlledDenoiser, controls=controls) if controls else None
        if controls:
            guidance_scale, sigma_min, experts = self.with_control_defaults(guidance_scale, sigma_min, experts)
        return self._sample(wrap, prompt=prompt, negative_prompt=negative_prompt, style=style, num_steps=num_steps,
                            guidance_scale=guidance_scale, seed=seed, height=height, width=width, sampler=sampler,
                            num_images_per_prompt=num_images_per_prompt, output_type=output_type,
                            callback=callback, final_stage=final_stage, steps_per_stage=steps_per_stage,
                            style_guidance=style_guidance, sigma_min=sigma_min, eta=eta, threshold=threshold,
                            shrink=shrink, shrink_rule=shrink_rule, experts=experts, guide_weight=guide_weight)

    def _sample(self, denoiser_wrapper: DenoiserWrapper | None, *, prompt, negative_prompt, style, num_steps,
                guidance_scale, seed, height, width, sampler, num_images_per_prompt, output_type, callback,
                final_stage, steps_per_stage, style_guidance=None, sigma_min=None, eta=None,
                threshold=None, shrink=None, shrink_rule=None, experts=None,
                guide_weight=None) -> TextToImageOutput:
        """`TextToImagePipeline.__call__` with the preconditioned denoiser wrapped before guidance:
        each stage's denoiser (the model's experts unless `experts` says otherwise) wrapped on its
        own; an unwrapped call (no control) is plain text-to-image."""
        return TextToImagePipeline.__call__(
            self, prompt, negative_prompt=negative_prompt, style=style, num_steps=num_steps,
            guidance_scale=guidance_scale, seed=seed, height=height, width=width, sampler=sampler,
            num_images_per_prompt=num_images_per_prompt, output_type=output_type, callback=callback,
            final_stage=final_stage, steps_per_stage=steps_per_stage, denoiser_wrapper=denoiser_wrapper,
            style_guidance=style_guidance, sigma_min=sigma_min, eta=eta, threshold=threshold,
            shrink=shrink, shrink_rule=shrink_rule, experts=experts, guide_weight=guide_weight)


# ---- inpainting, outpainting, object replacement -----------------------------------------------

class InpaintPipeline(ControlNetPipeline):
    """Image + mask + task -> images that keep the known pixels: through the inpainting ControlNet
    (7-channel hint, `edify.data.controls.prepare_inpaint`) or, without one, RePaint-style replacement."""

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, controlnet: str | os.PathLike | None = None,
                        text_encoder=None, **kwargs):
        """The model folder and the inpainting ControlNet folder (None: only method="repaint" runs)."""
        return super().from_pretrained(path, controlnets=[] if controlnet is None else [controlnet],
                                       text_encoder=text_encoder, **kwargs)

    def add_controlnet(self, net: ControlNet) -> None:
        if self.controlnets:
            raise EdifyError("an inpainting pipeline takes one ControlNet")
        if net.config.control_channels != len(TASKS) + 4 or net.config.kind not in ("inpaint", "custom"):
            raise EdifyError(f"this is a {net.config.kind} ControlNet with {net.config.control_channels} control "
                             f"channels, not an inpainting one (7 channels: image, mask, task)")
        super().add_controlnet(net)

    @torch.no_grad()
    def __call__(self, prompt: str | list[str], image=None, mask=None, task: str = "inpaint",
                 pad: Sequence[int] | None = None, method: str = "controlnet+repaint", feather_px: float = 2.0,
                 negative_prompt: str | None = None, style: str | list[str] | None = None,
                 num_steps: int | None = None, guidance_scale: float | Sequence[float] | None = None,
                 seed: int | list[int] | None = None, sampler: str | None = None, num_images_per_prompt: int = 1,
                 output_type: str = "pil", callback=None, steps_per_stage: tuple[int, ...] | None = None,
                 control_weight: float = 1.0, control_start: float = math.inf, control_end: float = 0.0,
                 resize: bool = False, sigma_min: float | None = None, eta: float | Sequence[float] | None = None,
                 threshold: float | None = None, shrink: float | None = None, shrink_rule: str | None = None,
                 experts=None, guide_weight=None) -> TextToImageOutput:
        """Regenerate the white part of `mask` in `image` (1 = generate, 0 = keep).

        task: "inpaint" (fill a region), "replace" (a new object where the mask covers the old one)
        or "outpaint" (extend the image: `pad=(left, top, right, bottom)` px instead of a mask).
        method: "controlnet+repaint" (default: the ControlNet's estimate, with the known pixels put
        back into it at every step), "controlnet" (the pipeline's inpainting ControlNet alone) or
        "repaint" (no ControlNet: `edify.core.repaint`), all at the same base-network evaluations.
        feather_px: width of the blend on the generated side of the seam (0 = a hard paste). resize: resize a mask of another size
        to the image (nearest). The other arguments are those of `TextToImagePipeline.__call__`.
        """
        if method not in INPAINT_METHODS:
            raise EdifyError(f"unknown inpainting method {method!r}; known: {', '.join(INPAINT_METHODS)}")
        task_index(task)
        if image is None:
            raise EdifyError("inpainting needs an image")
        image = image_tensor(image)
        if pad is not None:
            if task != "outpaint":
                raise EdifyError(f"pad extends the image for task 'outpaint', not {task!r}")
            if mask is not None:
                raise EdifyError("outpainting takes a pad or a mask, not both")
            canvas, mask = outpaint_canvas(image, tuple(pad))
            # the feather blends the generated border towards the image's edge colours
            left, top, right, bottom = pad
            reference = F.pad(image, (left, right, top, bottom), mode="replicate")
        else:
            if mask is None:
                raise EdifyError("inpainting needs a mask (white = generate), or pad=(left, top, right, bottom) "
                                 "for outpaint")
            canvas = reference = image
        control, mask = prepare_inpaint(canvas, map_tensor(mask), task, resize=resize)
        height, width = canvas.shape[-2:]
        m = self.size_multiple
        if height % m or width % m:
            what = "the image plus pad" if pad is not None else "the image"
            raise EdifyError(f"{what} is {height}x{width}; this model needs sides that are multiples of {m}")

        # the method is which layers wrap the base denoiser: the ControlNet, then the replacement
        controlled, replaced = method != "repaint", method != "controlnet"
        if controlled:
            if not self.controlnets:
                raise EdifyError(f"method {method!r} needs an inpainting ControlNet (from_pretrained(..., "
                                 "controlnet=FOLDER)); method 'repaint' needs none")
            controls = self.controls(control, (height, width), control_weight, control_start, control_end)
            guidance_scale, sigma_min, experts = self.with_control_defaults(guidance_scale, sigma_min, experts)

        def wrap(denoiser):
            if controlled:
                denoiser = ControlledDenoiser(denoiser, controls=controls)
            return RePaintDenoiser(denoiser, known=canvas, mask=mask) if replaced else denoiser

        out = self._sample(wrap, prompt=prompt, negative_prompt=negative_prompt, style=style, num_steps=num_steps,
                           guidance_scale=guidance_scale, seed=seed, height=height, width=width, sampler=sampler,
                           num_images_per_prompt=num_images_per_prompt, output_type="tensor", callback=callback,
                           final_stage=0, steps_per_stage=steps_per_stage, sigma_min=sigma_min, eta=eta,
                           threshold=threshold, shrink=shrink, shrink_rule=shrink_rule, experts=experts,
                           guide_weight=guide_weight)
        B = out.images.shape[0]
        if canvas.shape[0] not in (1, B):
            raise EdifyError(f"the image batch must be 1 or the number of images ({B}), got {canvas.shape[0]}")
        images = paste_known(out.images, reference.expand(B, -1, -1, -1).float(), mask.expand(B, -1, -1, -1).cpu(),
                             feather_px)
        out.images = images if output_type == "tensor" else to_pil(images)
        return out
