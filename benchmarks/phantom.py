"""Benchmark the phantom generator: seconds and peak memory per case at the CLI's default volume shape.

For each case it times (wall clock, and the CPU time of the process, which a shared machine's load changes much
less), without any tracer, :func:`h3de_lite.data.phantom.generate_phantom` and the MML writer
(:func:`h3de_lite.data.mml.write_mml_case`, one ``.nrrd`` and two ``.npy`` files into a temporary folder), then
repeats the same case under ``tracemalloc`` for its peak traced memory (NumPy's array buffers are traced; the
tracer slows Python code, so that pass is not timed). The last lines give the mean time per case, the time the
measured number of cases and a ``h3de-lite phantom`` call with the CLI's default counts (8 + 2 + 4 cases) would take
at that rate (wall clock and CPU), and the process's
peak resident set size (``resource.getrusage``), which also holds the interpreter and the imported libraries.

Cases alternate complete and incomplete like a dataset with ``--incomplete-fraction`` about 0.3; case ``i`` uses
seed ``seed + i``. Nothing here asserts a time: the unit tests never do (tests/test_phantom.py).

Usage::

    python benchmarks/phantom.py                        # 4 cases at the default 192×192×128
    python benchmarks/phantom.py --cases 7 --shape 128 128 64
    OMP_NUM_THREADS=1 python benchmarks/phantom.py --cases 7 --save book/results/phantom.md   # book/data.md's table

``--save PATH`` also writes the printed report to a Markdown file (``benchmarks/_report.py``).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

from _report import add_save_option, saved_report  # benchmarks/_report.py
from h3de_lite.data.mml import write_mml_case
from h3de_lite.data.phantom import DEFAULT_SHAPE, generate_phantom

CLI_DEFAULT_CASES = 8 + 2 + 4  # h3de-lite phantom: --n-train 8 --n-val 2 --n-test 4
MIB = 2**20


def _one_case(seed: int, shape: tuple[int, int, int], incomplete: bool, folder: Path) -> tuple[float, float, float]:
    """Generate and write one case; return (generate seconds, write seconds, CPU seconds of both)."""
    start, start_cpu = time.perf_counter(), time.process_time()
    case = generate_phantom(seed=seed, shape=shape, incomplete=incomplete, case_id=f"{seed:04d}")
    generated = time.perf_counter()
    write_mml_case(folder, case)
    return generated - start, time.perf_counter() - generated, time.process_time() - start_cpu


def _peak_traced(seed: int, shape: tuple[int, int, int], incomplete: bool, folder: Path) -> int:
    """Peak bytes traced by ``tracemalloc`` while generating and writing one case."""
    tracemalloc.start()
    try:
        _one_case(seed, shape, incomplete, folder)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def _peak_rss_mib() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / MIB if sys.platform == "darwin" else peak / 1024


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=4, help="number of cases (default 4)")
    parser.add_argument("--shape", type=int, nargs=3, metavar=("D", "H", "W"), default=DEFAULT_SHAPE,
                        help=f"volume size in voxels (default: the CLI's {DEFAULT_SHAPE})")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="seed of the first case (default 0)")
    parser.add_argument("--no-memory", action="store_true", help="skip the tracemalloc pass")
    add_save_option(parser)
    args = parser.parse_args(argv)
    if args.cases < 1:
        parser.error(f"--cases must be at least 1, got {args.cases}")
    with saved_report(args.save):
        _benchmark(args)


def _benchmark(args: argparse.Namespace) -> None:
    """Time (and trace) every case; print the header, the table and the summary lines (the report)."""
    shape = tuple(args.shape)
    print(
        f"date: {datetime.date.today().isoformat()}; numpy {np.__version__}; python {platform.python_version()}; "
        f"{os.cpu_count()} CPUs; {platform.processor() or platform.machine()}; "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}"
    )
    print(f"1-minute load average at start: {os.getloadavg()[0]:.1f} (other processes share the CPU when > 0)")
    print(f"shape {shape[0]}×{shape[1]}×{shape[2]} voxels, {args.cases} cases, seeds {args.seed}…"
          f"{args.seed + args.cases - 1}\n")  # fmt: skip

    rows = []
    with tempfile.TemporaryDirectory(prefix="h3de-phantom-bench-") as tmp:
        folder = Path(tmp) / "train"
        for i in range(args.cases):
            seed, incomplete = args.seed + i, i % 3 == 2
            gen_s, write_s, cpu_s = _one_case(seed, shape, incomplete, folder)
            peak = None if args.no_memory else _peak_traced(seed, shape, incomplete, folder)
            rows.append((seed, incomplete, gen_s, write_s, cpu_s, peak))

    print("| case seed | incomplete | generate (s) | write (s) | total (s) | CPU (s) | peak traced memory (MiB) |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for seed, incomplete, gen_s, write_s, cpu_s, peak in rows:
        memory = "—" if peak is None else f"{peak / MIB:,.0f}"
        print(f"| {seed} | {'yes' if incomplete else 'no'} | {gen_s:.2f} | {write_s:.2f} | {gen_s + write_s:.2f} "
              f"| {cpu_s:.2f} | {memory} |")  # fmt: skip

    totals = [g + w for _, _, g, w, _, _ in rows]
    mean, cpu = statistics.fmean(totals), statistics.fmean(row[4] for row in rows)
    n, cli = args.cases, CLI_DEFAULT_CASES
    print(f"\nmean {mean:.2f} s per case (min {min(totals):.2f}, max {max(totals):.2f}), CPU {cpu:.2f} s; at these "
          f"rates {n} cases ≈ {n * mean:.0f} s ({n * cpu:.0f} s of CPU), the CLI's default {cli} cases "
          f"≈ {cli * mean:.0f} s ({cli * cpu:.0f} s of CPU)")  # fmt: skip
    volume_mib = np.prod(shape) * 4 / MIB
    print(f"one float32 volume: {volume_mib:.1f} MiB; "
          f"peak resident set size of this process: {_peak_rss_mib():,.0f} MiB")  # fmt: skip
    print(f"1-minute load average at end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
