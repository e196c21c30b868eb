"""Where and how the commands compute: `--device`, `--threads`, batch sizes, progress, sanity checks.

    device = resolve_device("cuda")      # torch.device, or EdifyError naming what is available
    with threads(default_threads()):     # torch's CPU threads for the duration, then restored
        ...

This module imports torch only inside the functions that need it, so that argument parsers can
use its defaults (`default_threads`, `available_cpus`) without the start-up cost of torch.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

from edify.errors import EdifyError

# Images per generation batch when --batch-size is not given: a CPU gains little from larger
# batches and holds them in memory; an accelerator needs large ones to be busy.
DEFAULT_BATCH_SIZE = {"cpu": 16}
DEFAULT_ACCELERATOR_BATCH_SIZE = 64


# Where bf16 matrix products run this many times slower than fp32 ones, the CPU has no bf16 dot
# products of its own (AVX512-BF16, AMX, Arm's BF16) and torch emulates them: bf16 autocast then
# trains slower, not faster (bench/README.md, cpu_train.py: 0.07x the fp32 throughput on an AVX2-only CPU).
BF16_SLOW_CPU_FACTOR = 2.0


# ---------------------------------------------------------------------------------------------
# Devices


def available_devices() -> list[str]:
    """What `--device` accepts on this machine: cpu, cuda:N for each visible GPU, mps if usable."""
    import torch

    names = ["cpu"]
    if torch.cuda.is_available():
        names += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if _mps_available():
        names.append("mps")
    return names


def _mps_available() -> bool:
    import torch

    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def _cuda_problem(index: int | None) -> str | None:
    """Why `cuda[:index]` cannot be used here, or None when it can."""
    import torch

    if torch.version.cuda is None and not torch.cuda.is_available():
        return f"this torch build ({torch.__version__}) has no CUDA support"
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible"
    count = torch.cuda.device_count()
    if index is not None and index >= count:
        return f"there {'is' if count == 1 else 'are'} {count} CUDA GPU{'' if count == 1 else 's'}"
    return None


def resolve_device(name: str) -> "torch.device":  # noqa: F821 - torch is imported lazily
    """The torch.device for a `--device` value, checked against this machine.

    Accepts cpu, cuda, cuda:N and mps; anything else, or a device this machine or torch build
    lacks, raises EdifyError naming the device and listing the available ones.
    """
    import torch

    text = str(name).strip().lower()
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps"):
        raise EdifyError(f"unknown device {name!r}; available here: {', '.join(available_devices())}")
    problem = None
    if device.type == "cuda":
        problem = _cuda_problem(device.index)
    elif device.type == "mps" and not _mps_available():
        problem = "MPS (Apple GPU) is not available"
    if problem:
        raise EdifyError(f"device {name!r} is not available: {problem}; available here: "
                         f"{', '.join(available_devices())}")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def default_batch_size(device) -> int:
    """Images per generation batch on `device` (a torch.device or its name)."""
    kind = getattr(device, "type", str(device).split(":")[0])
    return DEFAULT_BATCH_SIZE.get(kind, DEFAULT_ACCELERATOR_BATCH_SIZE)


# ---------------------------------------------------------------------------------------------
# CPU threads


def available_cpus() -> int:
    """The CPU cores this process may run on (its affinity mask, e.g. a container's share)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity masks on this platform (macOS, Windows)
        return os.cpu_count() or 1


def default_threads() -> int:
    """torch threads when `--threads` is not given: $OMP_NUM_THREADS when set, else the usable
    cores divided among the processes a launcher started on this machine ($LOCAL_WORLD_SIZE)."""
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    local = os.environ.get("LOCAL_WORLD_SIZE", "1").strip()
    processes = int(local) if local.isdigit() and int(local) > 0 else 1
    return max(1, available_cpus() // processes)


def threads_help(workers: bool = False) -> str:
    """The --threads help, with this machine's default."""
    text = (f"CPU threads for torch (default here: {default_threads()}; $OMP_NUM_THREADS if set, else "
            "the cores this process may use, divided among torchrun's processes on this machine)")
    return text + ("; each data-loading worker process uses 1 thread" if workers else "")


def check_threads(n: int | None) -> int:
    """`--threads` checked (None -> `default_threads()`)."""
    if n is None:
        return default_threads()
    if n < 1:
        raise EdifyError(f"--threads must be >= 1, got {n}")
    return n


@contextlib.contextmanager
def threads(n: int | None) -> Iterator[int]:
    """Run the body with `n` torch CPU threads (None: `default_threads()`), then restore the count."""
    import torch

    n = check_threads(n)
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield n
    finally:
        torch.set_num_threads(before)


def single_thread_worker(worker_id: int) -> None:
    """A DataLoader `worker_init_fn`: one torch thread per worker process, so that N workers next
    to the main process do not start N x cores threads that compete for the same cores."""
    import torch

    torch.set_num_threads(1)


def add_runtime_arguments(parser, device_default: str | None = "cpu", quiet: bool = True,
                          workers: bool = False) -> None:
    """--device, --threads (and --quiet) as every command that computes spells them."""
    where = f"default: {device_default}" if device_default else "default: cuda:LOCAL_RANK if a GPU is visible, else cpu"
    parser.add_argument("--device", default=device_default,
                        help=f"cpu, cuda, cuda:N or mps ({where}); an unavailable one is an error listing "
                             "the available ones")
    parser.add_argument("--threads", type=int, default=None, metavar="N", help=threads_help(workers))
    if quiet:
        parser.add_argument("--quiet", action="store_true",
                            help="no progress bar (it is drawn on stderr only when stderr is a terminal)")


# ---------------------------------------------------------------------------------------------
# Progress and numerical sanity


def progress_enabled(quiet: bool) -> bool:
    """Progress bars are drawn on stderr only when it is a terminal and --quiet was not given."""
    return not quiet and sys.stderr.isatty()


class Progress:
    """A tqdm bar on stderr, created on the first update (a step that never runs draws nothing)."""

    def __init__(self, total: int, desc: str, enabled: bool, unit: str = "img"):
        self.total, self.desc, self.enabled, self.unit = total, desc, enabled, unit
        self._bar = None

    def _get(self):
        if self._bar is None and self.enabled:
            from tqdm import tqdm

            self._bar = tqdm(total=self.total, desc=self.desc, unit=self.unit, file=sys.stderr,
                             dynamic_ncols=True)
        return self._bar

    def update(self, n: int) -> None:
        if self._get() is not None:
            self._bar.update(n)

    def note(self, text: str) -> None:
        """Text after the counts, e.g. the sampler step of the batch in flight."""
        if self._get() is not None:
            self._bar.set_postfix_str(text, refresh=True)

    def write(self, line: str) -> None:
        """A line on stdout that does not break the bar."""
        if self._bar is not None:
            self._bar.write(line, file=sys.stdout)
        else:
            print(line, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def all_finite(x) -> bool:
    """Whether tensor `x` holds no NaN and no infinity."""
    import torch

    return bool(torch.isfinite(x).all())


def bf16_matmul_slowdown(size: int = 192, reps: int = 3) -> float:
    """How many times longer a bf16 matrix product of size x size takes than an fp32 one on this
    CPU, at the current thread count (the best of `reps` timings each, after one warm-up): below
    about 1 where the CPU has bf16 dot products, tens where torch emulates them. About 0.1 s."""
    import time

    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)

    def best(x, y) -> float:
        x @ y
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            x @ y
            times.append(time.perf_counter() - start)
        return max(min(times), 1e-9)

    return best(a.bfloat16(), b.bfloat16()) / best(a, b)


def bf16_cpu_warning(slowdown: float) -> str | None:
    """The one-line warning for bf16 autocast on a CPU whose bf16 products are `slowdown` times
    slower than fp32 ones (`bf16_matmul_slowdown`), or None where bf16 is not slower."""
    if slowdown < BF16_SLOW_CPU_FACTOR:
        return None
    return (f"edify: warning: bf16 matrix products run {slowdown:.0f}x slower than fp32 on this CPU (it has no "
            f"bf16 dot products: AVX512-BF16, AMX or Arm BF16); precision=bf16 will train slower than "
            f"precision=fp32 here")
