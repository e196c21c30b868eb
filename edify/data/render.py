"""Rasterising iconify SVG bodies with resvg: RGB composited on white plus the alpha mask.

Each icon is rendered from its SVG once per requested size (never resized from another size),
so every level of the cascade sees a clean rasterisation. The alpha channel is kept as the
object mask. `render_sample` is the unit of work a process pool maps over.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field

import numpy as np
import resvg
from PIL import Image

# resvg's affine transform is (sx, kx, tx, ky, sy, ty); the intuitive (1, 0, 0, 1, 0, 0)
# scales y by 0 and renders blank images without an error.
IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
WHITE = (255, 255, 255)
# a pixel counts as "ink" when some channel is this far below white after compositing
INK_MARGIN = 16
# fewer than this fraction of the covered pixels being ink means the glyph vanishes on white
VANISH_FRACTION = 0.02

_OPTIONS: resvg.usvg.Options | None = None


@dataclass(frozen=True)
class IconGeometry:
    """The iconify viewBox of one icon: left, top, width, height in SVG units."""

    left: float = 0.0
    top: float = 0.0
    width: float = 16.0
    height: float = 16.0


@dataclass
class RenderResult:
    """Outcome of rendering one icon: status 'ok', 'not_svg', 'empty' or 'vanishes'."""

    status: str
    images: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)  # size -> (rgb, mask)
    error: str = ""


def looks_like_svg(body: object) -> bool:
    """An iconify body is SVG markup: a string of elements, not a data URI or raster bytes."""
    return isinstance(body, str) and body.lstrip().startswith("<") and ("/>" in body or "</" in body)


def icon_svg(body: str, geometry: IconGeometry, size: int) -> str:
    """Wrap an iconify body in a square `size` x `size` SVG (non-square icons are centred)."""
    g = geometry
    return (
        '<svg xmlns="http://www.w3.org/2000/svg" xmlns:xlink="http://www.w3.org/1999/xlink" '
        f'width="{size}" height="{size}" viewBox="{g.left} {g.top} {g.width} {g.height}">'
        f"{body}</svg>"
    )


def _options() -> resvg.usvg.Options:
    global _OPTIONS  # one per process: building the options is not free
    if _OPTIONS is None:
        _OPTIONS = resvg.usvg.Options.default()
    return _OPTIONS


def render_rgba(svg: str) -> Image.Image:
    """Rasterise an SVG document to an RGBA image at its own width and height."""
    tree = resvg.usvg.Tree.from_str(svg, _options())
    png = resvg.render(tree, IDENTITY)
    return Image.open(io.BytesIO(bytes(png))).convert("RGBA")


def split_on_white(rgba: Image.Image) -> tuple[Image.Image, Image.Image]:
    """RGB alpha-composited over white, and the alpha channel as an 8-bit mask."""
    background = Image.new("RGBA", rgba.size, WHITE + (255,))
    rgb = Image.alpha_composite(background, rgba).convert("RGB")
    return rgb, rgba.getchannel("A")


def vanishes_on_white(rgb: Image.Image, mask: Image.Image) -> bool:
    """True when the glyph covers pixels but nearly none of them differ from white.

    White-on-transparent glyphs (some Noto v1 symbols) would become blank training images.
    """
    alpha = np.asarray(mask)
    covered = alpha > 127
    if not covered.any():
        return False
    ink = np.asarray(rgb).min(axis=-1) < 255 - INK_MARGIN
    return float(ink[covered].mean()) < VANISH_FRACTION


def encode_png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=6)
    return buffer.getvalue()


def render_sample(task: tuple[str, IconGeometry, tuple[int, ...]]) -> RenderResult:
    """Render one icon at every size; classify blank, vanishing and non-SVG icons."""
    body, geometry, sizes = task
    if not looks_like_svg(body):
        return RenderResult("not_svg", error="body is not SVG markup")
    result = RenderResult("ok")
    for size in sorted(sizes):
        try:
            rgba = render_rgba(icon_svg(body, geometry, size))
        except Exception as err:  # resvg raises plain exceptions for malformed markup
            return RenderResult("not_svg", error=str(err).splitlines()[0] if str(err) else "parse error")
        rgb, mask = split_on_white(rgba)
        if size == min(sizes):
            if mask.getextrema()[1] == 0:
                return RenderResult("empty")
            if vanishes_on_white(rgb, mask):
                return RenderResult("vanishes")
        result.images[size] = (encode_png(rgb), encode_png(mask))
    return result
