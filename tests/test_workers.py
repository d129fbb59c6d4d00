"""Tests of the worker threads that run V-BRA's CPU chunks side by side (h3de_lite.layers.workers)."""

from __future__ import annotations

import os
import threading

import pytest
import torch

from h3de_lite.layers import workers
from h3de_lite.layers.workers import ChunkClaims, ChunkWorkers, chunk_parallelism, chunk_workers, parallel_lanes


@pytest.fixture
def two_threads():
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(previous)


def test_map_keeps_the_order_and_reraises_the_first_error():
    pool = ChunkWorkers(num_workers=2)
    try:
        assert pool.map(lambda i: i * i, range(7)) == [0, 1, 4, 9, 16, 25, 36]
        done: list[int] = []

        def task(i: int) -> int:
            if i in (2, 4):
                raise RuntimeError(f"chunk {i}")
            done.append(i)
            return i

        with pytest.raises(RuntimeError, match="chunk 2"):
            pool.map(task, range(6))
        assert sorted(done) == [0, 1, 3, 5]  # the other tasks still ran: nothing is left half-written
        assert pool.map(lambda i: -i, [3]) == [-3]  # the pool survives an error
    finally:
        pool.close()


def test_workers_run_single_threaded_without_autograd_and_leave_thread_counts_alone(two_threads):
    pool = ChunkWorkers(num_workers=2)
    try:
        assert pool.map(lambda _: (torch.get_num_threads(), torch.is_grad_enabled()), range(4)) == [(1, False)] * 4
        assert torch.get_num_threads() == 2  # the caller's own count
        fresh: list[int] = []
        thread = threading.Thread(target=lambda: fresh.append(torch.get_num_threads()))
        thread.start()
        thread.join()
        assert fresh == [2]  # the process default that new threads start from is restored
    finally:
        pool.close()
    with pytest.raises(ValueError, match="at least 2"):
        ChunkWorkers(num_workers=1)


def test_chunk_workers_only_when_there_is_something_to_share(two_threads):
    pool = chunk_workers(4)
    assert isinstance(pool, ChunkWorkers) and pool.num_workers == 2 and parallel_lanes() == 2
    assert chunk_workers(4) is pool  # shared
    assert chunk_workers(1) is None  # one chunk: run it in this thread, on all threads
    assert pool.map(lambda _: chunk_workers(4), [0]) == [None]  # never nested inside a worker
    with chunk_parallelism(False):
        assert chunk_workers(4) is None and parallel_lanes() == 1
    assert workers.parallel_chunks_enabled()
    torch.set_num_threads(1)
    assert chunk_workers(4) is None and parallel_lanes() == 1


def test_an_idle_worker_holds_none_of_the_callers_tensors(two_threads, monkeypatch):
    """After a call the workers drop their task: the chunks' closure (the whole kv) is freed with the caller's refs."""
    import gc
    import weakref

    from h3de_lite.layers import routing
    from h3de_lite.layers.routing import regional_routing_attention

    monkeypatch.setattr(routing, "LANE_MIN_MACS", 0)  # lanes for these small chunks too

    q = torch.randn(1, 8, 6, 8)
    kv = torch.randn(1, 8, 6, 16)
    with torch.no_grad():
        out, *_ = regional_routing_attention(q, kv, num_heads=2, topk=3, scale=0.5, routing_scale=0.35, query_chunk=2)
    assert chunk_workers(4) is not None  # the call above ran its 4 chunks on the workers
    alive = weakref.ref(kv)
    del q, kv, out
    gc.collect()
    assert alive() is None


def test_two_callers_whose_items_wait_for_each_other_do_not_deadlock():
    """Each caller's 2 items meet at a barrier (as V-BRA's backward lanes wait for each other's chunks): with the
    callers' items interleaved in one queue this would hang; one caller at a time, it cannot."""
    import time

    pool = ChunkWorkers(num_workers=2)

    class SlowQueue:  # hands the GIL to the other callers between two items of one call
        def __init__(self, inner) -> None:
            self.inner = inner

        def put(self, task) -> None:
            self.inner.put(task)
            time.sleep(0.02)

        def get(self):
            return self.inner.get()

    pool._tasks = SlowQueue(pool._tasks)
    try:
        results: list[list[int]] = []

        def caller() -> None:
            barrier = threading.Barrier(2, timeout=10)
            results.append(pool.map(lambda i: (barrier.wait(), i)[1], [0, 1]))

        threads = [threading.Thread(target=caller) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        assert results == [[0, 1]] * 4
    finally:
        pool.close()


def test_the_pool_stops_before_a_fork_and_comes_back_after(two_threads):
    import os

    pool = chunk_workers(4)
    assert pool is not None
    pid = os.fork()
    if pid == 0:  # the child: no pool threads came along, and it can make its own
        os._exit(0 if chunk_workers(4).map(lambda i: i + 1, [1, 2]) == [2, 3] else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert not any(thread.is_alive() for thread in pool._threads)
    fresh = chunk_workers(4)
    assert fresh is not pool and fresh.map(lambda i: -i, [5]) == [-5]


def test_workers_follow_the_callers_inference_mode_and_autocast_and_stay_off_under_a_flop_counter(
    two_threads, monkeypatch
):
    from torch.utils.flop_counter import FlopCounterMode

    from h3de_lite.layers import routing
    from h3de_lite.layers.routing import regional_routing_attention

    monkeypatch.setattr(routing, "LANE_MIN_MACS", 0)  # lanes for these small chunks too

    pool = chunk_workers(4)

    def state(_):
        return torch.is_inference_mode_enabled(), torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")

    assert pool.map(state, [0]) == [(False, False, torch.get_autocast_dtype("cpu"))]
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert pool.map(state, [0]) == [(True, True, torch.bfloat16)]
        q, kv = torch.randn(1, 8, 6, 8), torch.randn(1, 8, 6, 16)  # inference tensors: written in place by workers
        out, *_ = regional_routing_attention(q, kv, num_heads=2, topk=3, scale=0.5, routing_scale=0.35, query_chunk=2)
    with chunk_parallelism(False), torch.inference_mode():
        expected, *_ = regional_routing_attention(
            q, kv, num_heads=2, topk=3, scale=0.5, routing_scale=0.35, query_chunk=2
        )
    assert torch.equal(out, expected)
    with FlopCounterMode(display=False):  # it counts only its own thread's ops: the chunks stay there
        assert parallel_lanes() == 1 and chunk_workers(4) is None


def test_chunk_claims_hand_out_every_index_once_in_increasing_order_across_threads():
    claims = ChunkClaims(count=2000)
    taken: dict[int, list[int]] = {}

    def claim(lane: int) -> None:
        taken[lane] = list(iter(claims, None))

    threads = [threading.Thread(target=claim, args=(lane,)) for lane in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(i for got in taken.values() for i in got) == list(range(2000))
    assert all(got == sorted(got) for got in taken.values())
    assert claims() is None


def _os_threads() -> int:
    return len(os.listdir("/proc/self/task"))


@pytest.mark.skipif(
    not workers._openmp_pause_functions(), reason="needs Linux and GNU OpenMP (libgomp), as PyTorch's wheels have"
)
def test_map_lets_the_callers_idle_openmp_thread_go_before_the_workers_start(two_threads):
    pool = ChunkWorkers(num_workers=2)
    try:
        values = torch.ones(1_000_000)
        for release, expected_change in ((False, 0), (True, -1)):
            values.add_(1)  # a parallel op on 2 threads: the calling thread's OpenMP team gets its second thread
            before = _os_threads()
            with workers.openmp_release(release):
                assert pool.map(abs, [-1, 2]) == [1, 2]
            assert _os_threads() - before == expected_change  # released: that idle OpenMP thread has ended
        values.add_(1)  # the next parallel op starts a new one, and computes as before
        assert torch.equal(values, torch.full((1_000_000,), 4.0)) and torch.get_num_threads() == 2
    finally:
        pool.close()


def test_vbra_lanes_give_the_same_output_with_and_without_the_openmp_release(two_threads, monkeypatch):
    import h3de_lite.layers.routing as routing
    from h3de_lite.layers.attention import BiLevelRoutingAttention3d

    monkeypatch.setattr(routing, "LANE_MIN_MACS", 0)  # lanes for this small layer's chunks
    releases: list[bool] = []
    release = workers.release_openmp_threads
    monkeypatch.setattr(workers, "release_openmp_threads", lambda: releases.append(release()) or releases[-1])
    torch.manual_seed(0)
    layer = BiLevelRoutingAttention3d(dim=32, num_heads=2, regions_per_side=2, topk=2, query_chunk=1)
    x = torch.randn(1, 16, 16, 8, 32)
    with torch.no_grad():
        released = layer.forward_channels_last(x)
        assert len(releases) == 1  # the lanes ran, after the release
        with workers.openmp_release(False):
            spinning = layer.forward_channels_last(x)
        assert len(releases) == 1
    assert torch.equal(released, spinning)
