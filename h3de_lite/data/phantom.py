"""Synthetic head-CT phantoms in Hounsfield units with analytically known mandibular landmarks.

The paper trains on 658 real head CTs (MML, He et al. 2024; H3DE-Net §IV-A). This module builds a stand-in that a
network cannot solve without looking at the image: a lower-face CT with a mandible and maxilla (cortical shell around
cancellous bone, mandibular canal, ramus), maxillary sinuses, nasal cavity, airway, cervical spine, the lower skull
shell, fat and soft tissue, and both dental arches (incisors, cuspids, premolars and three molars per quadrant, each
tooth an enamel cap over dentin with a pulp chamber, root canals and a lamina dura around its roots). The 14 landmarks
(``L0, La…Lf, R0, Ra…Rf``, meaning fixed in :mod:`h3de_lite.data.landmarks`) are points of the lower cuspids and lower
second and third molars, known exactly because the anatomy is built from them:

- cuspid cusp tip (``*0``): on the tooth axis, 1 mm below the tip of the cusp (inside the enamel);
- molar crown (``*a``, ``*d``): on the tooth axis, 1 mm below the floor of the central fossa (inside the enamel);
- root apex (``*b``, ``*c``, ``*e``, ``*f``): the end of the root axis, inside the dentin of the rounded root tip.

Two difficulties. ``difficulty="v1"`` is the first phantom, described below and kept byte-identical (its SHA-256 is
pinned in tests/test_phantom_v1.py). Once its pose is known, an average landmark layout lands about 1.2 mm from its
truth, and enamel is always 300 HU brighter than anything else: too easy to say much about head CT. The default
``"v2"`` (:data:`EFFECTS`, each switchable on its own) adds per-person anatomy after pose, third molars erupted,
partly erupted or impacted, missing teeth as they look (healed ridges, drifted and over-erupted neighbours, retained
roots, implants, bridges), metal (fillings, crowns, implants, brackets) with forward/back-projected streaks,
dense-region noise, reconstruction kernels, thick slices, motion ghosts, condyles, zygoma, skull base, hyoid, tongue
and muscles, head holders, and fields of view from a dental crop to a whole head with the jaw off-centre. v2 lives
in :mod:`h3de_lite.data.phantom_anatomy` (arches, surroundings, pose and field of view),
:mod:`h3de_lite.data.phantom_teeth` (tooth states, third molars, metal; its docstring has the table of which
landmarks count as missing in each situation: a landmark is missing when its tooth structure is absent, so a
retained root keeps its apex landmarks and loses its crown landmark, an implant or a bridge pontic has none, a filled
or crowned tooth keeps all, its crown landmark then lying on enamel, dentin or metal) and
:mod:`h3de_lite.data.phantom_render` (intensities and artefacts).
v2 adds the tissues ``METAL``, ``MUSCLE`` and ``DEVICE`` and writes HU on the extended CT scale (up to 30710).
``generate_phantom(..., return_meta=True)`` returns what each case holds, and :func:`write_phantom_dataset` saves it
beside each case as ``<id>_meta.json``. Explained in book/phantom.md, with the difficulty measured.

The rest of this docstring describes v1.

Geometry. Every structure is defined in a canonical head frame in mm (x toward the patient's right, y anterior, z
superior; origin on the midline in the lower occlusal plane, the lower incisors at y ≈ 33–39 mm). A random
similarity transform (rotation up to ±15° about each axis, scale 0.9–1.1, translation up to ±10 mm) places that frame
in the scanner, and each voxel's centre is mapped back to it; structures are evaluated inside their own bounding
boxes with vectorised numpy, never per voxel. Array axes follow the package convention: axis 0 = left → right (x),
axis 1 = posterior → anterior (y), axis 2 = inferior → superior (z, the slice axis, coarser spacing), so
``Case.affine = diag(spacing, 1)`` is a RAS voxel → world matrix. Landmarks are sub-voxel ``(14, 3)`` voxel
coordinates in that order, ``NaN`` rows for absent teeth.

Field of view. Like a dental/maxillofacial CT, the volume is a jaw field of view (about 100–115 mm in-plane and
72–160 mm along the slices at the default shape), not the whole head: the skin outline, the ramus, the spine and the
skull shell are cut by the volume edges, and the cranium shows only when the slab is tall enough. Spacing is drawn
from realistic anisotropic values (in-plane 0.4–0.6 mm, slices 0.5–1.25 mm, slices never finer than in-plane), but
never so fine that the field of view becomes smaller than the jaw needs (:data:`REQUIRED_FOV_MM`); for small shapes
(e.g. 64×64×48 for tests and CPU training) the spacing is therefore scaled up (≈1.6–1.8 mm in-plane, 1.6–2.7 mm
slices) and the same anatomy is simply seen more coarsely. A pose is redrawn (deterministically) until every
landmark lies at least 2 mm inside the volume.

Per-case variation: arch form (parabolic to U-shaped), arch width between second molars 45–55 mm, left/right
asymmetry (arch width, tooth size, root length), tooth size jitter (third molars more variable), root divergence and
tilt, mandibular body height 25–33 mm and cortical thickness 2–4 mm, curve of Spee, mouth opening, tissue intensities
within their HU ranges, trabecular texture, blur (point-spread σ 0.3–0.55 mm) and Gaussian noise (σ 20–40 HU).
Incomplete cases lack a random subset of the landmark-bearing teeth (lower cuspids, second and third molars; third
molars most often), and the tooth and all its landmarks are absent; other teeth are occasionally absent in any case.
Everything is deterministic per seed, and the incomplete version of a seed is the complete one with teeth removed.

Explained in notebooks/02_data.ipynb.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path
from typing import Literal

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from h3de_lite.data.case import Case, validate_spacing
from h3de_lite.data.landmarks import LANDMARK_NAMES, NUM_LANDMARKS
from h3de_lite.files import atomic_output

__all__ = [
    "DEFAULT_SHAPE",
    "DIFFICULTIES",
    "EFFECTS",
    "HU_RANGES",
    "INPLANE_SPACING_MM",
    "MISSING_PROBABILITY",
    "REQUIRED_FOV_MM",
    "SLICE_SPACING_MM",
    "Tissue",
    "generate_phantom",
    "write_phantom_dataset",
]


class Tissue(IntEnum):
    """Tissue labels of the phantom's label volume (``generate_phantom(..., return_tissue=True)``)."""

    AIR = 0
    FAT = 1
    SOFT = 2
    PULP = 3
    CANCELLOUS = 4
    CORTICAL = 5
    DENTIN = 6
    ENAMEL = 7
    METAL = 8  # v2 only: amalgam fillings, metal crowns and bridges, implants, orthodontic brackets and wires
    MUSCLE = 9  # v2 only: tongue and masticatory muscles
    DEVICE = 10  # v2 only: head holder and table


HU_RANGES: dict[Tissue, tuple[float, float]] = {
    Tissue.AIR: (-1010.0, -990.0),
    Tissue.FAT: (-100.0, -50.0),
    Tissue.SOFT: (20.0, 60.0),
    Tissue.PULP: (20.0, 60.0),
    Tissue.CANCELLOUS: (300.0, 800.0),
    Tissue.CORTICAL: (1000.0, 1800.0),
    Tissue.DENTIN: (1600.0, 2200.0),
    Tissue.ENAMEL: (2500.0, 3000.0),
}
"""Per-case mean intensity of each tissue is drawn uniformly from these ranges (HU, from /work/shared/PHANTOM.md)."""

_TEXTURE_HU: dict[Tissue, float] = {
    Tissue.AIR: 0.0,
    Tissue.FAT: 8.0,
    Tissue.SOFT: 10.0,
    Tissue.PULP: 10.0,
    Tissue.CANCELLOUS: 110.0,  # trabecular pattern
    Tissue.CORTICAL: 70.0,
    Tissue.DENTIN: 40.0,
    Tissue.ENAMEL: 60.0,
}

DIFFICULTIES: tuple[str, ...] = ("v1", "v2")
"""``generate_phantom(difficulty=...)``: ``"v1"`` is the first phantom (kept byte-identical), ``"v2"`` the default."""
EFFECTS: tuple[str, ...] = (
    "anatomy",
    "third_molars",
    "missing",
    "metal",
    "streaks",
    "noise",
    "kernel",
    "slice_thickness",
    "motion",
    "surroundings",
    "holder",
    "field_of_view",
)
"""The v2 effects, each switchable on its own with ``generate_phantom(effects={name: False})`` (module docstring)."""

DEFAULT_SHAPE: tuple[int, int, int] = (192, 192, 128)
"""Default volume size in voxels (axis 0 left→right, axis 1 posterior→anterior, axis 2 inferior→superior)."""
REQUIRED_FOV_MM: tuple[float, float, float] = (100.0, 100.0, 72.0)
"""Smallest field of view (mm per axis) that holds the landmarks under every pose; spacing is raised to reach it."""
INPLANE_SPACING_MM: tuple[float, float] = (0.4, 0.6)
"""Realistic in-plane spacing range (axes 0 and 1, equal)."""
SLICE_SPACING_MM: tuple[float, float] = (0.5, 1.25)
"""Realistic slice spacing range (axis 2)."""
MISSING_PROBABILITY: dict[str, float] = {"C": 0.06, "M2": 0.2, "M3": 0.55}
"""Per side, the probability that a landmark-bearing lower tooth is absent in an incomplete case."""
_OTHER_MISSING_PROBABILITY = 0.04  # any other tooth, in every case (no landmark depends on it)
_UPPER_M3_MISSING_PROBABILITY = 0.35

_MAX_ROTATION_DEG = 15.0
_MAX_TRANSLATION_MM = 10.0
_SCALE_RANGE = (0.9, 1.1)
_NOISE_SIGMA_HU = (20.0, 40.0)
_PSF_SIGMA_MM = (0.3, 0.55)
_LANDMARK_MARGIN_MM = 2.0
_MIN_SIDE = 16
_HEAD_CENTRE = (0.0, -20.0, 130.0)  # cranium: skull base ≈ 45 mm above the occlusal plane
_SKULL_SEMI = (72.0, 92.0, 85.0)
_HEAD_SEMI = (78.0, 98.0, 91.0)

ToothKind = Literal["incisor", "cuspid", "premolar", "molar"]

# name, kind, mesiodistal width, buccolingual width, crown height, root length (mm); arch order from the midline.
_LOWER_TEETH: tuple[tuple[str, ToothKind, float, float, float, float], ...] = (
    ("I1", "incisor", 5.4, 5.9, 9.0, 12.5),
    ("I2", "incisor", 5.9, 6.4, 9.5, 14.0),
    ("C", "cuspid", 7.0, 7.5, 11.0, 16.0),
    ("P1", "premolar", 7.0, 7.7, 8.5, 14.0),
    ("P2", "premolar", 7.1, 8.0, 8.0, 14.5),
    ("M1", "molar", 11.2, 10.3, 7.5, 14.0),
    ("M2", "molar", 10.5, 10.0, 7.0, 13.0),
    ("M3", "molar", 10.0, 9.5, 6.5, 11.5),
)
_UPPER_TEETH: tuple[tuple[str, ToothKind, float, float, float, float], ...] = (
    ("I1", "incisor", 8.6, 7.0, 10.5, 13.0),
    ("I2", "incisor", 6.6, 6.2, 9.0, 13.0),
    ("C", "cuspid", 7.6, 8.1, 10.0, 17.0),
    ("P1", "premolar", 7.1, 9.0, 8.5, 14.0),
    ("P2", "premolar", 6.6, 9.0, 7.8, 14.0),
    ("M1", "molar", 10.2, 11.0, 7.5, 12.5),
    ("M2", "molar", 9.0, 11.0, 7.0, 12.0),
    ("M3", "molar", 8.5, 10.0, 6.5, 11.0),
)
# lower tooth → landmark letters (crown or cusp first, then mesial and distal root apex)
_LANDMARK_TEETH: dict[str, tuple[str, ...]] = {"C": ("0",), "M2": ("a", "b", "c"), "M3": ("d", "e", "f")}
_SIDES: dict[str, int] = {"L": -1, "R": +1}  # sign of canonical x


# --------------------------------------------------------------------------------------------------------------------
# Geometry helpers
# --------------------------------------------------------------------------------------------------------------------


def _rotation(angles_deg: np.ndarray) -> np.ndarray:
    """``Rz @ Ry @ Rx`` for angles (about x, y, z) in degrees."""
    ax, ay, az = np.deg2rad(angles_deg)
    rx = np.array([[1, 0, 0], [0, math.cos(ax), -math.sin(ax)], [0, math.sin(ax), math.cos(ax)]])
    ry = np.array([[math.cos(ay), 0, math.sin(ay)], [0, 1, 0], [-math.sin(ay), 0, math.cos(ay)]])
    rz = np.array([[math.cos(az), -math.sin(az), 0], [math.sin(az), math.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


@dataclass(frozen=True)
class _Grid:
    """The voxel grid seen from the canonical head frame: ``canon = A @ index + c`` and its inverse."""

    shape: tuple[int, int, int]
    to_canon: np.ndarray  # (3, 4)
    to_voxel: np.ndarray  # (3, 4)

    @classmethod
    def make(cls, shape: tuple[int, int, int], spacing: np.ndarray, rotation: np.ndarray, scale: float,
             translation: np.ndarray, anchor: np.ndarray) -> _Grid:  # fmt: skip
        """World (mm, voxel 0 at the origin) = ``scale·R·(canon − anchor) + centre + translation``."""
        centre = (np.asarray(shape, dtype=np.float64) - 1.0) / 2.0 * spacing
        fwd = np.zeros((3, 4))
        fwd[:, :3] = (scale * rotation) / spacing[:, None]
        fwd[:, 3] = (centre + translation - scale * rotation @ anchor) / spacing
        inv = np.zeros((3, 4))
        inv[:, :3] = np.linalg.inv(fwd[:, :3])
        inv[:, 3] = -inv[:, :3] @ fwd[:, 3]
        return cls(shape=tuple(shape), to_canon=inv, to_voxel=fwd)

    def voxel(self, points: np.ndarray) -> np.ndarray:
        """Canonical mm ``(N, 3)`` → voxel coordinates ``(N, 3)``."""
        return points @ self.to_voxel[:, :3].T + self.to_voxel[:, 3]

    def box(self, corners: np.ndarray) -> tuple[slice, slice, slice] | None:
        """Index box covering canonical points ``(N, 3)`` (e.g. the 8 corners of a bounding box), clipped."""
        vox = self.voxel(np.asarray(corners, dtype=np.float64))
        lo = np.maximum(np.floor(vox.min(axis=0)).astype(int), 0)
        hi = np.minimum(np.ceil(vox.max(axis=0)).astype(int) + 1, self.shape)
        if np.any(hi <= lo):
            return None
        return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))

    def aabb(self, lo: Sequence[float], hi: Sequence[float]) -> tuple[slice, slice, slice] | None:
        """Index box of the canonical axis-aligned box ``[lo, hi]``."""
        return self.box(np.array(list(itertools.product(*zip(lo, hi)))))

    def coords(self, box: tuple[slice, slice, slice], frame: np.ndarray | None = None,
               origin: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
        """Coordinates (float32) of the voxel centres in ``box``: canonical, or local ``frameᵀ (canon − origin)``."""
        a, c = self.to_canon[:, :3], self.to_canon[:, 3]
        if frame is not None:
            a, c = frame.T @ a, frame.T @ (c - origin)
        i, j, k = (np.arange(s.start, s.stop, dtype=np.float32) for s in box)
        i, j, k = i[:, None, None], j[None, :, None], k[None, None, :]
        out = []
        for r in range(3):
            a0, a1, a2, c0 = (float(v) for v in (*a[r], c[r]))
            out.append((a0 * i + a1 * j) + (a2 * k + c0))
        return out[0], out[1], out[2]


@dataclass(frozen=True)
class _Arch:
    """A dental arch (or the mandible's midline curve) as a dense polyline with arc length and buccal normals.

    ``s`` is the signed arc length from the midline (negative on the patient's left), ``normal`` points buccally.
    ``query`` returns ``(s, d)`` for canonical ``(x, y)``: the arc length of the nearest curve point and the signed
    distance from it along the buccal normal, interpolated from a 2D lookup table built once.
    """

    points: np.ndarray  # (N, 2)
    s: np.ndarray  # (N,)
    normal: np.ndarray  # (N, 2)
    table_s: np.ndarray
    table_d: np.ndarray
    origin: tuple[float, float]
    step: float

    def query(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        coords = np.stack([(x - self.origin[0]) / self.step, (y - self.origin[1]) / self.step])
        s = ndimage.map_coordinates(self.table_s, coords, order=1, mode="nearest", output=np.float32)
        d = ndimage.map_coordinates(self.table_d, coords, order=1, mode="nearest", output=np.float32)
        return s, d

    def select(self, x: np.ndarray, y: np.ndarray, *, max_abs_d: float) -> np.ndarray:
        """Flat indices of the points within about ``max_abs_d`` mm of the curve (nearest-cell table lookup)."""
        ix = np.clip(np.rint((x - self.origin[0]) / self.step), 0, self.table_d.shape[0] - 1).astype(np.intp)
        iy = np.clip(np.rint((y - self.origin[1]) / self.step), 0, self.table_d.shape[1] - 1).astype(np.intp)
        ix, iy = np.broadcast_arrays(ix, iy)
        d = self.table_d[ix.reshape(-1), iy.reshape(-1)]
        return np.flatnonzero(np.abs(d) <= max_abs_d + self.step)


def _half_arch(depth: float, width: float, power: float, s_end: float, flare_deg: float, extension: float,
               step: float = 0.25) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Right half of an arch ``y = depth·(1 − (x/width)^power)`` from the midline to arc length ``s_end``, then a
    straight extension of length ``extension`` turned ``flare_deg`` outward (the mandible toward the ramus).

    Returns points ``(N, 2)`` sampled every ``step`` mm of arc length and their arc lengths ``(N,)``.
    """
    x = np.linspace(0.0, 4.0 * width, 8000)
    y = depth * (1.0 - (x / width) ** power)
    seg = np.hypot(np.diff(x), np.diff(y))
    arc = np.concatenate([[0.0], np.cumsum(seg)])
    assert arc[-1] >= s_end, "arch parameterisation too short"  # internal invariant: width ≥ s_end / 4
    s_curve = np.arange(0.0, s_end + 1e-9, step)
    px, py = np.interp(s_curve, arc, x), np.interp(s_curve, arc, y)
    tangent = np.array([px[-1] - px[-2], py[-1] - py[-2]])
    tangent /= np.linalg.norm(tangent)
    turn = math.radians(flare_deg)  # rotate counter-clockwise: outward (+x) for the posteriorly running right half
    rot = np.array([[math.cos(turn), -math.sin(turn)], [math.sin(turn), math.cos(turn)]])
    direction = rot @ tangent
    s_ext = np.arange(step, extension + 1e-9, step)
    ex, ey = px[-1] + s_ext * direction[0], py[-1] + s_ext * direction[1]
    points = np.stack([np.concatenate([px, ex]), np.concatenate([py, ey])], axis=1)
    return points, np.concatenate([s_curve, s_end + s_ext])


def _solve_width(depth: float, power: float, s_target: float, x_target: float) -> float:
    """The ``width`` for which the half arch reaches ``x = x_target`` at arc length ``s_target`` (bisection)."""
    lo, hi = 0.5 * x_target, 6.0 * x_target
    for _ in range(40):
        mid = 0.5 * (lo + hi)
        x = np.linspace(0.0, 3.0 * mid, 3000)
        y = depth * (1.0 - (x / mid) ** power)
        arc = np.concatenate([[0.0], np.cumsum(np.hypot(np.diff(x), np.diff(y)))])
        if np.interp(s_target, arc, x) < x_target:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def _make_arch(left: tuple[np.ndarray, np.ndarray], right: tuple[np.ndarray, np.ndarray],
               extent: tuple[float, float, float, float], step: float = 0.75) -> _Arch:  # fmt: skip
    """Join mirrored left and right half arches and tabulate ``(s, d)`` over the canonical rectangle ``extent``."""
    (pl, sl), (pr, sr) = left, right
    pl = pl * np.array([-1.0, 1.0])
    points = np.concatenate([pl[::-1], pr[1:]])
    s = np.concatenate([-sl[::-1], sr[1:]])
    tangent = np.gradient(points, axis=0)
    tangent /= np.linalg.norm(tangent, axis=1, keepdims=True)
    normal = np.stack([-tangent[:, 1], tangent[:, 0]], axis=1)  # left of the left→right direction = buccal
    x0, x1, y0, y1 = extent
    gx, gy = np.meshgrid(np.arange(x0, x1 + step, step), np.arange(y0, y1 + step, step), indexing="ij")
    query = np.stack([gx.ravel(), gy.ravel()], axis=1)
    _, nearest = cKDTree(points).query(query)
    table_s = s[nearest].reshape(gx.shape).astype(np.float32)
    table_d = np.einsum("ij,ij->i", query - points[nearest], normal[nearest]).reshape(gx.shape).astype(np.float32)
    return _Arch(points=points, s=s, normal=normal, table_s=table_s, table_d=table_d, origin=(x0, y0), step=step)


# --------------------------------------------------------------------------------------------------------------------
# Teeth
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class _Root:
    """A tapered root in tooth-local mm: axis from ``top`` to ``apex`` (w decreasing), elliptic cross-section."""

    top: np.ndarray  # (3,) u, v, w
    apex: np.ndarray  # (3,)
    radius_top: tuple[float, float]  # (ru, rv)
    radius_apex: float

    def mask(self, u: np.ndarray, v: np.ndarray, w: np.ndarray, grow: float = 0.0) -> np.ndarray:
        wt, wa = float(self.top[2]), float(self.apex[2])
        f = (wt - w) / (wt - wa)
        fc = np.clip(f, 0.0, 1.0)
        uc = self.top[0] + fc * (self.apex[0] - self.top[0])
        vc = self.top[1] + fc * (self.apex[1] - self.top[1])
        ru = self.radius_top[0] + fc * (self.radius_apex - self.radius_top[0]) + grow
        rv = self.radius_top[1] + fc * (self.radius_apex - self.radius_top[1]) + grow
        radial = ((u - uc) / ru) ** 2 + ((v - vc) / rv) ** 2
        cap_w = 1.3 * self.radius_apex + grow
        cap = radial + ((w - wa) / cap_w) ** 2 * (f > 1.0)
        return ((f >= 0.0) & (radial <= 1.0)) | ((f > 1.0) & (cap <= 1.0))

    def canal(self, u: np.ndarray, v: np.ndarray, w: np.ndarray) -> np.ndarray:
        """The root canal: the central 28% of the root, stopping 2 mm short of the apex."""
        wt, wa = float(self.top[2]), float(self.apex[2])
        f = (wt - w) / (wt - wa)
        fc = np.clip(f, 0.0, 1.0)
        uc = self.top[0] + fc * (self.apex[0] - self.top[0])
        vc = self.top[1] + fc * (self.apex[1] - self.top[1])
        ru = 0.28 * (self.radius_top[0] + fc * (self.radius_apex - self.radius_top[0]))
        rv = 0.28 * (self.radius_top[1] + fc * (self.radius_apex - self.radius_top[1]))
        stop = 1.0 - 2.0 / (wt - wa)
        return (f >= 0.0) & (f <= stop) & (((u - uc) / ru) ** 2 + ((v - vc) / rv) ** 2 <= 1.0)

    @property
    def apex_landmark(self) -> np.ndarray:
        """Landmark of the apex: the end of the root axis, half a cap radius into the rounded tip."""
        return self.apex - np.array([0.0, 0.0, 0.5 * 1.3 * self.radius_apex])


@dataclass
class _Tooth:
    """One tooth: crown and roots in a local frame (u mesial, v buccal, w toward the occlusal plane; origin at the
    centre of the cemento-enamel junction), placed by ``centre`` and ``frame`` (columns u, v, w in canonical mm)."""

    name: str  # e.g. "lower-R-M2"
    kind: ToothKind
    centre: np.ndarray
    frame: np.ndarray
    a: float  # crown half mesiodistal width
    b: float  # crown half buccolingual width
    h: float  # crown height
    enamel: float  # enamel thickness on the sides
    enamel_top: float  # enamel thickness at the occlusal surface / cusp
    fossa: float  # molar central fossa depth
    roots: list[_Root]
    present: bool = True
    landmarks: dict[str, np.ndarray] = field(default_factory=dict)  # landmark letter → local point

    def to_canonical(self, local: np.ndarray) -> np.ndarray:
        return self.centre + self.frame @ local

    def crown_mask(self, u: np.ndarray, v: np.ndarray, w: np.ndarray, inset: float = 0.0,
                   inset_top: float = 0.0) -> np.ndarray:  # fmt: skip
        """Inside the crown (``inset`` = 0) or its dentin core (shrunk by the enamel thickness)."""
        a, b, h = self.a - inset, self.b - inset, self.h - inset_top
        t = w / h
        if self.kind == "molar":
            # bulging sides (widest at t = 0.65, where neighbours touch), rounded occlusal table, central fossa,
            # four cusps on the diagonals
            g = np.where(t < 0.65, 0.8 + 0.2 * (1.0 - ((t - 0.65) / 0.65) ** 2), 1.0 - 0.25 * ((t - 0.65) / 0.35) ** 2)
            g = np.maximum(g, 1e-3)  # outside 0 ≤ w ≤ h the profile is meaningless (and masked below)
            rho = np.abs(u / (a * g)) ** 2.6 + np.abs(v / (b * g)) ** 2.6
            r2 = (u / a) ** 2 + (v / b) ** 2
            angle = np.arctan2(v / b, u / a)
            cusps = 0.6 * (1.0 - np.sin(2.0 * angle) ** 2) * np.clip(r2 / 0.15, 0.0, 1.0)
            top = h - self.fossa * np.exp(-((u / (0.45 * a)) ** 2) - (v / (0.4 * b)) ** 2) - 1.2 * r2 - cusps
            return (w >= 0.0) & (w <= top) & (rho <= 1.0)
        if self.kind == "incisor":
            gu = 0.8 + 0.2 * np.clip(t / 0.5, 0.0, 1.0)
            gv = 1.0 - 0.75 * np.clip((t - 0.3) / 0.7, 0.0, 1.0)
            top = h - 0.6 * (u / a) ** 2
            return (w >= 0.0) & (w <= top) & ((u / (a * gu)) ** 2 + (v / (b * gv)) ** 2 <= 1.0)
        # cuspid / premolar: elliptic cross-section closing in an ellipsoidal cap (a blunt cusp)
        t0 = 0.35 if self.kind == "cuspid" else 0.45
        g = np.where(t < t0, 0.78 + 0.22 * t / t0, np.sqrt(np.clip(1.0 - ((t - t0) / (1.0 - t0)) ** 2, 0.0, 1.0)))
        g = np.maximum(g, 1e-3)
        return (w >= 0.0) & (w <= h) & ((u / (a * g)) ** 2 + (v / (b * g)) ** 2 <= 1.0)

    def trunk_mask(self, u: np.ndarray, v: np.ndarray, w: np.ndarray) -> np.ndarray:
        """Molar root trunk (the 3 mm below the junction, before the roots split); other kinds use their root."""
        if self.kind != "molar":
            return np.zeros(u.shape, dtype=bool)
        shrink = 0.78 - 0.04 * np.clip(-w, 0.0, 3.0)
        rho = np.abs(u / (self.a * shrink)) ** 2.6 + np.abs(v / (self.b * shrink)) ** 2.6
        return (w <= 0.5) & (w >= -3.0) & (rho <= 1.0)

    def pulp_mask(self, u: np.ndarray, v: np.ndarray, w: np.ndarray) -> np.ndarray:
        if self.kind == "molar":
            chamber = (np.abs(u / (0.36 * self.a)) ** 2.6 + np.abs(v / (0.36 * self.b)) ** 2.6 <= 1.0) & (
                (w >= -2.5) & (w <= 0.4 * self.h)
            )
        else:
            chamber = ((u / (0.3 * self.a)) ** 2 + (v / (0.3 * self.b)) ** 2 <= 1.0) & (w >= -1.0) & (w <= 0.5 * self.h)
        for root in self.roots:
            chamber |= root.canal(u, v, w)
        return chamber

    def local_bounds(self) -> tuple[np.ndarray, np.ndarray]:
        depth = max(-float(r.apex[2]) + 1.5 * r.radius_apex for r in self.roots) + 1.5
        spread = max(max(abs(float(r.apex[0])), abs(float(r.apex[1]))) for r in self.roots) + 2.0
        lo = np.array([-max(self.a, spread) - 1.5, -max(self.b, spread) - 1.5, -depth])
        hi = np.array([max(self.a, spread) + 1.5, max(self.b, spread) + 1.5, self.h + 0.5])
        return lo, hi


def _tilt(frame: np.ndarray, mesial_deg: float, buccal_deg: float) -> np.ndarray:
    """Tip the tooth axis ``mesial_deg`` toward u and ``buccal_deg`` toward v (about the junction centre)."""
    m, b = math.radians(mesial_deg), math.radians(buccal_deg)
    rot_v = np.array([[math.cos(m), 0, math.sin(m)], [0, 1, 0], [-math.sin(m), 0, math.cos(m)]])
    rot_u = np.array([[1, 0, 0], [0, math.cos(b), math.sin(b)], [0, -math.sin(b), math.cos(b)]])
    return frame @ rot_v @ rot_u


def _make_roots(kind: ToothKind, jaw: str, a: float, b: float, length: float, rng: np.random.Generator,
                third_molar: bool) -> list[_Root]:  # fmt: skip
    """Roots in tooth-local mm; lower molars: mesial then distal; upper molars: mesiobuccal, distobuccal, palatal."""
    apex_r = float(rng.uniform(0.6, 0.85))  # thin tips: apices blur into the bone
    if kind != "molar":
        ru, rv = (0.55 * a, 0.8 * b) if kind == "incisor" else (0.62 * a, 0.72 * b)
        lean = rng.normal(0.0, 0.4, size=2)
        return [_Root(np.array([0.0, 0.0, 0.5]), np.array([lean[0], lean[1], -length]), (ru, rv), apex_r)]
    if jaw == "lower":
        half_sep = float(rng.uniform(1.2, 2.4) if third_molar else rng.uniform(2.0, 3.0))  # apices 4–6 mm apart
        distal_len = length * float(rng.uniform(0.92, 1.0))
        curve = float(rng.uniform(0.0, 0.8))  # distal root curving mesially
        mesial = _Root(np.array([0.45 * a, 0.0, -2.5]), np.array([half_sep, rng.normal(0, 0.3), -length]),
                       (0.3 * a, 0.8 * b), apex_r)  # fmt: skip
        distal = _Root(np.array([-0.45 * a, 0.0, -2.5]), np.array([-half_sep + curve, rng.normal(0, 0.3), -distal_len]),
                       (0.3 * a, 0.75 * b), apex_r)  # fmt: skip
        return [mesial, distal]
    return [
        _Root(np.array([0.45 * a, 0.4 * b, -2.5]), np.array([0.5 * a, 0.55 * b, -length]), (0.28 * a, 0.3 * b), apex_r),
        _Root(np.array([-0.45 * a, 0.4 * b, -2.5]), np.array([-0.5 * a, 0.55 * b, -0.95 * length]),
              (0.26 * a, 0.28 * b), apex_r),
        _Root(np.array([0.0, -0.4 * b, -2.5]), np.array([0.0, -0.75 * b, -1.05 * length]), (0.32 * a, 0.3 * b), apex_r),
    ]  # fmt: skip


# --------------------------------------------------------------------------------------------------------------------
# Anatomy sampling
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class _Anatomy:
    teeth: list[_Tooth]
    lower_arch: _Arch  # mandible midline curve (through the lower teeth, then flaring toward the ramus)
    upper_arch: _Arch
    lower_crest: tuple[np.ndarray, np.ndarray]  # |s| → alveolar crest z (lower)
    upper_crest: tuple[np.ndarray, np.ndarray]
    lower_s_end: float  # |s| of the gonial angle (the ramus spans the last 2·ramus_half_width mm before it)
    upper_s_end: float  # |s| behind the maxillary tuberosity
    upper_tuber_y: float  # canonical y of the maxillary tuberosity
    lower_p2_s: float
    body_height: float
    cortical: float
    arch_depth: float
    molar_half_width: float
    params: dict[str, float]


def _sample_missing(rng: np.random.Generator, incomplete: bool) -> set[str]:
    """Landmark-bearing lower teeth (e.g. ``"L-M3"``) absent from an incomplete case: at least one, third molars most
    often."""
    if not incomplete:
        return set()
    keys = [(side, tooth) for side in _SIDES for tooth in _LANDMARK_TEETH]
    prob = np.array([MISSING_PROBABILITY[tooth] for _, tooth in keys])
    absent = rng.random(len(keys)) < prob
    if not absent.any():
        absent[rng.choice(len(keys), p=prob / prob.sum())] = True
    return {f"{side}-{tooth}" for (side, tooth), gone in zip(keys, absent) if gone}


def _sample_anatomy(rng: np.random.Generator) -> _Anatomy:
    """Draw one head: arches, teeth (all present; absence is applied later), jaw bones and soft-tissue parameters."""
    size = float(rng.uniform(0.92, 1.08))  # global tooth size
    depth = float(rng.uniform(33.0, 39.0))
    power = float(rng.uniform(2.0, 2.8))
    molar_half_width = float(rng.uniform(22.5, 27.5))  # second molars 45–55 mm apart
    asym = float(rng.uniform(-0.03, 0.03))
    spee = float(rng.uniform(0.3, 1.2))
    gap = float(rng.uniform(0.5, 3.0))
    overjet = float(rng.uniform(2.0, 3.5))
    flare = float(rng.uniform(15.0, 25.0))
    body_height = float(rng.uniform(25.0, 33.0))
    cortical = float(rng.uniform(2.0, 4.0))
    lamina = float(rng.uniform(0.5, 0.9))

    teeth: list[_Tooth] = []
    halves: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]] = {}
    centres_s: dict[tuple[str, str], list[float]] = {}
    crest_z: dict[str, list[tuple[float, float]]] = {"lower": [], "upper": []}
    type_jitter = {(jaw, spec[0]): float(rng.uniform(0.96, 1.04)) for jaw in ("lower", "upper")
                   for spec in (_LOWER_TEETH if jaw == "lower" else _UPPER_TEETH)}  # fmt: skip
    extra: dict[str, float] = {}
    for jaw, table in (("lower", _LOWER_TEETH), ("upper", _UPPER_TEETH)):
        for side, sign in _SIDES.items():
            # tooth sizes on this side, then the arch that places their centres touching along the curve
            specs = []
            for name, kind, md, bl, height, root in table:
                jitter = size * type_jitter[(jaw, name)] * float(rng.uniform(0.98, 1.02))
                if name == "M3":
                    jitter *= float(rng.uniform(0.92, 1.08))
                specs.append((name, kind, md * jitter, bl * jitter, height * jitter,
                              root * jitter * float(rng.uniform(0.95, 1.05))))  # fmt: skip
            s_centres, s = [], 0.0
            for _, _, md, *_ in specs:
                s_centres.append(s + md / 2.0 - 0.15)
                s += md - 0.3  # neighbours overlap 0.3 mm at the contact
            s_m2 = s_centres[6]
            if jaw == "lower":
                x_m2 = molar_half_width * (1.0 + sign * asym)
                arch_depth = depth
            else:
                x_m2 = molar_half_width * (1.0 + sign * asym) + 1.5
                arch_depth = depth + overjet
            width = _solve_width(arch_depth, power, s_m2, x_m2)
            s_arch_end = s + (2.0 if jaw == "lower" else 6.0)
            half = _half_arch(arch_depth, width, power, s_arch_end, flare if jaw == "lower" else 0.0,
                              extension=70.0 if jaw == "lower" else 30.0)  # fmt: skip
            halves[(jaw, side)] = half
            centres_s[(jaw, side)] = s_centres
            if jaw == "lower":
                extra[f"lower_end_{side}"] = s_arch_end
            else:
                extra[f"upper_end_{side}"] = s_arch_end
            points, arcs = half
            for (name, kind, md, bl, height, root), sc in zip(specs, s_centres):
                k = int(np.clip(np.searchsorted(arcs, sc), 1, len(arcs) - 1))
                f = (sc - arcs[k - 1]) / (arcs[k] - arcs[k - 1])
                p = points[k - 1] + f * (points[k] - points[k - 1])
                tangent = points[k] - points[k - 1]
                tangent /= np.linalg.norm(tangent)
                mirror = np.array([sign, 1.0])
                p, tangent = p * mirror, tangent * mirror  # tangent points away from the midline
                buccal = np.array([-tangent[1], tangent[0]]) * sign
                occlusal_z = spee * max(0.0, (sc - 25.0) / 25.0) ** 2
                mesial = np.array([-tangent[0], -tangent[1], 0.0])
                buccal3 = np.array([buccal[0], buccal[1], 0.0])
                if jaw == "lower":
                    cej_z = occlusal_z - height
                    frame = np.stack([mesial, buccal3, np.array([0.0, 0.0, 1.0])], axis=1)
                    crest_z["lower"].append((sc, cej_z - 1.5))
                else:
                    cej_z = occlusal_z + gap + height
                    frame = np.stack([mesial, buccal3, np.array([0.0, 0.0, -1.0])], axis=1)
                    crest_z["upper"].append((sc, cej_z + 1.5))
                tilt_mesial = float(np.clip(rng.normal(3.0 if kind == "molar" else 0.0, 2.0), -6.0, 8.0))
                tilt_buccal = float(np.clip(rng.normal(0.0, 2.0), -5.0, 5.0))
                if kind == "incisor" or kind == "cuspid":
                    tilt_buccal += 8.0 if jaw == "upper" else 5.0  # proclined front teeth
                frame = _tilt(frame, tilt_mesial, tilt_buccal)
                a, b = md / 2.0, bl / 2.0
                roots = _make_roots(kind, jaw, a, b, root, rng, third_molar=(name == "M3"))
                tooth = _Tooth(
                    name=f"{jaw}-{side}-{name}", kind=kind, centre=np.array([p[0], p[1], cej_z]), frame=frame,
                    a=a, b=b, h=height, enamel=float(rng.uniform(1.0, 1.4)),
                    enamel_top=float(rng.uniform(1.8, 2.3)) if kind == "molar" else float(rng.uniform(1.5, 1.9)),
                    fossa=float(rng.uniform(1.2, 1.7)), roots=roots,
                )  # fmt: skip
                if jaw == "lower" and name in _LANDMARK_TEETH:
                    letters = _LANDMARK_TEETH[name]
                    if kind == "cuspid":
                        tooth.landmarks[letters[0]] = np.array([0.0, 0.0, height - 1.0])
                    else:
                        tooth.landmarks[letters[0]] = np.array([0.0, 0.0, height - tooth.fossa - 1.0])
                        tooth.landmarks[letters[1]] = roots[0].apex_landmark  # mesial root
                        tooth.landmarks[letters[2]] = roots[1].apex_landmark  # distal root
                teeth.append(tooth)

    extent_lower = (-95.0, 95.0, -110.0, depth + 25.0)
    extent_upper = (-80.0, 80.0, -70.0, depth + 30.0)
    lower_arch = _make_arch(halves[("lower", "L")], halves[("lower", "R")], extent_lower)
    upper_arch = _make_arch(halves[("upper", "L")], halves[("upper", "R")], extent_upper)

    def crest(jaw: str) -> tuple[np.ndarray, np.ndarray]:
        pairs = sorted(crest_z[jaw])
        return np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])

    lower_end = 0.5 * (extra["lower_end_L"] + extra["lower_end_R"])  # just behind the third molars
    upper_end = 0.5 * (extra["upper_end_L"] + extra["upper_end_R"])
    m3 = [t for t in teeth if t.name.startswith("upper") and t.name.endswith("M3")]
    upper_tuber_y = min(float(t.centre[1]) for t in m3) - 7.0
    lower_p2_s = float(np.mean([centres_s[("lower", s)][4] for s in _SIDES]))
    params = {
        "lamina_dura": lamina,
        "vault": float(rng.uniform(10.0, 14.0)),
        "sinus_scale": float(rng.uniform(0.85, 1.15)),
        "fat": float(rng.uniform(4.0, 9.0)),
        "face_width": float(rng.uniform(34.0, 42.0)),
        "ramus_half_width": float(rng.uniform(13.0, 16.0)),
        "ramus_thickness": float(rng.uniform(4.0, 5.0)),
        "canal_radius": float(rng.uniform(1.1, 1.5)),
        "airway_width": float(rng.uniform(9.0, 13.0)),
        "airway_depth": float(rng.uniform(5.0, 8.0)),
    }
    # the ramus starts behind the third molars; the body runs on under it to the gonial angle at its back
    lower_s_end = lower_end + 2.0 * params["ramus_half_width"] - 2.0
    return _Anatomy(
        teeth=teeth, lower_arch=lower_arch, upper_arch=upper_arch, lower_crest=crest("lower"),
        upper_crest=crest("upper"), lower_s_end=lower_s_end, upper_s_end=upper_end, upper_tuber_y=upper_tuber_y,
        lower_p2_s=lower_p2_s, body_height=body_height, cortical=cortical,
        arch_depth=depth, molar_half_width=molar_half_width,
        params=params,
    )  # fmt: skip


def _apply_absence(anatomy: _Anatomy, rng: np.random.Generator, missing: set[str]) -> None:
    """Mark absent teeth: the chosen landmark teeth, plus a few others at random (drawn in every case)."""
    for tooth in anatomy.teeth:
        jaw, side, name = tooth.name.split("-")
        if jaw == "upper" and name == "M3":
            gone = rng.random() < _UPPER_M3_MISSING_PROBABILITY
        elif jaw == "lower" and name in _LANDMARK_TEETH:
            gone = False
        else:
            gone = rng.random() < _OTHER_MISSING_PROBABILITY
        if jaw == "lower" and f"{side}-{name}" in missing:
            gone = True
        tooth.present = not gone


def _landmarks_canonical(anatomy: _Anatomy) -> tuple[np.ndarray, np.ndarray]:
    """All 14 landmarks in canonical mm ``(14, 3)`` (absent teeth included) and the presence mask ``(14,)``."""
    points = np.full((NUM_LANDMARKS, 3), np.nan)
    present = np.zeros(NUM_LANDMARKS, dtype=bool)
    for tooth in anatomy.teeth:
        side = tooth.name.split("-")[1]
        for letter, local in tooth.landmarks.items():
            row = LANDMARK_NAMES.index(f"{side}{letter}")
            points[row] = tooth.to_canonical(local)
            present[row] = tooth.present
    assert not np.isnan(points).any(), "every landmark must be defined"
    return points, present


# --------------------------------------------------------------------------------------------------------------------
# Painting tissue labels
# --------------------------------------------------------------------------------------------------------------------


def _sdf_ellipsoid(x: np.ndarray, y: np.ndarray, z: np.ndarray, centre: Sequence[float], semi: Sequence[float],
                   power: float = 2.0) -> np.ndarray:  # fmt: skip
    """Approximate signed distance (mm, negative inside) to a superellipsoid ``Σ|x_i/a_i|^p = 1``."""
    if power == 2.0:
        rho = ((x - centre[0]) / semi[0]) ** 2 + ((y - centre[1]) / semi[1]) ** 2 + ((z - centre[2]) / semi[2]) ** 2
        return (np.sqrt(rho) - 1.0) * min(semi)
    rho = (np.abs((x - centre[0]) / semi[0]) ** power + np.abs((y - centre[1]) / semi[1]) ** power
           + np.abs((z - centre[2]) / semi[2]) ** power)  # fmt: skip
    return (rho ** (1.0 / power) - 1.0) * min(semi)


def _paint_soft_tissue(labels: np.ndarray, grid: _Grid, anatomy: _Anatomy) -> None:
    """Head, face and neck envelope (skin, subcutaneous fat, soft tissue), fat pads, the cranial shell and brain."""
    box = grid.aabb((-200, -200, -200), (200, 200, 200))
    x, y, z = grid.coords(box)
    depth, fat = anatomy.arch_depth, anatomy.params["fat"]
    half_face = anatomy.molar_half_width + anatomy.params["face_width"]
    env = _sdf_ellipsoid(x, y, z, (0.0, (depth - 70.0) / 2.0, -8.0), (half_face, (depth + 100.0) / 2.0, 68.0), 2.5)
    np.minimum(env, _sdf_ellipsoid(x, y, z, _HEAD_CENTRE, _HEAD_SEMI), out=env)  # cranium
    neck = _sdf_ellipsoid(x, y, z, (0.0, -22.0, 0.0), (52.0, 58.0, 1e6))
    np.minimum(env, np.maximum(neck, z + 30.0), out=env)
    sub = labels[box]
    sub[env <= 0.0] = Tissue.SOFT
    sub[(env <= -1.5) & (env > -1.5 - fat)] = Tissue.FAT
    # cranial vault: outer table, diploë, inner table (visible only in a tall field of view), brain inside
    skull = _sdf_ellipsoid(x, y, z, _HEAD_CENTRE, _SKULL_SEMI)
    sub[(skull <= 0.0) & (skull > -2.0)] = Tissue.CORTICAL
    sub[(skull <= -2.0) & (skull > -4.0)] = Tissue.CANCELLOUS
    sub[(skull <= -4.0) & (skull > -6.0)] = Tissue.CORTICAL
    sub[skull <= -6.0] = Tissue.SOFT
    # buccal fat pads and parapharyngeal fat
    for sign in (-1.0, 1.0):
        for centre, semi in (
            ((sign * (anatomy.molar_half_width + 15.0), 0.0, 4.0), (6.0, 12.0, 12.0)),
            ((sign * 20.0, anatomy.upper_tuber_y - 18.0, 0.0), (5.0, 8.0, 20.0)),
        ):
            pad = grid.aabb(np.subtract(centre, semi), np.add(centre, semi))
            if pad is None:
                continue
            px, py, pz = grid.coords(pad)
            region = labels[pad]
            region[(_sdf_ellipsoid(px, py, pz, centre, semi) <= 0.0) & (region == Tissue.SOFT)] = Tissue.FAT


def _paint_spine_and_airway(labels: np.ndarray, grid: _Grid, anatomy: _Anatomy) -> None:
    """Cervical vertebral bodies (cortical shell, cancellous core) and the pharyngeal airway."""
    y_airway = anatomy.upper_tuber_y - 14.0
    y_spine = y_airway - 20.0
    for k in range(6):
        zc = 8.0 - 18.0 * k
        box = grid.aabb((-11, y_spine - 10, zc - 8), (11, y_spine + 10, zc + 8))
        if box is None:
            continue
        x, y, z = grid.coords(box)
        body = _sdf_ellipsoid(x, y, z, (0.0, y_spine, zc), (9.0, 8.0, 7.0), 4.0)
        sub = labels[box]
        sub[body <= 0.0] = Tissue.CORTICAL
        sub[body <= -1.2] = Tissue.CANCELLOUS
    box = grid.aabb((-20, y_airway - 12, -120), (20, y_airway + 12, 40))
    if box is not None:
        x, y, z = grid.coords(box)
        w, d = anatomy.params["airway_width"], anatomy.params["airway_depth"]
        airway = ((x / w) ** 2 + ((y - y_airway) / d) ** 2 <= 1.0) & (z <= 35.0)
        sub = labels[box]
        sub[airway & (sub <= Tissue.SOFT)] = Tissue.AIR


def _paint_maxilla(labels: np.ndarray, grid: _Grid, anatomy: _Anatomy) -> None:
    """Midface: maxilla (alveolar process around the upper roots, palate, sinuses), nasal cavity, orbits.

    The bone is the inside of the upper arch extruded upward (flaring laterally toward the zygoma) until it meets
    the cranial shell; cavities are carved into it.
    """
    arch = anatomy.upper_arch
    crest_s, crest_z = anatomy.upper_crest
    z_low = float(crest_z.min())
    top = z_low + 80.0
    box = grid.aabb((-70, anatomy.upper_tuber_y - 2, z_low - 1), (70, anatomy.arch_depth + 25, top + 1))
    if box is None:
        return
    x, y, z = grid.coords(box)
    s, d = arch.query(x, y)
    abs_s = np.abs(s)
    z_crest = np.interp(abs_s, crest_s, crest_z).astype(np.float32)
    half = 6.0 + 1.5 * np.clip((abs_s - 20.0) / 25.0, 0.0, 1.0)  # thicker at the molars
    half = half + 0.35 * np.clip(z - z_crest - 8.0, 0.0, 24.0) * np.clip((abs_s - 25.0) / 15.0, 0.0, 1.0)  # buttress
    inward = np.clip((-d - 4.0) / 12.0, 0.0, 1.0)
    vault = anatomy.params["vault"] * inward * inward * (3.0 - 2.0 * inward)
    z_floor = z_crest + vault  # alveolar crest on the arch, rising to the palatal vault inside it
    brain = _sdf_ellipsoid(x, y, z, _HEAD_CENTRE, _SKULL_SEMI) <= -2.0  # keep the cranium intact
    outer = (d <= half) & (z >= z_floor) & (y >= anatomy.upper_tuber_y) & (abs_s <= anatomy.upper_s_end) & ~brain
    inner = (d <= half - 1.5) & (z >= z_floor + 1.5) & (y >= anatomy.upper_tuber_y + 1.5)
    sub = labels[box]
    sub[outer] = Tissue.CORTICAL
    sub[inner & outer] = Tissue.CANCELLOUS
    # nasal cavity (pear-shaped, narrowing into the ethmoid), septum, inferior turbinates
    nasal_floor = float(np.interp(0.0, crest_s, crest_z)) + anatomy.params["vault"] + 3.0  # palate ≈ 3 mm thick
    height = z - nasal_floor
    nasal_half = np.maximum(12.0 * (1.0 - ((height - 10.0) / 30.0) ** 2), 4.5 * (height < 60.0))
    nasal = (np.abs(x) <= nasal_half) & (height >= 0.0) & (y <= anatomy.arch_depth - 2.0 - 0.3 * height) & outer
    sub[nasal] = Tissue.AIR
    turbinate = ((np.abs(x) - (nasal_half - 2.5)) / 2.2) ** 2 + ((height - 9.0) / 4.0) ** 2
    sub[nasal & (turbinate <= 1.0)] = Tissue.SOFT
    sub[nasal & (turbinate <= 0.2)] = Tissue.CORTICAL
    sub[nasal & (np.abs(x) <= 0.8)] = Tissue.CORTICAL
    # maxillary sinuses above the molar roots and orbits above them (fat, globe), each with a thin cortical wall
    k = anatomy.params["sinus_scale"]
    for tooth in (t for t in anatomy.teeth if t.name.startswith("upper") and t.name.endswith("M1")):
        sinus = _sdf_ellipsoid(x, y, z, (0.85 * tooth.centre[0], tooth.centre[1] + 2.0, nasal_floor + 9.0),
                               (11.0 * k, 15.0 * k, 10.0 * k))  # fmt: skip
        sub[(sinus <= 1.2) & outer] = Tissue.CORTICAL
        sub[(sinus <= 0.0) & outer] = Tissue.AIR
        side = math.copysign(1.0, float(tooth.centre[0]))
        orbit = _sdf_ellipsoid(x, y, z, (side * 32.0, anatomy.arch_depth - 8.0, nasal_floor + 36.0), (16.0, 22.0, 16.0))
        sub[(orbit <= 1.5) & outer] = Tissue.CORTICAL
        sub[(orbit <= 0.0) & outer] = Tissue.FAT
        globe = _sdf_ellipsoid(x, y, z, (side * 32.0, anatomy.arch_depth + 2.0, nasal_floor + 37.0), (11.5,) * 3)
        sub[(globe <= 0.0) & (sub != Tissue.AIR)] = Tissue.SOFT
    # a thin air layer between the tongue and the palate
    oral = _sdf_ellipsoid(x, y, z, (0.0, 0.3 * anatomy.arch_depth - 5.0, z_low + 0.5 * anatomy.params["vault"]),
                          (14.0, 20.0, 2.0))  # fmt: skip
    sub[(oral <= 0.0) & (sub == Tissue.SOFT)] = Tissue.AIR


def _paint_mandible(labels: np.ndarray, grid: _Grid, anatomy: _Anatomy) -> None:
    """Mandible: body along the arch (cortical shell, cancellous core, mandibular canal) and the ramus.

    Only voxels near the arch (|d| ≤ 11 mm, found with a cheap table lookup) are evaluated.
    """
    arch = anatomy.lower_arch
    crest_s, crest_z = anatomy.lower_crest
    height, cortical = anatomy.body_height, anatomy.cortical
    z_min = float(crest_z.min()) - height - 6.0
    box = grid.aabb((-75, -100, z_min), (75, anatomy.arch_depth + 20, 34.0))
    if box is None:
        return
    x, y, z = grid.coords(box)
    near = arch.select(x, y, max_abs_d=11.0)
    x, y, z = x.reshape(-1)[near], y.reshape(-1)[near], z.reshape(-1)[near]
    s, d = arch.query(x, y)
    abs_s = np.abs(s)
    s_end = anatomy.lower_s_end
    z_crest = np.interp(np.minimum(abs_s, float(crest_s.max())), crest_s, crest_z).astype(np.float32)
    body_h = height + 3.0 * np.exp(-((abs_s / 15.0) ** 2))  # taller symphysis
    z_base = z_crest - body_h
    zc, hz = 0.5 * (z_crest + z_base), 0.5 * body_h
    zn = (z - zc) / hz  # −1 at the lower border, +1 at the alveolar crest
    width = np.interp(abs_s, [0.0, 15.0, 30.0, 45.0, 80.0], [7.0, 5.6, 5.9, 6.9, 6.4]).astype(np.float32)
    width = width * (1.0 - 0.22 * np.clip(zn, 0.0, 1.0) ** 2)  # narrower alveolar process
    chin = 2.5 * np.exp(-((abs_s / 12.0) ** 2)) * np.clip(-zn, 0.0, 1.0)  # mental protuberance
    dd = d - chin
    end = (np.clip(abs_s - s_end, 0.0, None) / 6.0) ** 2
    outer = np.abs(dd / width) ** 2.4 + np.abs(zn) ** 3 + end <= 1.0
    zc_in = 0.5 * ((z_crest - 0.8) + (z_base + 1.2 * cortical))
    hz_in = 0.5 * (body_h - 0.8 - 1.2 * cortical)
    inner = np.abs(dd / np.maximum(width - 0.6 * cortical, 0.5)) ** 2.4 + np.abs((z - zc_in) / hz_in) ** 3 + end <= 1.0
    # ramus: a plate in the (s, z) plane of the flared extension, leaning back, with the sigmoid notch on top
    r_half, r_thick = anatomy.params["ramus_half_width"], anatomy.params["ramus_thickness"]
    z_base_end = float(crest_z[-1]) - height
    r_lo, r_hi = z_base_end + 2.0, 26.0
    r_zc, r_hz = 0.5 * (r_lo + r_hi), 0.5 * (r_hi - r_lo)
    sr = (abs_s - (s_end - r_half + 3.0)) - math.tan(math.radians(10.0)) * (z - r_zc)  # front edge behind the M3
    ramus_rho = np.abs(sr / r_half) ** 4 + np.abs((z - r_zc) / r_hz) ** 4 + (d / r_thick) ** 2
    notch = sr**2 + (z - (r_hi + 2.0)) ** 2 < 8.0**2
    ramus = (ramus_rho <= 1.0) & ~notch
    ramus_in = (
        np.abs(sr / (r_half - 1.5)) ** 4 + np.abs((z - r_zc) / (r_hz - 1.5)) ** 4 + (d / (r_thick - 1.8)) ** 2 <= 1.0
    ) & ~notch
    flat = np.zeros(near.shape, dtype=np.int8)  # 0 = untouched
    flat[outer | ramus] = Tissue.CORTICAL
    flat[(inner & outer) | ramus_in] = Tissue.CANCELLOUS
    # mandibular canal: from below the second premolar back into the ramus, a cortical-walled tube
    canal_z = z_base + 0.33 * body_h
    r = anatomy.params["canal_radius"]
    along = (abs_s >= anatomy.lower_p2_s) & (abs_s <= s_end + 3.0) & inner
    radial = (d + 0.8) ** 2 + (z - canal_z) ** 2
    flat[along & (radial <= (r + 0.6) ** 2)] = Tissue.CORTICAL
    flat[along & (radial <= r**2)] = Tissue.SOFT
    _scatter(labels, box, near, flat)


def _scatter(labels: np.ndarray, box: tuple[slice, slice, slice], flat_index: np.ndarray, values: np.ndarray) -> None:
    """Write ``values`` (0 = leave as is) at the flat indices ``flat_index`` of the box ``labels[box]``."""
    sub = labels[box].copy()
    view = sub.reshape(-1)
    keep = values != 0
    view[flat_index[keep]] = values[keep]
    labels[box] = sub


def _paint_tooth(labels: np.ndarray, grid: _Grid, tooth: _Tooth, lamina: float) -> None:
    """One tooth: lamina dura around its roots (where bone), dentin roots and core, enamel cap, pulp."""
    lo, hi = tooth.local_bounds()
    corners = np.array(list(itertools.product(*zip(lo, hi))))
    box = grid.box(np.array([tooth.to_canonical(c) for c in corners]))
    if box is None:
        return
    u, v, w = grid.coords(box, frame=tooth.frame, origin=tooth.centre)
    sub = labels[box]
    socket = np.zeros(u.shape, dtype=bool)
    root = tooth.trunk_mask(u, v, w)
    for r in tooth.roots:
        socket |= r.mask(u, v, w, grow=lamina)
        root |= r.mask(u, v, w)
    sub[socket & (sub == Tissue.CANCELLOUS)] = Tissue.CORTICAL
    crown = tooth.crown_mask(u, v, w)
    core = tooth.crown_mask(u, v, w, inset=tooth.enamel, inset_top=tooth.enamel_top)
    sub[root | (crown & core)] = Tissue.DENTIN
    sub[crown & ~core] = Tissue.ENAMEL
    sub[tooth.pulp_mask(u, v, w) & (root | crown)] = Tissue.PULP


def _paint(grid: _Grid, anatomy: _Anatomy) -> np.ndarray:
    labels = np.full(grid.shape, Tissue.AIR, dtype=np.int8)
    _paint_soft_tissue(labels, grid, anatomy)
    _paint_spine_and_airway(labels, grid, anatomy)
    _paint_maxilla(labels, grid, anatomy)
    _paint_mandible(labels, grid, anatomy)
    for tooth in anatomy.teeth:
        if tooth.present:
            _paint_tooth(labels, grid, tooth, anatomy.params["lamina_dura"])
    return labels


# --------------------------------------------------------------------------------------------------------------------
# Intensities
# --------------------------------------------------------------------------------------------------------------------


def _kernel_gain(sigma_vox: float, truncate: float) -> float:
    """``sqrt(Σ k²)`` of scipy's discrete Gaussian kernel: how much it shrinks the std of white noise (per axis)."""
    if sigma_vox <= 1e-6:
        return 1.0
    radius = int(truncate * sigma_vox + 0.5)
    xs = np.arange(-radius, radius + 1, dtype=np.float64)
    kernel = np.exp(-0.5 * (xs / sigma_vox) ** 2)
    kernel /= kernel.sum()
    return float(np.sqrt(np.sum(kernel**2)))


def _render(labels: np.ndarray, spacing: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Tissue labels → HU: per-case tissue means, trabecular texture and noise (white, then blurred with the
    point-spread function so that its std after blurring equals the drawn σ), rounded to integers like real CT."""
    mean = np.zeros(len(Tissue), dtype=np.float32)
    texture = np.zeros(len(Tissue), dtype=np.float32)
    for tissue in HU_RANGES:  # the eight v1 tissues, in their order (v2's extra tissues never occur here)
        mean[tissue] = rng.uniform(*HU_RANGES[tissue])
        texture[tissue] = _TEXTURE_HU[tissue]
    noise_sigma = float(rng.uniform(*_NOISE_SIGMA_HU))
    psf_vox = float(rng.uniform(*_PSF_SIGMA_MM)) / spacing
    truncate = 3.0
    gain = float(np.prod([_kernel_gain(s, truncate) for s in psf_vox]))
    amplitude = (np.sqrt(noise_sigma**2 + texture**2) / gain).astype(np.float32)
    volume = rng.standard_normal(labels.shape, dtype=np.float32)
    volume *= amplitude[labels]
    volume += mean[labels]
    volume = ndimage.gaussian_filter(volume, sigma=psf_vox, truncate=truncate, mode="nearest", output=np.float32)
    np.rint(volume, out=volume)
    np.clip(volume, -1024.0, 4095.0, out=volume)
    return volume


# --------------------------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------------------------


def _check_shape(shape: Sequence[int]) -> tuple[int, int, int]:
    try:
        out = tuple(int(n) for n in shape)
    except (TypeError, ValueError):
        raise ValueError(f"shape must be three integers (D, H, W), got {shape!r}") from None
    if len(out) != 3 or any(n != m for n, m in zip(out, shape)) or min(out) < _MIN_SIDE:
        raise ValueError(f"shape must be three integers >= {_MIN_SIDE} (D, H, W), got {shape!r}")
    return out  # type: ignore[return-value]


def _sample_spacing(rng: np.random.Generator, shape: tuple[int, int, int]) -> np.ndarray:
    """Anisotropic spacing: realistic ranges, raised where needed so the field of view holds the jaw."""
    lo = max(INPLANE_SPACING_MM[0], REQUIRED_FOV_MM[0] / min(shape[0], shape[1]))
    hi = max(INPLANE_SPACING_MM[1], lo * 1.15)
    inplane = float(rng.uniform(lo, hi))
    lo_z = max(SLICE_SPACING_MM[0], REQUIRED_FOV_MM[2] / shape[2], inplane)
    hi_z = max(SLICE_SPACING_MM[1], lo_z * 1.5)
    return np.array([inplane, inplane, float(rng.uniform(lo_z, hi_z))])


def generate_phantom(
    *,
    seed: int,
    shape: tuple[int, int, int] = DEFAULT_SHAPE,
    incomplete: bool = False,
    spacing: tuple[float, float, float] | None = None,
    case_id: str = "",
    return_tissue: bool = False,
    difficulty: str = "v2",
    effects: Mapping[str, bool] | None = None,
    return_meta: bool = False,
) -> Case | tuple:
    """A synthetic lower-face head CT in HU with the 14 MML landmarks known exactly (stand-in for paper §IV-A data).

    The anatomy, pose, spacing, intensities and artefacts are drawn from ``seed`` (see the module docstring for what
    varies and by how much); the same arguments always give the same case. ``difficulty="v1"`` is the first phantom,
    byte-identical to what it always was: the jaw under a random pose, small anatomical variation, clean teeth. The
    default ``"v2"`` adds what makes real head CT hard (per-person arches and teeth, impacted third molars, missing
    teeth as they look, metal and its streaks, noise, kernels, thick slices, motion, surroundings, fields of view from
    a dental crop to a whole head; :data:`EFFECTS`). With ``incomplete=True`` at least one of the lower cuspids,
    second or third molars is missing (third molars most often, :data:`MISSING_PROBABILITY`); its landmark rows are
    ``NaN`` following the MML convention (v2: a retained root keeps its apex landmarks, see
    :mod:`h3de_lite.data.phantom_teeth`). In v1 everything else equals the complete case of the same seed.

    Args:
        seed: seed of the case (any int ≥ 0).
        shape: volume size ``(D, H, W)`` in voxels, each ≥ 16. Smaller shapes get coarser spacing (the field of view
            stays large enough for the jaw); 64×64×48 gives ≈1.6–1.8 mm pixels (v1) or 1.2–1.8 mm (v2).
        incomplete: remove a random non-empty subset of the landmark-bearing teeth.
        spacing: voxel size in mm ``(3,)``; drawn when ``None``. A field of view too small for the jaw raises.
        case_id: stored in the returned case.
        return_tissue: also return the ``int8`` tissue-label volume (values of :class:`Tissue`).
        difficulty: ``"v1"`` or ``"v2"`` (:data:`DIFFICULTIES`).
        effects: v2 only: switch effects off (or on) by name, e.g. ``{"metal": False}``; the others stay on. Each
            effect draws from its own random stream, so switching one off leaves the rest of the case as it was.
        return_meta: also return the case's metadata (a JSON-able dict: difficulty, effects, pose, field of view,
            third-molar classes, missing-tooth situations, metal, imaging; v1: the missing teeth).

    Returns:
        The :class:`~h3de_lite.data.case.Case` (``float32`` integral HU volume, ``float64`` landmarks with ``NaN``
        rows, spacing), then the tissue labels when ``return_tissue``, then the metadata when ``return_meta``.

    Raises:
        ValueError: bad ``seed``, ``shape``, ``spacing``, ``difficulty`` or ``effects``, or a field of view (shape ×
            spacing) too small to hold the jaw.

    Shape:
        - volume and tissue ``(D, H, W)``; landmarks ``(14, 3)`` voxel coordinates (axis 0 left → right, axis 1
          posterior → anterior, axis 2 inferior → superior); spacing ``(3,)``.

    Example:
        >>> case = generate_phantom(seed=0, shape=(64, 64, 48), incomplete=True)
        >>> case.landmarks.shape, int(case.present.sum()) < 14
        ((14, 3), True)
        >>> case.volume.shape
        (64, 64, 48)

    Explained in notebooks/02_data.ipynb and book/phantom.md.
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    shape = _check_shape(shape)
    if difficulty not in DIFFICULTIES:
        raise ValueError(f"difficulty must be one of {', '.join(map(repr, DIFFICULTIES))}, got {difficulty!r}")
    if difficulty == "v1":
        if effects is not None:
            raise ValueError("effects switch parts of phantom v2; difficulty='v1' has none, pass effects=None")
        case, labels, meta = _generate_v1(seed, shape, incomplete, spacing, case_id)
    else:
        chosen = _resolve_effects(effects)
        spacing_arr = None
        if spacing is not None:
            spacing_arr = validate_spacing(np.asarray(spacing, dtype=np.float64), what="spacing")
        from h3de_lite.data.phantom_render import _generate_v2  # v2 builds on this module's geometry

        volume, landmarks, spacing_arr, labels, meta = _generate_v2(int(seed), shape, bool(incomplete), spacing_arr,
                                                                    chosen)  # fmt: skip
        case = Case(volume=volume, landmarks=landmarks, spacing=spacing_arr, case_id=case_id)
    meta = {**meta, "seed": int(seed), "incomplete": bool(incomplete)}
    out: tuple = (case,)
    if return_tissue:
        out += (labels,)
    if return_meta:
        out += (meta,)
    return out if len(out) > 1 else case


def _resolve_effects(effects: Mapping[str, bool] | None) -> dict[str, bool]:
    chosen = dict.fromkeys(EFFECTS, True)
    if effects is None:
        return chosen
    if not isinstance(effects, Mapping):
        raise ValueError(f"effects must be a mapping of effect name to bool, e.g. {{'metal': False}}, got {effects!r}")
    unknown = sorted(set(effects) - set(EFFECTS))
    if unknown:
        raise ValueError(f"unknown effects {unknown}; expected names from {', '.join(EFFECTS)}")
    chosen.update({name: bool(on) for name, on in effects.items()})
    return chosen


def _generate_v1(seed: int, shape: tuple[int, int, int], incomplete: bool, spacing, case_id: str
                 ) -> tuple[Case, np.ndarray, dict]:  # fmt: skip
    """The v1 generator, unchanged: the case, its tissue labels and the (small) v1 metadata."""
    streams = np.random.SeedSequence(int(seed)).spawn(6)
    rng_spacing, rng_anatomy, rng_missing, rng_others, rng_pose, rng_render = (
        np.random.default_rng(s) for s in streams
    )
    if spacing is None:
        spacing_arr = _sample_spacing(rng_spacing, shape)
    else:
        spacing_arr = validate_spacing(np.asarray(spacing, dtype=np.float64), what="spacing")
    anatomy = _sample_anatomy(rng_anatomy)
    missing = _sample_missing(rng_missing, incomplete)
    _apply_absence(anatomy, rng_others, missing)
    points, present = _landmarks_canonical(anatomy)
    anchor = 0.5 * (points.min(axis=0) + points.max(axis=0))

    margin = np.maximum(_LANDMARK_MARGIN_MM / spacing_arr, 1.0)
    upper = np.asarray(shape, dtype=np.float64) - 1.0 - margin
    grid = None
    for attempt in range(64):
        angles = rng_pose.uniform(-_MAX_ROTATION_DEG, _MAX_ROTATION_DEG, size=3)
        scale = float(rng_pose.uniform(*_SCALE_RANGE))
        translation = rng_pose.uniform(-_MAX_TRANSLATION_MM, _MAX_TRANSLATION_MM, size=3)
        if attempt == 63:  # last resort: the canonical pose, centred
            angles, scale, translation = np.zeros(3), 1.0, np.zeros(3)
        candidate = _Grid.make(shape, spacing_arr, _rotation(angles), scale, translation, anchor)
        vox = candidate.voxel(points)
        if np.all(vox >= margin) and np.all(vox <= upper):
            grid = candidate
            break
    if grid is None:
        fov = (np.asarray(shape) * spacing_arr).round(1).tolist()
        raise ValueError(
            f"the field of view shape × spacing = {fov} mm is too small to hold the jaw landmarks; use a larger shape "
            f"or spacing (at least about {list(REQUIRED_FOV_MM)} mm), or spacing=None"
        )

    labels = _paint(grid, anatomy)
    volume = _render(labels, spacing_arr, rng_render)
    landmarks = grid.voxel(points)
    landmarks[~present] = np.nan
    case = Case(volume=volume, landmarks=landmarks, spacing=spacing_arr, case_id=case_id)
    meta = {"difficulty": "v1", "shape": list(shape), "spacing_mm": [round(float(v), 5) for v in spacing_arr],
            "landmarks_present": {name: bool(p) for name, p in zip(LANDMARK_NAMES, case.present)},
            "missing_landmark_teeth": sorted(missing),
            "situations": ["absent"] if any(not t.present for t in anatomy.teeth) else []}  # fmt: skip
    return case, labels, meta


_SPLITS = ("train", "val", "test")
_CASE_SUFFIXES = ("_volume.nrrd", "_label.npy", "_spacing.npy", "_meta.json")


def _prepare_output(out: Path, *, overwrite: bool) -> None:
    """Check that ``out`` can take a new dataset, before any case is generated; with ``overwrite`` clear the old one.

    Refuses (``ValueError``, one line naming the path and the fix): ``out`` or a folder above it being a file, a split
    folder being a file, split folders that already hold files (unless ``overwrite``), and a folder that cannot be
    written (a real probe file, so it also holds for root and read-only file systems). Nothing is written or deleted
    before every check has passed.
    """
    import os
    import tempfile

    folder = out
    try:
        for folder in (out, *out.parents):  # the nearest existing path must be a folder
            if os.path.lexists(folder):
                if not folder.is_dir():
                    raise ValueError(f"output folder {str(out)!r} cannot be created: {str(folder)!r} is a file, not "
                                     "a folder; choose another output folder")  # fmt: skip
                break
        existing = {}
        for split in _SPLITS:
            folder = out / split
            if os.path.lexists(folder) and not folder.is_dir():
                raise ValueError(f"{str(folder)!r} is a file, not a split folder; remove it or choose another "
                                 "output folder")  # fmt: skip
            if folder.is_dir() and any(folder.iterdir()):
                existing[split] = sum(1 for _ in folder.iterdir())
    except OSError as err:
        raise ValueError(f"cannot read {str(folder)!r} ({err.strerror or err}); choose another output folder or fix "
                         "its permissions") from err  # fmt: skip
    if existing and not overwrite:
        found = ", ".join(f"{n} files in {split}/" for split, n in existing.items())
        raise ValueError(
            f"output folder {str(out)!r} already holds a dataset ({found}); pass overwrite=True (`h3de-lite phantom "
            "--overwrite`) to replace it, or choose an empty folder"
        )
    folder = out
    try:
        out.mkdir(parents=True, exist_ok=True)
        for folder in [out, *(out / split for split in existing)]:
            # a real write: permission bits do not stop root, and a file system may be read-only
            with tempfile.TemporaryFile(prefix=".write-probe-", dir=folder):
                pass
    except OSError as err:
        raise ValueError(f"cannot write into output folder {str(folder)!r} ({err.strerror or err}); choose a folder "
                         "you can write to, or fix its permissions") from err  # fmt: skip
    for split in existing:  # overwrite: the old cases of every split go, so old and new ids never mix
        for path in (out / split).iterdir():
            if path.is_file() and (path.name.endswith(_CASE_SUFFIXES) or path.name.startswith(".tmp-")):
                path.unlink()


def write_phantom_dataset(
    out: str | Path,
    *,
    seed: int = 0,
    n_train: int,
    n_val: int,
    n_test: int,
    incomplete_fraction: float = 0.3,
    shape: tuple[int, int, int] | None = None,
    progress: bool = True,
    overwrite: bool = False,
    difficulty: str = "v2",
) -> list[Path]:
    """Write a phantom dataset in the MML release layout: ``out/{train,val,test}/<id>_volume.nrrd`` + label + spacing,
    and the case's metadata beside it as ``<id>_meta.json`` (readers of the MML layout ignore it).

    Case ids run ``"0000", "0001", …`` across the splits (train first), so they are unique. Each case's seed is
    derived from ``seed`` (``numpy.random.SeedSequence(seed).spawn``); in each split ``round(incomplete_fraction ×
    n_split)`` cases, chosen by the same seed, are incomplete. The same arguments write the same files.

    Args:
        out: dataset folder (created).
        seed: master seed.
        n_train: number of training cases (≥ 0).
        n_val: number of validation cases (≥ 0).
        n_test: number of test cases (≥ 0).
        incomplete_fraction: share of incomplete cases per split, in [0, 1].
        shape: volume size; :data:`DEFAULT_SHAPE` when ``None``.
        progress: show a tqdm progress bar.
        overwrite: replace a dataset already in ``out``: the case files (``<id>_volume.nrrd``, ``_label.npy``,
            ``_spacing.npy``, ``_meta.json``) of every split folder (``train``, ``val``, ``test``, also those given 0
            cases) are deleted
            before the new cases are written, so no old case stays beside the new ones and no id is in two splits.
            Other files in the split folders are left alone.
        difficulty: ``"v1"`` or ``"v2"`` phantom (:func:`generate_phantom`).

    Returns:
        The written volume paths, in id order.

    Raises:
        ValueError: negative or non-integer counts, no case at all, a fraction outside [0, 1], a bad shape or
            difficulty; ``out``
            (or a folder above it, or a split folder) is a file; ``out`` cannot be written; a split folder of ``out``
            already holds files and ``overwrite`` is False. All of these are checked before any case is generated.

    Shape:
        - each written case: volume ``shape``; label ``(14, 3)``; spacing ``(3,)``; metadata JSON.

    Example:
        >>> paths = write_phantom_dataset("data/phantom", n_train=4, n_val=1, n_test=2)  # doctest: +SKIP
        >>> [p.parent.name for p in paths]  # doctest: +SKIP
        ['train', 'train', 'train', 'train', 'val', 'test', 'test']

    Explained in notebooks/02_data.ipynb.
    """
    from h3de_lite.data.mml import write_mml_case  # local: keeps the generator importable on its own

    counts = {"train": n_train, "val": n_val, "test": n_test}
    for name, n in counts.items():
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
            raise ValueError(f"n_{name} must be a non-negative int, got {n!r}")
    if sum(counts.values()) == 0:
        raise ValueError("n_train + n_val + n_test must be at least 1 to write a dataset")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    try:
        fraction = float(incomplete_fraction)
    except (TypeError, ValueError):
        raise ValueError(f"incomplete_fraction must be a number in [0, 1], got {incomplete_fraction!r}") from None
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"incomplete_fraction must be in [0, 1], got {incomplete_fraction!r}")
    shape = DEFAULT_SHAPE if shape is None else _check_shape(shape)
    if difficulty not in DIFFICULTIES:
        raise ValueError(f"difficulty must be one of {', '.join(map(repr, DIFFICULTIES))}, got {difficulty!r}")
    out = Path(out)
    _prepare_output(out, overwrite=bool(overwrite))

    iterator = _dataset_jobs(int(seed), counts, fraction)
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, desc="phantom cases", unit="case")
    paths = []
    for split, case_id, case_seed, incomplete in iterator:
        case, meta = generate_phantom(seed=case_seed, shape=shape, incomplete=incomplete, case_id=case_id,
                                      difficulty=difficulty, return_meta=True)  # fmt: skip
        directory = out / split
        directory.mkdir(parents=True, exist_ok=True)
        write_mml_case(directory, case)
        with atomic_output(directory / f"{case_id}_meta.json") as tmp:
            tmp.write_text(json.dumps({"case_id": case_id, "split": split, **meta}, indent=1) + "\n")
        paths.append(directory / f"{case_id}_volume.nrrd")
    return paths


def _dataset_jobs(seed: int, counts: dict[str, int], fraction: float) -> list[tuple[str, str, int, bool]]:
    """The cases of a dataset, in id order: ``(split, case_id, case_seed, incomplete)``. Each split gets
    ``round(fraction × n)`` incomplete cases, placed by the master seed (also used by
    benchmarks/phantom_difficulty.py)."""
    total = sum(counts.values())
    children = np.random.SeedSequence(int(seed)).spawn(total + 1)
    split_rng = np.random.default_rng(children[-1])
    jobs: list[tuple[str, int, bool]] = []
    for split, n in counts.items():
        flags = np.zeros(n, dtype=bool)
        flags[: round(fraction * n)] = True
        first = len(jobs)
        jobs.extend((split, first + i, bool(f)) for i, f in enumerate(split_rng.permutation(flags)))
    return [(split, f"{index:04d}", int(children[index].generate_state(1)[0]), incomplete)
            for split, index, incomplete in jobs]  # fmt: skip
