"""Teeth of phantom v2: curved roots, third molars as they come, missing-tooth situations and metal restorations.

Part of the phantom generator (:mod:`h3de_lite.data.phantom`, ``difficulty="v2"``). A tooth keeps the v1 geometry
(:class:`~h3de_lite.data.phantom._Tooth`: crown, roots and pulp in a local frame u mesial, v buccal, w occlusal) and
gains a *state*, so that a missing tooth looks like it does in a real jaw and its landmarks follow the MML convention
(a landmark is missing when the tooth structure it names is absent):

============  ==========================================================  =============================================
state         what the image shows                                        landmarks of that tooth
============  ==========================================================  =============================================
present       the tooth (possibly tilted, rotated, drifted, over-erupted,  all present (crown: enamel, dentin or metal)
              impacted, filled or crowned)
absent        nothing: bone (or soft tissue) where the tooth was            all missing
healed        a healed socket: the alveolar ridge lowered and narrowed     all missing
              by 2–6 mm (bone loss)
root          a retained root remnant: roots and canal up to the crest,    crown / cusp landmark missing, root-apex
              no crown                                                     landmarks present (on the root tips)
implant       a titanium screw in the ridge, an abutment and a metal       all missing (an implant is not tooth
              crown                                                        structure)
pontic        the suspended tooth of a bridge: a metal crown over the      all missing
              ridge joined to metal-crowned neighbours (the abutments)
============  ==========================================================  =============================================

Besides these, a gap can make a neighbour *drift* (tip and slide into the gap) and the opposing tooth *over-erupt*
(grow out of its socket toward the gap); both keep their landmarks, which move with the tooth. Lower third molars come
``erupted``, ``partial`` (partly erupted), or impacted ``mesioangular``, ``vertical``, ``horizontal`` or
``distoangular``, below the occlusal plane or at the front of the ramus, in a soft-tissue follicle, sometimes with
``fused`` or ``conical`` roots (a conical root: both root-apex landmarks at its one apex). Their landmarks follow the
tooth: the crown landmark stays 1 mm under the central fossa on the tooth axis, the apex landmarks on the root tips.

Explained in book/phantom.md.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import numpy as np
from scipy.spatial import cKDTree

from h3de_lite.data.phantom import _LANDMARK_TEETH, Tissue, _Grid, _Root, _Tooth

__all__ = [
    "GAP_KINDS",
    "METAL_HU",
    "METAL_KINDS",
    "SITUATIONS",
    "THIRD_MOLAR_CLASSES",
]

THIRD_MOLAR_CLASSES: tuple[str, ...] = ("erupted", "partial", "mesioangular", "vertical", "horizontal", "distoangular")
"""Lower third molar eruption classes (Winter's classification of impaction, plus erupted and partly erupted)."""
_THIRD_MOLAR_P = (0.58, 0.11, 0.14, 0.07, 0.05, 0.05)
GAP_KINDS: tuple[str, ...] = ("absent", "healed", "root", "implant", "pontic")
"""States of a missing tooth (see the module docstring)."""
SITUATIONS: tuple[str, ...] = ("absent", "healed", "drift", "over_eruption", "root", "implant", "bridge")
"""The missing-tooth situations counted per case in the metadata (``drift``/``over_eruption`` are neighbours')."""
METAL_KINDS: tuple[str, ...] = ("amalgam", "alloy", "titanium", "steel")
"""Metal kinds (index + 1 is the value in the metal-kind map): fillings, crowns/bridges, implants, brackets/wires."""
METAL_HU: dict[str, tuple[float, float]] = {
    "amalgam": (9000.0, 15000.0),
    "alloy": (10000.0, 16000.0),
    "titanium": (5000.0, 8000.0),
    "steel": (8000.0, 12000.0),
}
"""Per-case HU of each metal on the extended CT scale (well above enamel's 2300–3100)."""

# per-case probabilities
_P_FILLINGS = 0.35
_P_CROWNS = 0.18
_P_BRACKETS = 0.08
_P_DRIFT = 0.5
_P_OVER_ERUPTION = 0.5
# gap kind probabilities (absent, healed, root, implant, pontic) for a missing tooth
_GAP_P = {
    "M3": (0.55, 0.2, 0.25, 0.0, 0.0),
    "M2": (0.2, 0.25, 0.2, 0.2, 0.15),
    "C": (0.15, 0.1, 0.3, 0.3, 0.15),
    "other": (0.28, 0.35, 0.15, 0.12, 0.1),
}
_OTHER_MISSING_P = {"M1": 0.12, "M3": 0.0}  # lower M3 only in incomplete cases; upper M3 drawn separately
_OTHER_MISSING_DEFAULT = 0.035
_UPPER_M3_MISSING_P = 0.35


@dataclass
class _BentRoot(_Root):
    """A root whose axis bows by ``bow`` (u, v) mm: centre = straight axis − bow·f(1 − f), f = 0 at the top, 1 at the
    apex. The apex stays where it is; the root is banana-shaped and its tip points ``bow`` off the straight axis."""

    bow: np.ndarray = field(default_factory=lambda: np.zeros(2))

    def _centre(self, fc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        bend = fc * (1.0 - fc)
        uc = self.top[0] + fc * (self.apex[0] - self.top[0]) - self.bow[0] * bend
        vc = self.top[1] + fc * (self.apex[1] - self.top[1]) - self.bow[1] * bend
        return uc, vc

    def mask(self, u: np.ndarray, v: np.ndarray, w: np.ndarray, grow: float = 0.0) -> np.ndarray:
        wt, wa = float(self.top[2]), float(self.apex[2])
        f = (wt - w) / (wt - wa)
        fc = np.clip(f, 0.0, 1.0)
        uc, vc = self._centre(fc)
        ru = self.radius_top[0] + fc * (self.radius_apex - self.radius_top[0]) + grow
        rv = self.radius_top[1] + fc * (self.radius_apex - self.radius_top[1]) + grow
        radial = ((u - uc) / ru) ** 2 + ((v - vc) / rv) ** 2
        cap_w = 1.3 * self.radius_apex + grow
        cap = radial + ((w - wa) / cap_w) ** 2 * (f > 1.0)
        return ((f >= 0.0) & (radial <= 1.0)) | ((f > 1.0) & (cap <= 1.0))

    def canal(self, u: np.ndarray, v: np.ndarray, w: np.ndarray) -> np.ndarray:
        wt, wa = float(self.top[2]), float(self.apex[2])
        f = (wt - w) / (wt - wa)
        fc = np.clip(f, 0.0, 1.0)
        uc, vc = self._centre(fc)
        ru = 0.28 * (self.radius_top[0] + fc * (self.radius_apex - self.radius_top[0]))
        rv = 0.28 * (self.radius_top[1] + fc * (self.radius_apex - self.radius_top[1]))
        stop = 1.0 - 2.0 / (wt - wa)
        return (f >= 0.0) & (f <= stop) & (((u - uc) / ru) ** 2 + ((v - vc) / rv) ** 2 <= 1.0)

    @property
    def apex_landmark(self) -> np.ndarray:
        """On the bowed axis, half a cap radius above the end of the root."""
        wt, wa = float(self.top[2]), float(self.apex[2])
        w = wa + 0.5 * 1.3 * self.radius_apex
        fc = np.array((wt - w) / (wt - wa))
        uc, vc = self._centre(fc)
        return np.array([float(uc), float(vc), w])


@dataclass
class _ToothV2(_Tooth):
    """A v2 tooth: v1 geometry plus its state, restorations, follicle and what happened to it (for the metadata)."""

    state: str = "present"  # present | absent | healed | root | implant | pontic
    restoration: str = ""  # "" | "filling" | "crown"
    filling: tuple[float, float, float] = (0.0, 0.0, 0.0)  # u from, u to (as a fraction of a), depth below the fossa
    root_cut: float = 0.0  # w of the fracture line of a root remnant
    follicle: float = 0.0  # soft-tissue follicle around an impacted crown (mm)
    implant: tuple[float, float] = (0.0, 0.0)  # fixture radius, length (mm)
    third_molar: str = ""  # eruption class of a lower third molar
    root_form: str = ""  # "", "fused", "conical"
    events: list[str] = field(default_factory=list)  # e.g. "drift", "over_eruption"
    nominal_cej_z: float = 0.0  # z of the junction before impaction / over-eruption (for the alveolar crest)
    s: float = 0.0  # signed arc length of the tooth centre along its arch
    bracket: bool = False

    @property
    def jaw(self) -> str:
        return self.name.split("-")[0]

    @property
    def side(self) -> str:
        return self.name.split("-")[1]

    @property
    def short(self) -> str:
        return self.name.split("-")[2]

    @property
    def erupted(self) -> bool:
        return self.state == "present" and self.third_molar in ("", "erupted")

    def landmark_present(self, letter: str) -> bool:
        """MML convention: a landmark exists when the tooth structure it names does."""
        if self.state == "present":
            return True
        if self.state == "root":
            return letter not in ("0", "a", "d")  # the crown is gone, the root apices are there
        return False


def _spin(frame: np.ndarray, degrees: float) -> np.ndarray:
    """Rotate a tooth about its own long axis (w) by ``degrees``."""
    t = math.radians(degrees)
    rot = np.array([[math.cos(t), -math.sin(t), 0.0], [math.sin(t), math.cos(t), 0.0], [0.0, 0.0, 1.0]])
    return frame @ rot


def _tip_about(tooth: _Tooth, mesial_deg: float, pivot_w: float) -> None:
    """Tip a tooth toward u by ``mesial_deg`` about the point ``(0, 0, pivot_w)`` of its own axis (in place)."""
    m = math.radians(mesial_deg)
    rot_v = np.array([[math.cos(m), 0, math.sin(m)], [0, 1, 0], [-math.sin(m), 0, math.cos(m)]])
    pivot = tooth.to_canonical(np.array([0.0, 0.0, pivot_w]))
    new_frame = tooth.frame @ rot_v
    tooth.centre = pivot - new_frame @ np.array([0.0, 0.0, pivot_w])
    tooth.frame = new_frame


# --------------------------------------------------------------------------------------------------------------------
# Solid point clouds (for placing teeth without overlap)
# --------------------------------------------------------------------------------------------------------------------


def _tooth_points(tooth: _Tooth, step: float = 0.8) -> np.ndarray:
    """Canonical points ``(N, 3)`` on a ``step`` mm grid inside the tooth (crown, trunk and roots)."""
    lo, hi = tooth.local_bounds()
    axes = [np.arange(a, b + 1e-9, step) for a, b in zip(lo, hi)]
    u, v, w = np.meshgrid(*axes, indexing="ij")
    inside = tooth.crown_mask(u, v, w) | tooth.trunk_mask(u, v, w)
    for root in tooth.roots:
        inside |= root.mask(u, v, w)
    local = np.stack([u[inside], v[inside], w[inside]], axis=1)
    return tooth.centre + local @ tooth.frame.T


def _clearance(a: np.ndarray, b: np.ndarray) -> float:
    if len(a) == 0 or len(b) == 0:
        return math.inf
    return float(cKDTree(b).query(a, k=1)[0].min())


# --------------------------------------------------------------------------------------------------------------------
# Third molars
# --------------------------------------------------------------------------------------------------------------------


def _place_third_molar(tooth: _ToothV2, second: _ToothV2 | None, distal: np.ndarray, rng: np.random.Generator,
                       crest_z: float, base_z: float) -> None:  # fmt: skip
    """Give a lower third molar its eruption class: tilt, sink below the crest, slide distally clear of the second
    molar (0.4 mm) and keep the apices 3 mm above the lower border of the mandible (``base_z``)."""
    cls = str(rng.choice(THIRD_MOLAR_CLASSES, p=_THIRD_MOLAR_P))
    tooth.third_molar = cls
    if cls == "erupted":
        return
    h = tooth.h
    tilt, sink, back = {
        "partial": (float(rng.normal(8.0, 6.0)), float(rng.uniform(0.4, 0.7)) * h, float(rng.uniform(0.0, 1.5))),
        "mesioangular": (float(rng.uniform(25.0, 60.0)), float(rng.uniform(3.0, 7.0)), 0.0),
        "vertical": (float(rng.normal(0.0, 5.0)), h + float(rng.uniform(1.0, 4.0)), float(rng.uniform(0.0, 4.0))),
        "horizontal": (float(rng.uniform(80.0, 100.0)), float(rng.uniform(5.0, 8.0)), 0.0),
        "distoangular": (-float(rng.uniform(15.0, 40.0)), h + float(rng.uniform(0.0, 3.0)),
                         float(rng.uniform(2.0, 6.0))),
    }[cls]  # fmt: skip
    _tip_about(tooth, tilt, pivot_w=0.5 * h)
    tooth.centre = tooth.centre + np.array([0.0, 0.0, -sink]) + back * distal
    if cls != "partial":
        tooth.follicle = float(rng.uniform(0.8, 1.5))
    if cls in ("vertical", "distoangular") and rng.random() < 0.5:
        tooth.events.append("ramus")
    # the crown of an impacted tooth stays under the crest (bone covers it; a partial one shows above it), the whole
    # tooth above the lower border (cortex + 3 mm, which wins), clear of the second molar
    points = _tooth_points(tooth)
    other = _tooth_points(second) if second is not None and second.state in ("present", "root") else None
    for _ in range(3):
        shift = 0.0
        if cls != "partial":
            shift = min(0.0, crest_z - 0.5 - float(points[:, 2].max()))
        shift = max(shift, base_z + 3.0 - float(points[:, 2].min()))
        tooth.centre = tooth.centre + np.array([0.0, 0.0, shift])
        points = points + np.array([0.0, 0.0, shift])
        if other is None:
            break
        moved = False
        for _ in range(40):
            if _clearance(points, other) >= 0.4 + tooth.follicle:
                break
            tooth.centre = tooth.centre + 0.5 * distal
            points = points + 0.5 * distal
            moved = True
        if not moved:
            break


def _third_molar_roots(tooth: _ToothV2, rng: np.random.Generator) -> None:
    """Sometimes fused (the two roots meet into one mass) or conical (one tapering root; both apices at its tip)."""
    r = rng.random()
    if r < 0.15:
        tooth.root_form = "fused"
        mesial, distal = tooth.roots
        mid = 0.5 * (mesial.apex + distal.apex)
        mesial.apex = mid + np.array([0.5, 0.0, 0.0])
        distal.apex = mid - np.array([0.5, 0.0, 0.0])
        mesial.radius_top = (mesial.radius_top[0] * 1.5, mesial.radius_top[1])
        distal.radius_top = (distal.radius_top[0] * 1.5, distal.radius_top[1])
    elif r < 0.25:
        tooth.root_form = "conical"
        mesial, distal = tooth.roots
        apex = np.array([0.0, float(mesial.apex[1]), 0.75 * float(min(mesial.apex[2], distal.apex[2]))])
        cone = _BentRoot(np.array([0.0, 0.0, -1.0]), apex, (0.7 * tooth.a, 0.75 * tooth.b), mesial.radius_apex)
        tooth.roots = [cone, cone]  # both apex landmarks on the one apex
    for letter, root in zip(_LANDMARK_TEETH["M3"][1:], tooth.roots):
        tooth.landmarks[letter] = root.apex_landmark


# --------------------------------------------------------------------------------------------------------------------
# Missing-tooth situations
# --------------------------------------------------------------------------------------------------------------------


def _gap_kind(name: str, rng: np.random.Generator, *, situations: bool) -> str:
    kind = str(rng.choice(GAP_KINDS, p=_GAP_P.get(name, _GAP_P["other"])))  # drawn either way: streams stay aligned
    return kind if situations else "absent"


def _assign_states(teeth: dict[str, _ToothV2], missing_landmark_teeth: set[str], rng: np.random.Generator, *,
                   situations: bool, metal: bool) -> None:  # fmt: skip
    """Choose the state of every tooth. Lower landmark teeth (cuspids, second and third molars) are missing only when
    listed in ``missing_landmark_teeth`` (e.g. ``"L-M2"``); other teeth go missing at random in every case."""
    for key, tooth in teeth.items():
        jaw, side, name = key.split("-")
        draw_kind = rng.random()  # always drawn: switching situations off keeps the other draws
        if jaw == "lower" and name in _LANDMARK_TEETH:
            gone = f"{side}-{name}" in missing_landmark_teeth
        elif jaw == "upper" and name == "M3":
            gone = draw_kind < _UPPER_M3_MISSING_P
        else:
            gone = draw_kind < _OTHER_MISSING_P.get(name, _OTHER_MISSING_DEFAULT)
        kind = _gap_kind(name, rng, situations=situations)
        cut = float(rng.uniform(-1.5, 0.3))
        if not gone:
            continue
        if kind in ("implant", "pontic") and not metal:
            kind = "healed"
        tooth.state = kind
        tooth.root_cut = cut
    # a bridge needs both neighbours in place (they are crowned); otherwise the gap gets an implant
    for key, tooth in teeth.items():
        if tooth.state != "pontic":
            continue
        left, right = _neighbours(teeth, key)
        if left is None or right is None or not (left.erupted and right.erupted):
            tooth.state = "implant"
            continue
        for abutment in (left, right):
            abutment.restoration = "crown"
            abutment.events.append("bridge_abutment")


_ORDER = ("I1", "I2", "C", "P1", "P2", "M1", "M2", "M3")


def _neighbours(teeth: dict[str, _ToothV2], key: str) -> tuple[_ToothV2 | None, _ToothV2 | None]:
    """The mesial and distal neighbours along the arch (the other side's I1 is the mesial neighbour of an I1)."""
    jaw, side, name = key.split("-")
    i = _ORDER.index(name)
    if i == 0:
        mesial = teeth.get(f"{jaw}-{'R' if side == 'L' else 'L'}-I1")
    else:
        mesial = teeth.get(f"{jaw}-{side}-{_ORDER[i - 1]}")
    distal = teeth.get(f"{jaw}-{side}-{_ORDER[i + 1]}") if i + 1 < len(_ORDER) else None
    return mesial, distal


def _drift_and_over_erupt(teeth: dict[str, _ToothV2], rng: np.random.Generator) -> None:
    """Long-standing gaps (absent, healed, root remnant): neighbours tip and slide into them, the opposing tooth
    over-erupts toward them. Moves are small enough that a drifting tooth never reaches the far side of the gap."""
    for key, tooth in teeth.items():
        if tooth.state not in ("absent", "healed", "root"):
            continue
        draws = rng.random(4)
        amounts = rng.uniform(0.0, 1.0, size=4)
        jaw, side, name = key.split("-")
        mesial, distal = _neighbours(teeth, key)
        if tooth.state != "root":
            for neighbour, toward, p, amount in ((distal, +1.0, draws[0], amounts[0]),
                                                 (mesial, -1.0, draws[1], amounts[1])):  # fmt: skip
                if neighbour is None or not neighbour.erupted or p >= _P_DRIFT or neighbour.side != side:
                    continue
                # the distal neighbour tips mesially (u), the mesial one distally; the crown moves most
                tilt = toward * (8.0 + 12.0 * amount) * (1.0 if toward > 0 else 0.5)
                _tip_about(neighbour, tilt, pivot_w=-0.45 * _root_length(neighbour))
                neighbour.centre = neighbour.centre + toward * (0.5 + 1.5 * amount) * neighbour.frame[:, 0] * np.array(
                    [1.0, 1.0, 0.0])
                neighbour.events.append("drift")
        other_jaw = "upper" if jaw == "lower" else "lower"
        antagonist = teeth.get(f"{other_jaw}-{side}-{name}")
        if antagonist is not None and antagonist.erupted and draws[2] < _P_OVER_ERUPTION:
            rise = 1.5 + 2.5 * amounts[2]
            antagonist.centre = antagonist.centre + rise * np.array([0.0, 0.0, 1.0 if other_jaw == "lower" else -1.0])
            antagonist.events.append("over_eruption")


def _root_length(tooth: _Tooth) -> float:
    return float(max(-r.apex[2] for r in tooth.roots))


def _assign_metal(teeth: dict[str, _ToothV2], rng: np.random.Generator) -> list[str]:
    """Fillings, metal crowns and brackets on present teeth; returns the case's metal items for the metadata."""
    items: list[str] = []
    draws = rng.random(3)
    candidates = [t for t in teeth.values() if t.erupted and t.kind in ("molar", "premolar") and not t.restoration]
    if draws[0] < _P_FILLINGS and candidates:
        n = int(rng.integers(1, min(5, len(candidates)) + 1))
        for i in rng.choice(len(candidates), size=n, replace=False):
            tooth = candidates[int(i)]
            kind = str(rng.choice(["occlusal", "mesial", "distal"]))
            u0, u1 = {"occlusal": (-0.35, 0.35), "mesial": (-0.35, 1.3), "distal": (-1.3, 0.35)}[kind]
            tooth.restoration = "filling"
            tooth.filling = (u0, u1, float(rng.uniform(1.5, 3.0)))
            items.append(f"filling:{tooth.name}")
    candidates = [t for t in teeth.values() if t.erupted and t.kind in ("molar", "premolar") and not t.restoration]
    if draws[1] < _P_CROWNS and candidates:
        n = int(rng.integers(1, min(2, len(candidates)) + 1))
        for i in rng.choice(len(candidates), size=n, replace=False):
            candidates[int(i)].restoration = "crown"
            items.append(f"crown:{candidates[int(i)].name}")
    if draws[2] < _P_BRACKETS:
        upper_too = rng.random() < 0.7
        for tooth in teeth.values():
            if tooth.erupted and tooth.short not in ("M2", "M3") and (tooth.jaw == "lower" or upper_too):
                tooth.bracket = True
        items.append("brackets:" + ("both" if upper_too else "lower"))
    for tooth in teeth.values():
        if tooth.state == "implant":
            items.append(f"implant:{tooth.name}")
            tooth.implant = (float(rng.uniform(1.8, 2.4)), float(rng.uniform(8.0, 12.0)))
        elif tooth.state == "pontic":
            items.append(f"bridge:{tooth.name}")
        elif tooth.restoration == "crown" and "bridge_abutment" in tooth.events:
            items.append(f"crown:{tooth.name}")
    return items


# --------------------------------------------------------------------------------------------------------------------
# Painting
# --------------------------------------------------------------------------------------------------------------------

_BONE = (Tissue.CANCELLOUS, Tissue.CORTICAL)
_TOOTH = (Tissue.ENAMEL, Tissue.DENTIN, Tissue.PULP)


def _metal_code(kind: str) -> int:
    return METAL_KINDS.index(kind) + 1


def _local_box(grid: _Grid, tooth: _Tooth, lo: np.ndarray, hi: np.ndarray) -> tuple[slice, slice, slice] | None:
    corners = np.array(list(itertools.product(*zip(lo, hi))))
    return grid.box(np.array([tooth.to_canonical(c) for c in corners]))


def _paint_tooth_v2(labels: np.ndarray, metal: np.ndarray, grid: _Grid, tooth: _ToothV2, lamina: float) -> None:
    """One tooth in its state: lamina dura, follicle, dentin, enamel, pulp, restorations; implants and pontics."""
    if tooth.state in ("absent", "healed"):
        return
    lo, hi = tooth.local_bounds()
    if tooth.state == "implant":
        r, length = tooth.implant
        lo = np.array([-max(tooth.a, r) - 1.0, -max(tooth.b, r) - 1.0, -length - 1.0])
    box = _local_box(grid, tooth, lo, hi)
    if box is None:
        return
    u, v, w = grid.coords(box, frame=tooth.frame, origin=tooth.centre)
    sub, msub = labels[box], metal[box]
    crown = tooth.crown_mask(u, v, w)
    if tooth.state == "implant":
        r, length = tooth.implant
        radial = np.sqrt(u * u + v * v)
        taper = r - 0.4 * np.clip(-w / length, 0.0, 1.0)
        thread = 0.3 * (np.sin(2.0 * math.pi * w / 0.9) > 0.0)
        fixture = (w <= 0.3) & (w >= -length) & (radial <= taper + thread - 0.3 + 0.3 * (w > -length + 1.0))
        abutment = (w > 0.3) & (w <= 0.5 * tooth.h) & (radial <= 1.6)
        sub[fixture | abutment] = Tissue.METAL
        msub[fixture | abutment] = _metal_code("titanium")
        sub[crown] = Tissue.METAL
        msub[crown] = _metal_code("alloy")
        return
    if tooth.state == "pontic":
        sub[crown] = Tissue.METAL
        msub[crown] = _metal_code("alloy")
        return
    socket = np.zeros(u.shape, dtype=bool)
    root = tooth.trunk_mask(u, v, w)
    for r in tooth.roots:
        socket |= r.mask(u, v, w, grow=lamina)
        root |= r.mask(u, v, w)
    if tooth.state == "root":
        root &= w <= tooth.root_cut
        crown = np.zeros_like(crown)
    sub[socket & (sub == Tissue.CANCELLOUS)] = Tissue.CORTICAL
    if tooth.follicle > 0.0:
        grown = tooth.crown_mask(u, v, w, inset=-tooth.follicle, inset_top=-tooth.follicle)
        sub[grown & ~crown & np.isin(sub, _BONE)] = Tissue.SOFT
    core = tooth.crown_mask(u, v, w, inset=tooth.enamel, inset_top=tooth.enamel_top) & crown
    sub[root | core] = Tissue.DENTIN
    sub[crown & ~core] = Tissue.ENAMEL
    pulp = tooth.pulp_mask(u, v, w) & (root | crown)
    sub[pulp] = Tissue.PULP
    if tooth.restoration == "crown":
        prep = tooth.crown_mask(u, v, w, inset=1.3, inset_top=1.6)
        shell = crown & ~prep
        sub[shell] = Tissue.METAL
        msub[shell] = _metal_code("alloy")
    elif tooth.restoration == "filling":
        u0, u1, depth = tooth.filling
        cavity = (crown & (u >= u0 * tooth.a) & (u <= u1 * tooth.a) & (np.abs(v) <= 0.32 * tooth.b)
                  & (w >= tooth.h - tooth.fossa - depth) & ~pulp)  # fmt: skip
        sub[cavity] = Tissue.METAL
        msub[cavity] = _metal_code("amalgam")


def _paint_capsule(labels: np.ndarray, metal: np.ndarray, grid: _Grid, p0: np.ndarray, p1: np.ndarray, radius: float,
                   kind: str, *, keep_teeth: bool) -> None:  # fmt: skip
    """A metal capsule (segment ``p0``–``p1`` in canonical mm, ``radius``): bridge connectors and arch wires."""
    lo, hi = np.minimum(p0, p1) - radius, np.maximum(p0, p1) + radius
    box = grid.aabb(lo, hi)
    if box is None:
        return
    x, y, z = grid.coords(box)
    d = p1 - p0
    t = np.clip(((x - p0[0]) * d[0] + (y - p0[1]) * d[1] + (z - p0[2]) * d[2]) / max(float(d @ d), 1e-9), 0.0, 1.0)
    dist2 = (x - p0[0] - t * d[0]) ** 2 + (y - p0[1] - t * d[1]) ** 2 + (z - p0[2] - t * d[2]) ** 2
    inside = dist2 <= radius * radius
    sub, msub = labels[box], metal[box]
    if keep_teeth:
        inside &= ~np.isin(sub, _TOOTH + (Tissue.METAL,))
    sub[inside] = Tissue.METAL
    msub[inside] = _metal_code(kind)


def _bracket_centre(tooth: _Tooth) -> np.ndarray:
    return tooth.to_canonical(np.array([0.0, tooth.b + 1.0, 0.5 * tooth.h]))


def _paint_bracket(labels: np.ndarray, metal: np.ndarray, grid: _Grid, tooth: _ToothV2) -> None:
    """A steel bracket (3.4 × 1.6 × 3 mm) on the buccal face of the crown, outside the tooth."""
    lo = np.array([-1.7, tooth.b + 0.1, 0.5 * tooth.h - 1.5])
    hi = np.array([1.7, tooth.b + 1.7, 0.5 * tooth.h + 1.5])
    box = _local_box(grid, tooth, lo, hi)
    if box is None:
        return
    u, v, w = grid.coords(box, frame=tooth.frame, origin=tooth.centre)
    inside = (np.abs(u) <= 1.7) & (v >= lo[1]) & (v <= hi[1]) & (np.abs(w - 0.5 * tooth.h) <= 1.5)
    sub, msub = labels[box], metal[box]
    inside &= ~np.isin(sub, _TOOTH + (Tissue.METAL,))
    sub[inside] = Tissue.METAL
    msub[inside] = _metal_code("steel")


def _paint_teeth_v2(labels: np.ndarray, metal: np.ndarray, grid_lower: _Grid, grid_upper: _Grid,
                    teeth: dict[str, _ToothV2], lamina: float) -> None:  # fmt: skip
    """All teeth (landmark teeth last, so a crowded neighbour never paints over a landmark), then bridge connectors,
    brackets and arch wires."""
    order = sorted(teeth.values(), key=lambda t: (t.jaw == "lower" and t.short in _LANDMARK_TEETH, t.name))
    for tooth in order:
        grid = grid_lower if tooth.jaw == "lower" else grid_upper
        _paint_tooth_v2(labels, metal, grid, tooth, lamina)
    for key, tooth in teeth.items():
        if tooth.state != "pontic":
            continue
        grid = grid_lower if tooth.jaw == "lower" else grid_upper
        centre = tooth.to_canonical(np.array([0.0, 0.0, 0.45 * tooth.h]))
        for neighbour in _neighbours(teeth, key):
            if neighbour is not None:
                other = neighbour.to_canonical(np.array([0.0, 0.0, 0.45 * neighbour.h]))
                _paint_capsule(labels, metal, grid, centre, other, 1.6, "alloy", keep_teeth=True)
    for jaw, grid in (("lower", grid_lower), ("upper", grid_upper)):
        braced = [t for t in teeth.values() if t.jaw == jaw and t.bracket]
        if not braced:
            continue
        for tooth in braced:
            _paint_bracket(labels, metal, grid, tooth)
        braced.sort(key=lambda t: t.s)
        for a, b in zip(braced[:-1], braced[1:]):
            _paint_capsule(labels, metal, grid, _bracket_centre(a), _bracket_centre(b), 0.4, "steel", keep_teeth=True)
