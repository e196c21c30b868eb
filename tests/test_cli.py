"""The `edify` command through its real entry point (`python -m edify.cli` in a subprocess):
one-line errors, --help without torch, devices, batched generation, Ctrl-C, corrupt models and
the reproducibility statement of `edify generate --help`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from edify.cli import main as cli_main
from edify.networks.presets import build_network
from edify.pipelines.generate_cli import output_paths
from edify.pipelines.text2image import PipelineConfig, SamplingDefaults, TextToImagePipeline

ROOT = Path(__file__).resolve().parents[1]


def edify(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m edify.cli ARGS` with one torch thread and no EDIFY_* settings from outside."""
    full = {k: v for k, v in os.environ.items() if not k.startswith("EDIFY_")}
    full.update({"OMP_NUM_THREADS": "1", **(env or {})})
    return subprocess.run([sys.executable, "-m", "edify.cli", *args], capture_output=True, text=True, env=full,
                          timeout=timeout, cwd=ROOT)


def assert_one_line(result: subprocess.CompletedProcess, code: int, *fragments: str) -> str:
    """The command failed with `code` and one line on stderr holding every fragment."""
    lines = result.stderr.splitlines()
    assert result.returncode == code, result.stderr
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith("edify: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def save_tiny_model(folder: Path, head: float | None = None, nan: bool = False) -> Path:
    """A tiny random 32 px model (MiniLM text encoder); `head` fills the output layer, `nan` every weight."""
    torch.manual_seed(0)
    net = build_network("tiny")
    with torch.no_grad():
        if head is not None:
            net.head.weight.fill_(head)
            net.head.bias.fill_(head)
        if nan:
            for p in net.parameters():
                p.fill_(float("nan"))
    config = PipelineConfig(network=net.config.to_dict(), resolution=32, styles=("noto", "twemoji"),
                            defaults=SamplingDefaults(num_steps=3, guidance_scale=2.0))
    TextToImagePipeline(net, config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("model") / "tiny")


# ---------------------------------------------------------------------------------------------
# Dispatcher: version, command groups, --help without torch, one-line errors


def test_version_and_command_groups():
    from edify import __version__

    result = edify("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"edify {__version__}"
    result = edify("data")  # a command group alone lists its commands
    assert result.returncode == 0 and "emoji" in result.stdout and result.stderr == ""
    assert_one_line(edify("data", "nope"), 2, "unknown command 'data nope'", "commands: emoji")
    assert_one_line(edify("nope"), 2, "unknown command 'nope'", "generate", "data emoji")
    assert "--debug" in edify("--help").stdout


HELP_WITHOUT_TORCH = """
import sys
from edify.cli import main
code = main(sys.argv[1:] + ["--help"])
assert code == 0, code
assert "torch" not in sys.modules, "imported torch"
"""


@pytest.mark.parametrize("command", [
    ["generate"], ["eval"], ["train"], ["data", "emoji"],
])
def test_help_of_every_command_does_not_import_torch(command):
    result = subprocess.run([sys.executable, "-c", HELP_WITHOUT_TORCH, *command], capture_output=True, text=True,
                            cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert "--threads" in result.stdout or command == ["data", "emoji"]


def test_generate_help_lists_the_styles_and_states_reproducibility():
    out = " ".join(edify("generate", "--help").stdout.split())
    assert "twemoji" in out and "noto" in out  # the shipped model's styles, read from its config.json
    assert "--batch-size" in out and "--threads" in out and "--quiet" in out
    assert "bit-identical" in out and "batch of the same size" in out


@pytest.mark.parametrize("args, fragments", [
    (["generate", "apple", "--num", "x"], ["argument --num: invalid int value: 'x'", "edify generate --help"]),
    (["generate"], ["required: prompt"]),
    (["generate", "apple", "-o", "x.jpg"], ["output must be a .png file"]),
    (["generate", "apple", "--num", "0"], ["--num must be >= 1"]),
    (["generate", "apple", "--batch-size", "0"], ["--batch-size must be >= 1"]),
    (["generate", "apple", "--threads", "0"], ["--threads must be >= 1, got 0"]),
    (["generate", "apple", "--sigma-min", "0"], ["sigma_min must be a number in (0, 80), got 0.0"]),
    (["generate", "apple", "-o", "/nonexistent-folder/x.png"], ["output folder", "does not exist"]),
    (["train", "--preset", "nope"], ["argument --preset: invalid choice: 'nope'"]),
    (["eval", "--data", "/nonexistent", "--batch", "0"], ["--batch must be >= 1"]),
])
def test_bad_arguments_are_one_line(args, fragments):
    assert_one_line(edify(*args), 2, *fragments)


def test_edify_model_that_does_not_exist_is_named():
    line = assert_one_line(edify("generate", "apple", env={"EDIFY_MODEL": "/nonexistent"}), 2)
    assert "EDIFY_MODEL=/nonexistent does not exist" in line and "not in this checkout" not in line


@pytest.mark.parametrize("args", [
    ["generate", "apple", "--device", "tpu"],
    ["eval", "--data", "x", "--device", "tpu"],
    ["train", "--device", "tpu"],
])
def test_unknown_devices_are_one_line_listing_the_available(args):
    assert_one_line(edify(*args), 2, "unknown device 'tpu'", "available here: cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_on_a_machine_without_it_is_one_line():
    assert_one_line(edify("generate", "apple", "--device", "cuda"), 2, "device 'cuda' is not available",
                    "available here: cpu")


BUG = """
import sys
import edify.pipelines.generate_cli as g
from edify.cli import main

def run(args):
    raise ZeroDivisionError("division by zero")

g.run = run
sys.exit(main(sys.argv[1:]))
"""


def test_unexpected_errors_say_bug_and_show_a_traceback_only_with_debug():
    def bug(*args, env=None):
        full = {k: v for k, v in os.environ.items() if not k.startswith("EDIFY_")}
        return subprocess.run([sys.executable, "-c", BUG, *args], capture_output=True, text=True, cwd=ROOT,
                              env={**full, **(env or {})})

    assert_one_line(bug("generate", "apple"), 1, "internal error", "ZeroDivisionError", "bug", "--debug")
    for result in (bug("--debug", "generate", "apple"), bug("generate", "apple", "--debug"),
                   bug("generate", "apple", env={"EDIFY_DEBUG": "1"})):
        assert result.returncode == 1 and "Traceback" in result.stderr and "ZeroDivisionError" in result.stderr


# ---------------------------------------------------------------------------------------------
# Generation: batches written as they finish, Ctrl-C, corrupt models, OS errors


def test_generate_writes_every_batch_with_seed_plus_index(model, tmp_path):
    result = edify("generate", "red apple", "--model", str(model), "-o", str(tmp_path / "a.png"), "--num", "5",
                   "--batch-size", "2", "--seed", "10", "--style", "noto")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # no progress bar when stderr is not a terminal
    lines = result.stdout.splitlines()
    assert lines[:5] == [f"{tmp_path / f'a-{i}.png'}  (seed {10 + i})" for i in range(5)]
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"a-{i}.png" for i in range(5)]  # no temporary files


def test_ctrl_c_keeps_the_images_already_written(model, tmp_path):
    out = tmp_path / "x.png"
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDIFY_")}
    proc = subprocess.Popen([sys.executable, "-m", "edify.cli", "generate", "red apple", "--model", str(model),
                             "-o", str(out), "--num", "100000", "--batch-size", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env={**env, "OMP_NUM_THREADS": "1"},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 240
    while not (tmp_path / "x-3.png").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert len(stderr.splitlines()) == 1 and "Traceback" not in stderr
    written = sorted(tmp_path.iterdir())
    assert stderr.startswith(f"edify: interrupted: {len(written)} of 100000 images written")
    assert len(written) >= 4 and all(p.suffix == ".png" for p in written)
    for path in written:  # every file is a whole image
        Image.open(path).load()


def test_corrupt_models_never_write_an_image(tmp_path):
    nan = save_tiny_model(tmp_path / "nan", nan=True)
    assert_one_line(edify("generate", "apple", "--model", str(nan), "-o", str(tmp_path / "a.png")), 2,
                    "non-finite values")
    huge = save_tiny_model(tmp_path / "huge", head=3e38)  # finite weights whose output overflows
    assert_one_line(edify("generate", "apple", "--model", str(huge), "-o", str(tmp_path / "b.png")), 2,
                    "sampling produced non-finite values", "step 1")
    assert not list(tmp_path.glob("*.png"))


def test_os_errors_are_one_line(model, tmp_path):
    (tmp_path / "file").write_text("not a folder")
    assert_one_line(edify("generate", "apple", "--model", str(model), "-o", str(tmp_path / "file" / "x.png")), 2,
                    "Not a directory")


# ---------------------------------------------------------------------------------------------
# Reproducibility: exactly what `edify generate --help` promises


def _pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path), dtype=np.int16)


def test_same_seed_and_batch_size_is_bit_identical_whatever_the_position(model, tmp_path, capsys):
    def generate(name: str, seed: int, num: int, batch: int) -> list[Path]:
        code = cli_main(["generate", "red apple", "--model", str(model), "-o", str(tmp_path / f"{name}.png"),
                         "--seed", str(seed), "--num", str(num), "--batch-size", str(batch), "--threads", "1"])
        assert code == 0, capsys.readouterr().err
        return output_paths(str(tmp_path / f"{name}.png"), num)

    a = generate("a", 0, 5, 2)  # batches: seeds 0 1 | 2 3 | 4
    again = generate("again", 0, 5, 2)
    assert a[0].read_bytes() != a[1].read_bytes()  # the seeds do differ
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in again]  # a rerun: byte for byte
    b = generate("b", 2, 3, 2)  # 2 3 | 4: seeds 2, 3 and 4 in batches of the same sizes
    assert [p.read_bytes() for p in a[2:]] == [p.read_bytes() for p in b]
    c = generate("c", 1, 2, 2)  # 1 2: seed 2 second in its batch of 2 instead of first
    assert c[1].read_bytes() == a[2].read_bytes()
    d = generate("d", 3, 1, 2)  # seed 3 alone (a batch of 1): the same picture up to rounding
    assert np.abs(_pixels(d[0]) - _pixels(a[3])).max() <= 1


# ---------------------------------------------------------------------------------------------
# Training: --device, --threads, and --export that will not replace another model


def test_train_export_keeps_another_model_unless_overwrite(tmp_path):
    target = tmp_path / "model"
    save_tiny_model(target)
    before = (target / "config.json").read_text()
    args = ["train", "--preset", "tiny-cpu", "--data", "synthetic:8", "--set", "batch_size=2",
            "--set", "total_images=2", "--set", "text_cache=false", "--out", str(tmp_path / "run"), "--export", str(target), "--threads", "1", "--device", "cpu"]
    assert_one_line(edify(*args), 2, "already holds a model", "--overwrite")
    assert not (tmp_path / "run").exists()  # refused before any training
    assert (target / "config.json").read_text() == before
    result = edify(*args, "--overwrite")
    assert result.returncode == 0, result.stderr
    assert (target / "config.json").read_text() != before and f"model folder: {target}" in result.stdout
