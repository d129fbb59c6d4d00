"""Make the figures of book/phantom.md: phantom v2's effects one at a time, its missing-tooth situations and third
molars, and a gallery of cases.

Run from anywhere: ``python book/scripts/make_phantom_v2_figures.py`` (about 2–3 minutes on 2 CPU cores; 40 cases at
192 × 192 × 128). Writes ``book/figures/phantom_v2_effects.png``, ``phantom_v2_situations.png`` and
``phantom_v2_gallery.png``, each under 300 KB. Every panel is a sagittal slice (axis 0 fixed: anterior to the right,
superior up) in the window [−1000, 3000] HU that the network sees (metal saturates); red dots are present landmarks
within 3 mm of the slice. The seeds were picked from the cases' metadata for what they show.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from h3de_lite.data.landmarks import LANDMARK_NAMES  # noqa: E402
from h3de_lite.data.phantom import EFFECTS, generate_phantom  # noqa: E402

FIGURES = Path(__file__).resolve().parents[1] / "figures"
WINDOW = (-1000.0, 3000.0)
HALF_MM = 38.0  # half the width of a zoomed panel

# effects: one case (seed 55: right first molar missing with the second molar drifted into the gap, left third molar
# impacted vertically, amalgam fillings, motion drawn), every effect alone on top of the plain v2 phantom
EFFECT_SEED, EFFECT_LANDMARK = 55, "Ld"
# situations: (title, seed, incomplete, landmark the slice goes through)
SITUATIONS = [
    ("retained root (R M2)", 0, True, "Rb"),
    ("implant (L M2)", 10, True, "Ld"),
    ("bridge over L M2", 4, True, "Ld"),
    ("R M2 drifted into a healed gap", 5, True, "Ra"),
    ("L M2 over-erupted", 9, False, "La"),
    ("metal crown (L M2)", 42, False, "La"),
    ("M3 partly erupted", 1, False, "Rd"),
    ("M3 mesioangular", 2, False, "Rd"),
    ("M3 horizontal", 4, False, "Rd"),
    ("M3 vertical, deep", 11, False, "Ld"),
    ("M3 distoangular", 0, False, "Ld"),
    ("M3 fused roots", 7, False, "Ld"),
]


def _slice(ax: plt.Axes, case, landmark: str, title: str, *, zoom: bool = True) -> None:
    """Sagittal slice through ``landmark`` (or the nearest present landmark of its side)."""
    row = LANDMARK_NAMES.index(landmark)
    if not case.present[row]:
        side = [i for i, n in enumerate(LANDMARK_NAMES) if n[0] == landmark[0] and case.present[i]]
        row = side[0] if side else int(np.flatnonzero(case.present)[0])
    point = case.landmarks[row]
    i = int(np.clip(np.rint(point[0]), 0, case.volume.shape[0] - 1))
    image = np.clip(case.volume[i], *WINDOW).T  # (W, H): superior up after origin="lower"
    sy, sz = case.spacing[1], case.spacing[2]
    extent = (0.0, case.volume.shape[1] * sy, 0.0, case.volume.shape[2] * sz)
    ax.imshow(image, cmap="gray", origin="lower", extent=extent, vmin=WINDOW[0], vmax=WINDOW[1],
              interpolation="nearest")  # fmt: skip
    for q, present in zip(case.landmarks, case.present):
        if present and abs(q[0] - i) * case.spacing[0] <= 3.0:
            ax.plot(q[1] * sy, q[2] * sz, "r.", ms=4)
    if zoom:
        ax.set_xlim(point[1] * sy - HALF_MM, point[1] * sy + HALF_MM)
        ax.set_ylim(point[2] * sz - HALF_MM, point[2] * sz + HALF_MM)
    ax.set_title(title, fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])


def effects_figure(out: Path) -> None:
    panels: list[tuple[str, dict | None, str]] = [("v1", None, "v1"), ("v2, every effect off", {}, "v2")]
    for name in EFFECTS:
        on = {name}
        if name == "streaks":
            on = {"metal", "streaks"}
        if name == "holder":
            on = {"holder", "field_of_view"}
        panels.append((" + ".join(sorted(on)) if len(on) > 1 else name, on, "v2"))
    panels.append(("v2, every effect on", set(EFFECTS), "v2"))
    fig, axes = plt.subplots(3, 5, figsize=(12.5, 7.8))
    for ax, (title, on, difficulty) in zip(axes.ravel(), panels):
        if difficulty == "v1":
            case = generate_phantom(seed=EFFECT_SEED, difficulty="v1")
        else:
            case = generate_phantom(seed=EFFECT_SEED, effects={k: k in on for k in EFFECTS})
        zoom = "field_of_view" not in title and title != "v2, every effect on"
        _slice(ax, case, EFFECT_LANDMARK, title, zoom=zoom)
    for ax in axes.ravel()[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out, dpi=72)
    plt.close(fig)


def situations_figure(out: Path) -> None:
    fig, axes = plt.subplots(3, 4, figsize=(10.5, 8.0))
    for ax, (title, seed, incomplete, landmark) in zip(axes.ravel(), SITUATIONS):
        case = generate_phantom(seed=seed, incomplete=incomplete)
        _slice(ax, case, landmark, f"{title} · seed {seed}")
    fig.tight_layout()
    fig.savefig(out, dpi=72)
    plt.close(fig)


def gallery_figure(out: Path) -> None:
    fig, axes = plt.subplots(3, 4, figsize=(10.5, 8.0))
    for seed, ax in enumerate(axes.ravel()):
        case, meta = generate_phantom(seed=seed, incomplete=seed % 3 == 1, return_meta=True)
        molars = "/".join(meta["third_molars"][s][:5] for s in "LR")
        title = f"{seed}: {meta['fov_kind']} {meta['fov_mm'][0]:.0f} mm, {meta['kernel']}, M3 {molars}"
        _slice(ax, case, "Ra", title, zoom=False)
    fig.tight_layout()
    fig.savefig(out, dpi=72)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=FIGURES, help="folder of the PNG files")
    parser.add_argument("--only", choices=["effects", "situations", "gallery"], default=None)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    jobs = {"effects": effects_figure, "situations": situations_figure, "gallery": gallery_figure}
    for name, job in jobs.items():
        if args.only in (None, name):
            path = args.out / f"phantom_v2_{name}.png"
            job(path)
            print(f"wrote {path} ({path.stat().st_size / 1024:.0f} KB)")


if __name__ == "__main__":
    main()
