"""The wheel (`pip install .`) carries the demo model, and edify.assets finds it once installed.

The wheel is built offline (`pip wheel --no-deps --no-build-isolation`, setuptools from the test
extras) from a copy of the source, then installed with `pip install --target` into a temporary
folder that a fresh interpreter imports edify from (about 10 s in all).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import edify.assets as assets
from edify.errors import EdifyError

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "weights" / "emoji-64"
MODEL_FILES = sorted(p.relative_to(MODEL).as_posix() for p in MODEL.rglob("*") if p.is_file())  # expert-N/ too


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built from a copy of the source tree (the checkout stays free of build/ output)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(ROOT / "edify", src / "edify", ignore=ignore)
    shutil.copytree(ROOT / "weights", src / "weights", ignore=ignore)
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                           "-w", str(tmp / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    (path,) = (tmp / "dist").glob("edify-*.whl")
    return path


def test_wheel_contains_the_demo_model(wheel):
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        prefix = "edify/_weights/emoji-64/"
        assert sorted(n[len(prefix):] for n in names if n.startswith(prefix)) == MODEL_FILES
        for name in MODEL_FILES:
            assert sha256(zf.read(prefix + name)) == sha256((MODEL / name).read_bytes()), name
        assert "edify/assets.py" in names


def test_wheel_lists_every_package(wheel):
    # pyproject.toml lists the packages by hand (one of them maps weights/ into the wheel).
    packages = sorted(str(p.parent.relative_to(ROOT)) for p in (ROOT / "edify").rglob("__init__.py"))
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
    missing = [p for p in packages if f"{p}/__init__.py" not in names]
    assert not missing, f"add {missing} to [tool.setuptools] packages in pyproject.toml"


def test_installed_wheel_resolves_its_own_model(wheel, tmp_path):
    site = tmp_path / "site"
    done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-compile",
                           "--target", str(site), str(wheel)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    code = "import edify, edify.assets as a; print(edify.__file__); print(a.demo_model_path())"
    env = {**os.environ, "PYTHONPATH": str(site)}
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    package, model = (Path(line) for line in done.stdout.split())
    assert package == site / "edify" / "__init__.py"  # the installed copy, not the checkout
    assert model == site / "edify" / "_weights" / "emoji-64"
    assert sorted(p.relative_to(model).as_posix() for p in model.rglob("*") if p.is_file()) == MODEL_FILES


def test_source_checkout_model_comes_first():
    assert assets.demo_model_path() == MODEL


def test_missing_model_is_one_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(assets, "source_model_path", lambda name=assets.DEMO_MODEL: tmp_path / "a" / name)
    monkeypatch.setattr(assets, "installed_model_path", lambda name=assets.DEMO_MODEL: tmp_path / "b" / name)
    with pytest.raises(EdifyError, match="demo model emoji-64 is not installed") as err:
        assets.demo_model_path()
    assert "\n" not in str(err.value)
