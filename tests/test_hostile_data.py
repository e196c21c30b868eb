"""The emoji dataset builder against hostile packages: file access, parser bombs, crashes, bad JSON.

Every hostile package is made here by a helper (no fixture files): `hostile_tarballs` writes an
iconify-style tarball whose icons carry the given SVG bodies, `write_tarball` (from
test_emoji) one with arbitrary JSON or raw bytes per file.
"""

from __future__ import annotations

import base64
import io
import json
import math
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

import edify.data.schema as schema
from edify.cli import main
from edify.data.emoji import build_emoji_dataset
from edify.data.render import IconGeometry, icon_svg, render_rgba, svg_problem
from edify.data.sandbox import Failed, IsolatedPool
from edify.data.schema import check_icon, check_package
from edify.errors import EdifyError
from test_emoji import package_files, png, read_samples, write_package, write_tarball

SECRET = (12, 200, 99)  # the colour of the local file no icon may read
EMBEDDED = (200, 30, 140)  # the colour of an image embedded as a data: URI, which may render
GOOD = '<path fill="#ff0000" d="M0 0h8v16H0z"/>'
ROOT = Path(__file__).resolve().parents[1]
SVG_REASONS = {"malformed", "too_large", "too_deep", "too_complex", "external_ref", "bad_image"}


def hostile_tarballs(folder: Path, bodies: dict[str, object], name: str = "twemoji", **icon_extra) -> Path:
    """A folder with one iconify package whose icons have the given bodies (plus a good icon)."""
    folder.mkdir(parents=True, exist_ok=True)
    icons = {icon: {"body": body, **icon_extra} for icon, body in bodies.items()}
    write_package(folder, name, {"good": {"body": GOOD}, **icons}, {})
    return folder


def png_bytes(size: tuple[int, int], colour: tuple[int, int, int], kind: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format=kind)
    return buffer.getvalue()


def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def image(href: str, attribute: str = "href") -> str:
    return f'<image width="16" height="16" {attribute}="{href}"/>'


def build(tarballs: Path, out: Path, **kwargs) -> dict:
    kwargs = {"sizes": (16, 32), "workers": 1, "progress": False, **kwargs}
    return build_emoji_dataset(tarballs, out, sets="twemoji", **kwargs)


def shard_images(out: Path) -> list[np.ndarray]:
    samples = read_samples(sorted(out.rglob("*.tar")))
    return [png(data) for sample in samples.values() for key, data in sample.items() if key.endswith(".png")
            and not key.startswith("mask")]


def cli(args: list[str], timeout: float = 120, **popen) -> subprocess.CompletedProcess:
    """`python -m edify.cli ARGS` in a subprocess, as a user runs it."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "edify.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT, **popen)


# 1. no access to local files ----------------------------------------------------------------

def test_icons_cannot_read_local_files(tmp_path: Path, monkeypatch):
    secret = tmp_path / "secret.png"
    secret.write_bytes(png_bytes((16, 16), SECRET))
    (tmp_path / "#secret.png").write_bytes(secret.read_bytes())  # resvg reads "#name" as a file
    (tmp_path / "other.svg").write_text(f'<svg xmlns="http://www.w3.org/2000/svg"><path id="a" fill="rgb{SECRET}" '
                                        'd="M0 0h16v16H0z"/></svg>')
    monkeypatch.chdir(tmp_path)  # relative paths would resolve here (workers start in this directory)
    inner_svg = f'<svg xmlns="http://www.w3.org/2000/svg" width="16" height="16">{image(str(secret))}</svg>'
    external = {
        "absolute": image(str(secret)),
        "relative": image("secret.png"),
        "parent-relative": image(f"../{tmp_path.name}/secret.png"),
        "xlink": image(str(secret), "xlink:href"),
        "char-reference": image(str(secret).replace("/", "&#47;")),
        "hash-file-name": image("#secret.png"),
        "file-uri": image(f"file://{secret}"),
        "dev-zero": image("/dev/zero"),
        "svg-data-uri": image(data_uri(inner_svg.encode(), "image/svg+xml")),
        "fe-image": f'<filter id="f" x="0" y="0" width="1" height="1"><feImage href="{secret}"/></filter>'
                    '<rect width="16" height="16" filter="url(#f)"/>',
        "use-other-document": f'<use href="{tmp_path}/other.svg#a"/>',
        "css-import": f'<style>@import url({tmp_path}/x.css);</style>{GOOD}',
        "css-url-file": f'<path d="M0 0h16v16H0z" fill="url({tmp_path}/other.svg#a)"/>',
    }
    bad_images = {
        "embedded-too-large": image(data_uri(png_bytes((5000, 1), EMBEDDED))),
        "embedded-wrong-type": image(data_uri(png_bytes((16, 16), EMBEDDED, "JPEG"))),
        "embedded-garbage": image("data:image/png;base64,!!!notbase64"),
    }
    allowed = {"embedded-png": image(data_uri(png_bytes((16, 16), EMBEDDED)))}
    folder = hostile_tarballs(tmp_path / "npm", {**external, **bad_images, **allowed})
    started = time.monotonic()
    counts = build(folder, tmp_path / "out")["counts"]
    assert time.monotonic() - started < 60
    assert counts["dropped_external_ref"] == len(external) and counts["dropped_bad_image"] == len(bad_images)
    assert counts["written"] == 2  # the good icon and the embedded PNG
    images = shard_images(tmp_path / "out")
    assert images and not any((img == SECRET).all(axis=-1).any() for img in images)  # no secret pixel
    assert any((img == EMBEDDED).all(axis=-1).mean() > 0.9 for img in images)  # data: URIs still render


# 2. parser bombs, panics, hangs: contained, skipped and counted ------------------------------

def use_fanout(levels: int = 7, fan: int = 10) -> str:
    """fan**levels instances of one path from a few hundred bytes (billion laughs with <use>)."""
    groups = "".join(f'<g id="a{i + 1}">' + f'<use href="#a{i}"/>' * fan + "</g>" for i in range(levels))
    return f'<defs><path id="a0" d="M0 0h1v1z"/>{groups}</defs><use href="#a{levels}"/>'


PARSER_BOMBS = {
    "undefined-entity": ('<path d="M0 0h8v8z" fill="&bogus;"/>', "malformed"),
    "entity-laughs": ('<!DOCTYPE svg [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;">]><g>&b;</g>', "malformed"),
    "unclosed": ('<path d="M0 0h8v8z"></g>', "malformed"),
    "nested-5000": ("<g>" * 5000 + GOOD + "</g>" * 5000, "too_deep"),
    "use-fanout": (use_fanout(), "too_complex"),
    "use-cycle": ('<g id="x"><use href="#x"/></g>', "too_complex"),
    "many-elements": ("<g/>" * 100_001, "too_complex"),
    "slow-filter": ('<filter id="f" x="0" y="0" width="1" height="1">' + '<feGaussianBlur stdDeviation="9"/>' * 1000
                    + '</filter><rect width="16" height="16" fill="red" filter="url(#f)"/>', "timeout"),
}


@pytest.mark.parametrize("workers", [1, 2])
def test_parser_bombs_and_hangs_are_skipped_through_the_cli(tmp_path: Path, workers: int):
    folder = hostile_tarballs(tmp_path / "npm", {name: body for name, (body, _) in PARSER_BOMBS.items()})
    out = tmp_path / "out"
    started = time.monotonic()
    done = cli(["data", "emoji", "--tarballs", str(folder), "--sets", "twemoji", "--sizes", "512", "--quiet",
                "--workers", str(workers), "--icon-timeout", "3", "--out", str(out)], timeout=180)
    assert time.monotonic() - started < 120
    assert done.returncode == 0 and "Traceback" not in done.stderr and done.stderr == "", done.stderr
    counts = json.loads((out / "manifest.json").read_text())["counts"]
    expected = {}
    for _, reason in PARSER_BOMBS.values():
        expected[f"dropped_{reason}"] = expected.get(f"dropped_{reason}", 0) + 1
    assert {k: v for k, v in counts.items() if k.startswith("dropped_")} == expected
    assert counts["written"] == 1 and not list(out.rglob(".*tmp*"))
    failed = {}
    for sidecar in out.rglob("*.tar.json"):
        failed.update(json.loads(sidecar.read_text())["failed"])
    assert failed["twemoji__nested-5000"].startswith("too_deep:")
    assert failed["twemoji__slow-filter"].startswith("timeout:")


def test_worker_panic_crash_timeout_and_memory_are_contained():
    hostile = '<svg xmlns="http://www.w3.org/2000/svg" width="8" height="8">&bogus;</svg>'  # resvg panics
    good = icon_svg(GOOD, IconGeometry(), 16)
    started = time.monotonic()
    with IsolatedPool(render_rgba, workers=1, seconds=20) as pool:
        panic, after = list(pool.imap([hostile, good]))
    assert isinstance(panic, Failed) and panic.reason == "panic" and "UnknownEntityReference" in panic.detail
    assert after.size == (16, 16)  # the same pool goes on
    with IsolatedPool(time.sleep, workers=2, seconds=0.5) as pool:
        assert list(pool.imap([0, 60, 0])) == [None, Failed("timeout", "no result within 0.5 s"), None]
    with IsolatedPool(os._exit, workers=1, seconds=20) as pool:
        assert [r.reason for r in pool.imap([3, 4])] == ["crashed", "crashed"]
    if sys.platform.startswith("linux"):  # RLIMIT_AS is enforced there
        with IsolatedPool(bytearray, workers=1, seconds=20, megabytes=64) as pool:
            small, huge = list(pool.imap([8, 2**32]))
        assert small == bytearray(8) and huge.reason == "out_of_memory"
    assert time.monotonic() - started < 30


def slow_and_fast_packages(folder: Path, slow_icons: int = 60) -> Path:
    """twemoji: one quick icon (its shard finishes first); noto: icons taking ~0.5 s each at 256 px."""
    folder.mkdir(parents=True, exist_ok=True)
    write_package(folder, "twemoji", {"quick": {"body": GOOD}}, {})
    blur = ('<filter id="f" x="0" y="0" width="1" height="1">' + '<feGaussianBlur stdDeviation="2"/>' * 40
            + '</filter><rect width="16" height="16" fill="#c00" filter="url(#f)"/>')
    write_package(folder, "noto", {f"slow-{i:02d}": {"body": blur} for i in range(slow_icons)}, {})
    return folder


def start_build(tarballs: Path, out: Path) -> subprocess.Popen:
    """A 2-worker CLI build in its own session (so a Ctrl-C can go to its whole process group)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "edify.cli", "data", "emoji", "--tarballs", str(tarballs),
                             "--sets", "twemoji,noto", "--sizes", "256", "--quiet", "--workers", "2",
                             "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, cwd=ROOT, start_new_session=True,
                            # as at a terminal: a shell's background job would start with SIGINT ignored
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def wait_until_rendering(process: subprocess.Popen, out: Path, deadline: float = 90) -> None:
    """Until the quick shard is done and the slow one is being written (so workers are running)."""
    started = time.monotonic()
    while not (out / "train" / "twemoji-0000.tar").exists() or not list((out / "train").glob(".noto-*.tmp-*")):
        assert process.poll() is None, process.communicate()
        assert time.monotonic() - started < deadline, "the build did not start"
        time.sleep(0.05)
    time.sleep(0.3)


@pytest.mark.skipif(os.name != "posix", reason="POSIX signals")
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupt_prints_one_line_and_cleans_up(tmp_path: Path, signum: signal.Signals):
    out = tmp_path / "out"
    process = start_build(slow_and_fast_packages(tmp_path / "npm"), out)
    wait_until_rendering(process, out)
    if signum == signal.SIGINT:
        os.killpg(process.pid, signum)  # Ctrl-C in a terminal reaches every process of the group
    else:
        process.send_signal(signum)  # `kill PID`
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 130 and stderr == "edify: interrupted\n", stderr
    assert not list(out.rglob(".*tmp*")) and (out / "train" / "twemoji-0000.tar").exists()


@pytest.mark.skipif(os.name != "posix", reason="POSIX signals")
def test_killed_build_leaves_no_worker_noise_and_the_next_run_removes_its_temp_file(tmp_path: Path):
    out, tarballs = tmp_path / "out", slow_and_fast_packages(tmp_path / "npm")
    process = start_build(tarballs, out)
    wait_until_rendering(process, out)
    process.kill()  # SIGKILL: no cleanup is possible in the process itself
    stdout, stderr = process.communicate(timeout=60)  # returns once orphaned workers closed stderr
    assert "Traceback" not in stderr and "BrokenPipe" not in stderr, stderr
    assert list((out / "train").glob(".noto-*.tmp-*"))  # the killed build's leftover
    manifest = build_emoji_dataset(tarballs, out, sets="twemoji", sizes=(256,), workers=1, progress=False)
    assert manifest["icons_rendered"] == 0  # the finished shard is kept
    assert not list(out.rglob(".*tmp*"))


def test_stale_temp_files_are_removed_only_when_their_process_is_gone(tmp_path: Path):
    folder = hostile_tarballs(tmp_path / "npm", {})
    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait()
    stale = [tmp_path / "out" / "train" / f".twemoji-0000.tar.tmp-{finished.pid}",
             tmp_path / "out" / f".manifest.json.tmp-{os.getpid()}"]
    live = tmp_path / "out" / "val" / f".twemoji-0000.tar.tmp-{os.getppid()}"  # a running process
    for path in [*stale, live]:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"partial")
    build(folder, tmp_path / "out")
    assert not any(p.exists() for p in stale) and live.exists()


# 3. JSON of the wrong shape: one line naming file and field, or one skipped icon --------------

def mutated(name: str, change) -> dict:
    files = package_files(name, {"good": {"body": GOOD}}, {})
    change(files)
    return files


def set_in(member: str, *keys_and_value):
    """A change that sets files[member][k1][k2]... = value (the whole file when no keys)."""
    *keys, value = keys_and_value

    def change(files: dict) -> None:
        if not keys:
            files[member] = value
            return
        target = files[member]
        for key in keys[:-1]:
            target = target[key]
        target[keys[-1]] = value
    return change


FILE_ERRORS = {
    "icons-is-list": (set_in("icons.json", []), "icons.json must be an object, got a list"),
    "icons-icons-is-list": (set_in("icons.json", "icons", []), "icons.json.icons must be an object, got a list"),
    "license-is-string": (set_in("info.json", "license", "MIT"), "info.json.license must be an object, got a string"),
    "author-name-number": (set_in("info.json", "author", "name", 5), "info.json.author.name must be a string"),
    "width-text": (set_in("icons.json", "width", "abc"),
                   'icons.json.width must be a number from 0.01 to 1e+06, got "abc"'),
    "width-nan": (set_in("icons.json", "width", math.nan),
                  "icons.json.width must be a number from 0.01 to 1e+06, got NaN"),
    "height-negative": (set_in("icons.json", "height", -16), "icons.json.height must be a number from 0.01"),
    "width-1e308": (set_in("icons.json", "width", 1e308), "got 1e+308"),
    "left-infinite": (set_in("icons.json", b'{"icons": {}, "left": 1e999}'), "icons.json.left must be a number"),
    "huge-integer": (set_in("icons.json", b'{"icons": {}, "top": ' + b"9" * 5000 + b"}"), "icons.json: Exceeds"),
    "not-utf8": (set_in("info.json", b'{"name": "\xff\xfe"}'), "info.json: not UTF-8 (byte 10)"),
    "not-json": (set_in("icons.json", b'{"icons": '), "icons.json: invalid JSON at line 1 column 11"),
    "nested-too-deep": (set_in("info.json", b"[" * 200_000), "info.json: JSON nested too deeply"),
    "chars-bad-key": (set_in("chars.json", {"zz-top": "good"}), "chars.json: key 'zz-top' is not a codepoint sequence"),
    "chars-beyond-unicode": (set_in("chars.json", {"110000": "good"}), "key '110000' is not a codepoint sequence"),
    "chars-is-list": (set_in("chars.json", ["good"]), "chars.json must be an object, got a list"),
    "version-number": (set_in("package.json", "version", 3), "package.json.version must be a string"),
    "version-path": (set_in("package.json", "version", "../../x"), "package.json.version '../../x' is not a version"),
}


def cli_error(folder: Path, out: Path, capsys) -> str:
    """Run the real CLI entry point in-process; it must fail with exit 2 and one line."""
    code = main(["data", "emoji", "--quiet", "--workers", "1", "--sizes", "16", "--tarballs", str(folder),
                 "--sets", "twemoji", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("edify: error:") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("case", sorted(FILE_ERRORS))
def test_wrong_json_is_one_line_naming_file_and_field(tmp_path: Path, capsys, case: str):
    change, needle = FILE_ERRORS[case]
    folder = tmp_path / "npm"
    folder.mkdir()
    write_tarball(folder, "twemoji", mutated("twemoji", change))
    err = cli_error(folder, tmp_path / "out", capsys)
    assert needle in err and "iconify-json-twemoji-9.9.9.tgz" in err, err


def test_wrong_tarball_structure_is_one_line(tmp_path: Path, capsys, monkeypatch):
    folder = tmp_path / "npm"
    folder.mkdir()
    (folder / "iconify-json-twemoji-9.9.9.tgz").write_bytes(b"not a gzip file")
    assert "cannot read iconify package" in cli_error(folder, tmp_path / "o", capsys)
    with tarfile.open(folder / "iconify-json-twemoji-9.9.9.tgz", "w:gz") as tar:  # icons.json: a symlink out
        link = tarfile.TarInfo("package/icons.json")
        link.type, link.linkname = tarfile.SYMTYPE, "../../outside.json"
        tar.addfile(link)
    assert "package/icons.json is not a regular file" in cli_error(folder, tmp_path / "o", capsys)
    write_package(folder, "twemoji", {"good": {"body": GOOD}}, {})
    monkeypatch.setattr(schema, "MAX_JSON_BYTES", 64)  # declared sizes are checked before reading
    assert re.search(r"'package/icons\.json' is \d+ bytes, over 64$", cli_error(folder, tmp_path / "o", capsys))
    monkeypatch.undo()
    monkeypatch.setattr(schema, "MAX_MEMBERS", 2)
    assert "more than 2 files or 2147483648 bytes; not an iconify package" in cli_error(folder, tmp_path / "o", capsys)
    monkeypatch.undo()
    monkeypatch.setattr(schema, "MAX_ICONS", 0)
    assert "icons.json.icons has more than 0 icons" in cli_error(folder, tmp_path / "o", capsys)


def test_wrong_json_through_the_cli_subprocess(tmp_path: Path):
    folder = tmp_path / "npm"
    folder.mkdir()
    write_tarball(folder, "twemoji", mutated("twemoji", set_in("info.json", "license", "MIT")))
    done = cli(["data", "emoji", "--tarballs", str(folder), "--sets", "twemoji", "--quiet",
                "--out", str(tmp_path / "o")])
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr == ("edify: error: iconify-json-twemoji-9.9.9.tgz: info.json.license must be an object, "
                           "got a string\n")


BAD_ICONS = {
    "as-list": ([], "bad_icon"),
    "body-number": ({"body": 5}, "bad_icon"),
    "hidden-text": ({"body": GOOD, "hidden": "yes"}, "bad_icon"),
    "width-text": ({"body": GOOD, "width": "abc"}, "bad_geometry"),
    "width-nan": ({"body": GOOD, "width": math.nan}, "bad_geometry"),
    "height-negative": ({"body": GOOD, "height": -16}, "bad_geometry"),
    "width-1e308": ({"body": GOOD, "width": 1e308}, "bad_geometry"),
    "left-1e308": ({"body": GOOD, "left": 1e308}, "bad_geometry"),
    "width-boolean": ({"body": GOOD, "width": True}, "bad_geometry"),
    "width-tiny": ({"body": GOOD, "width": 1e-300}, "bad_geometry"),
    "long-body": ({"body": GOOD + "<g/>" * 300}, "too_large"),
    "../escape": ({"body": GOOD}, "bad_name"),
    "a/b": ({"body": GOOD}, "bad_name"),
    "with space": ({"body": GOOD}, "bad_name"),
    "": ({"body": GOOD}, "bad_name"),
    "x" * 300: ({"body": GOOD}, "bad_name"),
    "nul\x00": ({"body": GOOD}, "bad_name"),
}


def test_bad_icons_are_skipped_and_counted(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(schema, "MAX_SVG_CHARS", 1000)
    folder = tmp_path / "npm"
    folder.mkdir()
    write_package(folder, "twemoji", {"good": {"body": GOOD}, **{k: v for k, (v, _) in BAD_ICONS.items()}}, {})
    counts = build(folder, tmp_path / "out")["counts"]
    expected = {}
    for _, reason in BAD_ICONS.values():
        expected[f"dropped_{reason}"] = expected.get(f"dropped_{reason}", 0) + 1
    assert {k: v for k, v in counts.items() if k.startswith("dropped_")} == expected
    assert counts["icons"] == len(BAD_ICONS) + 1 and counts["written"] == 1
    for shard in (tmp_path / "out").rglob("*.tar"):
        with tarfile.open(shard) as tar:
            assert all("/" not in m.name and ".." not in m.name for m in tar.getmembers())


# fuzzing: any JSON anywhere is a result or one EdifyError line; any SVG passing the check parses

JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
                    max_leaves=8)
SLOTS = [("icons.json",), ("icons.json", "icons"), ("icons.json", "width"), ("icons.json", "icons", "good"),
         ("icons.json", "icons", "good", "height"), ("icons.json", "icons", "good", "body"), ("info.json",),
         ("info.json", "license"), ("info.json", "author", "url"), ("chars.json",), ("package.json", "version")]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(value=JSON, slot=st.sampled_from(SLOTS))
def test_fuzz_any_json_value_is_checked(value, slot):
    files = mutated("twemoji", set_in(*slot, value))
    try:
        icon_set = check_package(files, "pkg.tgz", "twemoji", "CC-BY-4.0")
    except EdifyError as err:
        assert "\n" not in str(err) and str(err).startswith("pkg.tgz: ")
        return
    for icon in icon_set.icons.values():
        assert icon.problem in ("", "bad_icon", "bad_geometry", "too_large", "bad_name")
        if not icon.problem and not icon.hidden:
            g = icon.geometry
            assert all(math.isfinite(v) for v in (g.left, g.top, g.width, g.height)) and g.width > 0 < g.height


@settings(max_examples=300, deadline=None)
@given(entry=st.dictionaries(st.sampled_from(["body", "hidden", "left", "top", "width", "height"]), JSON))
def test_fuzz_icon_entries_never_raise(entry):
    icon = check_icon("name", entry, IconGeometry())
    assert icon.problem in ("", "bad_icon", "bad_geometry", "too_large")


SVG_TOKENS = [
    "<g>", "</g>", '<g id="a">', GOOD, '<use href="#a"/>', '<use xlink:href="#b"/>', "&amp;", "&bogus;", "&#0;",
    "<![CDATA[x]]>", "<!--c-->", '<image href="x.png"/>', '<rect id="b" width="4" height="4" fill="url(#a)"/>',
    "<style>a{fill:url(#b)}</style>", '<linearGradient id="c" href="#c"/>',
    '<clipPath id="d"><use href="#d"/></clipPath>',
    "<svg>", "</svg>", "<text>x</text>", "x", "<", ">", "'", '"', "=", '<filter id="f"><feImage href="#a"/></filter>',
    '<mask id="m"><rect width="8" height="8" mask="url(#m)"/></mask>', '<g style="fill:url(#c)">',
    '<symbol id="s"><use href="#s"/></symbol>', '<use href="#s" width="1e30"/>', "<!DOCTYPE x>", "<?pi x?>",
]


@settings(max_examples=300, deadline=None)
@given(tokens=st.lists(st.sampled_from(SVG_TOKENS), min_size=1, max_size=12))
def test_fuzz_svg_that_passes_the_check_never_panics_resvg(tokens):
    document = icon_svg("".join(tokens), IconGeometry(), 16)
    problem = svg_problem(document)
    if problem is None:
        render_rgba(document)  # a panic here (a BaseException) fails the test
    else:
        assert problem[0] in SVG_REASONS and "\n" not in problem[1]


@pytest.mark.parametrize("limit", [["--icon-timeout", "0"], ["--icon-timeout", "nan"], ["--icon-memory", "-1"]])
def test_bad_limits_are_one_line(tmp_path: Path, capsys, limit: list[str]):
    folder = hostile_tarballs(tmp_path / "npm", {})
    code = main(["data", "emoji", "--quiet", "--tarballs", str(folder), "--sets", "twemoji", *limit,
                 "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("edify: error: per-icon limits must be positive") and err.count("\n") == 1
