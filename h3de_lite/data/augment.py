"""Training augmentation that keeps the landmarks right: crops with and without landmarks, left–right flips that swap
the L/R names, small rotations and scalings in mm, and intensity jitter in HU.

The paper (§III-A) describes only the intensity window and random 128×128×64 crops; it does not say whether it
augments. h3de-lite adds the transforms below because the phantom and the MML training sets are small, and because
sliding-window inference over a whole volume shows the network many windows that hold no landmark at all.

Every transform is a callable ``transform(case, rng) -> Case`` that draws its parameters from the
``numpy.random.Generator`` it is given (same generator state → same output) and returns a *new* case; the input is never
modified. :class:`Compose` chains them. Geometry:

- Geometric transforms (:class:`RandomFlipLR`, :class:`RandomRotateScale`) make a new synthetic patient on the *same*
  voxel grid: shape, spacing and affine stay, the anatomy and the landmarks move. Landmarks follow the voxels exactly
  (closed-form maps, not re-detected); a landmark that leaves the volume becomes ``NaN`` (absent), as in
  :func:`~h3de_lite.data.transforms.crop`.
- :class:`RandomCrop` moves the grid instead (the affine follows, as in :func:`~h3de_lite.data.transforms.crop`).
- A :class:`LabeledCase` carries a label volume (e.g. the phantom's :class:`~h3de_lite.data.phantom.Tissue` map) that
  every geometric transform moves with nearest-neighbour sampling and intensity transforms leave alone, so a test or
  a notebook can check that each landmark still sits on the anatomy it names (:func:`landmarks_off_tissue`).

Explained in notebooks/02_data.ipynb.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol, Sequence, runtime_checkable

import numpy as np
from scipy import ndimage

from h3de_lite.data.case import Case
from h3de_lite.data.phantom import Tissue
from h3de_lite.data.transforms import DEFAULT_WINDOW, _crop_frame, _size3, choose_crop_start, crop

__all__ = [
    "LabeledCase",
    "Transform",
    "Compose",
    "RandomCrop",
    "RandomFlipLR",
    "RandomRotateScale",
    "IntensityJitter",
    "mirror_rows",
    "flip_lr",
    "rotation_matrix",
    "warp",
    "warp_crop",
    "warp_landmarks",
    "rotate_scale",
    "rotate_scale_matrix",
    "adjust_intensity",
    "landmark_tissue",
    "landmarks_off_tissue",
    "training_augmentation",
]


# --------------------------------------------------------------------------------------------------------------------
# A case with a label volume, and rebuilding cases
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class LabeledCase(Case):
    """A :class:`~h3de_lite.data.case.Case` with an integer label volume that moves with the image.

    Geometric transforms resample ``labels`` with nearest neighbour (order 0) and pad with 0
    (:attr:`Tissue.AIR <h3de_lite.data.phantom.Tissue.AIR>`); intensity transforms leave it unchanged.

    Args:
        labels: ``(D, H, W)`` integer labels on the voxel grid of ``volume``, e.g. the phantom's tissue map.
        volume, landmarks, spacing, case_id, affine, names: as in :class:`~h3de_lite.data.case.Case`.

    Shape:
        volume and labels ``(D, H, W)``; landmarks ``(L, 3)``.

    Example:
        >>> c = LabeledCase(volume=np.zeros((8, 8, 4)), landmarks=np.full((14, 3), 2.0), spacing=[1, 1, 1],
        ...                 labels=np.zeros((8, 8, 4), dtype=np.int8))
        >>> c.labels.shape
        (8, 8, 4)
    """

    labels: np.ndarray | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.labels is None:
            raise ValueError(f"case {self.case_id!r}: a LabeledCase needs labels; use Case for a case without them")
        self.labels = np.asarray(self.labels)
        if self.labels.shape != self.volume.shape:
            raise ValueError(
                f"case {self.case_id!r}: labels must have the volume's shape {self.volume.shape}, "
                f"got {self.labels.shape}"
            )
        if not np.issubdtype(self.labels.dtype, np.integer):
            raise ValueError(f"case {self.case_id!r}: labels must be integers, got dtype {self.labels.dtype}")

    @classmethod
    def from_case(cls, case: Case, labels: np.ndarray) -> LabeledCase:
        """Attach ``labels`` to a case (arrays are shared, not copied)."""
        return cls(volume=case.volume, landmarks=case.landmarks, spacing=case.spacing, case_id=case.case_id,
                   affine=case.affine, names=case.names, labels=labels)  # fmt: skip


def _rebuild(case: Case, *, volume: np.ndarray, landmarks: np.ndarray, labels: np.ndarray | None = None,
             affine: np.ndarray | None = None) -> Case:  # fmt: skip
    """A new case like ``case`` with new voxels and landmarks (and ``affine``, default the same grid's); a
    :class:`LabeledCase` stays one."""
    common = dict(volume=volume, landmarks=landmarks, spacing=case.spacing.copy(), case_id=case.case_id,
                  affine=case.affine.copy() if affine is None else affine, names=case.names)  # fmt: skip
    if isinstance(case, LabeledCase):
        assert labels is not None and labels.shape == volume.shape  # internal: every transform passes labels on
        return LabeledCase(**common, labels=labels)
    return Case(**common)


def _copy(case: Case) -> Case:
    """An unchanged copy (what a transform returns when it draws "not applied")."""
    labels = case.labels.copy() if isinstance(case, LabeledCase) else None
    return _rebuild(case, volume=case.volume.copy(), landmarks=case.landmarks.copy(), labels=labels)


def _outside_to_nan(landmarks: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Rows outside ``[-0.5, n - 0.5]`` on any axis become ``NaN`` (the test :class:`Case` applies)."""
    landmarks = landmarks.copy()
    size = np.asarray(shape, dtype=np.float64)
    with np.errstate(invalid="ignore"):  # NaN rows compare False and stay NaN
        inside = np.all((landmarks >= -0.5) & (landmarks <= size - 0.5), axis=1)
    landmarks[~inside] = np.nan
    return landmarks


# --------------------------------------------------------------------------------------------------------------------
# Validation helpers
# --------------------------------------------------------------------------------------------------------------------


def _probability(value: float, *, what: str) -> float:
    try:
        p = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a probability in [0, 1], got {value!r}") from None
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"{what} must be a probability in [0, 1], got {value!r}")
    return p


def _range(values: Sequence[float], *, what: str, low: float = -math.inf, low_inclusive: bool = True,
           unit: str = "") -> tuple[float, float]:  # fmt: skip
    """``(lo, hi)`` with ``lo <= hi`` (equal values fix the parameter), both finite and above ``low``."""
    try:
        lo, hi = (float(v) for v in values)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be two numbers (low, high){unit}, got {values!r}") from None
    above = (lo >= low) if low_inclusive else (lo > low)
    if not (math.isfinite(lo) and math.isfinite(hi) and lo <= hi and above):
        bound = f" with low {'>=' if low_inclusive else '>'} {low:g}" if math.isfinite(low) else ""
        raise ValueError(f"{what} must be finite (low, high){unit} with low <= high{bound}, got ({lo:g}, {hi:g})")
    return lo, hi


def _check_rng(rng: np.random.Generator) -> np.random.Generator:
    if not isinstance(rng, np.random.Generator):
        raise ValueError(
            f"rng must be a numpy.random.Generator (np.random.default_rng(seed)), got {type(rng).__name__}"
        )
    return rng


# --------------------------------------------------------------------------------------------------------------------
# Pipeline
# --------------------------------------------------------------------------------------------------------------------


@runtime_checkable
class Transform(Protocol):
    """Anything callable as ``transform(case, rng) -> Case`` that returns a new case and leaves ``case`` unchanged."""

    def __call__(self, case: Case, rng: np.random.Generator) -> Case: ...


class Compose:
    """Apply transforms in order, all drawing from the same generator.

    Args:
        transforms: the transforms, each ``transform(case, rng) -> Case``.

    Shape:
        - case.volume: ``(D, H, W)``
        - output: ``Case`` (a :class:`LabeledCase` stays one); shape ``(D, H, W)`` unless a crop changes it

    Example:
        >>> aug = Compose([RandomFlipLR(p=1.0), IntensityJitter(noise_std=(0, 0))])
        >>> c = Case(volume=np.zeros((8, 8, 4)), landmarks=np.full((14, 3), 2.0), spacing=[1, 1, 1])
        >>> aug(c, np.random.default_rng(0)).volume.shape
        (8, 8, 4)

    Explained in notebooks/02_data.ipynb.
    """

    def __init__(self, transforms: Sequence[Transform]) -> None:
        transforms = list(transforms)
        for i, t in enumerate(transforms):
            if not callable(t):
                raise ValueError(f"transforms[{i}] must be callable as transform(case, rng), got {type(t).__name__}")
        self.transforms = transforms

    def __call__(self, case: Case, rng: np.random.Generator) -> Case:
        _check_rng(rng)
        out = _copy(case) if not self.transforms else case
        for t in self.transforms:
            out = t(out, rng)
        return out

    def __repr__(self) -> str:
        inner = ",\n    ".join(repr(t) for t in self.transforms)
        return f"Compose([\n    {inner},\n])" if self.transforms else "Compose([])"


# --------------------------------------------------------------------------------------------------------------------
# 1. Random crops with, partly with and without landmarks
# --------------------------------------------------------------------------------------------------------------------


def _crop_labels(labels: np.ndarray, start: np.ndarray, size: np.ndarray) -> np.ndarray:
    """``labels[start : start + size]``, padded with 0 where the box leaves the volume (like :func:`crop`)."""
    shape = np.asarray(labels.shape)
    out = np.zeros(tuple(size), dtype=labels.dtype)
    src_lo, src_hi = np.maximum(start, 0), np.minimum(start + size, shape)
    if np.all(src_hi > src_lo):
        dst = tuple(slice(lo - s, hi - s) for lo, hi, s in zip(src_lo, src_hi, start))
        out[dst] = labels[tuple(slice(lo, hi) for lo, hi in zip(src_lo, src_hi))]
    return out


def _landmark_counts(points: np.ndarray, size: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """How many of ``points`` each crop start in ``[lo, hi]`` (per axis) keeps in view.

    The starts whose box holds a point form a box of starts, ``ceil(x + 0.5 - size) … floor(x + 0.5)`` per axis, so the
    count over all starts is a sum of boxes: +1 at their corners in a difference array, then a cumulative sum per axis.

    Shape:
        - points: ``(P, 3)``; size, lo, hi: ``(3,)``
        - output: ``(hi - lo + 1)`` per axis, int32; ``out[i, j, k]`` belongs to start ``lo + (i, j, k)``
    """
    extent = hi - lo + 1
    diff = np.zeros(tuple(extent + 1), dtype=np.int32)
    first = np.clip(np.ceil(points + 0.5 - size), lo, hi + 1).astype(np.int64) - lo  # (P, 3)
    last = np.clip(np.floor(points + 0.5), lo - 1, hi).astype(np.int64) - lo + 1  # exclusive end, (P, 3)
    for a, b in zip(first, last):
        if np.any(b <= a):  # no start in range keeps this point
            continue
        for corner in np.ndindex(2, 2, 2):
            index = tuple(b[i] if c else a[i] for i, c in enumerate(corner))
            diff[index] += (-1) ** sum(corner)
    counts = diff.cumsum(0).cumsum(1).cumsum(2)
    return counts[: extent[0], : extent[1], : extent[2]]


class RandomCrop:
    """Training crops: most keep every landmark in view, some hold only part of them, some hold none.

    Each call draws a mode. With probability ``p_background`` the window is drawn uniformly among the windows that hold
    no present landmark, so that sliding-window inference, which visits every part of the volume, has seen windows
    without a tooth and learnt that their target heatmap is zero. With probability ``p_partial`` it is drawn uniformly
    among the windows that hold some but not all present landmarks (a molar cut by the window edge). Otherwise the
    window keeps every present landmark (:func:`~h3de_lite.data.transforms.choose_crop_start`, the paper's §III-A
    crop). Windows stay inside the volume where the volume is large enough (padding only when it is smaller than the
    crop). Landmarks outside the window become ``NaN`` (:func:`~h3de_lite.data.transforms.crop`): absent for this
    sample, so the heatmap loss sees background there and the existence branch learns "not in view".

    Fallbacks: if no window in the volume is free of landmarks, the background mode takes a window with the fewest;
    if no window holds part of them (fewer than two present landmarks, or a crop too large to separate them), the
    partial mode keeps all of them, as the ordinary crop does.

    Args:
        size: crop size ``(D, H, W)`` in voxels.
        p_partial: probability of a window with some but not all landmarks.
        p_background: probability of a window without landmarks; ``p_partial + p_background <= 1``. Both default to
            0, the paper's crop; 0.1–0.2 each is a reasonable start for sliding-window inference.

    Shape:
        - case.volume: ``(D0, H0, W0)``
        - output: ``Case`` with volume ``(D, H, W) = size``, landmarks ``(L, 3)``

    Example:
        >>> c = Case(volume=np.zeros((40, 40, 20)), landmarks=np.full((14, 3), 10.0), spacing=[1, 1, 1])
        >>> RandomCrop(size=(16, 16, 8), p_background=1.0)(c, np.random.default_rng(0)).volume.shape
        (16, 16, 8)

    Explained in notebooks/02_data.ipynb.
    """

    def __init__(self, *, size: Sequence[int], p_partial: float = 0.0, p_background: float = 0.0) -> None:
        self.size = _size3(size, what="size")
        self.p_partial = _probability(p_partial, what="p_partial")
        self.p_background = _probability(p_background, what="p_background")
        if self.p_partial + self.p_background > 1.0 + 1e-12:
            raise ValueError(f"p_partial + p_background must be <= 1, got {self.p_partial} + {self.p_background}")

    def __repr__(self) -> str:
        return (f"RandomCrop(size={tuple(int(s) for s in self.size)}, p_partial={self.p_partial}, "
                f"p_background={self.p_background})")  # fmt: skip

    def choose_start(self, shape: Sequence[int], landmarks: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Draw the mode and the window start for a volume of ``shape`` with ``(L, 3)`` landmarks (``NaN`` rows).

        With ``p_partial = p_background = 0`` this is :func:`~h3de_lite.data.transforms.choose_crop_start` with the
        same generator draws, so a dataset can switch to it without changing its existing crops.

        Shape:
            - output: ``(3,)`` int64 start (as :func:`~h3de_lite.data.transforms.choose_crop_start`)
        """
        _check_rng(rng)
        shape_arr = _size3(shape, what="shape")
        landmarks = np.asarray(landmarks, dtype=np.float64)
        points = landmarks[~np.isnan(landmarks).any(axis=1)]
        u = rng.random() if self.p_background + self.p_partial > 0 else 1.0  # both 0: the same draws as the paper crop
        if len(points) and u < self.p_background + self.p_partial:
            lo, hi = np.minimum(0, shape_arr - self.size), np.maximum(0, shape_arr - self.size)
            counts = _landmark_counts(points, self.size, lo, hi)
            if u < self.p_background:
                allowed = counts == counts.min()  # == 0 whenever a window without landmarks exists
            else:
                allowed = (counts > 0) & (counts < len(points))
            if allowed.any():
                flat = rng.choice(np.flatnonzero(allowed))
                return (np.asarray(np.unravel_index(flat, counts.shape)) + lo).astype(np.int64)
        return choose_crop_start(shape_arr, landmarks, self.size, rng=rng, keep_landmarks=True)

    def __call__(self, case: Case, rng: np.random.Generator) -> Case:
        return self._crop(case, self.choose_start(case.volume.shape, case.landmarks, rng), self.size)

    @staticmethod
    def _crop(case: Case, start: np.ndarray, size: np.ndarray) -> Case:
        """:func:`~h3de_lite.data.transforms.crop`, labels included for a :class:`LabeledCase`."""
        out = crop(case, start, size)
        if isinstance(case, LabeledCase):
            return LabeledCase.from_case(out, _crop_labels(case.labels, start, size))
        return out


# --------------------------------------------------------------------------------------------------------------------
# 2. Left–right flips that swap the L/R landmark names
# --------------------------------------------------------------------------------------------------------------------


def mirror_rows(names: Sequence[str]) -> np.ndarray:
    """Row permutation that swaps each left landmark with its right partner (``"La"`` ↔ ``"Ra"``, ...).

    A name is left or right by its first letter (``L``/``R``, :mod:`h3de_lite.data.landmarks`); a name without a
    partner in ``names`` keeps its row.

    Shape:
        - output: ``(L,)`` int64; row ``i`` of a flipped case is row ``out[i]`` of the original

    Example:
        >>> mirror_rows(("La", "Lb", "Ra", "Rb", "X")).tolist()
        [2, 3, 0, 1, 4]
    """
    index = {name: i for i, name in enumerate(names)}
    partner = {"L": "R", "R": "L"}
    out = []
    for i, name in enumerate(names):
        other = partner[name[0]] + name[1:] if name[:1] in partner else None
        out.append(index.get(other, i) if other is not None else i)
    return np.asarray(out, dtype=np.int64)


def flip_lr(case: Case, *, axis: int = 0) -> Case:
    """Mirror a case along the patient's left–right axis and swap the names of the L/R landmark pairs.

    The mirrored voxel ``x`` goes to ``n - 1 - x`` along ``axis`` (``n`` its size; exact, no interpolation). A mirror
    image turns the patient's left molars into right ones, so each L/R pair swaps rows (and presence flags): the row
    named ``La`` of the output is the mirrored ``Ra`` of the input. In h3de-lite axis 0 runs from the patient's left to
    right (:mod:`h3de_lite.data.phantom`); the result is right whenever ``axis`` is the left–right axis, whichever way
    it runs. Shape, spacing and affine are unchanged (a mirrored patient on the same grid). Flipping twice gives back
    the input: voxels, labels and presence exactly, coordinates up to float rounding (``n - 1 - (n - 1 - x)``).

    Args:
        case: the case (a :class:`LabeledCase`'s labels flip too).
        axis: the array axis along the patient's left–right direction.

    Shape:
        - case.volume: ``(D, H, W)``
        - output: ``Case`` with volume ``(D, H, W)``, landmarks ``(L, 3)``

    Example:
        >>> c = Case(volume=np.zeros((8, 8, 4)), landmarks=np.full((14, 3), 2.0), spacing=[1, 1, 1])
        >>> flip_lr(c).landmarks[0].tolist()
        [5.0, 2.0, 2.0]

    Explained in notebooks/02_data.ipynb.
    """
    if axis not in (0, 1, 2):
        raise ValueError(f"axis must be 0, 1 or 2 (the left–right array axis), got {axis!r}")
    rows = mirror_rows(case.names)
    landmarks = case.landmarks[rows].copy()  # fancy indexing copies; keep the copy explicit
    landmarks[:, axis] = case.volume.shape[axis] - 1 - landmarks[:, axis]
    volume = np.flip(case.volume, axis=axis).copy()
    labels = np.flip(case.labels, axis=axis).copy() if isinstance(case, LabeledCase) else None
    return _rebuild(case, volume=volume, landmarks=landmarks, labels=labels)


class RandomFlipLR:
    """With probability ``p``, :func:`flip_lr`: a mirrored patient, L/R landmark names swapped.

    Args:
        p: probability of flipping.
        axis: the array axis along the patient's left–right direction (0 in h3de-lite).

    Shape:
        - case.volume: ``(D, H, W)``
        - output: ``Case`` with volume ``(D, H, W)``

    Example:
        >>> c = Case(volume=np.zeros((8, 8, 4)), landmarks=np.full((14, 3), 2.0), spacing=[1, 1, 1])
        >>> RandomFlipLR(p=0.5)(c, np.random.default_rng(0)).volume.shape
        (8, 8, 4)

    Explained in notebooks/02_data.ipynb.
    """

    def __init__(self, *, p: float = 0.5, axis: int = 0) -> None:
        self.p = _probability(p, what="p")
        if axis not in (0, 1, 2):
            raise ValueError(f"axis must be 0, 1 or 2 (the left–right array axis), got {axis!r}")
        self.axis = axis

    def __repr__(self) -> str:
        return f"RandomFlipLR(p={self.p}, axis={self.axis})"

    def __call__(self, case: Case, rng: np.random.Generator) -> Case:
        if _check_rng(rng).random() < self.p:
            return flip_lr(case, axis=self.axis)
        return _copy(case)


# --------------------------------------------------------------------------------------------------------------------
# 3. Small rotations and scalings about the volume centre, in mm
# --------------------------------------------------------------------------------------------------------------------


def rotation_matrix(angles_deg: Sequence[float]) -> np.ndarray:
    """Rotation by ``angles_deg`` about array axes 0, 1 and 2, in that order: ``R = R2 @ R1 @ R0``.

    Each is right-handed in array-axis coordinates: rotating by +90° about axis 2 takes the axis-0 direction to the
    axis-1 direction (about axis 0: axis 1 → axis 2; about axis 1: axis 2 → axis 0). With h3de-lite's RAS axes these are
    rotations about x (left → right), y (posterior → anterior) and z (inferior → superior).

    Shape:
        - angles_deg: ``(3,)``
        - output: ``(3, 3)``

    Example:
        >>> np.round(rotation_matrix([0, 0, 90]) @ [1.0, 0.0, 0.0], 6).tolist()
        [0.0, 1.0, 0.0]
    """
    angles = np.asarray(angles_deg, dtype=np.float64)
    if angles.shape != (3,) or not np.all(np.isfinite(angles)):
        raise ValueError(f"angles_deg must be three finite angles in degrees (about axes 0, 1, 2), got {angles_deg!r}")
    out = np.eye(3)
    for axis, angle in enumerate(np.deg2rad(angles)):
        i, j = [(1, 2), (2, 0), (0, 1)][axis]  # the plane it turns: axis i → axis j
        r = np.eye(3)
        r[i, i] = r[j, j] = math.cos(angle)
        r[j, i], r[i, j] = math.sin(angle), -math.sin(angle)
        out = r @ out
    return out


def warp(case: Case, matrix: np.ndarray, *, order: int = 1) -> Case:
    """Move the anatomy by ``y = c + matrix @ (x - c)`` about the volume centre ``c = (shape - 1) / 2`` (voxel units).

    ``scipy.ndimage.affine_transform`` pulls each output voxel from the input, so the image is resampled with the
    inverse map ``x = c + matrix⁻¹ @ (y - c)`` (linear by default; labels of a :class:`LabeledCase` by nearest
    neighbour, order 0), while landmarks are pushed through the forward map exactly. Outside the input the image is
    padded with its minimum (air) and the labels with 0. Landmarks that leave the volume become ``NaN``. Shape,
    spacing and affine are unchanged.

    Args:
        case: the case.
        matrix: ``(3, 3)`` forward map in voxel index space (invertible).
        order: spline order for the image (0 nearest, 1 linear, 3 cubic); with ``order > 0`` the volume is float32.

    Shape:
        - case.volume: ``(D, H, W)``; matrix ``(3, 3)``
        - output: ``Case`` with volume ``(D, H, W)``, landmarks ``(L, 3)``

    Example:
        >>> c = Case(volume=np.zeros((8, 8, 4)), landmarks=np.full((14, 3), 2.0), spacing=[1, 1, 1])
        >>> warp(c, np.eye(3)).volume.shape
        (8, 8, 4)

    Explained in notebooks/02_data.ipynb.
    """
    matrix = _check_warp(matrix, order)
    volume, labels = _resample_warped(case, matrix, np.zeros(3, dtype=np.int64), case.volume.shape, order=order)
    return _rebuild(case, volume=volume, landmarks=warp_landmarks(case, matrix), labels=labels)


def _check_warp(matrix: np.ndarray, order: int) -> np.ndarray:
    """``matrix`` as a float64 ``(3, 3)`` array, or ``ValueError`` naming what is wrong with it or with ``order``."""
    matrix = np.asarray(matrix, dtype=np.float64)
    if matrix.shape != (3, 3) or not np.all(np.isfinite(matrix)) or abs(np.linalg.det(matrix)) < 1e-12:
        raise ValueError(f"matrix must be an invertible finite (3, 3) array, got shape {matrix.shape}")
    if order not in (0, 1, 2, 3, 4, 5):
        raise ValueError(f"order must be a spline order 0..5, got {order!r}")
    return matrix


def _resample_warped(case: Case, matrix: np.ndarray, start: np.ndarray, size, *, order: int):  # noqa: ANN001, ANN202
    """The voxels ``[start, start + size)`` of the warped volume (and labels), pulled through the inverse map.

    Output voxel ``j`` of the box is voxel ``y = start + j`` of the warped volume, read at ``x = A⁻¹ (y - c) + c`` in
    the input: one ``affine_transform`` with the box's offset, whatever the box's size.

    Shape:
        → volume ``size`` (float32 for ``order > 0``), labels ``size`` or None.
    """
    centre = (np.asarray(case.volume.shape, dtype=np.float64) - 1.0) / 2.0
    inverse = np.linalg.inv(matrix)
    offset = centre - inverse @ centre + inverse @ np.asarray(start, dtype=np.float64)  # x = inverse @ j + offset
    shape = tuple(int(n) for n in size)
    dtype = case.volume.dtype if order == 0 else np.float32
    fill = float(case.volume.min()) if case.volume.size else 0.0
    volume = ndimage.affine_transform(case.volume.astype(dtype, copy=False), inverse, offset=offset, order=order,
                                      output_shape=shape, output=dtype, mode="constant", cval=fill)  # fmt: skip
    labels = None
    if isinstance(case, LabeledCase):
        labels = ndimage.affine_transform(case.labels, inverse, offset=offset, order=0, output_shape=shape,
                                          output=case.labels.dtype, mode="constant", cval=0)  # fmt: skip
    return volume, labels


def warp_landmarks(case: Case, matrix: np.ndarray) -> np.ndarray:
    """The landmarks of :func:`warp`: pushed through ``y = c + matrix @ (x - c)``, ``NaN`` where they leave the volume.

    Cheap (no voxel is touched): what a crop placed by the warped landmarks needs before any voxel is resampled.

    Shape:
        case.landmarks ``(L, 3)``, matrix ``(3, 3)`` → ``(L, 3)``.

    Example:
        >>> c = Case(volume=np.zeros((9, 9, 9)), landmarks=[[4.0, 6.0, 4.0]], spacing=[1, 1, 1], names=("La",))
        >>> warp_landmarks(c, np.diag([1.0, 0.5, 1.0])).tolist()
        [[4.0, 5.0, 4.0]]
    """
    matrix = _check_warp(matrix, 1)
    centre = (np.asarray(case.volume.shape, dtype=np.float64) - 1.0) / 2.0
    landmarks = (case.landmarks - centre) @ matrix.T + centre  # NaN rows stay NaN
    return _outside_to_nan(landmarks, case.volume.shape)


def warp_crop(case: Case, matrix: np.ndarray, start: Sequence[int], size: Sequence[int], *, order: int = 1) -> Case:
    """``crop(warp(case, matrix, order=order), start, size)``, resampling only the voxels of the box.

    A training crop of 64 × 64 × 32 voxels out of a whole head at 1.5 mm is about 1/20 of the volume: warping the
    whole volume first and throwing the rest away is what made training augmentation cost as much as the training
    step on a CPU. The voxels are those of the warped volume at the same sample points (equal up to float32 rounding
    of the map's offset); landmarks, affine, labels and names are :func:`~h3de_lite.data.transforms.crop`'s of
    :func:`warp`'s. A box that leaves the volume (a volume smaller than the crop) takes the plain two steps, so that
    its padding is :func:`~h3de_lite.data.transforms.crop`'s.

    Args:
        case: the case before the warp.
        matrix: ``(3, 3)`` forward map in voxel index space (as :func:`warp`).
        start: first voxel of the box in the warped volume (three integers).
        size: box size ``(D, H, W)``.
        order: spline order for the image.

    Shape:
        - case.volume: ``(D0, H0, W0)``
        - output: ``Case`` with volume ``size``, landmarks ``(L, 3)`` in box coordinates

    Example:
        >>> c = Case(volume=np.zeros((20, 20, 10)), landmarks=np.full((14, 3), 5.0), spacing=[1, 1, 1])
        >>> warp_crop(c, np.eye(3), (2, 2, 2), (8, 8, 4)).volume.shape
        (8, 8, 4)
    """
    matrix = _check_warp(matrix, order)
    size = _size3(size, what="size")
    start = np.asarray(start)
    if start.shape != (3,) or not np.all(np.mod(start, 1) == 0):
        raise ValueError(f"start must be three integers, got {start!r}")
    start = start.astype(np.int64)
    if np.any(start < 0) or np.any(start + size > np.asarray(case.volume.shape)):
        return RandomCrop._crop(warp(case, matrix, order=order), start, size)
    volume, labels = _resample_warped(case, matrix, start, size, order=order)
    landmarks, affine = _crop_frame(warp_landmarks(case, matrix), case.affine, start, size)
    return _rebuild(case, volume=volume, landmarks=landmarks, labels=labels, affine=affine)


def rotate_scale(case: Case, *, angles_deg: Sequence[float] = (0.0, 0.0, 0.0), scale: float = 1.0,
                 order: int = 1) -> Case:  # fmt: skip
    """Rotate (:func:`rotation_matrix`) and scale the anatomy about the volume centre, in physical space (mm).

    With anisotropic voxels a rotation in index space would shear the anatomy, so the map is built in mm and brought
    back to voxels: ``A = S⁻¹ (scale · R) S`` with ``S = diag(spacing)``, applied by :func:`warp`. Distances in mm
    between landmarks are multiplied by ``scale`` (kept for a pure rotation). ``scale > 1`` enlarges the anatomy.

    Args:
        case: the case.
        angles_deg: rotation angles about array axes 0, 1, 2 in degrees.
        scale: isotropic scale factor (> 0).
        order: spline order for the image.

    Shape:
        - case.volume: ``(D, H, W)``
        - output: ``Case`` with volume ``(D, H, W)``, landmarks ``(L, 3)``

    Example:
        >>> c = Case(volume=np.zeros((8, 8, 4)), landmarks=np.full((14, 3), 2.0), spacing=[0.5, 0.5, 1.0])
        >>> rotate_scale(c, angles_deg=(0, 0, 10), scale=1.1).volume.shape
        (8, 8, 4)

    Explained in notebooks/02_data.ipynb.
    """
    return warp(case, rotate_scale_matrix(case.spacing, angles_deg=angles_deg, scale=scale), order=order)


def rotate_scale_matrix(spacing: Sequence[float], *, angles_deg: Sequence[float], scale: float) -> np.ndarray:
    """The voxel-index map of :func:`rotate_scale`: ``A = S⁻¹ (scale · R) S`` with ``S = diag(spacing)``.

    Shape:
        spacing ``(3,)`` → ``(3, 3)``.

    Example:
        >>> rotate_scale_matrix([1.0, 1.0, 2.0], angles_deg=(0, 0, 0), scale=2.0).diagonal().tolist()
        [2.0, 2.0, 2.0]
    """
    if not (isinstance(scale, (int, float, np.floating, np.integer)) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a finite number > 0, got {scale!r}")
    s = np.diag(np.asarray(spacing, dtype=np.float64))
    return np.linalg.inv(s) @ (float(scale) * rotation_matrix(angles_deg)) @ s


class RandomRotateScale:
    """With probability ``p``, :func:`rotate_scale` by random small angles and an isotropic scale.

    Each angle is uniform in ``[-degrees[i], degrees[i]]`` about array axis ``i``; the scale is log-uniform in
    ``scale`` (so ``(0.9, 1.1)`` enlarges as often as it shrinks). Landmarks pushed out of the volume become absent.

    Args:
        degrees: largest rotation in degrees, one number for all three axes or one per axis (0 to 180).
        scale: ``(low, high)`` scale range, ``0 < low <= high``; ``(1, 1)`` turns scaling off.
        p: probability of applying the transform.
        order: spline order for the image (labels always use 0).

    Shape:
        - case.volume: ``(D, H, W)``
        - output: ``Case`` with volume ``(D, H, W)``

    Example:
        >>> c = Case(volume=np.zeros((8, 8, 4)), landmarks=np.full((14, 3), 2.0), spacing=[1, 1, 2])
        >>> RandomRotateScale(degrees=10, scale=(0.9, 1.1))(c, np.random.default_rng(0)).volume.shape
        (8, 8, 4)

    Explained in notebooks/02_data.ipynb.
    """

    def __init__(self, *, degrees: float | Sequence[float] = 10.0, scale: Sequence[float] = (0.9, 1.1),
                 p: float = 1.0, order: int = 1) -> None:  # fmt: skip
        deg = np.asarray(degrees, dtype=np.float64) if np.ndim(degrees) else np.full(3, float(degrees))
        if deg.shape != (3,) or not np.all(np.isfinite(deg)) or np.any(deg < 0) or np.any(deg > 180):
            raise ValueError(f"degrees must be one number or three numbers in [0, 180], got {degrees!r}")
        self.degrees = deg
        self.scale = _range(scale, what="scale", low=0.0, low_inclusive=False)
        self.p = _probability(p, what="p")
        if order not in (0, 1, 2, 3, 4, 5):
            raise ValueError(f"order must be a spline order 0..5, got {order!r}")
        self.order = order

    def __repr__(self) -> str:
        return (f"RandomRotateScale(degrees={self.degrees.tolist()}, scale={self.scale}, p={self.p}, "
                f"order={self.order})")  # fmt: skip

    def draw(self, case: Case, rng: np.random.Generator) -> np.ndarray | None:
        """Draw this call's transform without applying it: the :func:`warp` matrix, or None when it does not apply.

        Takes the same draws from ``rng`` as a call, so that ``warp(case, draw(case, rng))`` is ``self(case, rng)``;
        :class:`~h3de_lite.data.LandmarkDataset` uses it to resample only its crop (:func:`warp_crop`).

        Shape:
            → ``(3, 3)`` or None.
        """
        if not _check_rng(rng).random() < self.p:
            return None
        angles = rng.uniform(-self.degrees, self.degrees)
        scale = math.exp(rng.uniform(math.log(self.scale[0]), math.log(self.scale[1])))
        return rotate_scale_matrix(case.spacing, angles_deg=angles, scale=scale)

    def __call__(self, case: Case, rng: np.random.Generator) -> Case:
        matrix = self.draw(case, rng)
        return _copy(case) if matrix is None else warp(case, matrix, order=self.order)


# --------------------------------------------------------------------------------------------------------------------
# 4. Intensity jitter (HU)
# --------------------------------------------------------------------------------------------------------------------


def adjust_intensity(volume: np.ndarray, *, scale: float = 1.0, shift: float = 0.0, gamma: float = 1.0,
                     window: Sequence[float] = DEFAULT_WINDOW) -> np.ndarray:  # fmt: skip
    """Scale and shift intensities in HU, then apply a gamma curve inside the intensity window.

    ``v' = scale · v + shift``; then, for ``w0 <= v' <= w1``, ``v'' = w0 + (w1 - w0) · t^gamma`` with
    ``t = (v' - w0) / (w1 - w0)``. Values outside the window are left as they are: the curve fixes both window ends,
    so the result stays continuous and increasing, and the later window (:func:`normalize_intensity
    <h3de_lite.data.transforms.normalize_intensity>`) clips them anyway. ``gamma < 1`` brightens soft tissue and bone,
    ``gamma > 1`` darkens them.

    Args:
        volume: intensities in HU.
        scale: multiplicative factor (> 0).
        shift: additive offset in HU.
        gamma: exponent on the windowed range (> 0).
        window: ``(w0, w1)`` HU range the gamma curve acts on, the one the dataset windows with.

    Shape:
        - volume: ``(D, H, W)`` (any shape)
        - output: same shape, float32

    Example:
        >>> [round(float(v), 1) for v in adjust_intensity(np.array([-1000.0, 1000.0, 3000.0]), gamma=0.5)]
        [-1000.0, 1828.4, 3000.0]
        >>> adjust_intensity(np.zeros((8, 8, 4)), scale=1.1, shift=20.0, gamma=0.8).shape
        (8, 8, 4)
    """
    w0, w1 = _range(window, what="window", unit=" in HU")
    if not w0 < w1:
        raise ValueError(f"window must have low < high in HU, got ({w0:g}, {w1:g})")
    if not (math.isfinite(scale) and scale > 0 and math.isfinite(gamma) and gamma > 0 and math.isfinite(shift)):
        raise ValueError(f"scale and gamma must be finite and > 0 and shift finite, got {scale}, {gamma}, {shift}")
    out = np.asarray(volume, dtype=np.float32) * np.float32(scale) + np.float32(shift)
    if gamma != 1.0:
        inside = (out >= w0) & (out <= w1)
        t = (out[inside] - np.float32(w0)) / np.float32(w1 - w0)
        out[inside] = np.float32(w0) + np.float32(w1 - w0) * np.power(t, np.float32(gamma))
    return out


class IntensityJitter:
    """With probability ``p``, random :func:`adjust_intensity` (scale, shift, gamma) plus Gaussian noise, all in HU.

    Scale and shift are uniform in their ranges, gamma log-uniform, the noise standard deviation uniform in
    ``noise_std``. Landmarks and labels are untouched. Apply it before the intensity window, on HU.

    Args:
        scale: ``(low, high)`` multiplicative factor, ``0 < low <= high``.
        shift: ``(low, high)`` offset in HU.
        gamma: ``(low, high)`` gamma on the windowed range, ``0 < low <= high``.
        noise_std: ``(low, high)`` standard deviation of added Gaussian noise in HU, ``0 <= low <= high``.
        window: HU window of the gamma curve (the dataset's window, :data:`DEFAULT_WINDOW` by default).
        p: probability of applying the transform.

    Shape:
        - case.volume: ``(D, H, W)``
        - output: ``Case`` with float32 volume ``(D, H, W)``

    Example:
        >>> c = Case(volume=np.zeros((8, 8, 4)), landmarks=np.full((14, 3), 2.0), spacing=[1, 1, 1])
        >>> IntensityJitter()(c, np.random.default_rng(0)).volume.shape
        (8, 8, 4)

    Explained in notebooks/02_data.ipynb.
    """

    def __init__(self, *, scale: Sequence[float] = (0.9, 1.1), shift: Sequence[float] = (-50.0, 50.0),
                 gamma: Sequence[float] = (0.8, 1.25), noise_std: Sequence[float] = (0.0, 30.0),
                 window: Sequence[float] = DEFAULT_WINDOW, p: float = 1.0) -> None:  # fmt: skip
        self.scale = _range(scale, what="scale", low=0.0, low_inclusive=False)
        self.shift = _range(shift, what="shift", unit=" in HU")
        self.gamma = _range(gamma, what="gamma", low=0.0, low_inclusive=False)
        self.noise_std = _range(noise_std, what="noise_std", low=0.0, unit=" in HU")
        w0, w1 = _range(window, what="window", unit=" in HU")
        if not w0 < w1:
            raise ValueError(f"window must have low < high in HU, got ({w0:g}, {w1:g})")
        self.window = (w0, w1)
        self.p = _probability(p, what="p")

    def __repr__(self) -> str:
        return (f"IntensityJitter(scale={self.scale}, shift={self.shift}, gamma={self.gamma}, "
                f"noise_std={self.noise_std}, window={self.window}, p={self.p})")  # fmt: skip

    def __call__(self, case: Case, rng: np.random.Generator) -> Case:
        if not _check_rng(rng).random() < self.p:
            return _copy(case)
        scale = rng.uniform(*self.scale)
        shift = rng.uniform(*self.shift)
        gamma = math.exp(rng.uniform(math.log(self.gamma[0]), math.log(self.gamma[1])))
        sigma = rng.uniform(*self.noise_std)
        volume = adjust_intensity(case.volume, scale=scale, shift=shift, gamma=gamma, window=self.window)
        if sigma > 0:
            volume += np.float32(sigma) * rng.standard_normal(volume.shape, dtype=np.float32)
        labels = case.labels.copy() if isinstance(case, LabeledCase) else None
        return _rebuild(case, volume=volume, landmarks=case.landmarks.copy(), labels=labels)


def training_augmentation() -> tuple[Compose, IntensityJitter]:
    """The training augmentation of ``h3de-lite train --augment`` (on in the ``tiny`` recipe), as the dataset takes it.

    A spatial part, ``Compose([RandomFlipLR(), RandomRotateScale()])`` (left–right flips that swap the L/R names
    half of the time, rotations up to 10° about each axis and scalings of 0.9–1.1), for
    :class:`~h3de_lite.data.LandmarkDataset`'s ``augment``, and :class:`IntensityJitter` with its defaults, for its
    ``intensity_augment``.

    Returns:
        ``(augment, intensity_augment)``.

    Example:
        >>> spatial, intensity = training_augmentation()
        >>> [type(t).__name__ for t in spatial.transforms], type(intensity).__name__
        (['RandomFlipLR', 'RandomRotateScale'], 'IntensityJitter')
    """
    return Compose([RandomFlipLR(), RandomRotateScale()]), IntensityJitter()


# --------------------------------------------------------------------------------------------------------------------
# Anatomy checks on the phantom's tissue map
# --------------------------------------------------------------------------------------------------------------------

_CROWN_TISSUE = frozenset({Tissue.ENAMEL, Tissue.DENTIN, Tissue.METAL})
_APEX_TISSUE = frozenset({Tissue.DENTIN, Tissue.CANCELLOUS, Tissue.CORTICAL})


def landmark_tissue(name: str) -> frozenset[Tissue]:
    """The phantom tissues a landmark may lie on: a cusp tip or crown (``*0``, ``*a``, ``*d``) lies in enamel or
    dentin, or in metal when the crown is restored (phantom v2: a filling in the central fossa or a metal crown: the
    tooth's crown is still there, so its landmark is present and lies on the restoration); a root apex (``*b``,
    ``*c``, ``*e``, ``*f``) in the dentin of the root tip or the bone around it.

    Example:
        >>> sorted(t.name for t in landmark_tissue("La"))
        ['DENTIN', 'ENAMEL', 'METAL']
    """
    if len(name) != 2 or name[0] not in "LR" or name[1] not in "0abcdef":
        raise ValueError(f"unknown landmark {name!r}; expected one of L0, La … Lf, R0, Ra … Rf")
    return _CROWN_TISSUE if name[1] in "0ad" else _APEX_TISSUE


def landmarks_off_tissue(case: LabeledCase, *, radius: float = 1.5) -> tuple[str, ...]:
    """Names of the present landmarks that do not lie on the tissue they name (:func:`landmark_tissue`).

    A landmark counts as on its tissue when a voxel centre within ``radius`` voxels of it carries that tissue. The
    phantom's own landmarks are within 0.75 voxels of their tissue at ~2 mm voxels (a cusp tip can fall between voxel
    centres), and nearest-neighbour resampling of the labels (:func:`warp`) moves a thin structure by up to about one
    more voxel; a landmark carried by a wrong map (e.g. the inverse rotation) is typically 3 or more voxels away.

    Args:
        case: a case whose ``labels`` are phantom :class:`~h3de_lite.data.phantom.Tissue` values.
        radius: tolerance in voxels (index units).

    Shape:
        - case.labels: ``(D, H, W)``
        - output: tuple of names (empty when every present landmark is on its tissue)

    Example:
        >>> c = LabeledCase(volume=np.zeros((4, 4, 4)), landmarks=[[1.5, 1.5, 1.5]], spacing=[1, 1, 1], names=("La",),
        ...                 labels=np.full((4, 4, 4), int(Tissue.AIR), dtype=np.int8))
        >>> landmarks_off_tissue(c)
        ('La',)
    """
    if not isinstance(case, LabeledCase):
        raise ValueError(f"landmarks_off_tissue needs a LabeledCase (a tissue map), got {type(case).__name__}")
    if not (math.isfinite(radius) and radius >= 0):
        raise ValueError(f"radius must be a finite number >= 0 (voxels), got {radius!r}")
    shape = np.asarray(case.labels.shape)
    off = []
    for name, point, present in zip(case.names, case.landmarks, case.present):
        if not present:
            continue
        lo = np.clip(np.ceil(point - radius), 0, shape).astype(np.int64)
        hi = np.clip(np.floor(point + radius) + 1, 0, shape).astype(np.int64)
        box = tuple(slice(a, b) for a, b in zip(lo, hi))
        grid = np.stack(np.meshgrid(*(np.arange(a, b) for a, b in zip(lo, hi)), indexing="ij"), axis=-1)
        near = np.linalg.norm(grid - point, axis=-1) <= radius  # voxel centres within the radius
        wanted = np.isin(case.labels[box], [int(t) for t in landmark_tissue(name)])
        if not (near & wanted).any():
            off.append(name)
    return tuple(off)
