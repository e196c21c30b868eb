"""Reading an iconify JSON npm package with every value type- and range-checked before use.

The builder reads `package/{icons,info,chars,package}.json` from tarballs it did not make. Valid
JSON of the wrong shape (a list for an object, a string license, `"width": "abc"`), bytes that
are not UTF-8, or numbers that are NaN, negative or 1e308 used to end in a traceback, or worse in
a silently wrong render. Here they end in one `EdifyError` line naming the file and the field,
or in one skipped icon, by this rule:

- A problem with a file as a whole (not an object, no `icons`, a string where the license object
  belongs, a set-wide width that is NaN, a chars.json entry that is not a codepoint sequence)
  raises `EdifyError`: the package is not what it claims to be, so nothing in it is trusted.
- A problem with one icon (its entry not an object, a body that is not a string or is too long,
  `hidden` not a boolean, a width that is not a positive finite number within bounds, a name
  unsafe as a shard key) skips that icon and counts it in the manifest as `bad_icon`,
  `too_large`, `bad_geometry` or `bad_name`: one broken icon among thousands should not stop a
  set, just as icons whose body is not SVG are skipped and counted.

Sizes are bounded before anything is allocated: the number of tar members and their declared
sizes (checked from the headers, before the data is read), the number of icons and chars
entries, and the length of every string kept.
"""

from __future__ import annotations

import json
import re
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edify.data.render import MAX_SVG_CHARS, IconGeometry
from edify.errors import EdifyError

FILES = ("icons.json", "info.json", "chars.json", "package.json")
MAX_MEMBERS = 10_000  # an iconify package has about ten files
MAX_JSON_BYTES = 512 * 2**20  # per file; the largest published set (fluent-emoji) has a 104 MB icons.json
MAX_PACKAGE_BYTES = 2 * 2**30  # all files together, as declared in the tar headers
MAX_ICONS = 200_000  # entries of icons.json and of chars.json
MAX_TEXT = 2_000  # characters of an attribution string or a version
MAX_COORD = 1e6  # bound on viewBox values in SVG units (published sets use 16 to 512)
MIN_EXTENT = 0.01  # smallest viewBox width or height: below it an icon is a magnified speck
ICON_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}", re.ASCII)  # safe as a shard key
CODEPOINTS = re.compile(r"[0-9a-fA-F]{1,6}(?:[-_ ][0-9a-fA-F]{1,6})*", re.ASCII)
VERSION = re.compile(r"[0-9A-Za-z][0-9A-Za-z.+-]{0,99}", re.ASCII)


@dataclass(frozen=True)
class Icon:
    """One checked icon: its body and viewBox, or `problem`, the status it is skipped under."""

    body: str = ""
    geometry: IconGeometry = IconGeometry()
    hidden: bool = False
    problem: str = ""


@dataclass(frozen=True)
class IconSet:
    """One iconify JSON package: its checked icons, chars.json and attribution."""

    name: str
    version: str
    title: str
    license: str
    license_url: str
    author: str
    author_url: str
    icons: dict[str, Icon]
    chars: dict[str, str]
    default_geometry: IconGeometry


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number")


def _shown(value: Any) -> str:
    """A short rendering of a bad value for a one-line message."""
    if isinstance(value, (int, float, str)) and not isinstance(value, bool):
        return json.dumps(value)[:40]
    return _kind(value)


def in_range(value: Any, low: float, high: float) -> bool:
    """A JSON number (not a boolean) in [low, high]; NaN never is (comparisons are exact for big ints)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return low <= value <= high


def parse_json(data: bytes, where: str) -> Any:
    """Strict UTF-8 JSON; every failure is one line naming `where`."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise EdifyError(f"{where}: not UTF-8 (byte {err.start})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise EdifyError(f"{where}: invalid JSON at line {err.lineno} column {err.colno}: {err.msg}") from None
    except RecursionError:
        raise EdifyError(f"{where}: JSON nested too deeply") from None
    except ValueError as err:  # an integer literal of thousands of digits
        raise EdifyError(f"{where}: {str(err).splitlines()[0]}") from None


def _check_member(path: Path, member: tarfile.TarInfo, count: int, total: int) -> None:
    """Bounds from a member's header, before its data is read or skipped over."""
    if member.size > MAX_JSON_BYTES:
        raise EdifyError(f"{path.name}: {member.name[:80]!r} is {member.size} bytes, over {MAX_JSON_BYTES}")
    if count > MAX_MEMBERS or total > MAX_PACKAGE_BYTES:
        raise EdifyError(f"{path.name}: more than {MAX_MEMBERS} files or {MAX_PACKAGE_BYTES} bytes; "
                         "not an iconify package")


def read_package_files(path: Path) -> dict[str, Any]:
    """Parsed `package/NAME` for NAME in FILES, from a gzipped npm tarball, sizes checked first."""
    files: dict[str, Any] = {}
    try:
        with tarfile.open(path, "r:gz") as tar:
            total = 0
            for count, member in enumerate(tar, 1):  # headers are read one by one, data only on demand
                total += member.size
                _check_member(path, member, count, total)
                name = member.name.removeprefix("package/")
                if member.name != f"package/{name}" or name not in FILES:
                    continue
                if not member.isfile():
                    raise EdifyError(f"{path.name}: package/{name} is not a regular file")
                handle = tar.extractfile(member)
                files[name] = parse_json(handle.read(MAX_JSON_BYTES + 1), f"{path.name}: {name}")
    except (tarfile.TarError, OSError, EOFError, zlib.error) as err:
        raise EdifyError(f"cannot read iconify package {path}: {err}") from None
    if "icons.json" not in files:
        raise EdifyError(f"iconify package {path} has no package/icons.json")
    return files


def _object(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise EdifyError(f"{where} must be an object, got {_kind(value)}")
    return value


def _text(parent: dict[str, Any], key: str, where: str, default: str) -> str:
    value = parent.get(key, default)
    if not isinstance(value, str) or len(value) > MAX_TEXT:
        got = f"{len(value)} characters" if isinstance(value, str) else _kind(value)
        raise EdifyError(f"{where}.{key} must be a string of at most {MAX_TEXT} characters, got {got}")
    return value


def _number(parent: dict[str, Any], key: str, where: str, default: float, extent: bool) -> float:
    """A viewBox value: an offset within ±MAX_COORD, or an extent within [MIN_EXTENT, MAX_COORD]."""
    value = parent.get(key, default)
    low = MIN_EXTENT if extent else -MAX_COORD
    if not in_range(value, low, MAX_COORD):
        raise EdifyError(f"{where}.{key} must be a number from {low:g} to {MAX_COORD:g}, got {_shown(value)}")
    return float(value)


def check_geometry(entry: dict[str, Any], where: str, default: IconGeometry) -> IconGeometry:
    """left/top within ±MAX_COORD, width/height within [MIN_EXTENT, MAX_COORD]; missing keys take `default`."""
    return IconGeometry(
        _number(entry, "left", where, default.left, False), _number(entry, "top", where, default.top, False),
        _number(entry, "width", where, default.width, True), _number(entry, "height", where, default.height, True),
    )


def check_icon(name: str, entry: Any, default: IconGeometry) -> Icon:
    """One icons.json entry, or the reason it is skipped (see the module docstring)."""
    if not ICON_NAME.fullmatch(name):
        return Icon(problem="bad_name")
    if not isinstance(entry, dict) or not isinstance(entry.get("hidden", False), bool):
        return Icon(problem="bad_icon")
    if entry.get("hidden", False):
        return Icon(hidden=True)
    body = entry.get("body")
    if not isinstance(body, str):
        return Icon(problem="bad_icon")
    if len(body) > MAX_SVG_CHARS:
        return Icon(problem="too_large")
    try:
        geometry = check_geometry(entry, name, default)
    except EdifyError:
        return Icon(problem="bad_geometry")
    return Icon(body, geometry)


def check_chars(value: Any, where: str) -> dict[str, str]:
    """chars.json: codepoint sequence ('1f468-200d-1f4bb') -> icon name."""
    chars = _object(value, where)
    if len(chars) > MAX_ICONS:
        raise EdifyError(f"{where} has more than {MAX_ICONS} entries")
    for key, icon in chars.items():
        if not CODEPOINTS.fullmatch(key) or any(int(cp, 16) > 0x10FFFF for cp in re.split(r"[-_ ]", key)):
            raise EdifyError(f"{where}: key {key[:40]!r} is not a codepoint sequence")
        if not isinstance(icon, str) or not ICON_NAME.fullmatch(icon):
            raise EdifyError(f"{where}.{key} must be an icon name, got {_kind(icon)}")
    return dict(chars)


def check_icons(value: Any, where: str) -> tuple[dict[str, Icon], IconGeometry]:
    """icons.json: the set-wide viewBox (raises when bad) and every icon (skipped when bad)."""
    icons_json = _object(value, where)
    entries = _object(icons_json.get("icons"), f"{where}.icons")
    if len(entries) > MAX_ICONS:
        raise EdifyError(f"{where}.icons has more than {MAX_ICONS} icons")
    default = check_geometry(icons_json, where, IconGeometry())
    return {name: check_icon(name, entry, default) for name, entry in entries.items()}, default


def check_package(files: dict[str, Any], archive: str, name: str, default_license: str) -> IconSet:
    """An IconSet from the parsed files of `archive`; file-level problems raise EdifyError naming them."""
    where = lambda member: f"{archive}: {member}"  # noqa: E731
    icons, default = check_icons(files.get("icons.json"), where("icons.json"))
    info = _object(files.get("info.json", {}), where("info.json"))
    license_ = _object(info.get("license", {}), where("info.json") + ".license")
    author = _object(info.get("author", {}), where("info.json") + ".author")
    package = _object(files.get("package.json", {}), where("package.json"))
    version = _text(package, "version", where("package.json"), "unknown")
    if not VERSION.fullmatch(version):
        raise EdifyError(f"{where('package.json')}.version {version[:40]!r} is not a version")
    return IconSet(
        name=name,
        version=version,
        title=_text(info, "name", where("info.json"), name),
        license=_text(license_, "spdx", where("info.json") + ".license", default_license),
        license_url=_text(license_, "url", where("info.json") + ".license", ""),
        author=_text(author, "name", where("info.json") + ".author", ""),
        author_url=_text(author, "url", where("info.json") + ".author", ""),
        icons=icons,
        chars=check_chars(files.get("chars.json", {}), where("chars.json")),
        default_geometry=default,
    )


def load_icon_set(path: Path, name: str, default_license: str) -> IconSet:
    """Read and check one iconify package tarball (see the module docstring for what is refused)."""
    path = Path(path)
    return check_package(read_package_files(path), path.name, name, default_license)
