"""Multi-process training: 2 CPU processes under torchrun (gloo), with DDP and with FSDP2.

Each run launches `tests/_torchrun_worker.py` through `python -m torch.distributed.run
--nproc_per_node 2 --standalone` and trains the tiny config for two steps of two accumulated
micro-batches. Both modes must finish, write exactly one checkpoint in the common full-state
format, and train the same model: DDP and FSDP2 see the same data, seeds and initial weights, so
their losses and weights agree to float rounding, and either checkpoint resumes in one process.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from _training_helpers import WordHashEncoder, tiny_config
from edify.training import checkpoint as ckpt
from edify.training.loop import Trainer

WORKER = Path(__file__).with_name("_torchrun_worker.py")

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


def launch(folder: Path, *args: str, timeout: float = 300) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
         str(WORKER), *args[:1], str(folder), *args[1:]],
        capture_output=True, text=True, timeout=timeout, env=env, cwd=WORKER.parent)
    assert proc.returncode == 0, f"{args} run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = {}
    for mode in ("ddp", "fsdp"):
        out[mode] = tmp_path_factory.mktemp(mode)
        launch(out[mode], mode)
    return out


def test_ranks_agree_to_stop_on_a_time_budget(tmp_path):
    # rank 1's clock crosses max_minutes after the first step, rank 0's never does: both must stop
    # after that step, log and checkpoint together (a rank stopping alone leaves the other hanging
    # in the next step's all-reduce, which the timeout here turns into a failure)
    launch(tmp_path, "ddp", "skew", timeout=180)
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["stop"] == "max_minutes" and result["images"] == 8 and len(result["losses"]) == 1
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["ckpt-000000000008"]
    record = json.loads((tmp_path / "runs.jsonl").read_text().splitlines()[-1])
    assert record["stop"] == "max_minutes" and record["images"] == 8


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_process_run_finishes_with_one_checkpoint(runs, mode):
    folder = runs[mode]
    result = json.loads((folder / "result.json").read_text())
    assert result["world"] == 2 and result["images"] == 16 and len(result["losses"]) == 2
    assert [p.name for p in ckpt.list_checkpoints(folder)] == ["ckpt-000000000016"]
    meta = ckpt.read_meta(folder / "ckpt-000000000016")
    assert meta["world_size"] == 2 and meta["data"] == {"kind": "synthetic", "consumed": 16}
    # per-rank RNG states of both ranks are kept
    assert {k.split(".")[0] for k in load_file(folder / "ckpt-000000000016" / "rng.safetensors")} == {"rank0", "rank1"}


def test_ddp_and_fsdp_train_the_same_model(runs):
    ddp = json.loads((runs["ddp"] / "result.json").read_text())
    fsdp = json.loads((runs["fsdp"] / "result.json").read_text())
    assert ddp["losses"][0] == fsdp["losses"][0]  # same weights, data and noise before any update
    assert fsdp["losses"] == pytest.approx(ddp["losses"], rel=1e-5)
    for name in ("model", "ema", "optimizer"):
        a = load_file(runs["ddp"] / "ckpt-000000000016" / f"{name}.safetensors")
        b = load_file(runs["fsdp"] / "ckpt-000000000016" / f"{name}.safetensors")
        assert a.keys() == b.keys()  # one format: full, unsharded, keyed by parameter name
        for k in a:
            assert torch.allclose(a[k].float(), b[k].float(), atol=1e-5), (name, k)
    structure_a = (runs["ddp"] / "ckpt-000000000016" / "optimizer.json").read_text()
    assert structure_a == (runs["fsdp"] / "ckpt-000000000016" / "optimizer.json").read_text()


def test_fsdp_checkpoint_resumes_in_one_process(runs):
    # dist may change on resume: the checkpoint format is the same for every mode
    config = tiny_config(dist="none", batch_size=8, grad_accum=2, total_images=24, checkpoint_images=16,
                         log_images=8)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a busy 2-core machine: avoid OpenMP threads spinning against each other
    try:
        t = Trainer(config, runs["fsdp"], resume=True, text_encoder=WordHashEncoder())
        assert t.state.images == 16 and t.stream.state_dict()["consumed"] == 16
        saved = load_file(runs["fsdp"] / "ckpt-000000000016" / "model.safetensors")
        for k, v in t.model.state_dict().items():
            assert torch.equal(v, saved[k])
        result = t.run()
    finally:
        torch.set_num_threads(threads)
    assert result.images == 24 and len(result.losses) == 1
