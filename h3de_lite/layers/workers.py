"""Worker threads that run independent pieces of CPU work side by side, each piece single-threaded.

Why: PyTorch's CPU flash-attention kernel spreads one call over its (batch, head, query-block) items with OpenMP. On
V-BRA's short sequences (one region's T queries against its k·T routed keys, in 64-query blocks) a call gained less
from a second thread on the 2-core machine than dense attention's one long call did, and unevenly from run to run.
The chunks of query regions are independent, so V-BRA hands them to ``torch.get_num_threads()`` worker threads whose
ATen ops run on one thread each: the kernels run side by side, and no chunk waits for the other core inside a call.
``benchmarks/attention.py`` times both (methods ``gather`` and ``serial``; book/benchmark_attention.md).

A worker thread is made single-threaded with ``torch.set_num_threads(1)`` called in that thread; that call also sets
PyTorch's process-wide default that new threads start from, so the pool restores it (in the thread that created the
pool) once every worker has started. The calling thread keeps its own thread count throughout.

Tasks run with autograd off (they are kernel calls whose gradients the caller's ``autograd.Function`` handles), in
the caller's inference mode and CPU autocast state (thread-local in PyTorch). Under a dispatch or function mode
(``FlopCounterMode``, fake tensors, tracing), which sees only its own thread's ops, nothing runs on the workers.
:func:`chunk_parallelism` turns the whole mechanism off (``with chunk_parallelism(False): ...``) for comparisons and
benchmarks; the results are the same bit for bit (tested), since each chunk's arithmetic does not depend on threads.

Before it hands work to the workers, :meth:`ChunkWorkers.map` lets the calling thread's idle OpenMP threads go
(:func:`release_openmp_threads`). GNU OpenMP (libgomp, which PyTorch's Linux wheels use) keeps a thread that has
finished its share of a parallel operation spinning on its core for a while before it sleeps. V-BRA's lanes start
right after the projections and the routing, parallel operations of the calling thread, so that thread's idle
OpenMP thread spun on a core a lane needed. Released, it is gone; the next parallel operation of the calling thread
starts a new one. ``benchmarks/openmp_release.py`` measures both ways (book/benchmark_attention.md);
:func:`openmp_release` turns the release off.

Explained in book/benchmark_attention.md.
"""

from __future__ import annotations

import ctypes
import functools
import os
import queue
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from contextlib import AbstractContextManager, ExitStack, contextmanager
from typing import NamedTuple, TypeVar

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

__all__ = [
    "ChunkClaims",
    "ChunkWorkers",
    "chunk_parallelism",
    "chunk_workers",
    "openmp_release",
    "parallel_chunks_enabled",
    "parallel_lanes",
    "release_openmp_threads",
]

_T = TypeVar("_T")
_R = TypeVar("_R")

_ENABLED = True
_RELEASE_OPENMP = True
_OMP_PAUSE_SOFT = 1  # omp_pause_soft, of OpenMP 5.0's omp_pause_resource_t
_POOL: ChunkWorkers | None = None
_POOL_LOCK = threading.Lock()
_LOCAL = threading.local()  # .worker: True in a pool's threads


class _CallerState(NamedTuple):
    """The caller's thread-local modes that decide what an op does: inference mode and CPU autocast."""

    inference: bool
    autocast: bool
    autocast_dtype: torch.dtype

    @classmethod
    def capture(cls) -> _CallerState:
        return cls(torch.is_inference_mode_enabled(), torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"))

    def applied(self) -> AbstractContextManager:
        """Autograd off (inference mode too, if the caller's), and the caller's CPU autocast."""
        stack = ExitStack()
        stack.enter_context(torch.inference_mode() if self.inference else torch.no_grad())
        stack.enter_context(torch.autocast("cpu", enabled=self.autocast, dtype=self.autocast_dtype))
        return stack


class ChunkWorkers:
    """A fixed set of daemon threads, each running its tasks on one thread with autograd off, in the caller's inference
    mode and CPU autocast state.

    Args:
        num_workers: how many threads (at least 2; one worker would only add a hand-over).

    Example:
        >>> pool = ChunkWorkers(num_workers=2)
        >>> pool.map(lambda i: i * i, [1, 2, 3])
        [1, 4, 9]
        >>> pool.close()
    """

    def __init__(self, *, num_workers: int) -> None:
        if num_workers < 2:
            raise ValueError(f"ChunkWorkers needs at least 2 workers, got {num_workers}")
        self.num_workers = num_workers
        self.pid = os.getpid()
        self._tasks: queue.SimpleQueue = queue.SimpleQueue()
        self._busy = threading.Lock()
        caller_threads = torch.get_num_threads()
        started = threading.Barrier(num_workers + 1)
        self._threads = [
            threading.Thread(target=self._run, args=(started,), name=f"h3de-chunk-{i}", daemon=True)
            for i in range(num_workers)
        ]
        for thread in self._threads:
            thread.start()
        try:
            started.wait()  # every worker has made itself single-threaded (which also set the process default to 1)
        except threading.BrokenBarrierError:
            raise RuntimeError("a ChunkWorkers thread failed to start (see the error printed above)") from None
        finally:
            torch.set_num_threads(caller_threads)  # restore the default new threads start from (and this thread's)

    def _run(self, started: threading.Barrier) -> None:
        try:
            torch.set_num_threads(1)  # this thread's OpenMP and MKL teams: one thread
            # PyTorch sets a thread's count from the process default at the thread's first query: make it now, while
            # the default is 1, or it would take the default the constructor restores.
            assert torch.get_num_threads() == 1
            _LOCAL.worker = True
        except BaseException:
            started.abort()  # the constructor raises instead of waiting for this thread
            raise
        started.wait()
        while True:
            task = self._tasks.get()
            if task is None:
                return
            fn, item, future, state = task
            result = None
            try:
                with state.applied():
                    result = fn(item)
            except BaseException as error:  # noqa: BLE001 - handed to the caller, re-raised there
                future.set_exception(error)
            else:
                future.set_result(result)
            # Drop the task before waiting for the next: its closure holds the caller's tensors (the whole kv, the
            # gradients), which would otherwise stay alive in this idle thread until the next call.
            del task, fn, item, future, state, result

    def map(self, fn: Callable[[_T], _R], items: Sequence[_T]) -> list[_R]:
        """``[fn(item) for item in items]``, the calls spread over the workers; the first error is re-raised.

        One caller at a time: with at most ``num_workers`` items, every item then has a thread of its own, so items
        may wait for each other (V-BRA's backward lanes do) without two callers' items deadlocking the pool.
        """
        state = _CallerState.capture()
        if _RELEASE_OPENMP:
            release_openmp_threads()  # or the caller's idle OpenMP threads spin on the cores the workers need
        with self._busy:
            futures: list[Future] = []
            for item in items:
                future: Future = Future()
                self._tasks.put((fn, item, future, state))
                futures.append(future)
            for future in futures:  # wait for all before raising the first error, in order
                future.exception()
        return [future.result() for future in futures]

    def close(self) -> None:
        """Stop the threads, once the call in progress (if any) has finished."""
        with self._busy:
            for _ in self._threads:
                self._tasks.put(None)
            for thread in self._threads:
                thread.join()


class ChunkClaims:
    """Indices ``0, 1, …, count − 1`` handed out one at a time, each to whichever worker lane asks first; then None.

    Dynamic scheduling of V-BRA's chunks: a lane whose core runs slower for a while (shared with other work, a
    descheduled thread) takes fewer chunks instead of leaving the other lanes idle at the end, as a fixed split
    (chunks ``i, i + W, …`` in lane ``i``) did; ``benchmarks/attention_kernel.py`` times both on V-BRA's kernel calls
    (book/benchmark_attention.md). Indices go out in increasing order, which the backward's in-order additions rely
    on. Thread-safe.

    Args:
        count: how many indices to hand out.

    Example:
        >>> claims = ChunkClaims(count=3)
        >>> list(iter(claims, None))
        [0, 1, 2]
    """

    def __init__(self, *, count: int) -> None:
        self._count = count
        self._next = 0
        self._lock = threading.Lock()

    def __call__(self) -> int | None:
        """The next unclaimed index, or None when all are taken."""
        with self._lock:
            index = self._next
            if index >= self._count:
                return None
            self._next = index + 1
            return index


def parallel_chunks_enabled() -> bool:
    """Whether V-BRA's CPU chunks may run on worker threads (see :func:`chunk_parallelism`)."""
    return _ENABLED


@contextmanager
def chunk_parallelism(enabled: bool) -> Iterator[None]:
    """Turn the worker threads on or off inside a ``with`` block (process-wide; on by default).

    Example:
        >>> with chunk_parallelism(False):
        ...     chunk_workers(8) is None
        True
    """
    global _ENABLED
    previous, _ENABLED = _ENABLED, bool(enabled)
    try:
        yield
    finally:
        _ENABLED = previous


@contextmanager
def openmp_release(enabled: bool) -> Iterator[None]:
    """Whether :meth:`ChunkWorkers.map` releases the caller's idle OpenMP threads, inside a ``with`` block
    (process-wide; on by default). Off, they spin until OpenMP puts them to sleep, as before: for comparisons
    (``benchmarks/openmp_release.py``). Same results either way.

    Example:
        >>> pool = ChunkWorkers(num_workers=2)
        >>> with openmp_release(False):
        ...     pool.map(abs, [-1, 2])
        [1, 2]
        >>> pool.close()
    """
    global _RELEASE_OPENMP
    previous, _RELEASE_OPENMP = _RELEASE_OPENMP, bool(enabled)
    try:
        yield
    finally:
        _RELEASE_OPENMP = previous


def release_openmp_threads() -> bool:
    """Let the calling thread's idle OpenMP threads go now, instead of letting them spin on their cores.

    Calls OpenMP 5.0's ``omp_pause_resource_all(omp_pause_soft)`` in every GNU OpenMP runtime (libgomp) loaded in
    the process, which ends the threads of the calling thread's team; its next parallel operation starts new ones.
    Nothing else changes: thread counts, results. Does nothing inside a parallel region, and where no libgomp is
    loaded (macOS, Windows, other OpenMP runtimes).

    Returns:
        Whether a runtime took the call (also when the team had no idle thread); False where none is loaded, or
        inside a parallel region.

    Example:
        >>> isinstance(release_openmp_threads(), bool)
        True
    """
    released = False
    for pause in _openmp_pause_functions():
        released = pause(_OMP_PAUSE_SOFT) == 0 or released
    return released


@functools.cache
def _openmp_pause_functions() -> tuple[Callable[[int], int], ...]:
    """``omp_pause_resource_all`` of each libgomp mapped in this process (Linux), found once: PyTorch loads its
    OpenMP runtime when it is imported, before any caller gets here."""
    if not sys.platform.startswith("linux"):
        return ()
    try:
        with open("/proc/self/maps", encoding="utf-8") as maps:
            paths = sorted({line.split()[-1] for line in maps if "/libgomp" in line})
    except OSError:
        return ()
    functions = []
    for path in paths:
        try:
            library = ctypes.CDLL(path, mode=os.RTLD_NOLOAD)  # the copy already loaded, or OSError
            function = library.omp_pause_resource_all  # libgomp of GCC 9 or later
        except (OSError, AttributeError):
            continue
        function.argtypes, function.restype = [ctypes.c_int], ctypes.c_int
        functions.append(function)
    return tuple(functions)


def parallel_lanes() -> int:
    """How many chunks :func:`chunk_workers` would run at once: ``torch.get_num_threads()``, or 1 when it runs none."""
    threads = torch.get_num_threads()
    if not _ENABLED or threads < 2 or getattr(_LOCAL, "worker", False) or _dispatch_mode_active():
        return 1
    return threads


def _dispatch_mode_active() -> bool:
    """Whether a thread-local dispatch or function mode watches this thread's ops (``FlopCounterMode``, fake or meta
    tensor modes, ``torch.compile`` tracing): the work must then stay in this thread, where the mode sees it."""
    return (
        torch.compiler.is_compiling()
        or _get_current_dispatch_mode() is not None
        or torch._C._is_torch_function_mode_enabled()
    )


def chunk_workers(num_chunks: int) -> ChunkWorkers | None:
    """The shared pool for ``num_chunks`` independent chunks, or None when they should run in this thread.

    None when parallelism is off, when PyTorch runs on one thread (``torch.get_num_threads()``), when there are fewer
    than two chunks, or when called from a worker thread. The pool has ``torch.get_num_threads()`` workers; it is made
    again when that number changes, and after ``os.fork`` (which stops it first, :func:`_close_before_fork`).
    """
    global _POOL
    threads = parallel_lanes()
    if threads < 2 or num_chunks < 2:
        return None
    with _POOL_LOCK:
        pool = _POOL
        if pool is None or pool.num_workers != threads or pool.pid != os.getpid():
            if pool is not None and pool.pid == os.getpid():
                pool.close()
            _POOL = pool = ChunkWorkers(num_workers=threads)
    return pool


def _close_before_fork() -> None:
    """Stop the shared pool before ``os.fork`` (DataLoader workers): a forked child inherits no running threads, and
    forking a process with threads is what Python 3.12 warns about. The parent makes a new pool when it next needs one.
    """
    global _POOL
    with _POOL_LOCK:
        pool, _POOL = _POOL, None
    if pool is not None and pool.pid == os.getpid():
        pool.close()


if hasattr(os, "register_at_fork"):  # POSIX
    os.register_at_fork(before=_close_before_fork)
