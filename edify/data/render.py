"""Rasterising iconify SVG bodies with resvg: RGB composited on white plus the alpha mask.

Each icon is rendered from its SVG once per requested size (never resized from another size),
so every level of the cascade sees a clean rasterisation. The alpha channel is kept as the
object mask. `render_sample` is the unit of work a process pool maps over.

Icon bodies come from downloaded packages and are treated as hostile. resvg would load any file
an `<image>` or `<feImage>` names (absolute, relative, even `#name` for a file called so) and
copy its pixels into the dataset, and it panics on markup it cannot parse. This binding offers no
hook to refuse loading, so `svg_problem` checks the exact document before resvg sees it:
well-formed XML without a DOCTYPE, entities or processing instructions; bounded size, depth,
element count and `<use>`/`url(#id)` expansion; references only to `#id` inside the icon; images
only as raster data: URIs of bounded size. Relative paths are also pointed at a directory that
cannot exist. Whatever still goes wrong in resvg is contained by the worker process
(edify.data.sandbox).
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import re
import xml.parsers.expat
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

# Bounds of the SVG pre-check; the largest published emoji bodies (emojione-v1, fluent-emoji)
# reach 0.9 MB, 5,300 elements, depth 6 and 44 <use>, far inside these.
MAX_SVG_CHARS = 4_000_000
MAX_DEPTH = 64
MAX_ELEMENTS = 100_000
MAX_EXPANDED = 200_000  # elements once every <use> and url(#id) is instantiated
MAX_IMAGE_SIDE = 4096  # pixels of an embedded raster image
RASTER_TYPES = {"image/png": "PNG", "image/jpeg": "JPEG", "image/jpg": "JPEG", "image/gif": "GIF",
                "image/webp": "WEBP"}
LOADING_ELEMENTS = ("image", "feimage")  # resvg reads files for these hrefs, even for "#name"
_URL_OPEN = re.compile(r"url\(", re.IGNORECASE)
_URL = re.compile(r"url\(\s*(['\"]?)(.*?)\1\s*\)", re.IGNORECASE | re.DOTALL)
_DATA_URI = re.compile(r"data:([^;,]*)((?:;[^;,]*)*),(.*)", re.DOTALL)
# relative hrefs resolve below this, a path under the null device that cannot exist
NO_RESOURCES = os.path.join(os.devnull, "edify-no-resources")

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
    """Outcome of rendering one icon: 'ok', 'not_svg', 'empty', 'vanishes' or an `svg_problem` reason."""

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
        _OPTIONS.resources_dir = NO_RESOURCES
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


class SvgRefused(Exception):
    """The SVG pre-check's verdict; `reason` is the status the icon is counted under."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


def _local(name: str) -> str:
    """Local name of an expat namespace-qualified name ('uri local' -> 'local')."""
    return name[name.rfind(" ") + 1:]


def check_data_uri(value: str) -> None:
    """An embedded image must be a base64 raster (PNG, JPEG, GIF, WebP) of at most MAX_IMAGE_SIDE px.

    SVG in a data: URI would be parsed by resvg with the same file access as the icon itself.
    """
    match = _DATA_URI.fullmatch(value)
    if match is None or match.group(1).strip().lower() not in RASTER_TYPES:
        raise SvgRefused("external_ref", f"image href is not a raster data: URI: {value[:40]!r}")
    if ";base64" not in match.group(2).lower():
        raise SvgRefused("bad_image", "embedded image is not base64")
    try:
        data = base64.b64decode(re.sub(r"\s+", "", match.group(3)), validate=True)
        with Image.open(io.BytesIO(data)) as image:  # reads the header only
            kind, size = image.format, image.size
    except (binascii.Error, ValueError, OSError, Image.DecompressionBombError) as err:
        raise SvgRefused("bad_image", f"embedded image does not decode: {err}") from None
    if kind != RASTER_TYPES[match.group(1).strip().lower()] or max(size) > MAX_IMAGE_SIDE:
        raise SvgRefused("bad_image", f"embedded image is {kind} {size[0]}x{size[1]}")


def check_href(element: str, value: str) -> str | None:
    """Refuse an href resvg could resolve outside the icon; returns the local id referred to."""
    if element.lower() in LOADING_ELEMENTS:
        check_data_uri(value)
        return None
    if not value.startswith("#"):
        raise SvgRefused("external_ref", f"<{element}> href outside the icon: {value[:40]!r}")
    return value[1:] or None


def check_css(text: str) -> list[str]:
    """CSS may only refer to `#id` (resvg fetches nothing for CSS; this is a second line)."""
    if "@import" in text.lower():
        raise SvgRefused("external_ref", "CSS @import")
    targets = [m.group(2).strip() for m in _URL.finditer(text)]
    if len(targets) != len(_URL_OPEN.findall(text)):
        raise SvgRefused("external_ref", "unparsed CSS url(")
    outside = [t for t in targets if not t.startswith("#")]
    if outside:
        raise SvgRefused("external_ref", f"url() outside the icon: {outside[0][:40]!r}")
    return [t[1:] for t in targets]


class _SvgScan:
    """One expat pass over a document: limits, references, and the element tree for `expanded`."""

    def __init__(self) -> None:
        self.parents: list[int] = []  # element index -> parent index (-1 for the root)
        self.refs: list[list[str]] = []  # element index -> ids it instantiates
        self.ids: dict[str, int] = {}
        self.stack: list[int] = []
        self.css: list[str] | None = None  # text of the <style> element being read

    def start(self, name: str, attrs: dict[str, str]) -> None:
        if len(self.parents) >= MAX_ELEMENTS:
            raise SvgRefused("too_complex", f"more than {MAX_ELEMENTS} elements")
        if len(self.stack) >= MAX_DEPTH:
            raise SvgRefused("too_deep", f"elements nested deeper than {MAX_DEPTH}")
        index = len(self.parents)
        self.parents.append(self.stack[-1] if self.stack else -1)
        element, refs = _local(name), []
        for attribute, value in attrs.items():
            local = _local(attribute)
            if local == "href":
                refs += filter(None, [check_href(element, value)])
            elif local == "id":
                self.ids.setdefault(value, index)
            if local == "style" or ("(" in value and _URL_OPEN.search(value)):
                refs += check_css(value)
        self.refs.append(refs)
        self.stack.append(index)
        if element == "style":
            self.css = []

    def end(self, name: str) -> None:
        self.stack.pop()
        if _local(name) == "style" and self.css is not None:
            check_css("".join(self.css))  # expat may hand text over in pieces
            self.css = None

    def text(self, data: str) -> None:
        if self.css is not None:
            self.css.append(data)

    def refuse(self, *args: object) -> None:
        raise SvgRefused("malformed", "DOCTYPE, entity declaration or processing instruction")

    def expanded(self) -> int:
        """Element count with every reference instantiated; a reference cycle counts as too many."""
        children: list[list[int]] = [[] for _ in self.parents]
        for index, parent in enumerate(self.parents):
            if parent >= 0:
                children[parent].append(index)
        if not any(self.refs):
            return len(self.parents)
        weight: dict[int, int] = {}
        self._weigh(0, children, weight)  # every element is below the root
        return weight[0]

    def _weigh(self, root: int, children: list[list[int]], weight: dict[int, int]) -> None:
        """Iterative post-order: weight = 1 + children + referenced elements (no recursion limit)."""
        on_path, todo = set(), [(root, False)]
        while todo:
            node, ready = todo.pop()
            if ready:
                on_path.discard(node)
                deps = children[node] + [self.ids[r] for r in self.refs[node] if r in self.ids]
                weight[node] = min(MAX_EXPANDED + 1, 1 + sum(weight[d] for d in deps))
                continue
            if node in weight:
                continue
            if node in on_path:
                raise SvgRefused("too_complex", "a <use> or url(#id) refers to itself")
            on_path.add(node)
            todo.append((node, True))
            deps = children[node] + [self.ids[r] for r in self.refs[node] if r in self.ids]
            todo.extend((d, False) for d in deps if d not in weight)


def svg_problem(document: str) -> tuple[str, str] | None:
    """(reason, detail) when the document may not be given to resvg (see module docstring)."""
    if len(document) > MAX_SVG_CHARS:
        return "too_large", f"{len(document)} characters, more than {MAX_SVG_CHARS}"
    scan = _SvgScan()
    parser = xml.parsers.expat.ParserCreate(namespace_separator=" ")
    parser.StartElementHandler, parser.EndElementHandler = scan.start, scan.end
    parser.CharacterDataHandler = scan.text
    parser.StartDoctypeDeclHandler = parser.EntityDeclHandler = scan.refuse
    parser.ProcessingInstructionHandler = scan.refuse
    try:
        parser.Parse(document, True)
        if scan.expanded() > MAX_EXPANDED:
            return "too_complex", f"more than {MAX_EXPANDED} elements once <use> is expanded"
    except SvgRefused as refused:
        return refused.reason, str(refused)
    except xml.parsers.expat.ExpatError as err:
        return "malformed", f"XML: {xml.parsers.expat.ErrorString(err.code)} at column {err.offset}"
    return None


def render_sample(task: tuple[str, IconGeometry, tuple[int, ...]]) -> RenderResult:
    """Render one icon at every size; classify blank, vanishing and non-SVG icons."""
    body, geometry, sizes = task
    if not looks_like_svg(body):
        return RenderResult("not_svg", error="body is not SVG markup")
    problem = svg_problem(icon_svg(body, geometry, min(sizes)))
    if problem is not None:
        return RenderResult(problem[0], error=problem[1])
    result = RenderResult("ok")
    for size in sorted(sizes):
        try:
            rgba = render_rgba(icon_svg(body, geometry, size))
        except Exception as err:  # resvg panics (a BaseException) on bad markup: the worker counts those
            return RenderResult("not_svg", error=str(err).splitlines()[0] if str(err) else "parse error")
        rgb, mask = split_on_white(rgba)
        if size == min(sizes):
            if mask.getextrema()[1] == 0:
                return RenderResult("empty")
            if vanishes_on_white(rgb, mask):
                return RenderResult("vanishes")
        result.images[size] = (encode_png(rgb), encode_png(mask))
    return result
