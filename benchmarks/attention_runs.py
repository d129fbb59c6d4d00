"""V-BRA's forward speed-up over dense attention across saved runs of ``benchmarks/attention.py``.

Reads what runs of ``benchmarks/attention.py`` printed (stdout and stderr together, the text ``--from-log`` reads),
takes the per-round forward samples of dense attention and of V-BRA (the ``gather`` method) at one token grid from the
runs' ``measured`` lines, and prints one row per run and thread count: each layer's median and fastest call, the
ratio of the medians (what the acceptance line tests) with its 95 % interval over the rounds, and the ratio of the
fastest calls. Below the table, per thread count: how many runs reached the target by the medians, and each layer's
fastest call over all runs and their ratio. That last ratio is the speed-up without the shared machine's interference,
provided each layer had one undisturbed call in some run: a one-second dense call rarely has one when the machine is
busy, an 80 ms V-BRA call often does (book/benchmark_attention.md).

The runs of the book are kept in ``benchmarks/logs/attention/``, named by date and order.

Usage::

    python benchmarks/attention_runs.py benchmarks/logs/attention/*.txt --save book/results/attention_runs.md

Explained in book/benchmark_attention.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

from _report import add_save_option, saved_report  # benchmarks/_report.py
from attention import ACCEPT_GRID, ACCEPT_SPEEDUP, measured_results, parse_grid, speedup_interval  # attention.py


def forward_samples(text: str, grid: tuple[int, int, int], *, source: str) -> dict[str, tuple[list, list]]:
    """``{threads as printed: (dense attention's rounds, V-BRA's rounds)}`` of forward samples (ms) at ``grid``.

    Raises:
        ValueError: if the run measured no dense and gather forward at ``grid``, or printed no per-round samples (runs
            before the script kept them).
    """
    measured, _ = measured_results(text)
    samples = {}
    for threads, rows in measured.items():
        dense, gather = rows.get((grid, "dense"), {}), rows.get((grid, "gather"), {})
        if "fwd_ms" not in dense or "fwd_ms" not in gather:
            continue
        if "fwd_rounds" not in dense or "fwd_rounds" not in gather:
            raise ValueError(
                f"{source}: the run printed no per-round samples (fwd_rounds); use the output of a run of the current "
                "benchmarks/attention.py (stdout and stderr together)"
            )
        samples[threads] = (dense["fwd_rounds"], gather["fwd_rounds"])
    if not samples:
        raise ValueError(
            f"{source}: no dense and gather forward times at {'x'.join(map(str, grid))} in its measured lines; pass "
            "what `python benchmarks/attention.py` printed, stdout and stderr together, for a run with that grid"
        )
    return samples


def _flat(rounds: list[list[float]]) -> list[float]:
    return [t for samples in rounds for t in samples]


def report(runs: dict[str, str], grid: tuple[int, int, int]) -> list[str]:
    """The table and summary lines for ``runs`` (``{name: printed text}``, in the order they ran)."""
    lines = [
        "| run | threads | dense median ms | dense fastest ms | V-BRA median ms | V-BRA fastest ms "
        "| speed-up (medians) | 95 % interval over rounds | speed-up (fastest calls) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    per_threads: dict[str, list[tuple[str, float, float, float]]] = {}  # threads -> (run, ratio, dense, V-BRA fastest)
    for name, text in runs.items():
        for threads, (dense, gather) in forward_samples(text, grid, source=name).items():
            dense_median, gather_median = statistics.median(_flat(dense)), statistics.median(_flat(gather))
            dense_fastest, gather_fastest = min(_flat(dense)), min(_flat(gather))
            medians = dense_median / gather_median
            interval = speedup_interval(dense, gather)
            interval_text = "—" if interval is None else f"{interval[0]:.1f}–{interval[1]:.1f}×"
            lines.append(
                f"| {name} | {threads} | {dense_median:.1f} | {dense_fastest:.1f} | {gather_median:.1f} "
                f"| {gather_fastest:.1f} | {medians:.2f}× | {interval_text} | {dense_fastest / gather_fastest:.2f}× |"
            )
            per_threads.setdefault(threads, []).append((name, medians, dense_fastest, gather_fastest))
    lines.append("")
    for threads, rows in per_threads.items():
        passed = sum(medians >= ACCEPT_SPEEDUP for _, medians, _, _ in rows)
        dense_run, _, dense_fastest, _ = min(rows, key=lambda row: row[2])
        gather_run, _, _, gather_fastest = min(rows, key=lambda row: row[3])
        lines.append(
            f"- threads={threads}: speed-up of the medians ≥ {ACCEPT_SPEEDUP:.0f}× in {passed} of {len(rows)} runs; "
            f"fastest calls over all runs: dense {dense_fastest:.1f} ms ({dense_run}), V-BRA {gather_fastest:.1f} ms "
            f"({gather_run}): {dense_fastest / gather_fastest:.2f}×"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("logs", nargs="+", type=Path, help="what runs of benchmarks/attention.py printed, in order")
    parser.add_argument(
        "--grid",
        type=parse_grid,
        default=ACCEPT_GRID,
        help="token grid D×H×W (default: the acceptance grid 32x32x16)",
    )
    add_save_option(parser)
    args = parser.parse_args(argv)
    missing = [str(path) for path in args.logs if not path.is_file()]
    if missing:
        parser.error(f"no such log file: {', '.join(missing)}")
    runs = {path.stem: path.read_text(encoding="utf-8") for path in args.logs}
    if len(runs) != len(args.logs):
        parser.error("two logs have the same file name; runs are named by their file names")
    try:
        lines = report(runs, args.grid)
    except ValueError as error:
        parser.error(str(error))
    with saved_report(args.save):
        grid_label = "×".join(map(str, args.grid))
        print(f"# V-BRA (gather) against dense attention, forward at {grid_label} tokens, over {len(runs)} saved runs")
        print(
            "# from the per-round samples in each run's measured lines (stdout and stderr of benchmarks/attention.py)"
        )
        print()
        for line in lines:
            print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
