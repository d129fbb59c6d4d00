"""Sliding windows or coarse-to-fine? Accuracy and time of whole-volume inference with a trained run.

For each strategy of :func:`h3de_lite.inference.predict_volume` (and each test-time augmentation, ``none`` or the
left–right mirror average ``flip`` of :mod:`h3de_lite.tta`), the run's :class:`~h3de_lite.evaluation.Predictor`
(its own preprocessing: resampling, window, roi) evaluates the whole volumes of a split, never looking at a label
to predict, and the table gives MRE ± SD, SDR at 2 and 4 mm over all cases and the mean seconds per volume (reading
and resampling included), measured in the same run.

Usage::

    python benchmarks/inference_strategies.py --run runs/tiny --data data/phantom-test --split test
    python benchmarks/inference_strategies.py --run runs/tiny --data data/phantom-test --split test \
        --save book/results/inference_strategies.md      # the book's table

``--save PATH`` also writes the printed report to a Markdown file (``benchmarks/_report.py``).

Explained in book/benchmark_training.md (whole-volume inference).
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import torch
from _report import add_save_option, saved_report  # benchmarks/_report.py


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="run folder of h3de-lite train")
    parser.add_argument("--data", type=Path, required=True, help="dataset folder")
    parser.add_argument("--split", default="test")
    parser.add_argument("--strategies", nargs="+", default=["sliding", "coarse_to_fine"])
    parser.add_argument("--overlaps", type=float, nargs="+", default=[0.25, 0.5], help="sliding strategy only")
    parser.add_argument("--tta", nargs="+", default=["none", "flip"], choices=["none", "flip"],
                        help="test-time augmentations")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    add_save_option(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with saved_report(args.save):
        _benchmark(args)


def _benchmark(args: argparse.Namespace) -> None:
    """Evaluate every strategy (and overlap); print the header and the table (the report)."""

    from h3de_lite.evaluation import evaluate, load_predictor, find_cases

    n_cases = len(find_cases(args.data, args.split))
    print(f"# whole-volume inference strategies: {args.run} on {args.data}/{args.split} ({n_cases} cases)")
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} threads, "
          f"load average {os.getloadavg()[0]:.1f}")  # fmt: skip
    print()
    print("| strategy | overlap | tta | MRE ± SD (mm) | SDR 2 mm (%) | SDR 4 mm (%) | missed | s / volume |")
    print("|---|---|---|---|---|---|---|---|")
    settings = [(strategy, overlap, tta) for tta in args.tta for strategy in args.strategies
                for overlap in (args.overlaps if strategy == "sliding" else [None])]  # fmt: skip
    for strategy, overlap, tta in settings:
        predictor = load_predictor(args.run, device="cpu", strategy=strategy, overlap=overlap or 0.25, tta=tta)
        start = time.perf_counter()
        result = evaluate(predictor, args.data, split=args.split)
        seconds = (time.perf_counter() - start) / max(1, len(result.cases))
        s = result.summary["all"]
        mre = "n/a" if s["mre"] is None else f"{s['mre']:.2f} ± {s['std']:.2f}"
        sdr = s["sdr"] or {}
        print(f"| {strategy} | {'—' if overlap is None else overlap} | {tta} | {mre} "
              f"| {sdr.get('2.0', float('nan')):.1f} | {sdr.get('4.0', float('nan')):.1f} | {s.get('n_missed', 0)} "
              f"| {seconds:.2f} |")  # fmt: skip


if __name__ == "__main__":
    main()
