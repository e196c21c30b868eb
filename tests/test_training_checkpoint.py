"""Checkpoints (pickle-free, atomic, exact) and the EMA, on a small stand-in module."""

import json
import math
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from edify.errors import EdifyError
from edify.pipelines import model_io
from edify.training import checkpoint as ckpt
from edify.training.checkpoint import TrainState
from edify.training.config import get_preset
from edify.training.ema import EMA, power_gamma
from test_model_files import edit_json, one_line_error, opened, replace_with  # noqa: F401 (opened: a fixture)

CONFIG = get_preset("tiny-cpu").replace(keep_last=2)


def make(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.8, 0.95))
    ema = EMA(model, halflife_images=16.0, rampup=0.0)
    return model, opt, ema


def train_steps(model, opt, ema, n, seed=123):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        loss = model(torch.randn(6, 4, generator=g)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        ema.update(model, 8, 4)


def save(tmp_path, model, opt, ema, images, **kw):
    return ckpt.save_checkpoint(tmp_path, CONFIG, model, opt, ema,
                                TrainState(step=images // 4, images=images, data={"consumed": images}, **kw))


def test_optimizer_state_round_trips_without_pickle():
    model, opt, ema = make()
    train_steps(model, opt, ema, 2)
    tensors = {}
    structure = ckpt.flatten_state(opt.state_dict(), tensors)
    text = json.dumps(structure)  # plain JSON: no pickled objects anywhere
    back = ckpt.unflatten_state(json.loads(text), tensors)
    ref = opt.state_dict()
    assert back["param_groups"] == ref["param_groups"]  # int keys, tuple betas preserved
    assert set(back["state"]) == set(ref["state"])
    for k, v in ref["state"].items():
        for name, t in v.items():
            assert torch.equal(back["state"][k][name], t)


def test_resumed_objects_continue_exactly(tmp_path):
    model, opt, ema = make()
    train_steps(model, opt, ema, 3)
    path = save(tmp_path, model, opt, ema, 12, nonfinite_total=2)
    assert (tmp_path / "latest").read_text().strip() == path.name == "ckpt-000000000012"
    assert sorted(p.name for p in path.iterdir()) == sorted([
        "config.json", "model.safetensors", "ema.safetensors", "optimizer.safetensors", "optimizer.json",
        "rng.safetensors", "state.json"])

    model2, opt2, ema2 = make(seed=99)  # different initial weights, fresh optimizer
    state = ckpt.load_latest(tmp_path, CONFIG, model2, opt2, ema2)
    assert (state.step, state.images, state.data, state.nonfinite_total) == (3, 12, {"consumed": 12}, 2)
    # continue both: bit-identical weights, optimizer moments and EMA afterwards
    train_steps(model, opt, ema, 2, seed=7)
    train_steps(model2, opt2, ema2, 2, seed=7)
    for a, b in zip(model.state_dict().values(), model2.state_dict().values()):
        assert torch.equal(a, b)
    for name in ema.shadow:
        assert torch.equal(ema.shadow[name], ema2.shadow[name])


def test_rng_states_are_restored(tmp_path):
    model, opt, ema = make()
    torch.manual_seed(5)
    save(tmp_path, model, opt, ema, 4)
    expected = torch.rand(3)
    torch.manual_seed(6)
    ckpt.load_latest(tmp_path, CONFIG, *make()[:3])
    assert torch.equal(torch.rand(3), expected)


def test_keep_last_prunes_older_checkpoints_and_stale_temp_folders(tmp_path):
    model, opt, ema = make()
    (tmp_path / ".tmp-ckpt-000000000999").mkdir()  # what a process killed mid-save leaves
    for images in (4, 8, 12, 16):
        save(tmp_path, model, opt, ema, images)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["ckpt-000000000012", "ckpt-000000000016"]
    assert sorted(os.listdir(tmp_path)) == ["ckpt-000000000012", "ckpt-000000000016", "latest"]


def test_interrupted_save_leaves_previous_checkpoint_loadable(tmp_path, monkeypatch):
    model, opt, ema = make()
    train_steps(model, opt, ema, 1)
    save(tmp_path, model, opt, ema, 4)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    train_steps(model, opt, ema, 1)

    real_save = ckpt.save_file
    calls = []

    def failing_save(tensors, filename, *args, **kwargs):
        calls.append(filename)
        if len(calls) > 1:  # the first file lands, then the "disk" fails
            with open(filename, "wb") as f:
                f.write(b"partial")
            raise OSError("disk full")
        return real_save(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(ckpt, "save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        save(tmp_path, model, opt, ema, 8)
    monkeypatch.setattr(ckpt, "save_file", real_save)

    assert len(calls) == 2
    assert (tmp_path / "latest").read_text().strip() == "ckpt-000000000004"
    assert sorted(os.listdir(tmp_path)) == ["ckpt-000000000004", "latest"]  # no temp or partial dir
    model2, opt2, ema2 = make(seed=1)
    state = ckpt.load_latest(tmp_path, CONFIG, model2, opt2, ema2)
    assert state.images == 4
    for k, v in model2.state_dict().items():
        assert torch.equal(v, saved[k])


def test_checkpoint_from_another_config_is_refused(tmp_path):
    model, opt, ema = make()
    save(tmp_path, model, opt, ema, 4)
    with pytest.raises(EdifyError, match=r"another config \(lr: 0.001 -> 0.002\)"):
        ckpt.load_latest(tmp_path, CONFIG.replace(lr=2e-3), *make()[:3])
    # fields that do not change the math may differ
    assert ckpt.load_latest(tmp_path, CONFIG.replace(total_images=10**6), *make()[:3]).images == 4


def test_checkpoint_of_another_model_shape_is_refused(tmp_path):
    model, opt, ema = make()
    save(tmp_path, model, opt, ema, 4)
    other = nn.Sequential(nn.Linear(4, 9), nn.BatchNorm1d(9), nn.Linear(9, 2))
    with pytest.raises(EdifyError, match="does not fit the model"):
        ckpt.load_latest(tmp_path, CONFIG, other, torch.optim.AdamW(other.parameters()), None)


def test_corrupt_or_missing_files_raise_edify_errors(tmp_path):
    model, opt, ema = make()
    path = save(tmp_path, model, opt, ema, 4)
    weights = path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(EdifyError, match="model.safetensors is corrupt"):
        ckpt.load_latest(tmp_path, CONFIG, *make()[:3])
    weights.unlink()
    with pytest.raises(EdifyError, match="checkpoint file missing"):
        ckpt.load_latest(tmp_path, CONFIG, *make()[:3])
    (tmp_path / "latest").write_text("ckpt-000000000999\n")
    with pytest.raises(EdifyError, match="missing checkpoint 'ckpt-000000000999'"):
        ckpt.load_latest(tmp_path, CONFIG, *make()[:3])
    assert ckpt.load_latest(tmp_path / "empty", CONFIG, *make()[:3]) is None


def test_ema_half_life_in_images():
    # Toward a constant target, the gap to the target halves every `halflife` images (EDM ema).
    p = nn.Parameter(torch.zeros(3))
    module = nn.Module()
    module.p = p
    ema = EMA(module, halflife_images=64.0, rampup=0.0)
    with torch.no_grad():
        p.fill_(1.0)
    for step in range(1, 17):  # 16 steps of 4 images = 64 images
        ema.update(module, step * 4, 4)
    assert torch.allclose(ema.shadow["p"], torch.full((3,), 0.5), atol=1e-6)
    # ramp-up: early on the half-life is capped at rampup * images seen
    ramp = EMA(module, halflife_images=1e6, rampup=0.5)
    assert ramp.beta(images_seen=8, batch_images=4) == pytest.approx(0.5 ** (4 / 4))


def test_ema_power_function_profile():
    # edm2: relative std sqrt((g+1) / ((g+2)^2 (g+3))); 0.10 <-> gamma = 6.94
    assert power_gamma(0.10) == pytest.approx(6.94, abs=0.01)
    for std in (0.05, 0.1, 0.2):
        g = power_gamma(std)
        assert math.sqrt((g + 1) / ((g + 2) ** 2 * (g + 3))) == pytest.approx(std, rel=1e-9)
    ema = EMA(nn.Linear(2, 2), std=0.1)
    g = power_gamma(0.1)
    assert ema.beta(images_seen=4, batch_images=4) == 0.0  # t = 1: the average is the weights
    assert ema.beta(images_seen=40, batch_images=4) == pytest.approx((1 - 1 / 10) ** (g + 1))
    with pytest.raises(EdifyError, match="EMA std"):
        power_gamma(0.5)
    with pytest.raises(EdifyError, match="exactly one"):
        EMA(nn.Linear(2, 2), halflife_images=10.0, decay=0.9)


# ---- hostile checkpoints: crafted from a good one, each must fail in one line -------------------

def saved_checkpoint(out: Path) -> Path:
    model, opt, ema = make()
    train_steps(model, opt, ema, 1)
    return save(out, model, opt, ema, 4)


def rewrite(folder: Path, name: str, data: bytes) -> None:
    """Replace a checkpoint file and record its new size and sha256: a consistent hostile checkpoint."""
    (folder / name).write_bytes(data)
    edit_json(folder / "state.json", lambda m: _record(m, folder, name))


def _record(meta: dict, folder: Path, name: str) -> None:
    meta["file_sizes"][name] = (folder / name).stat().st_size
    meta["file_sha256"][name] = model_io.sha256_file(folder / name)


def flip_byte(file: Path) -> None:
    data = bytearray(file.read_bytes())
    data[-3] ^= 0xFF
    file.write_bytes(bytes(data))


def drop_tensor_reference(c: Path) -> None:
    text = (c / "optimizer.json").read_text().replace('"s/state/0.weight/exp_avg"', '"s/nope"', 1)
    rewrite(c, "optimizer.json", text.encode())


def outside(c: Path) -> Path:
    """A file next to the run folder of checkpoint `c`: never to be read."""
    file = c.parent.parent / "outside.txt"
    file.write_text("ckpt-000000000004\n")
    return file


def list_outside_file(c: Path) -> None:
    def change(m):
        m["file_sizes"]["../../outside.txt"] = 18
        m["file_sha256"]["../../outside.txt"] = model_io.sha256_file(outside(c))
    edit_json(c / "state.json", change)


CHECKPOINT_CASES = {
    "flipped byte, same size": (lambda c: flip_byte(c / "model.safetensors"),
                                "model.safetensors is corrupt: its sha256"),
    "state.json without file_sizes": (lambda c: edit_json(c / "state.json", lambda m: m.pop("file_sizes")),
                                      "lacks the required field 'file_sizes'"),
    "state.json a list": (lambda c: (c / "state.json").write_text("[]"), "has format"),
    "state.json nested 100k deep": (lambda c: (c / "state.json").write_text("[" * 100_000 + "]" * 100_000),
                                    "too deeply"),
    "state.json step a string": (lambda c: edit_json(c / "state.json", lambda m: m.update(step="1")),
                                 "'step' must be an integer"),
    "python_random of a wrong size": (lambda c: edit_json(c / "state.json", lambda m: m["python_random"][0][1].pop()),
                                      "python_random. holds a bad state"),
    "missing tensor reference": (drop_tensor_reference, "missing tensor 's/nope'"),
    "optimizer.json nested 100k deep": (lambda c: rewrite(c, "optimizer.json", b"[" * 100_000 + b"]" * 100_000),
                                        "too deeply"),
    "optimizer.json nested 200 deep": (lambda c: rewrite(c, "optimizer.json", b"[" * 200 + b"]" * 200),
                                        "nests deeper than"),
    "file_sizes entry ../": (list_outside_file, "outside the folder"),
    "checksum not hex": (lambda c: edit_json(c / "state.json", lambda m: m["file_sha256"].update(
        {"config.json": "x" * 64})), "malformed digest"),
    "latest symlinked out": (lambda c: replace_with(c.parent / "latest", lambda p: p.symlink_to(outside(c))),
                             "leads outside the folder"),
    "latest names ../": (lambda c: (c.parent / "latest").write_text("ckpt-1/../../x\n"), "names a missing checkpoint"),
}


@pytest.mark.parametrize("case", list(CHECKPOINT_CASES))
def test_hostile_checkpoints_fail_in_one_line(tmp_path, case, opened):
    craft, match = CHECKPOINT_CASES[case]
    folder = saved_checkpoint(tmp_path / "run")
    craft(folder)
    opened.clear()
    message = one_line_error(lambda: ckpt.load_latest(tmp_path / "run", CONFIG, *make(seed=1)), match)
    assert str(tmp_path / "run") in message
    assert all(p.is_relative_to((tmp_path / "run").resolve()) for p in opened), opened


def test_old_checkpoint_without_checksums_loads_with_a_warning(tmp_path):
    folder = saved_checkpoint(tmp_path / "run")
    edit_json(folder / "state.json", lambda m: m.pop("file_sha256"))
    with pytest.warns(UserWarning, match="no checksums"):
        state = ckpt.load_latest(tmp_path / "run", CONFIG, *make(seed=1))
    assert state.images == 4


def test_leftovers_of_a_killed_save_are_cleaned_up_on_the_next_run(tmp_path):
    folder = saved_checkpoint(tmp_path / "run")
    run = tmp_path / "run"
    (run / ".tmp-ckpt-000000000008").mkdir()
    (run / ".tmp-ckpt-000000000008" / "model.safetensors").write_bytes(b"partial")
    (run / ".latest.tmp").write_text("ckpt-000000000008\n")
    os.replace(folder, run / f".old-{folder.name}")  # killed between moving the old one aside and the new in
    assert ckpt.load_latest(run, CONFIG, *make(seed=1)).images == 4
    assert sorted(os.listdir(run)) == [folder.name, "latest"]
