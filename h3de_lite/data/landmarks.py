"""The 14 mandibular landmarks of the MML dataset (He et al. 2024) and the meaning we fix for each.

The upstream release names the landmarks ``L0, La…Lf, R0, Ra…Rf`` but does not say which tooth point
each letter is. h3de-lite fixes the assignment below, uses it in the phantom, and never changes it:

========  ==========================================================
name      point (``L`` = patient's left side, ``R`` = right side)
========  ==========================================================
``*0``    cuspid (canine) cusp tip
``*a``    second molar, crown (occlusal centre)
``*b``    second molar, mesial root apex
``*c``    second molar, distal root apex
``*d``    third molar, crown (occlusal centre)
``*e``    third molar, mesial root apex
``*f``    third molar, distal root apex
========  ==========================================================

Explained in notebooks/02_data.ipynb.
"""

from __future__ import annotations

SIDES: tuple[str, str] = ("L", "R")
POINTS: tuple[str, ...] = ("0", "a", "b", "c", "d", "e", "f")
POINT_MEANING: dict[str, str] = {
    "0": "cuspid cusp tip",
    "a": "second molar crown",
    "b": "second molar mesial root apex",
    "c": "second molar distal root apex",
    "d": "third molar crown",
    "e": "third molar mesial root apex",
    "f": "third molar distal root apex",
}
LANDMARK_NAMES: tuple[str, ...] = tuple(f"{side}{point}" for side in SIDES for point in POINTS)
"""``('L0', 'La', …, 'Lf', 'R0', 'Ra', …, 'Rf')``: the row order of every ``(L, 3)`` landmark array."""
NUM_LANDMARKS: int = len(LANDMARK_NAMES)


def describe(name: str) -> str:
    """Human-readable meaning of a landmark name, e.g. ``describe("Lb")`` → ``'left second molar mesial root apex'``."""
    if name not in LANDMARK_NAMES:
        raise ValueError(f"unknown landmark {name!r}; expected one of {', '.join(LANDMARK_NAMES)}")
    side = "left" if name[0] == "L" else "right"
    return f"{side} {POINT_MEANING[name[1]]}"
