"""Make book/figures/phantom_molar.png: orthogonal slices of the v1 phantom (seed 0) through the right second molar.

Run from anywhere: ``python book/scripts/make_phantom_figure.py`` (about 5 s on 2 CPU cores). The figure shows what
the network sees: soft tissue grey, air black, bone bright, teeth brightest, with the landmarks within 3 mm of each
plane marked (``Ra`` crown, ``Rb``/``Rc`` root apices, ``Rd``–``Rf`` on the third molar). The sagittal panel runs
along the right molars, like a panoramic view: crowns touching in a row, two roots each, the mandibular canal below.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt

from h3de_lite.data.landmarks import LANDMARK_NAMES
from h3de_lite.data.phantom import generate_phantom
from h3de_lite.viz import plot_orthogonal_slices

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "figures" / "phantom_molar.png"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0, help="phantom seed")
    parser.add_argument("--landmark", default="Ra", choices=LANDMARK_NAMES, help="landmark the planes go through")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output PNG")
    args = parser.parse_args()

    case = generate_phantom(seed=args.seed, difficulty="v1")  # the figure of the v1 section
    centre = case.landmarks[LANDMARK_NAMES.index(args.landmark)]
    spacing = ", ".join(f"{s:.2f}" for s in case.spacing)
    _, axes = plt.subplots(1, 3, figsize=(12.0, 4.6), constrained_layout=True)  # one row, as before
    fig = plot_orthogonal_slices(
        case.volume,
        axes=axes,
        center=centre,
        landmarks=case.landmarks,
        names=case.names,
        spacing=case.spacing,
        window=(-450.0, 2900.0),
        title=f"Phantom head CT, seed {args.seed}: slices through {args.landmark} "
        f"(shape {case.volume.shape}, spacing {spacing} mm, window −450…2900 HU)",
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    plt.close(fig)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1024:.0f} KB)")


if __name__ == "__main__":
    main()
