"""edify.runtime: --device resolution, --threads defaults and scoping, DataLoader worker threads."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from edify import runtime
from edify.errors import EdifyError


def test_cpu_resolves_and_unknown_devices_list_what_is_available():
    assert runtime.resolve_device("cpu") == torch.device("cpu")
    assert runtime.resolve_device(" CPU ") == torch.device("cpu")
    with pytest.raises(EdifyError, match=r"unknown device 'tpu'; available here: cpu") as info:
        runtime.resolve_device("tpu")
    assert "\n" not in str(info.value)
    with pytest.raises(EdifyError, match="unknown device 'meta'"):
        runtime.resolve_device("meta")  # a torch device type, but nothing can be generated on it
    assert runtime.available_devices()[0] == "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_names_the_device_and_the_alternatives():
    for name in ("cuda", "cuda:1"):
        with pytest.raises(EdifyError, match=rf"device '{name}' is not available: .*; available here: cpu$"):
            runtime.resolve_device(name)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_resolves_to_an_indexed_device_and_rejects_a_missing_index():
    assert runtime.resolve_device("cuda").type == "cuda"
    with pytest.raises(EdifyError, match="CUDA GPU"):
        runtime.resolve_device(f"cuda:{torch.cuda.device_count()}")


def test_default_threads_follow_omp_then_affinity_then_local_processes(monkeypatch):
    monkeypatch.setattr(runtime.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5}, raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert runtime.default_threads() == 3
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert runtime.available_cpus() == 6 and runtime.default_threads() == 6
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # torchrun: four processes share the six cores
    assert runtime.default_threads() == 1
    assert "default here: 1" in runtime.threads_help()


def test_threads_apply_inside_and_are_restored():
    before = torch.get_num_threads()
    with runtime.threads(1) as n:
        assert n == 1 and torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with pytest.raises(EdifyError, match="--threads must be >= 1, got 0"):
        with runtime.threads(0):
            pass


class _Threads(Dataset):
    def __len__(self):
        return 2

    def __getitem__(self, i):
        return torch.get_num_threads()


def test_dataloader_workers_run_one_thread_each():
    with runtime.threads(2):
        loader = DataLoader(_Threads(), batch_size=None, num_workers=1, worker_init_fn=runtime.single_thread_worker)
        assert list(loader) == [1, 1]


def test_default_batch_sizes():
    assert runtime.default_batch_size(torch.device("cpu")) == 16
    assert runtime.default_batch_size("cuda:0") == 64


def test_non_finite_checks():
    assert runtime.all_finite(torch.zeros(3))
    assert not runtime.all_finite(torch.tensor([0.0, float("inf")]))
    assert not runtime.all_finite(torch.tensor([float("nan")]))


def test_progress_without_a_terminal_draws_nothing(capsys):
    bar = runtime.Progress(3, "x", enabled=False)
    bar.note("step 1")
    bar.update(1)
    bar.write("line")
    bar.close()
    out, err = capsys.readouterr()
    assert out == "line\n" and err == ""
    assert not runtime.progress_enabled(quiet=True)


def test_importing_runtime_does_not_import_torch():
    code = "import sys, edify.runtime as r; r.default_threads(); r.threads_help(); assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
