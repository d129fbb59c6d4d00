"""V-BRA on worker lanes with and without releasing the calling thread's idle OpenMP threads first.

V-BRA's CPU chunks run on single-threaded worker threads (``h3de_lite.layers.workers``). The calling thread's own
OpenMP threads, idle once its projections and routing are done, spin on their cores for a while before they sleep
(GNU OpenMP's wait policy), on the cores the lanes need. ``ChunkWorkers.map`` now ends them first
(``workers.release_openmp_threads``); ``workers.openmp_release(False)`` keeps them, as before. This script times both
in one subprocess per thread count, interleaved round by round, on the layer of ``benchmarks/attention.py``'s
acceptance setting (32×32×16 tokens, 64 channels, 4 heads, S = 4, top-k 4, called as ``VBRABlock`` calls it), and
counts where the CPU time goes:

* ``wall ms`` — median time of one call;
* ``CPU ms`` — CPU time of the whole process per call (all threads, those that ended included);
* ``lanes ms`` — of which the worker lanes (``h3de-chunk-*`` threads, from ``/proc/self/task/*/schedstat``);
* ``caller ms`` — of which the calling thread;
* ``OpenMP ms`` — the rest: the calling thread's OpenMP threads, their share of its parallel operations and their
  spinning.

Steps: ``fwd`` (``torch.no_grad``) and ``fwd+bwd``. Same outputs and gradients either way (tested in
``tests/test_workers.py``). CPU columns need Linux (``—`` elsewhere). One thread has no lanes and no OpenMP threads:
both methods are then the same code.

Usage::

    python benchmarks/openmp_release.py                     # 2 threads
    python benchmarks/openmp_release.py --threads 2 --rounds 15 --save book/results/openmp_release.md

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
import threading
import time

from _report import add_save_option, saved_report  # benchmarks/_report.py
from _worker import run_worker, thread_counts  # benchmarks/_worker.py

GRID, DIM, HEADS, REGIONS, TOPK = (32, 32, 16), 64, 4, 4, 4
CALLS = {"fwd": 4, "fb": 1}  # calls per method and round
METHODS = ("spin", "release")


def _lane_cpu_ns() -> int | None:
    """CPU time so far of the worker lanes' threads (Linux), else None."""
    total = 0
    for thread in threading.enumerate():
        if not thread.name.startswith("h3de-chunk-"):
            continue
        try:
            with open(f"/proc/self/task/{thread.native_id}/schedstat", encoding="utf-8") as stat:
                total += int(stat.read().split()[0])
        except OSError:
            return None
    return total


def _worker(threads: int, rounds: int) -> dict:
    import torch

    from h3de_lite.layers.attention import BiLevelRoutingAttention3d
    from h3de_lite.layers.workers import openmp_release

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    layer = BiLevelRoutingAttention3d(dim=DIM, num_heads=HEADS, regions_per_side=REGIONS, topk=TOPK)
    x = torch.randn(1, *GRID, DIM)  # (1, D, H, W, C): the LayerNorm output VBRABlock passes

    def forward() -> None:
        with torch.no_grad():
            layer.forward_channels_last(x)

    def forward_backward() -> None:
        layer.zero_grad(set_to_none=True)
        layer.forward_channels_last(x).sum().backward()

    steps = {"fwd": forward, "fb": forward_backward}
    samples = {(step, method): [] for step in steps for method in METHODS}
    totals = {key: {"cpu": 0.0, "caller": 0.0, "lanes": 0.0, "n": 0} for key in samples}
    for call in steps.values():
        for method in METHODS:
            with openmp_release(method == "release"):
                call()  # warm-up: the lanes' pool, kernel selection, the allocator
    for _ in range(rounds):
        for step, call in steps.items():
            for method in METHODS:
                key = (step, method)
                with openmp_release(method == "release"):
                    cpu, caller, lanes = time.process_time(), time.thread_time(), _lane_cpu_ns()
                    for _ in range(CALLS[step]):
                        start = time.perf_counter()
                        call()
                        samples[key].append(time.perf_counter() - start)
                    lanes_after = _lane_cpu_ns()
                    totals[key]["cpu"] += time.process_time() - cpu
                    totals[key]["caller"] += time.thread_time() - caller
                    if lanes is None or lanes_after is None:
                        totals[key]["lanes"] = float("nan")
                    else:
                        totals[key]["lanes"] += (lanes_after - lanes) / 1e9
                    totals[key]["n"] += CALLS[step]
    result = {}
    for (step, method), values in samples.items():
        total = totals[(step, method)]
        per_call = {name: 1e3 * total[name] / total["n"] for name in ("cpu", "caller", "lanes")}
        result[f"{step}/{method}"] = {"wall_ms": 1e3 * statistics.median(values), "n": len(values), **per_call}
    return result


def _ms(value: float) -> str:
    return "—" if value != value else f"{value:.1f}"  # NaN: not measured here


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--threads", type=thread_counts, default=[2], help="comma-separated torch thread counts, rows of each"
    )
    parser.add_argument("--rounds", type=int, default=15, help="interleaved rounds (median of all calls reported)")
    add_save_option(parser)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        threads, rounds = json.loads(args.worker)
        print(json.dumps(_worker(threads, rounds)))
        return 0
    if args.rounds < 1:
        parser.error(f"--rounds takes a positive int, got {args.rounds}")
    import torch

    with saved_report(args.save):
        grid = "×".join(map(str, GRID))
        print(f"# V-BRA's worker lanes with and without releasing idle OpenMP threads — {datetime.date.today()}")
        print(
            f"# device cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} CPUs), torch "
            f"{torch.__version__}; {grid} tokens, dim {DIM}, {HEADS} heads, S = {REGIONS}, top-k {TOPK}; "
            f"{args.rounds} interleaved rounds of {CALLS['fwd']} forward and {CALLS['fb']} forward+backward calls "
            "per method, one subprocess per thread count"
        )
        print(f"# 1-minute load average at start: {os.getloadavg()[0]:.1f}")
        print()
        print(
            "| threads | step | method | wall ms | n | CPU ms | lanes ms | caller ms | OpenMP ms "
            "| wall: spin / release |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|")
        summary = []
        for threads in args.threads:
            rows = run_worker(__file__, [threads, args.rounds])
            if "error" in rows:
                print(f"| {threads} | error: {rows['error'][:100]} |" + " |" * 8)
                continue
            for step, label in (("fwd", "fwd"), ("fb", "fwd+bwd")):
                spin, release = rows[f"{step}/spin"], rows[f"{step}/release"]
                ratio = spin["wall_ms"] / release["wall_ms"]
                for method, row in (("spin", spin), ("release", release)):
                    openmp = row["cpu"] - row["caller"] - row["lanes"]
                    cells = [_ms(row["wall_ms"]), str(row["n"]), _ms(row["cpu"]), _ms(row["lanes"])]
                    cells += [_ms(row["caller"]), _ms(openmp), f"{ratio:.2f}×" if method == "release" else ""]
                    print(f"| {threads} | {label} | {method} | " + " | ".join(cells) + " |")
                summary.append(
                    f"- {threads} thread{'s' if threads > 1 else ''}, {label}: {ratio:.2f}× faster with the release "
                    f"(median wall time {spin['wall_ms']:.1f} → {release['wall_ms']:.1f} ms; process CPU per call "
                    f"{spin['cpu']:.1f} → {release['cpu']:.1f} ms)"
                )
        print()
        for line in summary:
            print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
