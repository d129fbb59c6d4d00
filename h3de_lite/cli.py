"""The ``h3de-lite`` command line.

``h3de-lite phantom --out DIR --seed 0 --n-train 4 --n-val 1 --n-test 2`` writes a phantom dataset in the MML release
layout (see :func:`h3de_lite.data.phantom.write_phantom_dataset`). It refuses an ``--out`` that already holds a dataset
unless ``--overwrite`` is given. User errors print one line ``h3de-lite <command>: error: ...`` and exit with code 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

__all__ = ["main", "build_parser"]


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a count >= 0, got {value}")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1], got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser, one sub-command per task."""
    parser = argparse.ArgumentParser(prog="h3de-lite", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    phantom = sub.add_parser("phantom", help="write a phantom head-CT dataset in the MML release layout")
    phantom.add_argument("--out", type=Path, required=True, help="output folder (created; gets train/ val/ test/)")
    phantom.add_argument("--seed", type=int, default=0, help="master seed: the same seed writes the same dataset")
    phantom.add_argument("--n-train", type=_non_negative_int, default=8, help="number of training cases")
    phantom.add_argument("--n-val", type=_non_negative_int, default=2, help="number of validation cases")
    phantom.add_argument("--n-test", type=_non_negative_int, default=4, help="number of test cases")
    phantom.add_argument(
        "--incomplete-fraction", type=_fraction, default=0.3, help="share of cases with missing teeth, in [0, 1]"
    )
    phantom.add_argument(
        "--shape", type=int, nargs=3, metavar=("D", "H", "W"), default=None, help="volume size in voxels"
    )
    phantom.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a dataset already in --out (its train/ val/ test/ case files are deleted first); without it an "
        "--out that holds a dataset is refused",
    )
    phantom.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


def _phantom(args: argparse.Namespace) -> int:
    from h3de_lite.data.phantom import write_phantom_dataset

    paths = write_phantom_dataset(
        args.out,
        seed=args.seed,
        n_train=args.n_train,
        n_val=args.n_val,
        n_test=args.n_test,
        incomplete_fraction=args.incomplete_fraction,
        shape=tuple(args.shape) if args.shape else None,
        progress=not args.no_progress,
        overwrite=args.overwrite,
    )
    print(f"wrote {len(paths)} cases to {args.out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``h3de-lite`` console script."""
    args = build_parser().parse_args(argv)
    try:
        return {"phantom": _phantom}[args.command](args)
    except (ValueError, FileNotFoundError) as err:
        print(f"h3de-lite {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
