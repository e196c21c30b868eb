"""The training loop on the tiny network and synthetic data: exact resume, the non-finite guard,
stage sampling, logging and FLOP counting, sample grids, the `edify train` command, a real shard."""

import io
import math
import json
import shutil
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from _training_helpers import WordHashEncoder, tiny_config
from edify.cli import main as edify_main
from edify.conditioning import Cond
from edify.errors import EdifyError
from edify.pipelines.text2image import TextToImagePipeline
from edify.training import checkpoint as ckpt
from edify.training import monitor
from edify.training.export import export_pipeline
from edify.training.loop import Trainer


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def trainer(out, **changes):
    return Trainer(tiny_config(**changes), out, resume=True, text_encoder=WordHashEncoder())


def test_resume_reproduces_the_uninterrupted_loss_sequence_exactly(tmp_path):
    straight = trainer(tmp_path / "a")
    losses_straight = straight.run(max_steps=6).losses

    first = trainer(tmp_path / "b").run(max_steps=3)
    assert first.checkpoint.name == "ckpt-000000000006"  # stopping early writes a checkpoint
    resumed_trainer = trainer(tmp_path / "b")  # new objects, as a new process would build them
    assert resumed_trainer.state.images == 6 and resumed_trainer.stream.state_dict()["consumed"] == 6
    resumed = resumed_trainer.run(max_steps=3)

    assert len(losses_straight) == 6
    assert first.losses + resumed.losses == losses_straight  # bit-identical floats
    for a, b in zip(straight.model.state_dict().values(), resumed_trainer.model.state_dict().values()):
        assert torch.equal(a, b)
    # both stages were trained (round robin) and the loss is a real number
    assert {straight.stage_for(s) for s in range(6)} == {0, 1}
    assert all(0 < x < 10 for x in losses_straight)


def test_non_finite_loss_skips_the_step_and_stops_after_k_in_a_row(tmp_path):
    t = trainer(tmp_path, max_nonfinite=2)
    t.train_step()  # one good step so the optimizer has state
    real_loss = t.loss_fn
    poison = {"on": True}

    def loss_fn(*args, **kwargs):
        loss, sigma = real_loss(*args, **kwargs)
        return (loss * float("nan") if poison["on"] else loss), sigma

    t.loss_fn = loss_fn
    before = {k: v.clone() for k, v in t.model.state_dict().items()}
    ema_before = {k: v.clone() for k, v in t.ema.shadow.items()}
    adam_steps = [s["step"].item() for s in t.optimizer.state.values()]
    loss = t.train_step()
    assert loss != loss  # NaN reported
    assert t.state.nonfinite_total == 1 and t.state.images == 4  # counted; data still consumed
    for k, v in t.model.state_dict().items():
        assert torch.equal(v, before[k])
    for k, v in t.ema.shadow.items():
        assert torch.equal(v, ema_before[k])
    assert [s["step"].item() for s in t.optimizer.state.values()] == adam_steps
    assert all(p.grad is None for p in t.model.parameters())

    poison["on"] = False
    t.train_step()  # a good step resets the consecutive count
    assert t.consecutive_nonfinite == 0
    assert any(not torch.equal(v, before[k]) for k, v in t.model.state_dict().items())
    poison["on"] = True
    t.train_step()
    with pytest.raises(EdifyError, match="2 consecutive non-finite losses"):
        t.train_step()
    assert t.state.nonfinite_total == 3


def test_bf16_autocast_trains_on_the_cpu_and_may_be_switched_on_when_resuming(tmp_path):
    trainer(tmp_path).run(max_steps=1)
    t = trainer(tmp_path, precision="bf16")
    assert t.network_dtype == torch.bfloat16 and t.state.step == 1
    before = {k: v.clone() for k, v in t.model.state_dict().items()}
    assert math.isfinite(t.train_step())
    assert all(v.dtype == torch.float32 for v in t.model.state_dict().values())  # fp32 master weights
    assert any(not torch.equal(v, before[k]) for k, v in t.model.state_dict().items())


def test_bf16_on_a_cpu_without_bf16_products_is_warned_of(tmp_path, capsys, monkeypatch):
    from edify import runtime

    slowdown = runtime.bf16_matmul_slowdown(size=64, reps=2)  # the real probe: a positive ratio
    assert math.isfinite(slowdown) and slowdown > 0
    calls = []

    def probe(factor):
        return lambda *a, **k: calls.append(factor) or factor

    monkeypatch.setattr(runtime, "bf16_matmul_slowdown", probe(27.0))
    trainer(tmp_path / "a", precision="bf16")
    err = capsys.readouterr().err.splitlines()
    assert [line for line in err if "warning" in line] == [
        "edify: warning: bf16 matrix products run 27x slower than fp32 on this CPU (it has no bf16 dot "
        "products: AVX512-BF16, AMX or Arm BF16); precision=bf16 will train slower than precision=fp32 here"]
    monkeypatch.setattr(runtime, "bf16_matmul_slowdown", probe(0.6))  # a CPU with bf16 products
    trainer(tmp_path / "b", precision="bf16")
    trainer(tmp_path / "c")  # fp32: nothing to probe
    assert "warning" not in capsys.readouterr().err and calls == [27.0, 0.6]


def test_resume_with_another_config_is_refused(tmp_path):
    trainer(tmp_path, stage_sampling="random").run(max_steps=1)
    with pytest.raises(EdifyError, match=r"another config \(lr: 0.001 -> 0.01\)"):
        trainer(tmp_path, stage_sampling="random", lr=1e-2)
    # a cool-down may be added when the run goes on
    cooled = trainer(tmp_path, stage_sampling="random", total_images=40, cooldown_images=20)
    assert cooled.state.images > 0 and cooled.lr_at(40) == 0.0
    # and the compute moved between stages
    moved = trainer(tmp_path, stage_sampling="random", stage_weights=(1.0, 0.0001))
    assert moved.state.images > 0 and {moved.stage_for(s) for s in range(20)} == {0}


def test_stage_sampling_and_warmup(tmp_path):
    t = trainer(tmp_path, stage_sampling="random", stage_weights=(3.0, 1.0), warmup_images=8)
    draws = [t.stage_for(s) for s in range(800)]
    assert draws == [t.stage_for(s) for s in range(800)]  # a function of (seed, step) only
    assert 0.70 < draws.count(0) / 800 < 0.80
    assert [t.lr_at(i) for i in (0, 2, 8, 100)] == pytest.approx([0.0, 2.5e-4, 1e-3, 1e-3])
    decay = trainer(tmp_path / "decay", lr_decay_images=100)
    assert [decay.lr_at(i) for i in (50, 100, 400, 10_000)] == pytest.approx([1e-3, 1e-3, 5e-4, 1e-4])
    cool = trainer(tmp_path / "cool", lr_decay_images=100, total_images=800, cooldown_images=400)
    assert [cool.lr_at(i) for i in (100, 400, 600, 800)] == pytest.approx([1e-3, 5e-4, 1e-3 / 6 ** 0.5 / 2, 0.0])
    only = trainer(tmp_path / "one", stages=(1,))
    assert {only.stage_for(s) for s in range(10)} == {1}


def test_flop_count_matches_a_linear_layer_closed_form():
    # forward 2*B*I*O, backward weight grad 2*B*I*O (the input needs no gradient): 4 B I O in all
    class LinearDenoiser(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(48, 48, bias=False)

        def forward(self, x, sigma, cond, stage):
            return self.lin(x.flatten(1)).view_as(x)

    flops = monitor.count_training_flops(LinearDenoiser(), torch.randn(5, 3, 4, 4), torch.ones(5), None, 0)
    assert flops == 4 * 5 * 48 * 48
    assert monitor.mfu(1e9, 100.0, 1.0) == pytest.approx(0.1)


def test_logs_scalars_with_mfu_and_writes_a_sample_grid(tmp_path):
    t = trainer(tmp_path, peak_tflops=1.0, total_images=8, log_images=8, sample_steps=1)
    assert set(t.flops_per_image) == {0, 1} and t.flops_per_image[0] > t.flops_per_image[1] > 0
    t.run()
    rows = [json.loads(line) for line in (tmp_path / "scalars.jsonl").read_text().splitlines()]
    assert [r["images"] for r in rows] == [8]
    row = rows[0]
    assert {"loss", "lr", "img_per_s", "mfu", "loss/stage0", "loss/stage1", "grad_norm"} <= set(row)
    assert any(k.startswith("loss_sigma/") for k in row) and 0 < row["mfu"] < 1
    path = t.sample_grid()
    image = Image.open(path)
    assert image.size == (2 * 16, 16)  # two prompts side by side at 16 px
    assert np.asarray(image).std() > 0


def test_train_command_runs_and_reports_bad_input(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--preset", "tiny-cpu", "--out", str(out), "--data", "synthetic:8", "--set", "text_encoder=none",
            "--set", "batch_size=2", "--set", "total_images=2", "--set", "text_cache=false"]
    assert edify_main(args) == 0
    assert ckpt.latest_checkpoint(out).name == "ckpt-000000000002"
    assert edify_main(args) == 2  # refuses to overwrite without --resume
    assert "--resume" in capsys.readouterr().err
    assert edify_main(args + ["--set", "lr=abc"]) == 2
    assert "lr must be float, got 'abc'" in capsys.readouterr().err
    assert edify_main(["train", "--preset", "emoji-64", "--print-config"]) == 0
    assert json.loads(capsys.readouterr().out)["model"] == "emoji-64"
    # a checkpoint's config.json reproduces the run's config
    saved = ckpt.latest_checkpoint(out) / "config.json"
    assert edify_main(["train", "--config", str(saved), "--print-config"]) == 0
    assert json.loads(capsys.readouterr().out) == json.loads(saved.read_text())
    assert edify_main(["train", "--config", str(tmp_path / "missing.json")]) == 2
    assert "training config file not found" in capsys.readouterr().err


def _write_shard(path, n=6, side=24):
    rng = np.random.default_rng(0)
    with tarfile.open(path, "w") as tar:
        for i in range(n):
            png = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)).save(png, format="PNG")
            meta = json.dumps({"caption": f"icon {i}", "style": ["flat", "glossy"][i % 2], "weight": 1.0}).encode()
            for name, data in ((f"{i:04d}.png", png.getvalue()), (f"{i:04d}.json", meta)):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_trains_from_a_webdataset_shard_and_resumes_exactly(tmp_path):
    shard = tmp_path / "data" / "train" / "shard-000000.tar"  # the layout `edify data emoji` writes
    shard.parent.mkdir(parents=True)
    _write_shard(shard)
    data = str(shard.parent.parent)
    straight = trainer(tmp_path / "a", data=data).run(max_steps=4).losses
    first = trainer(tmp_path / "b", data=data)
    part = first.run(max_steps=1).losses
    assert first.stream.state_dict() == {"kind": "loader", "epoch": 0, "batches": 1}
    resumed = trainer(tmp_path / "b", data=data)
    assert resumed.stream.state_dict() == {"kind": "loader", "epoch": 0, "batches": 1}
    assert part + resumed.run(max_steps=3).losses == straight  # 4 steps x 2 images wrap the 6-image shard
    batch = resumed.stream.next()
    assert batch.image.shape == (2, 3, 16, 16) and batch.image.min() >= -1 and batch.image.max() <= 1
    assert set(batch.style) <= {"flat", "glossy"} and all(c.startswith("icon ") for c in batch.caption)


def test_condition_dropout_reaches_the_denoiser(tmp_path):
    seen = []
    t = trainer(tmp_path, cond_drop={"text": 1.0, "media": 0.0})
    real = t.denoiser

    def spy(x, sigma, cond, stage):
        seen.append(cond)
        return real(x, sigma, cond, stage)

    t.denoiser = spy
    t.train_step()
    t.config = t.config.replace(cond_drop={"text": 0.0, "media": 1.0})
    t.train_step()
    dropped_text, dropped_media = seen
    assert not dropped_text.text_mask.any() and (dropped_text.media >= 0).all()
    assert dropped_media.text_mask.any(dim=1).all() and (dropped_media.media == -1).all()


def test_stage_dropout_acts_only_on_its_stage_and_resumes_exactly(tmp_path):
    # round robin over stages (0, 1): stage 1 trains with dropout 0.5, stage 0 with none
    t = trainer(tmp_path / "on", stage_dropout=(0.0, 0.5))
    off = trainer(tmp_path / "off")
    rates = {}
    for _ in range(2):
        a, b = t.train_step(), off.train_step()
        rates[t.last_stage] = {m.p for m in t.net.modules() if isinstance(m, nn.Dropout)}
        if t.last_stage == 0:
            assert a == b  # no dropout on stage 0: the same step as the run without the option
        else:
            assert a != b  # half the residual features dropped change the loss
    assert rates == {0: {0.0}, 1: {0.5}}
    # the dropout draws come from the generator the checkpoint keeps: a resumed run repeats them
    straight = trainer(tmp_path / "a", stage_dropout=(0.0, 0.5)).run(max_steps=4).losses
    first = trainer(tmp_path / "b", stage_dropout=(0.0, 0.5)).run(max_steps=2).losses
    assert first + trainer(tmp_path / "b", stage_dropout=(0.0, 0.5)).run(max_steps=2).losses == straight
    with pytest.raises(EdifyError, match="stage_dropout needs 2 values in"):
        trainer(tmp_path / "bad", stage_dropout=(0.0, 1.0))


def test_per_sample_loss_weights_scale_the_loss(tmp_path):
    # Same seeds, same data: weight 2 doubles the loss exactly; weight 0 leaves the weights alone.
    losses = {}
    for w in (1.0, 2.0, 0.0):
        t = trainer(tmp_path / str(w), grad_clip=0.0)
        t.stream.weights.fill_(w)
        before = {k: v.clone() for k, v in t.model.state_dict().items()}
        losses[w] = t.train_step()
        if w == 0.0:
            assert all(torch.equal(v, before[k]) for k, v in t.model.state_dict().items())
    assert losses[2.0] == 2 * losses[1.0] and losses[0.0] == 0.0
    unweighted = trainer(tmp_path / "off", grad_clip=0.0, weight_key="")
    unweighted.stream.weights.fill_(5.0)  # ignored without a weight key
    assert unweighted.train_step() == losses[1.0]


def test_exported_model_folder_generates_with_the_ema_weights(tmp_path):
    t = trainer(tmp_path / "run")
    t.run(max_steps=2)
    folder = export_pipeline(tmp_path / "run", tmp_path / "model")
    pipe = TextToImagePipeline.from_pretrained(folder, text_encoder=WordHashEncoder())
    ema = t.ema.state_dict(t.model)
    for k, v in pipe.network.state_dict().items():
        assert torch.equal(v, ema[k])
    assert (pipe.config.levels, pipe.config.switch_sigmas, pipe.config.styles) == (2, (2.0,), ("flat", "glossy"))
    out = pipe("a red heart", style="glossy", seed=0, num_steps=2, output_type="tensor")
    assert out.images.shape == (1, 3, 16, 16) and torch.isfinite(out.images).all()


def test_several_processes_without_a_dist_mode_are_refused(tmp_path, monkeypatch):
    from edify.training import distributed

    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    with pytest.raises(EdifyError, match="2 processes need dist='ddp' or 'fsdp'"):
        trainer(tmp_path)
    with pytest.raises(EdifyError, match="multiple of the world size 2, got 3 / 1"):
        trainer(tmp_path, dist="ddp", batch_size=3)


def test_warm_start_from_an_exported_model_and_checkpoints_win_on_resume(tmp_path):
    t = trainer(tmp_path / "run")
    t.run(max_steps=2)
    folder = export_pipeline(tmp_path / "run", tmp_path / "model")
    saved = TextToImagePipeline.from_pretrained(folder, text_encoder=WordHashEncoder()).network.state_dict()
    w = trainer(tmp_path / "warm", init_from=str(folder), seed=1)
    assert w.state.images == 0  # a fresh run: counters, optimizer and data start afresh
    net, ema = w.net.state_dict(), w.ema.state_dict(w.model)
    for k, v in saved.items():
        assert torch.equal(net[k], v) and torch.equal(ema[k], v)
    w.run(max_steps=1)
    moved = w.net.state_dict()
    assert any(not torch.equal(moved[k], saved[k]) for k in saved)  # it trains from there
    again = trainer(tmp_path / "warm", init_from=str(folder), seed=1)  # resume: the checkpoint wins
    assert again.state.images == w.state.images
    assert all(torch.equal(again.net.state_dict()[k], moved[k]) for k in moved)
    with pytest.raises(EdifyError, match="another config"):
        trainer(tmp_path / "other", init_from=str(folder),
                model={**w.net.config.to_dict(), "num_res_blocks": 2})


def test_a_warm_start_may_grow_the_saved_network_keeping_its_function(tmp_path):
    trainer(tmp_path / "run").run(max_steps=2)
    folder = export_pipeline(tmp_path / "run", tmp_path / "model")
    saved = TextToImagePipeline.from_pretrained(folder, text_encoder=WordHashEncoder()).network.eval()
    cfg = saved.config.to_dict()
    assert 0 not in cfg["cross_attention_levels"] and "pooled_cond" not in cfg  # written only when set
    grown_cfg = {**cfg, "cross_attention_levels": [0, *cfg["cross_attention_levels"]], "pooled_cond": True}
    w = trainer(tmp_path / "grow", init_from=str(folder), model=grown_cfg)
    grown = w.net.eval()
    added = set(grown.state_dict()) - set(saved.state_dict())
    assert "cond_embed.to_emb.weight" in added and any(k.startswith("down.0.attn.") for k in added)
    for k, v in saved.state_dict().items():
        assert torch.equal(grown.state_dict()[k], v)
    torch.manual_seed(0)
    side = cfg["reference_resolution"]
    x, c_noise = torch.randn(2, 3, side, side), torch.tensor([0.3, -1.0])
    cond = Cond(text=torch.randn(2, 4, cfg["text_dim"]), text_mask=torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]]).bool(),
                media=torch.tensor([0, -1]))
    with torch.no_grad():
        torch.testing.assert_close(grown(x, c_noise, cond), saved(x, c_noise, cond))  # the same function
    w.run(max_steps=2)
    assert any(w.net.state_dict()[k].abs().sum() > 0 for k in added if "proj_out" in k)  # the new blocks train
    export_pipeline(tmp_path / "grow", tmp_path / "grown")
    with pytest.raises(EdifyError, match="does not grow"):  # a saved network is never shrunk
        trainer(tmp_path / "shrink", init_from=str(tmp_path / "grown"))
    with pytest.raises(EdifyError, match="does not grow"):
        trainer(tmp_path / "wider", init_from=str(folder), model={**cfg, "mlp_ratio": cfg["mlp_ratio"] + 1})


def test_export_records_the_training_history_across_warm_starts(tmp_path):
    t = trainer(tmp_path / "run")
    t.run(max_steps=2)
    first = export_pipeline(tmp_path / "run", tmp_path / "model")
    h1 = json.loads((first / "training.json").read_text())
    assert [r["images"] for r in h1["runs"]] == [4] and h1["images_total"] == 4
    w = trainer(tmp_path / "warm", init_from=str(first))
    w.run(max_steps=3)
    second = export_pipeline(tmp_path / "warm", tmp_path / "model2", card=True,
                             manifest=tmp_path / "no-manifest.json")
    h2 = json.loads((second / "training.json").read_text())
    assert [r["images"] for r in h2["runs"]] == [4, 6] and h2["images_total"] == 10
    assert h2["runs"][1]["init_from"] == str(first)
    card = (second / "README.md").read_text()
    assert "Images seen in all: 10." in card and "| warm | 6 | 3 |" in card
    # the run recorded the first model's history when it started: replacing that folder later (here
    # by an export of this very run, as when a continuation is shipped in place) changes nothing
    snapshot = json.loads((tmp_path / "warm" / "init_model.json").read_text())
    assert snapshot["model"] == str(first) and snapshot["history"] == h1
    shutil.copytree(second, first, dirs_exist_ok=True)
    again = json.loads((export_pipeline(tmp_path / "warm", tmp_path / "model2b") / "training.json").read_text())
    assert again == h2
    # a run without that record (written before it existed) reads the folder as it is now
    (tmp_path / "warm" / "init_model.json").unlink()
    (first / "training.json").unlink()  # an init model without a history: the total is unknown
    third = export_pipeline(tmp_path / "warm", tmp_path / "model3")
    h3 = json.loads((third / "training.json").read_text())
    assert h3["images_total"] is None and h3["runs"][0] == {"model": str(first), "images": None}


def test_a_continued_model_keeps_the_sampling_defaults_of_the_model_it_continues(tmp_path):
    trainer(tmp_path / "run").run(max_steps=1)
    first = export_pipeline(tmp_path / "run", tmp_path / "model")
    preset = json.loads((first / "config.json").read_text())["defaults"]
    # the defaults measured for the first model, written into its folder as a user would ship them
    config = json.loads((first / "config.json").read_text())
    config["defaults"] = {**config["defaults"], "guidance_scale": [5.0, 7.0], "sampler": "dpmpp_2m_sde",
                          "eta": [1.0, 0.0], "sigma_min": 0.4, "num_steps": 12}
    (first / "config.json").write_text(json.dumps(config))
    w = trainer(tmp_path / "warm", init_from=str(first))
    w.run(max_steps=1)
    second = export_pipeline(tmp_path / "warm", tmp_path / "model2", card=True, manifest=tmp_path / "none.json")
    assert json.loads((second / "config.json").read_text())["defaults"] == config["defaults"]
    assert "Defaults: 12 sampler steps over all stages, guidance scale 5, 7." in (second / "README.md").read_text()
    pipe = TextToImagePipeline.from_pretrained(second, text_encoder=WordHashEncoder())
    assert pipe.config.defaults.sampler == "dpmpp_2m_sde" and pipe.config.defaults.eta == (1.0, 0.0)
    # turned off, or with the first folder gone or holding another model: the preset's settings
    off = export_pipeline(tmp_path / "warm", tmp_path / "model3", inherit_defaults=False)
    assert json.loads((off / "config.json").read_text())["defaults"] == preset
    # the record of the first model taken when the run started wins over the folder as it is now
    (first / "config.json").write_text(json.dumps({**config, "defaults": {}}))
    assert json.loads((export_pipeline(tmp_path / "warm", tmp_path / "model3b") / "config.json").read_text())[
        "defaults"] == config["defaults"]
    (tmp_path / "warm" / "init_model.json").unlink()  # a run from before the record: the folder now
    config["styles"] = ["flat", "glossy", "matte"]
    (first / "config.json").write_text(json.dumps(config))
    other = export_pipeline(tmp_path / "warm", tmp_path / "model4")
    assert json.loads((other / "config.json").read_text())["defaults"] == preset
    shutil.rmtree(first)
    gone = export_pipeline(tmp_path / "warm", tmp_path / "model5")
    assert json.loads((gone / "config.json").read_text())["defaults"] == preset
