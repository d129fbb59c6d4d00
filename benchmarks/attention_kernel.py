"""The flash-kernel calls alone: V-BRA's routed calls against dense attention's one call, on 1 and 2 threads.

``benchmarks/attention.py`` times whole layers. This script times only what sits under them: PyTorch's CPU flash
kernel (``aten._scaled_dot_product_flash_attention_for_cpu``) on the shapes V-BRA gives it at 32×32×16 tokens
(64 regions of T = 256 tokens, top-k 4: per chunk of 8 query regions, 256 queries against 1024 gathered keys per
region and head, keys and values as the strided views of one gather buffer, as ``routing._gather_chunk`` makes them),
and on dense attention's one call (16384 queries against 16384 keys). No projection, copy, gather or routing: the
ratio of the two is the most the layers' ratio could reach with that kernel.

Methods, timed in one subprocess per thread count, interleaved round by round, median reported:

* ``dense``  — one kernel call over all tokens;
* ``serial`` — the 8 routed calls one after the other, each on all threads;
* ``fixed``  — the same 8 calls on single-threaded worker threads (:class:`h3de_lite.layers.workers.ChunkWorkers`),
  split in a fixed pattern: lane ``i`` makes calls ``i, i + W, …`` (how V-BRA's lanes first shared their chunks);
* ``lanes``  — the same, each lane taking the next call when free (``ChunkClaims``, as V-BRA runs its chunks with 2
  threads or more). Same calls, so the two differ only when one lane runs slower than the other.

Usage::

    python benchmarks/attention_kernel.py                       # threads 1 and 2
    python benchmarks/attention_kernel.py --threads 1,2 --rounds 9 --save book/results/attention_kernel.md

Explained in book/benchmark_attention.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time

from _report import add_save_option, saved_report  # benchmarks/_report.py
from _worker import run_worker, thread_counts  # benchmarks/_worker.py

HEADS, HEAD_DIM, TOKENS, REGIONS, TOPK, CHUNK = 4, 16, 256, 64, 4, 8


def _worker(threads: int, rounds: int) -> dict:
    import torch

    from h3de_lite.layers.workers import ChunkClaims, ChunkWorkers

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    kernel = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    channels = HEADS * HEAD_DIM
    calls = []
    for _ in range(REGIONS // CHUNK):
        q = torch.randn(CHUNK, TOKENS, channels).view(CHUNK, TOKENS, HEADS, HEAD_DIM).transpose(1, 2)  # (n, M, T, c)
        kv = torch.randn(CHUNK, TOPK * TOKENS, 2 * channels)  # one gather buffer: keys then values per token
        k = kv[..., :channels].view(CHUNK, -1, HEADS, HEAD_DIM).transpose(1, 2)  # (n, M, k·T, c) views
        v = kv[..., channels:].view(CHUNK, -1, HEADS, HEAD_DIM).transpose(1, 2)
        calls.append((q, k, v))
    n = REGIONS * TOKENS
    dense_q = torch.randn(1, n, channels).view(1, n, HEADS, HEAD_DIM).transpose(1, 2)
    dense_kv = torch.randn(1, n, 2 * channels)
    dense_k = dense_kv[..., :channels].view(1, n, HEADS, HEAD_DIM).transpose(1, 2)
    dense_v = dense_kv[..., channels:].view(1, n, HEADS, HEAD_DIM).transpose(1, 2)
    scale = HEAD_DIM**-0.5
    pool = ChunkWorkers(num_workers=threads) if threads > 1 else None

    def fixed() -> None:  # lane i makes calls i, i + W, ...
        def lane(first: int) -> None:
            for q, k, v in calls[first :: pool.num_workers]:
                kernel(q, k, v, 0.0, False, scale=scale)

        pool.map(lane, range(pool.num_workers))

    def lanes() -> None:  # each lane claims the next call when free, as V-BRA's lanes claim chunks
        claims = ChunkClaims(count=len(calls))

        def lane(_: int) -> None:
            for index in iter(claims, None):
                kernel(*calls[index], 0.0, False, scale=scale)

        pool.map(lane, range(pool.num_workers))

    methods = {
        "dense": lambda: kernel(dense_q, dense_k, dense_v, 0.0, False, scale=scale),
        "serial": lambda: [kernel(q, k, v, 0.0, False, scale=scale) for q, k, v in calls],
    }
    if pool is not None:
        methods["fixed"] = fixed
        methods["lanes"] = lanes
    times: dict[str, list[float]] = {name: [] for name in methods}
    for call in methods.values():
        call()  # warm-up
    for _ in range(rounds):
        for name, call in methods.items():
            repeats = 1 if name == "dense" else 3  # short calls: more samples per round
            for _ in range(repeats):
                start = time.perf_counter()
                call()
                times[name].append(time.perf_counter() - start)
    if pool is not None:
        pool.close()
    return {name: 1e3 * statistics.median(values) for name, values in times.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--threads", type=thread_counts, default=[1, 2], help="comma-separated torch thread counts, one row each"
    )
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds (median of all samples reported)")
    add_save_option(parser)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        threads, rounds = json.loads(args.worker)
        print(json.dumps(_worker(threads, rounds)))
        return 0
    import torch

    with saved_report(args.save):
        print(f"# Flash-kernel calls of V-BRA and of dense attention — {datetime.date.today().isoformat()}")
        print(
            f"# device cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} CPUs), torch "
            f"{torch.__version__}; {REGIONS} regions of {TOKENS} tokens, top-k {TOPK}, {HEADS} heads of {HEAD_DIM} "
            f"channels; routed: {REGIONS // CHUNK} calls of {CHUNK} regions; dense: one call over {REGIONS * TOKENS} "
            "tokens"
        )
        print(
            f"# time: median over {args.rounds} interleaved rounds after a warm-up, one subprocess per thread count; "
            f"1-minute load average at start: {os.getloadavg()[0]:.1f}"
        )
        print()
        print(
            "| threads | dense ms | serial ms | fixed ms | lanes ms | dense / serial | dense / fixed | dense / lanes |"
        )
        print("|---|---|---|---|---|---|---|---|")
        results = {}
        for threads in args.threads:
            row = run_worker(__file__, [threads, args.rounds])
            if "error" in row:
                print(f"| {threads} | error: {row['error'][:100]} | | | | | | |")
                continue
            results[threads] = row
            on_lanes = [row.get(name) for name in ("fixed", "lanes")]
            cells = [f"{row['dense']:.1f}", f"{row['serial']:.1f}"]
            cells += ["—" if ms is None else f"{ms:.1f}" for ms in on_lanes]
            cells += [f"{row['dense'] / row['serial']:.1f}×"]
            cells += ["—" if ms is None else f"{row['dense'] / ms:.1f}×" for ms in on_lanes]
            print(f"| {threads} | " + " | ".join(cells) + " |")
        print()
        if 1 in results:
            for threads, row in results.items():
                if threads == 1:
                    continue
                one = results[1]
                line = (
                    f"- 1 → {threads} threads: dense {one['dense'] / row['dense']:.2f}× faster, routed calls "
                    f"{one['serial'] / row['serial']:.2f}× faster one after the other"
                )
                if "lanes" in row:
                    line += (
                        f", {one['serial'] / row['lanes']:.2f}× faster on worker lanes; lanes that claim calls "
                        f"{row['fixed'] / row['lanes']:.2f}× faster than the fixed split"
                    )
                print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
