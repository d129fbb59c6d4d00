"""Anatomy of phantom v2: per-person arches and teeth, mouth opening, surroundings, field of view and pose.

Part of the phantom generator (:mod:`h3de_lite.data.phantom`, ``difficulty="v2"``). Everything is built in the
canonical head frame of v1 (mm; x to the patient's right, y anterior, z superior, origin on the midline in the lower
occlusal plane) and painted through the voxel grid, like v1. What v2 adds:

- **Anatomy after pose** (effect ``anatomy``): arch depth 31–42 mm, width between second molars 42–58 mm, curvature
  (the power of the arch curve) 1.8–3.2 with a left/right difference, asymmetry up to 5 %; every tooth its own
  mesio-distal and bucco-lingual tilt (σ 5° and 4°, up to ±15°/±12°), rotation about its long axis (σ 6°, up to ±20°,
  more where crowded), size (±6 %, third molars ±12 %), spacing or crowding along the arch (contacts from 1.3 mm
  overlap, with the crowded tooth pushed buccally or lingually and rotated, to 2 mm gaps); roots 0.85–1.15 × their
  length, bowed (curved) by up to ~2 mm, molar apices 3–7 mm apart; a curve of Spee of 0.3–2.2 mm; and a mouth
  opening of 0–25 mm at the incisors (the cranium, maxilla and upper teeth rotate about the condyles).
- **Surroundings** (effect ``surroundings``): condyles in their glenoid fossae, coronoid processes, zygomatic arches
  and bodies, the skull base (petrous ridges, clivus, mastoids with air cells), the hyoid, the tongue and the
  masseter and medial pterygoid muscles in fat planes, air in an open mouth; a head holder and table in some cases
  (effect ``holder``), fixed to the scanner, not to the head.
- **Field of view** (effect ``field_of_view``): a dental CBCT-like crop (80–100 mm), a jaw field of view (100–150 mm)
  or a whole head (170–240 mm) at the same voxel count, and the jaw off-centre (σ 12 % of the field of view, as far
  as every landmark stays 2 mm inside the volume). Shapes under 167 voxels in-plane (tests, CPU training) cannot
  hold a crop at realistic voxel sizes: they keep v1's rule (the whole jaw with room around it, at least
  :data:`~h3de_lite.data.phantom.REQUIRED_FOV_MM`, seen coarsely, shifted by about ±10 mm).

Explained in book/phantom.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from h3de_lite.data.phantom import (
    INPLANE_SPACING_MM,
    REQUIRED_FOV_MM,
    SLICE_SPACING_MM,
    _LANDMARK_TEETH,
    _LOWER_TEETH,
    _SIDES,
    _UPPER_TEETH,
    LANDMARK_NAMES,
    NUM_LANDMARKS,
    Tissue,
    _Anatomy,
    _Grid,
    _half_arch,
    _make_arch,
    _paint_maxilla,
    _paint_soft_tissue,
    _paint_spine_and_airway,
    _rotation,
    _scatter,
    _sdf_ellipsoid,
    _solve_width,
    _tilt,
    ToothKind,
)
from h3de_lite.data.phantom_teeth import (
    _BentRoot,
    _ToothV2,
    _assign_metal,
    _assign_states,
    _drift_and_over_erupt,
    _paint_teeth_v2,
    _place_third_molar,
    _spin,
    _third_molar_roots,
)

FOV_KINDS: dict[str, tuple[float, float]] = {"cbct": (80.0, 100.0), "jaw": (100.0, 150.0), "head": (170.0, 240.0)}
"""In-plane field of view (mm) of each kind of scan; the voxel count stays the caller's shape."""
_FOV_P = (0.3, 0.4, 0.3)
_MAX_INPLANE_MM = 1.25  # whole-head CT; small shapes may need coarser voxels to hold the jaw
_MAX_SLICE_MM = 2.0
_P_OPEN = 0.45
_P_HOLDER = 0.35


@dataclass
class _AnatomyV2(_Anatomy):
    """v1's anatomy record plus the v2 state: teeth by key, crest per side, ridge dips, mouth opening, condyles."""

    by_key: dict[str, _ToothV2] = field(default_factory=dict)
    lower_crest_signed: tuple[np.ndarray, np.ndarray] = (np.zeros(1), np.zeros(1))
    dips: list[tuple[float, float, float]] = field(default_factory=list)  # signed s, half width, depth (mm)
    opening_deg: float = 0.0
    opening_mm: float = 0.0
    hinge: np.ndarray = field(default_factory=lambda: np.zeros(3))
    condyles: list[np.ndarray] = field(default_factory=list)
    crowding: float = 0.0
    metal_items: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------------------------------


def _make_roots_v2(kind: ToothKind, jaw: str, a: float, b: float, length: float, rng: np.random.Generator,
                   third_molar: bool, vary: bool) -> list[_BentRoot]:  # fmt: skip
    """v1's roots with per-tooth divergence and curvature (bowed axes)."""
    apex_r = float(rng.uniform(0.6, 0.85))
    bows = rng.normal(0.0, 1.0, size=(3, 2)) * (np.array([0.7, 0.35]) if vary else 0.0)
    if kind != "molar":
        ru, rv = (0.55 * a, 0.8 * b) if kind == "incisor" else (0.62 * a, 0.72 * b)
        lean = rng.normal(0.0, 0.8 if vary else 0.4, size=2)
        return [_BentRoot(np.array([0.0, 0.0, 0.5]), np.array([lean[0], lean[1], -length]), (ru, rv), apex_r,
                          bows[0])]  # fmt: skip
    if jaw == "lower":
        if vary:
            half_sep = float(rng.uniform(0.6, 2.8) if third_molar else rng.uniform(1.5, 3.5))
            curve = float(rng.uniform(-0.5, 1.5))
        else:
            half_sep = float(rng.uniform(1.2, 2.4) if third_molar else rng.uniform(2.0, 3.0))
            curve = float(rng.uniform(0.0, 0.8))
        distal_len = length * float(rng.uniform(0.9, 1.0))
        mesial = _BentRoot(np.array([0.45 * a, 0.0, -2.5]), np.array([half_sep, rng.normal(0, 0.3), -length]),
                           (0.3 * a, 0.8 * b), apex_r, bows[0])  # fmt: skip
        distal = _BentRoot(np.array([-0.45 * a, 0.0, -2.5]),
                           np.array([-half_sep + curve, rng.normal(0, 0.3), -distal_len]), (0.3 * a, 0.75 * b), apex_r,
                           bows[1])  # fmt: skip
        return [mesial, distal]
    return [
        _BentRoot(np.array([0.45 * a, 0.4 * b, -2.5]), np.array([0.5 * a, 0.55 * b, -length]), (0.28 * a, 0.3 * b),
                  apex_r, bows[0]),
        _BentRoot(np.array([-0.45 * a, 0.4 * b, -2.5]), np.array([-0.5 * a, 0.55 * b, -0.95 * length]),
                  (0.26 * a, 0.28 * b), apex_r, bows[1]),
        _BentRoot(np.array([0.0, -0.4 * b, -2.5]), np.array([0.0, -0.75 * b, -1.05 * length]), (0.32 * a, 0.3 * b),
                  apex_r, bows[2]),
    ]  # fmt: skip


def _sample_anatomy_v2(rng: np.random.Generator, *, vary: bool) -> _AnatomyV2:
    """Draw one v2 head (all teeth present and erupted; states, third molars and metal are applied afterwards).

    With ``vary=False`` (effect ``anatomy`` off) the ranges are v1's: upright, evenly spaced teeth, closed mouth.
    """
    u = rng.uniform
    size = float(u(0.9, 1.1) if vary else u(0.92, 1.08))
    depth = float(u(31.0, 42.0) if vary else u(33.0, 39.0))
    power = float(u(1.8, 3.2) if vary else u(2.0, 2.8))
    power_asym = float(u(-0.2, 0.2)) if vary else 0.0
    molar_half_width = float(u(21.0, 29.0) if vary else u(22.5, 27.5))
    asym = float(u(-0.05, 0.05) if vary else u(-0.03, 0.03))
    spee = float(u(0.3, 2.2) if vary else u(0.3, 1.2))
    gap = float(u(0.3, 3.0))
    open_draw, open_mm = float(rng.random()), float(u(3.0, 25.0))
    opening_mm = open_mm if (vary and open_draw < _P_OPEN) else 0.0
    crowding = float(u(-1.0, 1.0)) if vary else 0.0
    overjet = float(u(2.0, 3.5))
    flare = float(u(15.0, 25.0))
    body_height = float(u(25.0, 33.0))
    cortical = float(u(2.0, 4.0))
    lamina = float(u(0.5, 0.9))

    teeth: list[_ToothV2] = []
    halves: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]] = {}
    centres_s: dict[tuple[str, str], list[float]] = {}
    ends: dict[str, float] = {}
    type_jitter = {(jaw, spec[0]): float(u(0.94, 1.06) if vary else u(0.96, 1.04)) for jaw in ("lower", "upper")
                   for spec in (_LOWER_TEETH if jaw == "lower" else _UPPER_TEETH)}  # fmt: skip
    for jaw, table in (("lower", _LOWER_TEETH), ("upper", _UPPER_TEETH)):
        for side, sign in _SIDES.items():
            specs = []
            for name, kind, md, bl, height, root in table:
                jitter = size * type_jitter[(jaw, name)] * float(u(0.97, 1.03) if vary else u(0.98, 1.02))
                if name == "M3":
                    jitter *= float(u(0.88, 1.12) if vary else u(0.92, 1.08))
                root_scale = float(u(0.85, 1.15) if vary else u(0.95, 1.05))
                specs.append((name, kind, md * jitter, bl * jitter, height * jitter, root * jitter * root_scale))
            # contacts: overlap 0.3 mm (v1), or per-contact spacing/crowding
            contacts = np.full(len(specs), -0.3)
            if vary:
                weight = np.array([1.0, 1.0, 1.0, 0.9, 0.8, 0.4, 0.3, 0.3])
                contacts = np.clip(-0.3 + weight * (0.9 * crowding + rng.normal(0.0, 0.35, size=len(specs))),
                                   -1.3, 2.0)  # fmt: skip
            s_centres, s = [], 0.0
            for (_, _, md, *_), c in zip(specs, contacts):
                s_centres.append(s + md / 2.0 + min(c, 0.0) / 2.0)
                s += md + c
            s_m2 = s_centres[6]
            local_power = power * (1.0 + sign * power_asym / 2.0)
            if jaw == "lower":
                x_m2, arch_depth = molar_half_width * (1.0 + sign * asym), depth
            else:
                x_m2, arch_depth = molar_half_width * (1.0 + sign * asym) + 1.5, depth + overjet
            width = _solve_width(arch_depth, local_power, s_m2, x_m2)
            s_arch_end = s + (2.0 if jaw == "lower" else 6.0)
            half = _half_arch(arch_depth, width, local_power, s_arch_end, flare if jaw == "lower" else 0.0,
                              extension=70.0 if jaw == "lower" else 30.0)  # fmt: skip
            halves[(jaw, side)] = half
            centres_s[(jaw, side)] = s_centres
            ends[f"{jaw}_{side}"] = s_arch_end
            points, arcs = half
            for (name, kind, md, bl, height, root), sc, c in zip(specs, s_centres, contacts):
                k = int(np.clip(np.searchsorted(arcs, sc), 1, len(arcs) - 1))
                f = (sc - arcs[k - 1]) / (arcs[k] - arcs[k - 1])
                p = points[k - 1] + f * (points[k] - points[k - 1])
                tangent = points[k] - points[k - 1]
                tangent /= np.linalg.norm(tangent)
                mirror = np.array([sign, 1.0])
                p, tangent = p * mirror, tangent * mirror
                buccal = np.array([-tangent[1], tangent[0]]) * sign
                occlusal_z = spee * max(0.0, (sc - 25.0) / 25.0) ** 2
                mesial = np.array([-tangent[0], -tangent[1], 0.0])
                buccal3 = np.array([buccal[0], buccal[1], 0.0])
                crowded = vary and c < -0.6
                shift = float(rng.normal(0.0, 0.4)) if vary else 0.0
                if crowded:
                    shift += float(rng.choice([-1.0, 1.0])) * 1.2 * (-c)
                p = p + shift * buccal
                if jaw == "lower":
                    cej_z = occlusal_z - height
                    frame = np.stack([mesial, buccal3, np.array([0.0, 0.0, 1.0])], axis=1)
                else:
                    cej_z = occlusal_z + gap + height
                    frame = np.stack([mesial, buccal3, np.array([0.0, 0.0, -1.0])], axis=1)
                if vary:
                    cej_z += float(rng.normal(0.0, 0.3)) * (1.0 if jaw == "lower" else -1.0)
                    tilt_mesial = float(np.clip(rng.normal(4.0 if kind == "molar" else 0.0, 5.0), -15.0, 15.0))
                    tilt_buccal = float(np.clip(rng.normal(0.0, 4.0), -12.0, 12.0))
                    spin = float(np.clip(rng.normal(0.0, 6.0) + (rng.normal(0.0, 12.0) if crowded else 0.0), -25, 25))
                else:
                    tilt_mesial = float(np.clip(rng.normal(3.0 if kind == "molar" else 0.0, 2.0), -6.0, 8.0))
                    tilt_buccal = float(np.clip(rng.normal(0.0, 2.0), -5.0, 5.0))
                    spin = 0.0
                if kind in ("incisor", "cuspid"):
                    tilt_buccal += 8.0 if jaw == "upper" else 5.0  # proclined front teeth
                frame = _spin(_tilt(frame, tilt_mesial, tilt_buccal), spin)
                a, b = md / 2.0, bl / 2.0
                roots = _make_roots_v2(kind, jaw, a, b, root, rng, third_molar=(name == "M3"), vary=vary)
                tooth = _ToothV2(
                    name=f"{jaw}-{side}-{name}", kind=kind, centre=np.array([p[0], p[1], cej_z]), frame=frame,
                    a=a, b=b, h=height, enamel=float(u(1.0, 1.4)),
                    enamel_top=float(u(1.8, 2.3)) if kind == "molar" else float(u(1.5, 1.9)),
                    fossa=float(u(1.2, 1.7)), roots=roots, nominal_cej_z=cej_z, s=sign * sc,
                )  # fmt: skip
                if jaw == "lower" and name in _LANDMARK_TEETH:
                    letters = _LANDMARK_TEETH[name]
                    if kind == "cuspid":
                        tooth.landmarks[letters[0]] = np.array([0.0, 0.0, height - 1.0])
                    else:
                        tooth.landmarks[letters[0]] = np.array([0.0, 0.0, height - tooth.fossa - 1.0])
                        tooth.landmarks[letters[1]] = roots[0].apex_landmark
                        tooth.landmarks[letters[2]] = roots[1].apex_landmark
                teeth.append(tooth)

    lower_arch = _make_arch(halves[("lower", "L")], halves[("lower", "R")], (-95.0, 95.0, -110.0, depth + 25.0))
    upper_arch = _make_arch(halves[("upper", "L")], halves[("upper", "R")], (-80.0, 80.0, -70.0, depth + 30.0))
    lower_end = 0.5 * (ends["lower_L"] + ends["lower_R"])
    upper_end = 0.5 * (ends["upper_L"] + ends["upper_R"])
    m3 = [t for t in teeth if t.name.startswith("upper") and t.name.endswith("M3")]
    upper_tuber_y = min(float(t.centre[1]) for t in m3) - 7.0
    lower_p2_s = float(np.mean([centres_s[("lower", s)][4] for s in _SIDES]))
    params = {
        "lamina_dura": lamina,
        "vault": float(u(10.0, 14.0)),
        "sinus_scale": float(u(0.85, 1.15)),
        "fat": float(u(4.0, 9.0)),
        "face_width": float(u(34.0, 42.0)),
        "ramus_half_width": float(u(13.0, 16.0)),
        "ramus_thickness": float(u(4.0, 5.0)),
        "canal_radius": float(u(1.1, 1.5)),
        "airway_width": float(u(9.0, 13.0)),
        "airway_depth": float(u(5.0, 8.0)),
        "tongue": float(u(0.85, 1.1)),
    }
    lower_s_end = lower_end + 2.0 * params["ramus_half_width"] - 2.0
    anatomy = _AnatomyV2(
        teeth=teeth, lower_arch=lower_arch, upper_arch=upper_arch, lower_crest=(np.zeros(1), np.zeros(1)),
        upper_crest=(np.zeros(1), np.zeros(1)), lower_s_end=lower_s_end, upper_s_end=upper_end,
        upper_tuber_y=upper_tuber_y, lower_p2_s=lower_p2_s, body_height=body_height, cortical=cortical,
        arch_depth=depth, molar_half_width=molar_half_width, params=params,
        by_key={t.name: t for t in teeth}, opening_mm=opening_mm, crowding=crowding,
    )  # fmt: skip
    _set_crests(anatomy)
    _set_condyles(anatomy)
    if opening_mm > 0.0:
        incisor_y = depth
        lever = math.hypot(incisor_y - anatomy.hinge[1], anatomy.hinge[2])
        anatomy.opening_deg = math.degrees(math.atan2(opening_mm, lever))
    return anatomy


def _set_crests(anatomy: _AnatomyV2) -> None:
    """Alveolar crest heights from the teeth's nominal junctions: |s| tables (v1 painters) and a signed lower one."""
    lower = sorted((t.s, t.nominal_cej_z - 1.5) for t in anatomy.teeth if t.jaw == "lower")
    upper = sorted((abs(t.s), t.nominal_cej_z + 1.5) for t in anatomy.teeth if t.jaw == "upper")
    anatomy.lower_crest_signed = (np.array([p[0] for p in lower]), np.array([p[1] for p in lower]))
    folded = sorted((abs(s), z) for s, z in lower)
    anatomy.lower_crest = (np.array([p[0] for p in folded]), np.array([p[1] for p in folded]))
    anatomy.upper_crest = (np.array([p[0] for p in upper]), np.array([p[1] for p in upper]))


def _arch_point(anatomy: _AnatomyV2, s: float) -> np.ndarray:
    arch = anatomy.lower_arch
    k = int(np.clip(np.searchsorted(arch.s, s), 0, len(arch.s) - 1))
    return arch.points[k]


def _ramus_geometry(anatomy: _AnatomyV2) -> dict[str, float]:
    crest_s, crest_z = anatomy.lower_crest
    r_half = anatomy.params["ramus_half_width"]
    z_base_end = float(crest_z[-1]) - anatomy.body_height
    r_lo, r_hi = z_base_end + 2.0, 26.0
    return {"r_half": r_half, "r_lo": r_lo, "r_hi": r_hi, "r_zc": 0.5 * (r_lo + r_hi), "r_hz": 0.5 * (r_hi - r_lo),
            "front": anatomy.lower_s_end - r_half + 3.0}  # fmt: skip


def _set_condyles(anatomy: _AnatomyV2) -> None:
    """Condyle centres on top of the ramus' posterior border (canonical mm); the hinge axis runs through them."""
    g = _ramus_geometry(anatomy)
    z_c = g["r_hi"] + 5.0
    abs_s = g["front"] + 0.55 * g["r_half"] + math.tan(math.radians(10.0)) * (z_c - g["r_zc"])
    anatomy.condyles = []
    for sign in (-1.0, 1.0):
        xy = _arch_point(anatomy, sign * abs_s)
        anatomy.condyles.append(np.array([xy[0], xy[1], z_c]))
    anatomy.hinge = 0.5 * (anatomy.condyles[0] + anatomy.condyles[1])


def _apply_dental_state(anatomy: _AnatomyV2, rng_missing: np.random.Generator, rng_molars: np.random.Generator,
                        rng_metal: np.random.Generator, missing: set[str],
                        effects: dict[str, bool]) -> None:  # fmt: skip
    """Teeth states (missing situations), third-molar classes and metal, then the crest dips of healed ridges."""
    teeth = anatomy.by_key
    _assign_states(teeth, missing, rng_missing, situations=effects["missing"], metal=effects["metal"])
    # third molars: eruption class and root form (drawn for both sides whatever their state)
    crest_s, crest_z = anatomy.lower_crest_signed
    for side in _SIDES:
        tooth = teeth[f"lower-{side}-M3"]
        second = teeth[f"lower-{side}-M2"]
        sub = np.random.default_rng(rng_molars.integers(2**63))
        roots_rng = np.random.default_rng(rng_molars.integers(2**63))
        if not effects["third_molars"] or tooth.state != "present" or "bridge_abutment" in tooth.events:
            tooth.third_molar = "erupted" if tooth.state == "present" else ""
            continue
        _third_molar_roots(tooth, roots_rng)
        distal = -tooth.frame[:, 0] * np.array([1.0, 1.0, 0.0])
        distal /= np.linalg.norm(distal)
        crest = float(np.interp(tooth.s, crest_s, crest_z))
        base = crest - anatomy.body_height + anatomy.cortical
        _place_third_molar(tooth, second, distal, sub, crest, base)
    if effects["missing"]:
        _drift_and_over_erupt(teeth, rng_missing)
    if effects["metal"]:
        anatomy.metal_items = _assign_metal(teeth, rng_metal)
    for tooth in teeth.values():
        if tooth.jaw == "lower" and tooth.state == "healed":
            anatomy.dips.append((tooth.s, tooth.a + 1.5, float(rng_missing.uniform(2.0, 6.0))))
        if tooth.jaw == "lower" and "over_eruption" in tooth.events:
            tooth.nominal_cej_z += 0.5 * (tooth.centre[2] - tooth.nominal_cej_z)  # the bone follows halfway
    _set_crests(anatomy)


def _landmarks_v2(anatomy: _AnatomyV2) -> tuple[np.ndarray, np.ndarray]:
    """All 14 landmarks in canonical mm (missing ones too, where the tooth would be) and the presence mask."""
    points = np.full((NUM_LANDMARKS, 3), np.nan)
    present = np.zeros(NUM_LANDMARKS, dtype=bool)
    for tooth in anatomy.teeth:
        for letter, local in tooth.landmarks.items():
            row = LANDMARK_NAMES.index(f"{tooth.side}{letter}")
            points[row] = tooth.to_canonical(local)
            present[row] = tooth.landmark_present(letter)
    assert not np.isnan(points).any(), "every landmark must be defined"
    return points, present


# --------------------------------------------------------------------------------------------------------------------
# Pose and field of view
# --------------------------------------------------------------------------------------------------------------------


def _place(points: np.ndarray, shape: tuple[int, int, int], spacing: np.ndarray | None, rng_pose: np.random.Generator,
           rng_fov: np.random.Generator, *, fov: bool,
           margin_mm: float = 2.0) -> tuple[_Grid, np.ndarray, dict]:  # fmt: skip
    """Pose (rotation ±15°, scale 0.9–1.1), spacing (from the field-of-view kind, never too small for the landmarks)
    and an off-centre translation that keeps every landmark ``margin_mm`` inside. Returns the grid, the spacing and
    the pose metadata; raises ``ValueError`` when a given spacing cannot hold the jaw."""
    angles = rng_pose.uniform(-15.0, 15.0, size=3)
    scale = float(rng_pose.uniform(0.9, 1.1))
    offset_draw = rng_pose.standard_normal(3)
    rotation = _rotation(angles)
    anchor = 0.5 * (points.min(axis=0) + points.max(axis=0))
    posed = scale * (points - anchor) @ rotation.T
    extent = np.ptp(posed, axis=0)
    n = np.asarray(shape, dtype=np.float64)
    kind = str(rng_fov.choice(list(FOV_KINDS), p=_FOV_P))
    fov_draw, slice_draw = float(rng_fov.random()), float(rng_fov.random())
    small = REQUIRED_FOV_MM[0] / min(n[0], n[1]) > INPLANE_SPACING_MM[1]
    if spacing is None:
        need_xy = (max(extent[0], extent[1]) + 2.0 * margin_mm + 4.0) / (min(n[0], n[1]) - 1.0)
        need_z = (extent[2] + 2.0 * margin_mm + 4.0) / (n[2] - 1.0)
        if small:  # too few voxels for a realistic crop: v1's rule, the whole jaw with room around it, seen coarsely
            lo = max(need_xy, REQUIRED_FOV_MM[0] / min(n[0], n[1]))
            inplane = lo * (1.0 + 0.15 * fov_draw)
            lo_z = max(SLICE_SPACING_MM[0], REQUIRED_FOV_MM[2] / n[2], inplane, need_z)
            spacing = np.array([inplane, inplane, lo_z + slice_draw * (max(SLICE_SPACING_MM[1], 1.5 * lo_z) - lo_z)])
            kind = "jaw"
        elif fov:
            lo, hi = FOV_KINDS[kind]
            target = (lo + fov_draw * (hi - lo)) / min(n[0], n[1])
            inplane = float(np.clip(target, need_xy, max(_MAX_INPLANE_MM, 1.3 * need_xy)))
        else:
            inplane = max(need_xy, 0.4 + 0.2 * fov_draw, 100.0 / min(n[0], n[1]))
            kind = "jaw"
        if not small:
            lo_z = max(inplane, 0.5, need_z)
            hi_z = max(min(_MAX_SLICE_MM, 1.6 * inplane), lo_z)
            spacing = np.array([inplane, inplane, lo_z + slice_draw * (hi_z - lo_z)])
    else:
        kind = "given"
    fov_mm = n * spacing
    centre = (n - 1.0) / 2.0 * spacing
    low_ok = margin_mm - posed.min(axis=0) - centre
    high_ok = (n - 1.0) * spacing - margin_mm - posed.max(axis=0) - centre
    if np.any(low_ok > high_ok):
        raise ValueError(
            f"the field of view shape × spacing = {fov_mm.round(1).tolist()} mm is too small to hold the jaw "
            f"landmarks of this case ({extent.round(1).tolist()} mm after pose); use a larger shape or spacing, or "
            "spacing=None"
        )
    nominal = np.zeros(3)
    if kind == "head":
        nominal[2] = -0.2 * fov_mm[2]  # the jaw in the lower part of a whole-head volume
    spread = 0.12 * fov_mm if fov and not small else np.full(3, 5.0)  # small volumes: about v1's ±10 mm
    translation = np.clip(nominal + spread * offset_draw, low_ok, high_ok)
    grid = _Grid.make(shape, spacing, rotation, scale, translation, anchor)
    meta = {"fov_kind": kind, "fov_mm": fov_mm.round(1).tolist(), "rotation_deg": angles.round(2).tolist(),
            "scale": round(scale, 4), "translation_mm": translation.round(2).tolist()}  # fmt: skip
    return grid, spacing, meta


def _cranial_grid(grid: _Grid, anatomy: _AnatomyV2) -> _Grid:
    """The grid seen from the cranium's frame: the cranium turns up by the opening angle about the condyle axis."""
    if anatomy.opening_deg == 0.0:
        return grid
    t = math.radians(anatomy.opening_deg)
    rot = np.array([[1.0, 0.0, 0.0], [0.0, math.cos(t), -math.sin(t)], [0.0, math.sin(t), math.cos(t)]])
    hinge = anatomy.hinge
    # cranial point c sits at mandible-frame point q = hinge + rot (c − hinge)
    to_voxel = np.zeros((3, 4))
    to_voxel[:, :3] = grid.to_voxel[:, :3] @ rot
    to_voxel[:, 3] = grid.to_voxel[:, :3] @ (hinge - rot @ hinge) + grid.to_voxel[:, 3]
    to_canon = np.zeros((3, 4))
    to_canon[:, :3] = np.linalg.inv(to_voxel[:, :3])
    to_canon[:, 3] = -to_canon[:, :3] @ to_voxel[:, 3]
    return _Grid(shape=grid.shape, to_canon=to_canon, to_voxel=to_voxel)


# --------------------------------------------------------------------------------------------------------------------
# Painting
# --------------------------------------------------------------------------------------------------------------------


def _paint_mandible_v2(labels: np.ndarray, grid: _Grid, anatomy: _AnatomyV2, *, condyles: bool) -> None:
    """v1's mandible with a per-side crest (lowered at healed ridges) and, with ``condyles``, condylar heads and a
    taller coronoid process on the ramus."""
    arch = anatomy.lower_arch
    crest_s, crest_z = anatomy.lower_crest_signed
    height, cortical = anatomy.body_height, anatomy.cortical
    z_min = float(crest_z.min()) - height - 6.0
    box = grid.aabb((-75, -100, z_min), (75, anatomy.arch_depth + 20, 44.0 if condyles else 34.0))
    if box is None:
        return
    x, y, z = grid.coords(box)
    near = arch.select(x, y, max_abs_d=11.0)
    x, y, z = x.reshape(-1)[near], y.reshape(-1)[near], z.reshape(-1)[near]
    s, d = arch.query(x, y)
    abs_s = np.abs(s)
    s_end = anatomy.lower_s_end
    z_nominal = np.interp(np.clip(s, float(crest_s[0]), float(crest_s[-1])), crest_s, crest_z).astype(np.float32)
    z_crest = z_nominal.copy()
    for s_dip, half, depth in anatomy.dips:  # healed ridges: the crest sinks, the lower border stays
        z_crest -= (depth * np.exp(-(((s - s_dip) / half) ** 4))).astype(np.float32)
    z_base = z_nominal - (height + 3.0 * np.exp(-((abs_s / 15.0) ** 2)))  # taller symphysis
    body_h = z_crest - z_base
    zc, hz = 0.5 * (z_crest + z_base), 0.5 * body_h
    zn = (z - zc) / hz
    width = np.interp(abs_s, [0.0, 15.0, 30.0, 45.0, 80.0], [7.0, 5.6, 5.9, 6.9, 6.4]).astype(np.float32)
    width = width * (1.0 - 0.22 * np.clip(zn, 0.0, 1.0) ** 2)
    chin = 2.5 * np.exp(-((abs_s / 12.0) ** 2)) * np.clip(-zn, 0.0, 1.0)
    dd = d - chin
    end = (np.clip(abs_s - s_end, 0.0, None) / 6.0) ** 2
    outer = np.abs(dd / width) ** 2.4 + np.abs(zn) ** 3 + end <= 1.0
    zc_in = 0.5 * ((z_crest - 0.8) + (z_base + 1.2 * cortical))
    hz_in = np.maximum(0.5 * (body_h - 0.8 - 1.2 * cortical), 0.5)
    inner = np.abs(dd / np.maximum(width - 0.6 * cortical, 0.5)) ** 2.4 + np.abs((z - zc_in) / hz_in) ** 3 + end <= 1.0
    g = _ramus_geometry(anatomy)
    r_half, r_thick = g["r_half"], anatomy.params["ramus_thickness"]
    r_zc, r_hz, r_hi = g["r_zc"], g["r_hz"], g["r_hi"]
    sr = (abs_s - g["front"]) - math.tan(math.radians(10.0)) * (z - r_zc)
    ramus_rho = np.abs(sr / r_half) ** 4 + np.abs((z - r_zc) / r_hz) ** 4 + (d / r_thick) ** 2
    notch = sr**2 + (z - (r_hi + 2.0)) ** 2 < 8.0**2
    ramus = (ramus_rho <= 1.0) & ~notch
    ramus_in = (
        np.abs(sr / (r_half - 1.5)) ** 4 + np.abs((z - r_zc) / (r_hz - 1.5)) ** 4 + (d / (r_thick - 1.8)) ** 2 <= 1.0
    ) & ~notch
    flat = np.zeros(near.shape, dtype=np.int8)
    flat[outer | ramus] = Tissue.CORTICAL
    flat[(inner & outer) | ramus_in] = Tissue.CANCELLOUS
    if condyles:
        z_c = r_hi + 5.0
        # condylar neck and head (elongated mediolaterally), coronoid tip
        neck = ((sr - 0.55 * r_half) / 3.5) ** 2 + (d / 3.5) ** 2 <= 1.0
        neck &= (z >= r_hi - 4.0) & (z <= z_c)
        head = ((sr - 0.55 * r_half) / 4.5) ** 2 + (d / 9.0) ** 2 + ((z - z_c) / 5.0) ** 2
        coronoid = ((sr + 0.6 * r_half) / 3.0) ** 2 + (d / 2.5) ** 2 + ((z - r_hi - 1.0) / 7.0) ** 2 <= 1.0
        flat[(neck | (head <= 1.0) | coronoid) & (flat == 0)] = Tissue.CORTICAL
        flat[head <= 0.45] = Tissue.CANCELLOUS
    canal_z = z_base + 0.33 * (z_nominal - z_base)
    r = anatomy.params["canal_radius"]
    along = (abs_s >= anatomy.lower_p2_s) & (abs_s <= s_end + 3.0) & inner
    radial = (d + 0.8) ** 2 + (z - canal_z) ** 2
    flat[along & (radial <= (r + 0.6) ** 2)] = Tissue.CORTICAL
    flat[along & (radial <= r**2)] = Tissue.SOFT
    _scatter(labels, box, near, flat)


def _blob(labels: np.ndarray, grid: _Grid, centre: np.ndarray, semi: tuple[float, float, float], tissue: Tissue,
          *, only: tuple[int, ...] | None = None, shell: float = 0.0, core: Tissue | None = None) -> None:  # fmt: skip
    """Paint an ellipsoid (a shell of ``shell`` mm around a ``core`` when given), only over the ``only`` labels."""
    box = grid.aabb(np.subtract(centre, semi), np.add(centre, semi))
    if box is None:
        return
    x, y, z = grid.coords(box)
    sdf = _sdf_ellipsoid(x, y, z, centre, semi)
    sub = labels[box]
    allowed = np.ones(sub.shape, dtype=bool) if only is None else np.isin(sub, only)
    sub[(sdf <= 0.0) & allowed] = tissue
    if core is not None:
        sub[(sdf <= -shell) & allowed] = core


def _paint_surroundings_cranial(labels: np.ndarray, grid: _Grid, anatomy: _AnatomyV2) -> None:
    """Glenoid fossae and articular eminences, zygomatic arches and bodies, petrous ridges, mastoids and clivus."""
    soft = (int(Tissue.SOFT), int(Tissue.FAT), int(Tissue.AIR))
    for cond in anatomy.condyles:
        side = math.copysign(1.0, float(cond[0]))
        # fossa roof: a cortical cap 2.5 mm above the condyle
        box = grid.aabb(cond - np.array([12.0, 10.0, 2.0]), cond + np.array([12.0, 10.0, 12.0]))
        if box is not None:
            x, y, z = grid.coords(box)
            sdf = _sdf_ellipsoid(x, y, z, cond, (11.5, 7.5, 8.0))
            sub = labels[box]
            sub[(sdf > 0.0) & (sdf <= 2.5) & (z >= cond[2] + 1.0) & np.isin(sub, soft)] = Tissue.CORTICAL
        # zygomatic arch: from the eminence in front of the fossa forward to the zygoma body
        start = cond + np.array([side * 3.0, 9.0, 3.0])
        end = np.array([side * (anatomy.molar_half_width + 22.0), anatomy.upper_tuber_y + 20.0, cond[2] + 6.0])
        bulge = np.array([side * 8.0, 0.0, 0.0])
        for t in np.linspace(0.0, 1.0, 9):
            p = (1 - t) ** 2 * start + 2 * t * (1 - t) * (0.5 * (start + end) + bulge) + t**2 * end
            _blob(labels, grid, p, (2.6, 5.5, 4.5), Tissue.CORTICAL, only=soft, shell=1.3, core=Tissue.CANCELLOUS)
        _blob(labels, grid, end + np.array([-side * 2.0, 6.0, 6.0]), (8.0, 9.0, 11.0), Tissue.CORTICAL, only=soft,
              shell=1.5, core=Tissue.CANCELLOUS)  # fmt: skip
        # petrous ridge (dense) and mastoid process with air cells
        _blob(labels, grid, np.array([side * 28.0, cond[1] - 8.0, cond[2] + 12.0]), (17.0, 8.0, 7.0),
              Tissue.CORTICAL, only=soft)  # fmt: skip
        mastoid = np.array([side * (abs(cond[0]) + 2.0), cond[1] - 14.0, cond[2] - 4.0])
        _blob(labels, grid, mastoid, (7.0, 9.0, 12.0), Tissue.CORTICAL, only=soft)
        box = grid.aabb(mastoid - np.array([5.5, 7.5, 10.5]), mastoid + np.array([5.5, 7.5, 10.5]))
        if box is not None:
            x, y, z = grid.coords(box)
            inside = _sdf_ellipsoid(x, y, z, mastoid, (5.5, 7.5, 10.5)) <= 0.0
            cells = np.sin(1.3 * x) * np.sin(1.3 * y) * np.sin(1.3 * z) > 0.25
            sub = labels[box]
            sub[inside & cells & (sub == Tissue.CORTICAL)] = Tissue.AIR
    # clivus: a sloping plate from the sphenoid down and back to the foramen magnum
    hinge = anatomy.hinge
    top = np.array([0.0, hinge[1] + 14.0, hinge[2] + 22.0])
    bottom = np.array([0.0, hinge[1] - 12.0, hinge[2] - 10.0])
    for t in np.linspace(0.0, 1.0, 7):
        _blob(labels, grid, (1 - t) * top + t * bottom, (11.0, 5.0, 6.0), Tissue.CORTICAL, only=soft, shell=1.5,
              core=Tissue.CANCELLOUS)  # fmt: skip


def _paint_surroundings_mandible(labels: np.ndarray, grid: _Grid, anatomy: _AnatomyV2) -> None:
    """Hyoid, tongue (with air above it in an open mouth) and the masseter and medial pterygoid muscles."""
    soft = (int(Tissue.SOFT), int(Tissue.FAT))
    crest_s, crest_z = anatomy.lower_crest
    base = float(crest_z.min()) - anatomy.body_height
    depth = anatomy.arch_depth
    # hyoid: a horseshoe open backwards below and behind the chin
    y0, z0, radius = depth - 30.0, base - 12.0, 17.0
    for t in np.linspace(-1.8, 1.8, 13):
        p = np.array([radius * math.sin(t), y0 - radius * (1.0 - math.cos(t)) * 0.9, z0 + 2.0 * abs(t)])
        r = 2.4 if abs(t) < 0.8 else 1.6
        _blob(labels, grid, p, (r, r, r), Tissue.CORTICAL, only=soft, shell=0.9, core=Tissue.CANCELLOUS)
    # tongue: muscle filling the lower arch up to just under the occlusal plane
    k = anatomy.params["tongue"]
    tongue_c = np.array([0.0, 0.25 * depth - 8.0, -9.0])
    tongue_semi = (k * (anatomy.molar_half_width - 7.0), k * 0.8 * depth, 11.0)
    _blob(labels, grid, tongue_c, tongue_semi, Tissue.MUSCLE, only=soft)
    if anatomy.opening_mm > 3.0:
        gap = anatomy.opening_mm
        _blob(labels, grid, np.array([0.0, 0.3 * depth - 4.0, 2.0 + 0.45 * gap]),
              (anatomy.molar_half_width - 6.0, 0.75 * depth, 0.45 * gap + 1.0), Tissue.AIR,
              only=(int(Tissue.SOFT), int(Tissue.FAT), int(Tissue.MUSCLE)))  # fmt: skip
    # masseter (lateral) and medial pterygoid (medial) along each ramus, in a thin fat plane
    g = _ramus_geometry(anatomy)
    mid_s = g["front"] + 0.1 * g["r_half"]
    for sign in (-1.0, 1.0):
        xy = _arch_point(anatomy, sign * mid_s)
        out = np.array([sign, 0.0])
        for offset, semi in ((anatomy.params["ramus_thickness"] + 5.0, (5.0, 13.0, 20.0)),
                             (-(anatomy.params["ramus_thickness"] + 5.5), (4.5, 10.0, 16.0))):  # fmt: skip
            c = np.array([xy[0] + out[0] * offset, xy[1], g["r_zc"] - (6.0 if offset < 0 else 0.0)])
            _blob(labels, grid, c, tuple(s + 1.2 for s in semi), Tissue.FAT, only=(int(Tissue.SOFT),))
            _blob(labels, grid, c, semi, Tissue.MUSCLE, only=soft)


def _paint_holder(labels: np.ndarray, spacing: np.ndarray, rng: np.random.Generator) -> dict:
    """A carbon head holder (a cradle under the back of the head) and the table below it, fixed to the scanner axes;
    painted into air only, and only when the back of the head is inside the volume."""
    occupied = np.flatnonzero((labels != Tissue.AIR).any(axis=(0, 2)))
    if len(occupied) == 0 or occupied[0] == 0:
        return {"holder": False}
    y_back = occupied[0] * spacing[1]
    columns = np.flatnonzero((labels != Tissue.AIR).any(axis=(1, 2)))
    x_mid = 0.5 * (columns[0] + columns[-1]) * spacing[0]
    half = 0.5 * (columns[-1] - columns[0]) * spacing[0]
    radius = half + float(rng.uniform(4.0, 12.0))
    wall = float(rng.uniform(3.0, 5.0))
    y_centre = y_back - float(rng.uniform(2.0, 6.0)) + radius
    x = (np.arange(labels.shape[0]) * spacing[0])[:, None]
    y = (np.arange(labels.shape[1]) * spacing[1])[None, :]
    r = np.hypot(x - x_mid, y - y_centre)
    cradle = (r >= radius) & (r <= radius + wall) & (y < y_centre)
    y_table = y_centre - radius - wall - float(rng.uniform(2.0, 8.0))
    table = (y <= y_table) & (y >= y_table - 9.0) & np.ones_like(x, dtype=bool)
    plane = cradle | table
    if not plane.any():
        return {"holder": False}
    air = labels == Tissue.AIR
    labels[plane[:, :, None] & air] = Tissue.DEVICE
    return {"holder": True}


def _paint_v2(grid: _Grid, anatomy: _AnatomyV2, effects: dict[str, bool]) -> tuple[np.ndarray, np.ndarray]:
    """Tissue labels and the metal-kind map (0 = no metal) of one v2 case."""
    cranial = _cranial_grid(grid, anatomy)
    labels = np.full(grid.shape, Tissue.AIR, dtype=np.int8)
    metal = np.zeros(grid.shape, dtype=np.int8)
    _paint_soft_tissue(labels, cranial, anatomy)
    if anatomy.opening_deg > 0.0:  # the chin and floor of the mouth go down with the mandible
        _blob(labels, grid, np.array([0.0, 0.5 * anatomy.arch_depth - 12.0, -30.0]),
              (anatomy.molar_half_width + 14.0, 0.5 * anatomy.arch_depth + 24.0, 34.0), Tissue.SOFT,
              only=(int(Tissue.AIR),))  # fmt: skip
    _paint_spine_and_airway(labels, cranial, anatomy)  # the neck holds the skull; the mandible swings open
    if effects["surroundings"]:
        _paint_surroundings_mandible(labels, grid, anatomy)
    _paint_maxilla(labels, cranial, anatomy)
    if effects["surroundings"]:
        _paint_surroundings_cranial(labels, cranial, anatomy)
    _paint_mandible_v2(labels, grid, anatomy, condyles=effects["surroundings"])
    _paint_teeth_v2(labels, metal, grid, cranial, anatomy.by_key, anatomy.params["lamina_dura"])
    return labels, metal
