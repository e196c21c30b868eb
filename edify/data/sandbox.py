"""Untrusted work (rendering icons from downloaded SVG) in worker processes that cannot hang a build.

Why: resvg is native code. A malformed icon makes it panic (pyo3's `PanicException` is a
`BaseException`, so `except Exception` misses it), a hostile one can overflow its stack (the
process dies) or allocate until the machine runs out of memory. `multiprocessing.Pool` loses the
task of a worker that dies and then waits for its result forever. Here each worker is a child
process with its own pipe; the parent waits on the pipes, the process sentinels and a deadline at
once, turns a worker that dies, overruns its time or runs out of memory into a `Failed` result for
that one task, and starts a fresh worker for the next. Results come back in task order.

Each worker
- caps its address space (`RLIMIT_AS`, a budget above what it maps once started) and, per task,
  its CPU time (`RLIMIT_CPU`), so a runaway task ends even if the parent is gone;
- ignores SIGINT: Ctrl-C reaches the whole process group and only the parent should answer it;
- writes nothing to stderr once started (a panic's message is kept in `Failed.detail`) and exits
  quietly when its pipe closes, so a stopped or killed build leaves no worker tracebacks.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
from dataclasses import dataclass
from multiprocessing.connection import wait
from typing import Any, Callable, Iterable, Iterator

try:
    import resource
except ImportError:  # not on Windows: the time limit still holds there, the memory cap does not
    resource = None  # type: ignore[assignment]

WINDOW_PER_WORKER = 64  # results held back, per worker, while an earlier task is still running


@dataclass(frozen=True)
class Failed:
    """A task without a result: 'timeout', 'crashed', 'out_of_memory', 'panic' or 'error'."""

    reason: str
    detail: str = ""


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0][:200]}" if text else type(err).__name__


def _mapped_bytes() -> int | None:
    """The address space this process maps now (Linux), or None where that is unknown."""
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _set_soft_limit(kind: int, value: int) -> None:
    soft, hard = resource.getrlimit(kind)
    if hard != resource.RLIM_INFINITY:
        value = min(value, hard)
    resource.setrlimit(kind, (value, hard))


def _limit_memory(megabytes: int) -> None:
    """Cap the address space at what is mapped now plus `megabytes`; no core files either.

    Measured rather than absolute because the baseline (libraries, thread stacks) differs
    between machines by hundreds of MB.
    """
    if resource is None:
        return
    _set_soft_limit(resource.RLIMIT_CORE, 0)  # a crash of a hostile icon is expected, not a bug report
    mapped = _mapped_bytes()
    if megabytes > 0 and mapped is not None:
        _set_soft_limit(resource.RLIMIT_AS, mapped + megabytes * 2**20)


def _limit_cpu(seconds: float) -> None:
    """Let the next task use at most `seconds` more CPU time (SIGXCPU ends the process after)."""
    if resource is None:
        return
    usage = resource.getrusage(resource.RUSAGE_SELF)
    _set_soft_limit(resource.RLIMIT_CPU, int(usage.ru_utime + usage.ru_stime + seconds) + 2)


def _call(func: Callable[[Any], Any], task: Any) -> Any:
    try:
        return func(task)
    except MemoryError:
        return Failed("out_of_memory", "the task exceeded the worker's memory limit")
    except BaseException as err:  # noqa: BLE001 - a panic in native code is a BaseException
        return Failed("panic" if type(err).__name__ == "PanicException" else "error", _first_line(err))


def _silence_stderr() -> None:
    """Native code prints panics straight to fd 2; the parent reports failures instead."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    os.close(devnull)


def _serve(conn, func: Callable[[Any], Any], megabytes: int, seconds: float) -> None:
    """Worker loop: receive a task, answer with its result or a `Failed`; None or EOF ends it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _limit_memory(megabytes)
    _silence_stderr()
    while True:
        try:
            task = conn.recv()
        except (EOFError, OSError):  # the parent is gone
            return
        if task is None:
            return
        _limit_cpu(seconds)
        reply = _call(func, task)
        try:
            conn.send(reply)
        except (OSError, ValueError):  # the parent is gone (broken pipe)
            return
        except Exception as err:  # noqa: BLE001 - a result that does not pickle
            conn.send(Failed("error", _first_line(err)))


def _context() -> multiprocessing.context.BaseContext:
    """forkserver where there is one (forks from a clean, preloaded process: fast, thread-safe)."""
    if "forkserver" in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("forkserver")
    return multiprocessing.get_context("spawn")


def _death(process: multiprocessing.process.BaseProcess) -> str:
    process.join(timeout=5)
    code = process.exitcode
    if code is not None and code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with status {code}"


class _Worker:
    """One child process, its end of the pipe, and the task it is working on (index, deadline)."""

    def __init__(self, ctx, func: Callable[[Any], Any], megabytes: int, seconds: float):
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_serve, args=(child, func, megabytes, seconds),
                                   name="edify-worker", daemon=True)
        self.process.start()
        child.close()
        self.index: int | None = None
        self.deadline = 0.0

    def submit(self, index: int, task: Any, seconds: float) -> None:
        self.conn.send(task)
        self.index, self.deadline = index, time.monotonic() + seconds

    def stop(self, kill: bool = False) -> None:
        """Ask an idle worker to exit; kill a busy one (or any, with `kill`). Never raises."""
        if self.index is not None:
            kill = True
        if not kill and self.process.is_alive():
            try:
                self.conn.send(None)
            except (OSError, ValueError):
                kill = True
        self.conn.close()
        self.process.join(timeout=0 if kill else 2)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(timeout=5)


class IsolatedPool:
    """Map `func` over tasks in `workers` child processes, each task with a time and memory limit.

    `func` must be a module-level function (it is pickled by reference). A task whose worker dies,
    overruns `seconds` of wall time or exceeds `megabytes` of memory yields `Failed(reason)`;
    the pool goes on with a fresh worker. Use as a context manager: leaving it stops every worker.
    """

    def __init__(self, func: Callable[[Any], Any], workers: int = 1, seconds: float = 30.0,
                 megabytes: int = 2048):
        if workers < 1 or not seconds > 0:
            raise ValueError("IsolatedPool needs at least one worker and a positive time limit")
        self.func, self.seconds, self.megabytes = func, float(seconds), int(megabytes)
        self._slots: list[_Worker | None] = [None] * workers
        self._ctx = _context()
        if self._ctx.get_start_method() == "forkserver":
            self._ctx.set_forkserver_preload([__name__, func.__module__])

    def __enter__(self) -> "IsolatedPool":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for index, worker in enumerate(self._slots):
            if worker is not None:
                worker.stop()
            self._slots[index] = None

    def _worker(self, slot: int) -> _Worker:
        worker = self._slots[slot]
        if worker is None or not worker.process.is_alive():
            if worker is not None:
                worker.stop()
            worker = self._slots[slot] = _Worker(self._ctx, self.func, self.megabytes, self.seconds)
        return worker

    def _submit(self, slot: int, index: int, task: Any, done: dict[int, Any]) -> None:
        """Send a task, with one retry on a fresh worker if the pipe is already broken."""
        for _ in range(2):
            worker = self._worker(slot)
            try:
                worker.submit(index, task, self.seconds)
                return
            except (OSError, ValueError):  # died before it read the task
                worker.stop(kill=True)
                self._slots[slot] = None
        done[index] = Failed("crashed", "the worker could not take the task")

    def _retire(self, slot: int, worker: _Worker, done: dict[int, Any], failure: Failed) -> None:
        """Record the failure of the worker's task and drop the worker (killed if still running)."""
        done[worker.index] = failure
        worker.stop(kill=True)
        self._slots[slot] = None

    def _collect(self, done: dict[int, Any]) -> None:
        """Wait for the first result, death or deadline among busy workers; record what happened."""
        busy = [(slot, w) for slot, w in enumerate(self._slots) if w is not None and w.index is not None]
        soonest = min(w.deadline for _, w in busy)
        ready = set(wait([w.conn for _, w in busy] + [w.process.sentinel for _, w in busy],
                         timeout=max(0.0, soonest - time.monotonic())))
        now = time.monotonic()
        for slot, worker in busy:
            if worker.conn in ready:
                try:
                    done[worker.index] = worker.conn.recv()
                    worker.index = None
                    continue
                except (EOFError, OSError):
                    pass  # died: handled below
            if worker.conn in ready or worker.process.sentinel in ready:
                self._retire(slot, worker, done, Failed("crashed", _death(worker.process)))
            elif now >= worker.deadline:
                self._retire(slot, worker, done, Failed("timeout", f"no result within {self.seconds:g} s"))

    def imap(self, tasks: Iterable[Any]) -> Iterator[Any]:
        """Results (or `Failed`) in the order of `tasks`, which is read lazily (None is no task)."""
        source, done = iter(tasks), {}
        next_in = next_out = 0
        exhausted, window = False, WINDOW_PER_WORKER * len(self._slots)
        while True:
            for slot in self._idle_slots():
                if exhausted or next_in >= next_out + window:
                    break
                try:
                    task = next(source)
                except StopIteration:
                    exhausted = True
                    break
                if task is None:
                    raise ValueError("IsolatedPool tasks must not be None (None stops a worker)")
                self._submit(slot, next_in, task, done)
                next_in += 1
            while next_out in done:
                yield done.pop(next_out)
                next_out += 1
            if len(self._idle_slots()) == len(self._slots):  # nothing in flight
                if exhausted and next_out == next_in:
                    return
                continue
            self._collect(done)

    def _idle_slots(self) -> list[int]:
        return [slot for slot, w in enumerate(self._slots) if w is None or w.index is None]
