"""The in-memory data path, the wall-clock budget and the shipping export (bf16 shards + model card)."""

import io
import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from _training_helpers import WordHashEncoder, tiny_config
from edify.cli import main as edify_main
from edify.data.vocab import StyleVocab, make_cond
from edify.errors import EdifyError
from edify.pipelines.text2image import TextToImagePipeline
from edify.training import checkpoint as ckpt
from edify.training import loop
from edify.training.config import TrainConfig
from edify.training.export import export_pipeline, run_numbers
from edify.training.loop import Trainer
from edify.training.memory_data import (MemoryData, MemoryStream, TableTextEncoder, TextTable, epoch_plan,
                                        read_samples)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _add(tar, name, data: bytes):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_shard(path, n=8, side=24, bad=()):
    """n samples "icon i"; indices in `bad` get a truncated PNG ("png") or no caption ("caption")."""
    rng = np.random.default_rng(0)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for i in range(n):
            png = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)).save(png, format="PNG")
            data = png.getvalue()[:40] if (i, "png") in bad else png.getvalue()
            meta = {"style": ["flat", "glossy"][i % 2], "weight": 1.0}
            if (i, "caption") not in bad:
                meta["caption"] = f"icon {i % 5}"  # repeated captions: 5 unique texts
            _add(tar, f"{i:04d}.png", data)
            _add(tar, f"{i:04d}.json", json.dumps(meta).encode())


def memory_trainer(out, data, **changes):
    config = tiny_config(data=str(data), data_in_memory=True, **changes)
    return Trainer(config, out, resume=True, text_encoder=WordHashEncoder())


def test_in_memory_training_resumes_exactly_and_matches_the_loader_conditioning(tmp_path):
    write_shard(tmp_path / "data" / "train" / "a-0000.tar")
    data = tmp_path / "data"
    straight = memory_trainer(tmp_path / "a", data).run(max_steps=6).losses
    first = memory_trainer(tmp_path / "b", data)
    part = first.run(max_steps=3).losses
    assert first.stream.state_dict() == {"kind": "memory", "epoch": 0, "batches": 3}  # 4 batches of 2 per epoch
    resumed = memory_trainer(tmp_path / "b", data)
    assert resumed.stream.state_dict() == {"kind": "memory", "epoch": 0, "batches": 3}
    assert part + resumed.run(max_steps=3).losses == straight  # bit-identical floats, across an epoch boundary
    assert resumed.stream.state_dict() == {"kind": "memory", "epoch": 1, "batches": 2}
    assert len(straight) == 6 and all(0 < x < 10 for x in straight)

    # a memory batch carries the same images and text states the streaming path would build
    t = memory_trainer(tmp_path / "c", data)
    batch = t.stream.next()
    assert batch.image.dtype == torch.float32 and batch.image.shape == (2, 3, 16, 16)
    ref = make_cond(WordHashEncoder(), batch.caption, batch.style, StyleVocab(("flat", "glossy")))
    n = ref.text.shape[1]
    assert torch.equal(batch.cond.text_mask[:, :n], ref.text_mask) and not batch.cond.text_mask[:, n:].any()
    assert torch.equal(batch.cond.text[:, :n], ref.text) and torch.equal(batch.cond.media, ref.media)
    # images: the uint8 rows the epoch plan names, as x / 127.5 - 1 (the streaming loader's math)
    records, _ = read_samples(str(data), 16, 16)
    _, idx = MemoryStream(t.stream.data, 2, seed=t.config.seed).next_indices()
    want = torch.from_numpy(np.stack([records["image"][i] for i in idx.tolist()])).permute(0, 3, 1, 2)
    assert torch.equal(batch.image, want.float() / 127.5 - 1)
    assert batch.caption == [records["caption"][i] for i in idx.tolist()]


def _records(buckets: dict[str, int]):
    out = {"image": [], "caption": [], "style": [], "weight": [], "bucket": []}
    shapes = {"1:1": (8, 8), "4:3": (8, 12)}
    for bucket, n in buckets.items():
        for i in range(n):
            out["image"].append(np.full((*shapes[bucket], 3), len(out["image"]), dtype=np.uint8))
            out["caption"].append(f"{bucket} {i}")
            out["style"].append(None)
            out["weight"].append(1.0)
            out["bucket"].append(bucket)
    return out


def test_ranks_draw_disjoint_samples_and_one_bucket_per_batch():
    data = MemoryData(_records({"1:1": 13, "4:3": 9}), {}, None, None, "cpu")
    micro, world = 2, 2
    streams = [MemoryStream(data, micro, seed=3, rank=r, world_size=world) for r in range(world)]
    plan = epoch_plan(data.bucket_sizes(), micro * world, 3, 0)
    assert len(plan) == 13 // 4 + 9 // 4  # full global batches per bucket; the rest sit the epoch out
    seen = []
    for _ in range(len(plan)):
        batches = [s.next() for s in streams]
        ids = [int(x[0, 0, 0]) for b in batches for x in b.image.add(1).mul(127.5).round().long()]
        shapes = {tuple(b.image.shape[2:]) for b in batches}
        assert len(shapes) == 1  # one bucket per global batch, on every rank
        assert len(set(ids)) == micro * world  # ranks take disjoint slices
        seen += ids
    assert len(seen) == len(set(seen)) == 4 * len(plan)  # no sample twice within an epoch
    assert streams[0].state_dict() == {"kind": "memory", "epoch": 0, "batches": len(plan)}
    next_epoch = [int(x[0, 0, 0]) for x in streams[0].next().image.add(1).mul(127.5).round().long()]
    assert streams[0].state_dict()["epoch"] == 1 and len(next_epoch) == micro
    with pytest.raises(EdifyError, match="bucket of at least world x micro batch = 20 images, got buckets of"):
        MemoryStream(data, 10, world_size=2)


def test_bad_samples_are_skipped_and_counted_at_load(tmp_path):
    write_shard(tmp_path / "d" / "s-0000.tar", n=8, bad={(2, "png"), (5, "caption")})
    records, stats = read_samples(str(tmp_path / "d"), 16, 16)
    assert len(records["image"]) == 6 and stats["ok"] == 6
    assert stats["skipped"] == {"bad_image": 1, "no_caption": 1}
    assert all(img.shape == (16, 16, 3) and img.dtype == np.uint8 for img in records["image"])
    with pytest.raises(EdifyError, match="in-memory data must be a folder of images or .tar shards"):
        read_samples(str(tmp_path / "nothing-here"), 16, 16)


def test_caption_table_file_round_trip_and_unknown_prompts(tmp_path):
    enc = WordHashEncoder()
    table = TextTable.build(enc, ["a red heart", "rocket", "a red heart", "flag: Malta"], batch_size=2)
    assert table.texts == sorted({"a red heart", "rocket", "flag: Malta"}) and len(table) == 3
    loaded = TextTable.load(table.save(tmp_path / "t.safetensors", torch.float32))
    served = TableTextEncoder(loaded)
    states, mask = served.encode(["rocket", "a red heart"])
    ref_states, ref_mask = enc.encode(["rocket", "a red heart"])
    assert torch.equal(mask, ref_mask) and torch.equal(states, ref_states * ref_mask[..., None])
    assert (served.name, served.dim, served.max_length) == ("word-hash", 384, 77)
    half = TextTable.load(table.save(tmp_path / "h.safetensors"))  # float16 by default
    assert half.states.dtype == torch.float32 and torch.allclose(half.states, table.states, rtol=1e-3, atol=1e-3)
    with pytest.raises(EdifyError, match="1 text\\(s\\) of the prompts are not in the caption table \\(3 texts\\), "
                                         "first: 'banana'"):
        served.encode(["rocket", "banana"])
    with pytest.raises(EdifyError, match="caption table file not found"):
        TextTable.load(tmp_path / "missing.safetensors")


def test_max_minutes_stops_checkpoints_and_records_the_run(tmp_path, monkeypatch):
    now = [1000.0]

    def clock():  # every reading advances the fake clock by 25 s
        now[0] += 25.0
        return now[0]

    monkeypatch.setattr(loop, "wall_clock", clock)
    t = Trainer(tiny_config(max_minutes=2.0, total_images=1000), tmp_path / "run", text_encoder=WordHashEncoder())
    result = t.run()
    # started at 1025; one budget check before the first step (1050) and one after each step (1075,
    # 1100, ...): 1150 is the first >= 1025 + 120, after the 4th step
    assert result.stop == "max_minutes" and len(result.losses) == 4
    assert result.checkpoint == ckpt.latest_checkpoint(tmp_path / "run") and result.checkpoint.name.endswith("8")
    record = json.loads((tmp_path / "run" / "runs.jsonl").read_text().splitlines()[-1])
    assert record["stop"] == "max_minutes" and record["images"] == 8 and record["gpu"].startswith("CPU")
    rows = [json.loads(x) for x in (tmp_path / "run" / "scalars.jsonl").read_text().splitlines()]
    assert rows[-1]["images"] == 8  # a final log point is written when time runs out
    with pytest.raises(EdifyError, match="max_minutes must be >= 0, got -1.0"):
        tiny_config(max_minutes=-1.0)
    assert TrainConfig.from_dict({"max_minutes": 3}).max_minutes == 3.0


def test_sigterm_stops_at_a_step_with_a_checkpoint_and_a_record(tmp_path):
    import os
    import signal

    t = Trainer(tiny_config(total_images=1000), tmp_path / "run", text_encoder=WordHashEncoder())
    step, calls = t.train_step, []

    def step_then_signal():
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # arrives during the third step
        return step()

    t.train_step = step_then_signal
    before = signal.getsignal(signal.SIGTERM)
    result = t.run()
    assert result.stop == "signal" and len(result.losses) == 3  # the step under way finished
    assert result.checkpoint == ckpt.latest_checkpoint(tmp_path / "run") and result.checkpoint.name.endswith("6")
    record = json.loads((tmp_path / "run" / "runs.jsonl").read_text().splitlines()[-1])
    assert record["stop"] == "signal" and record["images"] == 6
    rows = [json.loads(x) for x in (tmp_path / "run" / "scalars.jsonl").read_text().splitlines()]
    assert rows[-1]["images"] == 6
    assert signal.getsignal(signal.SIGTERM) is before  # the handler is restored
    resumed = Trainer(tiny_config(total_images=1000), tmp_path / "run", text_encoder=WordHashEncoder(), resume=True)
    assert resumed.state.images == 6


def test_export_writes_bf16_shards_under_the_limit_and_a_model_card_from_the_logs(tmp_path, capsys):
    write_shard(tmp_path / "data" / "train" / "a-0000.tar")
    manifest = {"sets": {"flat": {"title": "Flat Set", "version": "1.0", "license": "CC-BY-4.0",
                                  "license_url": "https://creativecommons.org/licenses/by/4.0/",
                                  "author": "Someone", "author_url": "https://example.org", "train": 4}},
                "licenses": ["CC-BY-4.0"], "counts": {"train": 8}, "sizes": [24], "split": {"rule": "none"}}
    (tmp_path / "data" / "manifest.json").write_text(json.dumps(manifest))
    table = TextTable.build(WordHashEncoder(), [f"icon {i}" for i in range(5)] + ["a red heart", "a smiling face"])
    table.save(tmp_path / "captions.safetensors", torch.float32)
    run, model = tmp_path / "run", tmp_path / "model"
    args = ["train", "--preset", "tiny-cpu", "--out", str(run), "--data", str(tmp_path / "data"),
            "--set", "data_in_memory=true", "--set", f"text_table={tmp_path / 'captions.safetensors'}",
            "--set", "batch_size=2", "--set", "total_images=4", "--set", "log_images=2", "--set", "peak_tflops=1",
            "--set", "sample_steps=1", "--export", str(model), "--export-dtype", "bf16",
            "--export-shard-mib", "0.15", "--model-card"]
    assert edify_main(args) == 0
    shards = sorted(model.glob("model-*.safetensors"))
    assert len(shards) >= 2 and all(p.stat().st_size <= 0.15 * 2**20 for p in shards)
    with safe_open(str(shards[0]), framework="pt") as f:
        assert all(f.get_tensor(k).dtype == torch.bfloat16 for k in f.keys())
    pipe = TextToImagePipeline.from_pretrained(model, text_encoder=WordHashEncoder())
    _, ema = ckpt.load_weights(run)
    assert all(torch.equal(v, ema[k].to(torch.bfloat16).float()) for k, v in pipe.network.state_dict().items())
    assert (model / "samples.png").is_file()

    card = (model / "README.md").read_text()
    numbers = run_numbers(run)
    rows = [json.loads(x) for x in (run / "scalars.jsonl").read_text().splitlines()]
    img_s = sum(r["interval_images"] for r in rows) / sum(r["interval_seconds"] for r in rows)
    assert numbers["img_per_s"] == pytest.approx(img_s) and f"{img_s:,.0f} img/s" in card
    assert f"{100 * numbers['mfu']:.1f}%" in card and 0 < numbers["mfu"] < 1
    assert "| images seen | 4 (2 optimizer steps of 2 images) |" in card
    sets = " ".join(f"--set {x}" for x in args[8:21:2])
    command = (f"edify train --preset tiny-cpu --data {tmp_path / 'data'} --out {run} --export {model} {sets} "
               "--export-dtype bf16 --export-shard-mib 0.15 --model-card")
    assert f"```\n{command}\n```" in card
    assert "[CC-BY-4.0](https://creativecommons.org/licenses/by/4.0/)" in card
    assert "| flat | Flat Set | 1.0 |" in card and "[Someone](https://example.org)" in card
    assert "| accelerator | CPU (" in card and "${" not in card and "BF16" in card

    capsys.readouterr()
    assert edify_main(args[:5] + ["--max-minutes", "0"]) == 2
    assert "--max-minutes must be > 0, got 0.0" in capsys.readouterr().err
    with pytest.raises(EdifyError, match="max_shard_bytes must hold the largest tensor and a header"):
        export_pipeline(run, tmp_path / "m2", max_shard_bytes=1000)


def test_run_numbers_count_only_what_led_to_the_exported_checkpoint(tmp_path):
    """A checkpoint inside a session: its intervals up to the checkpoint, no wall-time estimate;
    sessions that started after it are left out."""
    def session(start, end, wall, train, command):
        return {"device": "cpu", "gpu": "CPU", "start_images": start, "images": end, "wall_seconds": wall,
                "train_seconds": train, "command": command, "precision": "fp32"}
    (tmp_path / "runs.jsonl").write_text("\n".join(json.dumps(r) for r in [
        session(0, 200, 100.0, 90.0, "first"), session(200, 500, 160.0, 150.0, "second"),
        session(500, 600, 60.0, 50.0, "third")]) + "\n")
    rows = [{"images": i, "interval_images": 100, "interval_seconds": 10.0 * i / 100, "img_per_s": 1e3 / i,
             "loss": 1.0 / i} for i in range(100, 700, 100)]
    (tmp_path / "scalars.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")

    whole = run_numbers(tmp_path)
    assert whole["wall_seconds"] == 320.0 and whole["train_seconds"] == 290.0 and whole["runs"] == 3
    assert whole["final_loss"] == 1.0 / 600 and whole["commands"] == ["first", "second", "third"]

    at_end_of_first = run_numbers(tmp_path, upto=200)
    assert at_end_of_first["wall_seconds"] == 100.0 and at_end_of_first["train_seconds"] == 90.0
    assert at_end_of_first["commands"] == ["first"] and at_end_of_first["final_loss"] == 1.0 / 200

    inside_second = run_numbers(tmp_path, upto=400)  # the second session went on to 500
    assert inside_second["wall_seconds"] is None  # not recorded at the checkpoint: never estimated
    assert inside_second["train_seconds"] == 90.0 + 30.0 + 40.0  # its intervals at 300 and 400
    assert inside_second["commands"] == ["first", "second"] and inside_second["runs"] == 2
    assert inside_second["img_per_s"] == pytest.approx(400 / (10 + 20 + 30 + 40))
    assert inside_second["final_loss"] == 1.0 / 400
