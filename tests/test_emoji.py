"""Emoji demo dataset: captions, rendering, shards, resume, split and error paths (no network)."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import emoji as emoji_package
import numpy as np
import pytest
import webdataset as wds
from PIL import Image

import edify.data.emoji as emoji_data
from edify.cli import main
from edify.data.emoji import build_emoji_dataset, fetch_tarballs, parse_sets, split_of
from edify.data.emoji_names import Caption, EmojiNamer, cldr_name, sequence_key
from edify.data.render import IDENTITY, IconGeometry, render_sample
from edify.errors import EdifyError

SIZES = (16, 32)
# a 16x16 viewBox: the apple fills the left half, so its mask and colours are known exactly
ICONS = {
    "red-apple": {"body": '<path fill="#ff0000" d="M0 0h8v16H0z"/>'},
    "grinning-face": {"body": '<circle cx="8" cy="8" r="6" fill="#0000ff"/>'},
    "grapes": {"body": '<circle cx="8" cy="8" r="5" fill="#800080"/>'},  # its codepoint is in val
    "edify-logo": {"body": '<path fill="#00aa00" d="M2 2h12v12H2z"/>'},
    "digit-one": {"body": '<path fill="#ffffff" d="M2 2h12v12H2z"/>'},  # white: vanishes on white
    "broken-icon": {"body": "data:image/png;base64,iVBORw0KGgo="},  # not SVG markup
    "old-apple": {"body": '<path fill="#f00" d="M0 0h8v16H0z"/>', "hidden": True},
}


def package_files(name: str, icons: dict, chars: dict, version: str = "9.9.9") -> dict:
    """The JSON files of a minimal iconify package: package/{icons,info,chars,package}.json."""
    return {
        "icons.json": {"prefix": name, "icons": icons, "width": 16, "height": 16},
        "info.json": {"name": f"Test {name}", "author": {"name": "Test Author", "url": "https://example.org"},
                      "license": {"title": "CC BY 4.0", "spdx": "CC-BY-4.0", "url": "https://example.org/l"}},
        "chars.json": chars,
        "package.json": {"name": f"@iconify-json/{name}", "version": version},
    }


def write_tarball(folder: Path, name: str, files: dict, version: str = "9.9.9") -> Path:
    """An npm-style `iconify-json-NAME-VERSION.tgz`; values are JSON-encoded unless already bytes."""
    path = folder / f"iconify-json-{name}-{version}.tgz"
    with tarfile.open(path, "w:gz") as tar:
        for member, payload in files.items():
            data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
            info = tarfile.TarInfo(f"package/{member}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def write_package(folder: Path, name: str, icons: dict, chars: dict, version: str = "9.9.9") -> Path:
    """A minimal iconify JSON npm tarball: package/{icons,info,chars,package}.json."""
    return write_tarball(folder, name, package_files(name, icons, chars, version), version)


@pytest.fixture()
def tarballs(tmp_path: Path) -> Path:
    folder = tmp_path / "npm"
    folder.mkdir()
    write_package(folder, "twemoji", ICONS, {"1f600": "grinning-face"})
    return folder


def read_samples(paths: list[Path]) -> dict[str, dict]:
    samples = {}
    for sample in wds.WebDataset([str(p) for p in paths], shardshuffle=False, empty_check=False):
        samples[sample["__key__"]] = sample
    return samples


def png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def build(tarballs: Path, out: Path, **kwargs) -> dict:
    kwargs = {"sizes": SIZES, "workers": 1, "progress": False, **kwargs}
    return build_emoji_dataset(tarballs, out, sets="twemoji", **kwargs)


def test_cldr_names_restore_colon_form():
    cases = {
        (":man_technologist_medium_skin_tone:", "1f468-1f3fd-200d-1f4bb"): "man technologist: medium skin tone",
        (":Malta:", "1f1f2-1f1f9"): "flag: Malta",
        (":England:", "1f3f4-e0067-e0062-e0065-e006e-e0067-e007f"): "flag: England",
        (":keycap_1:", "31-20e3"): "keycap: 1",
        (":family_man_woman_boy:", "1f468-200d-1f469-200d-1f466"): "family: man, woman, boy",
        (":woman_light_skin_tone_beard:", "1f9d4-1f3fb-200d-2640"): "woman: light skin tone, beard",
        (":kiss_woman_man_light_skin_tone_dark_skin_tone:", "1f469"): "kiss: woman, man, light skin tone, dark skin tone",
        (":light_skin_tone:", "1f3fb"): "light skin tone",
        (":red_apple:", "1f34e"): "red apple",
    }
    for (name, key), expected in cases.items():
        assert cldr_name(name, key) == expected
    assert sequence_key("1F468-200D-2764-FE0F-200D-1F468") == "1f468-200d-2764-200d-1f468"


def test_namer_resolves_each_naming_scheme():
    namer = EmojiNamer({"twemoji": {"1f34e": "apple-of-mine"}})
    assert namer.caption("twemoji", "apple-of-mine") == Caption("red apple", "1f34e", "own-chars")
    assert namer.caption("noto", "apple-of-mine").source == "other-chars"
    assert namer.caption("fxemoji", "admissiontickets").text == "admission tickets"  # words run together
    assert namer.caption("fluent-emoji", "girl-dark").text == "girl: dark skin tone"  # "-skin-tone" dropped
    assert namer.caption("emojione", "flag-for-malta").text == "flag: Malta"
    run_together = namer.caption("fxemoji", "banknotepound")  # no emoji of that name: words only
    assert (run_together.text, run_together.named) == ("banknote pound", False)
    unnamed = namer.caption("openmoji", "edify-logo")
    assert (unnamed.text, unnamed.named) == ("edify logo", False)


def test_split_is_per_codepoint_and_about_five_percent():
    keys = {sequence_key([ord(c) for c in char]) for char in emoji_package.EMOJI_DATA}
    val = [k for k in keys if split_of(Caption("x", k, "own-chars"), "any") == "val"]
    assert 0.035 < len(val) / len(keys) < 0.065
    # the split ignores the style and the icon name: one emoji is held out in every set at once
    assert {split_of(Caption(t, val[0], "own-chars"), n) for t, n in [("a", "x"), ("b", "y")]} == {"val"}


def test_render_identity_transform_and_mask():
    result = render_sample((ICONS["red-apple"]["body"], IconGeometry(0, 0, 16, 16), (16,)))
    rgb, mask = (png(b) for b in result.images[16])
    assert mask[:, :8].min() == 255 and mask[:, 8:].max() == 0
    assert (rgb[:, :8] == (255, 0, 0)).all() and (rgb[:, 8:] == 255).all()
    assert IDENTITY == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def test_build_writes_expected_shards(tarballs: Path, tmp_path: Path):
    out = tmp_path / "out"
    manifest = build(tarballs, out)
    counts = manifest["counts"]
    # 7 icons: 1 hidden (not planned), 1 white glyph and 1 non-SVG body dropped and counted
    assert counts["icons"] == 6 and counts["written"] == 4 and counts["val"] == 1
    assert counts["dropped_vanishes"] == 1 and counts["dropped_not_svg"] == 1
    assert manifest["keys"] == ["16.png", "mask16.png", "32.png", "mask32.png", "json"]
    assert manifest["sets"]["twemoji"]["license"] == "CC-BY-4.0"
    samples = read_samples([out / p for split in ("train", "val") for p in manifest["shards"][split]])
    assert set(samples) == {"twemoji__red-apple", "twemoji__grinning-face", "twemoji__edify-logo", "twemoji__grapes"}
    for key, sample in samples.items():
        meta = json.loads(sample["json"])
        assert meta["style"] == "twemoji" and meta["author"] == "Test Author"
        assert meta["split"] == split_of(Caption(meta["caption"], meta["codepoints"], "x"), meta["name"])
        for size in SIZES:
            rgb, mask = png(sample[f"{size}.png"]), png(sample[f"mask{size}.png"])
            assert rgb.shape == (size, size, 3) and mask.shape == (size, size)
            assert (rgb[mask == 0] == 255).all()  # uncovered pixels are white
    apple = json.loads(samples["twemoji__red-apple"]["json"])
    assert (apple["caption"], apple["codepoints"], apple["named"]) == ("red apple", "1f34e", True)
    face = json.loads(samples["twemoji__grinning-face"]["json"])
    assert (face["caption"], face["caption_source"]) == ("grinning face", "own-chars")
    mask32 = png(samples["twemoji__red-apple"]["mask32.png"])
    assert mask32[:, :16].min() == 255 and mask32[:, 16:].max() == 0
    # each split's shards load on their own and carry only that split
    for split in ("train", "val"):
        alone = read_samples([out / p for p in manifest["shards"][split]])
        assert alone and all(json.loads(s["json"])["split"] == split for s in alone.values())
    assert json.loads(samples["twemoji__grapes"]["json"])["split"] == "val"


def test_a_missing_naming_set_is_said_and_recorded(tarballs: Path, tmp_path: Path, capsys):
    assert build(tarballs, tmp_path / "out")["naming_sets"] == ["twemoji"]
    assert main(["data", "emoji", "--tarballs", str(tarballs), "--sets", "twemoji", "--sizes", "16", "--workers", "1",
                 "--quiet", "--out", str(tmp_path / "cli")]) == 0
    out = capsys.readouterr().out
    assert "naming set(s) noto, fluent-emoji-flat, openmoji" in out and "other captions and splits" in out
    for name in ("noto", "fluent-emoji-flat", "openmoji"):
        write_package(tarballs, name, {}, {})
    manifest = build(tarballs, tmp_path / "all")
    assert set(manifest["naming_sets"]) == {"twemoji", "noto", "fluent-emoji-flat", "openmoji"}
    assert main(["data", "emoji", "--tarballs", str(tarballs), "--sets", "twemoji", "--sizes", "16", "--workers", "1",
                 "--quiet", "--out", str(tmp_path / "cli-all")]) == 0
    assert "naming set" not in capsys.readouterr().out


def test_rerun_skips_finished_shards_and_resumes_after_error(tarballs: Path, tmp_path: Path, monkeypatch):
    monkeypatch.setattr(emoji_data, "SHARD_SIZE", 1)  # one icon per shard
    out = tmp_path / "out"
    calls = {"n": 0}
    real_record = emoji_data.sample_record

    def failing_record(*args):  # fails in the parent, while the third written shard is open
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("disk on fire")
        return real_record(*args)

    monkeypatch.setattr(emoji_data, "sample_record", failing_record)
    with pytest.raises(RuntimeError):
        build(tarballs, out)
    built = sorted(p.name for p in out.rglob("*.tar"))
    assert len(built) == 4 and not list(out.rglob(".*tmp*"))  # finished shards kept, no temp files
    manifest = build(tarballs, out)
    assert manifest["icons_rendered"] == 6 - len(built) and manifest["counts"]["written"] == 4
    # a rerun renders nothing and rewrites nothing: same shards, same sidecars, same totals
    # (asserted on content and mtimes, not on timing, which may round to 0.0 on a fast machine)
    shards_before = {p: (p.stat().st_mtime_ns, p.stat().st_ino) for p in out.rglob("*.tar")}
    sidecars_before = {p: p.read_bytes() for p in out.rglob("*.tar.json")}
    rerun = build(tarballs, out)
    assert rerun["icons_rendered"] == 0 and rerun["counts"] == manifest["counts"]
    assert rerun["build_seconds"] == manifest["build_seconds"]
    assert {p: (p.stat().st_mtime_ns, p.stat().st_ino) for p in out.rglob("*.tar")} == shards_before
    assert {p: p.read_bytes() for p in out.rglob("*.tar.json")} == sidecars_before
    # other sizes change the fingerprint: everything is rebuilt
    assert build(tarballs, out, sizes=(16,))["icons_rendered"] == 6


def test_process_pool_matches_inline(tarballs: Path, tmp_path: Path):
    inline = build(tarballs, tmp_path / "a", sizes=(16,))
    pooled = build(tarballs, tmp_path / "b", sizes=(16,), workers=2)
    a = read_samples(sorted((tmp_path / "a").rglob("*.tar")))
    b = read_samples(sorted((tmp_path / "b").rglob("*.tar")))
    assert inline["counts"] == pooled["counts"] and a.keys() == b.keys()
    assert all(a[k]["16.png"] == b[k]["16.png"] for k in a)


def test_bad_input_raises(tarballs: Path, tmp_path: Path, monkeypatch):
    with pytest.raises(EdifyError, match="known sets: twemoji"):
        parse_sets("twemoji,bogus", permissive_only=False)
    assert parse_sets(None, permissive_only=True) == [
        "twemoji", "noto", "noto-v1", "fluent-emoji-flat", "fluent-emoji", "emojione", "fxemoji"]
    with pytest.raises(EdifyError, match="share-alike"):
        parse_sets("openmoji", permissive_only=True)
    with pytest.raises(EdifyError, match="does not exist"):
        build(tmp_path / "missing", tmp_path / "out")
    with pytest.raises(EdifyError, match="no iconify-json-noto-VERSION.tgz"):
        build_emoji_dataset(tarballs, tmp_path / "out", sets="noto", progress=False)
    with pytest.raises(EdifyError, match="between 8 and 4096 px, got '3'"):
        build(tarballs, tmp_path / "out", sizes="3")
    monkeypatch.setattr(emoji_data.shutil, "which", lambda name: None)
    with pytest.raises(EdifyError, match="npm is not installed"):
        fetch_tarballs(["twemoji"], tmp_path / "cache")


def test_fetch_uses_npm_pack_without_a_registry_address(tmp_path: Path, monkeypatch):
    commands = []

    def fake_npm(command, **kwargs):  # stands in for `npm pack NAME --pack-destination DIR`
        commands.append(command)
        write_package(Path(command[command.index("--pack-destination") + 1]), command[2].split("/")[1], ICONS, {})
        return emoji_data.subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(emoji_data.shutil, "which", lambda name: "/usr/bin/npm")
    monkeypatch.setattr(emoji_data.subprocess, "run", fake_npm)
    cache = tmp_path / "cache"
    fetch_tarballs(["twemoji", "noto"], cache)
    fetch_tarballs(["twemoji"], cache)  # already cached: npm is not called again
    assert [c[:3] for c in commands] == [["npm", "pack", "@iconify-json/twemoji"], ["npm", "pack", "@iconify-json/noto"]]
    assert not any("http" in part for c in commands for part in c)


def test_cli_exit_codes(tarballs: Path, tmp_path: Path, capsys):
    base = ["data", "emoji", "--quiet", "--workers", "1", "--sizes", "16"]
    assert main(base + ["--tarballs", str(tarballs), "--sets", "twemoji", "--out", str(tmp_path / "o")]) == 0
    assert "wrote" in capsys.readouterr().out
    for bad, needle in [(["--tarballs", str(tmp_path / "nowhere")], "does not exist"),
                        (["--tarballs", str(tarballs), "--sets", "bogus"], "known sets"),
                        (["--tarballs", str(tarballs), "--sizes", "x"], "comma-separated integers")]:
        assert main(base + bad + ["--out", str(tmp_path / "o2")]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("edify: error:") and needle in err and "\n" not in err
