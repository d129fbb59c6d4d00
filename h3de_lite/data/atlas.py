"""Single-atlas training: one annotated scan, re-posed and re-imaged for every sample, and rigid test copies of it.

With only one annotated scan (e.g. the AFIDs template, :mod:`h3de_lite.data.afids`) a detector would learn where the
landmarks sit in that scan's voxel grid and nothing else. Here every training sample is a new synthetic acquisition:

1. **Pose** (:class:`RandomPose`): a random rotation (axis uniform on the sphere, angle up to ``max_rotation_deg``)
   and shift (direction uniform, length up to ``max_shift_mm``) about the template's centre, a mild affine part
   (isotropic scale, ±a few % per axis, small shears) and a smooth elastic displacement (cubic B-spline on a coarse
   control grid). The result is a :class:`SpatialTransform`, a map of world (RAS mm) points.
2. **Resampling** (:func:`warp_to_grid`): the image is *pulled* through the inverse map onto the working grid (one
   interpolation from the stored template), the landmarks are *pushed* through the forward map, the same function,
   so they stay on the anatomy (checked to a fraction of a voxel in ``tests/test_atlas.py``).
3. **Skull** (:func:`brain_mask`): with probability ``p_stripped`` the head is replaced by a rough brain mask times
   the image, because T1 scans arrive both with and without skull stripping.
4. **Intensity** (:class:`MRIntensityAugment`): a smooth multiplicative bias field, blur or thick slices (a lower
   resolution along one axis), contrast, gamma and noise.
5. **Normalisation** (:func:`~h3de_lite.data.transforms.percentile_normalize`): the 0.5 and 99.5 percentiles of the
   volume map to 0 and 255, exactly as at inference, then a crop.

No sample shows the template in its stored pose: every draw rotates it (the angle is continuous, so the identity has
probability zero). Validation items (:class:`AtlasDataset` with ``split="val"``) and the test copies of
:func:`write_rigid_copies` are rigid copies drawn from random streams of their own (:data:`STREAMS`), so no test pose
is ever a training pose.

Explained in notebooks/09_real_anatomy.ipynb.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import torch
from einops import rearrange
from scipy import ndimage
from torch.utils.data import Dataset

from h3de_lite.data.augment import RandomCrop
from h3de_lite.data.case import Case
from h3de_lite.data.markups import write_markups
from h3de_lite.data.nifti import spacing_from_affine, voxel_to_world, world_to_voxel, write_nifti
from h3de_lite.data.transforms import crop, percentile_normalize, resample, spacing3
from h3de_lite.files import atomic_output

__all__ = [
    "STREAMS",
    "SpatialTransform",
    "RandomPose",
    "MRIntensityAugment",
    "AtlasDataset",
    "atlas_data_config",
    "axis_angle_matrix",
    "brain_mask",
    "elastic_field",
    "warp_volume",
    "warp_to_grid",
    "working_grid",
    "write_rigid_copies",
    "read_rigid_transforms",
    "rigid_copy",
    "sampling_coordinates",
]

STREAMS: dict[str, int] = {"train": 1, "val": 2, "test": 3}
"""First entropy word of every random generator here: ``default_rng([STREAMS[split], seed, ...])``. Generators with
different first words are independent, so a training draw never repeats a validation or test pose, whatever the
seeds."""

DEFAULT_PERCENTILES: tuple[float, float] = (0.5, 99.5)
"""Intensity percentiles mapped to [0, 255] (:func:`~h3de_lite.data.transforms.percentile_normalize`)."""


def _rng(split: str, *words: int) -> np.random.Generator:
    return np.random.default_rng([STREAMS[split], *(int(w) for w in words)])


# ---------------------------------------------------------------------------------------------------- geometry
def axis_angle_matrix(axis: Sequence[float], angle_deg: float) -> np.ndarray:
    """Rotation by ``angle_deg`` about the unit vector ``axis`` (Rodrigues' formula), right-handed.

    Shape:
        - axis: ``(3,)``
        - output: ``(3, 3)``

    Example:
        >>> np.round(axis_angle_matrix([0, 0, 1], 90) @ [1.0, 0.0, 0.0], 6).tolist()
        [0.0, 1.0, 0.0]
    """
    axis = np.asarray(axis, dtype=np.float64)
    norm = np.linalg.norm(axis)
    if axis.shape != (3,) or not np.isfinite(norm) or norm == 0 or not math.isfinite(angle_deg):
        raise ValueError(f"axis must be a non-zero (3,) vector and angle_deg finite, got {axis!r}, {angle_deg!r}")
    x, y, z = axis / norm
    k = np.array([[0.0, -z, y], [z, 0.0, -x], [-y, x, 0.0]])
    angle = math.radians(angle_deg)
    return np.eye(3) + math.sin(angle) * k + (1.0 - math.cos(angle)) * (k @ k)


def _unit_vector(rng: np.random.Generator) -> np.ndarray:
    v = rng.standard_normal(3)
    return v / np.linalg.norm(v)


def working_grid(case: Case, spacing: Sequence[float] | float) -> tuple[tuple[int, int, int], np.ndarray]:
    """Shape and voxel → world affine of the grid :func:`~h3de_lite.data.transforms.resample` gives at ``spacing``.

    Same physical extent as ``case``, ``round(shape * old_spacing / spacing)`` voxels, voxel-centre convention.

    Shape:
        - output: ``((D, H, W), (4, 4))``

    Example:
        >>> c = Case(volume=np.zeros((20, 20, 10)), landmarks=np.zeros((0, 3)), spacing=[1, 1, 2], names=())
        >>> working_grid(c, 2.0)[0]
        (10, 10, 10)
    """
    target = spacing3(spacing, what="working spacing")
    old = np.asarray(case.volume.shape, dtype=np.float64)
    shape = np.maximum(1, np.round(old * case.spacing / target)).astype(np.int64)
    factor = shape / old
    to_old = np.eye(4)
    to_old[:3, :3] = np.diag(1.0 / factor)
    to_old[:3, 3] = 0.5 / factor - 0.5
    return tuple(int(s) for s in shape), case.affine @ to_old  # type: ignore[return-value]


@dataclass(frozen=True, kw_only=True)
class SpatialTransform:
    """A map of world points (RAS mm): an affine part, then an optional smooth elastic displacement.

    The forward map ``y = F(x)`` (template → new pose) is defined through its inverse, which is what resampling an
    image needs: ``F⁻¹(y) = M⁻¹ (y + u(y))`` with ``M`` the ``(4, 4)`` affine and ``u`` a displacement in mm,
    interpolated (cubic B-spline) from ``field`` on a world-aligned control grid. Points are pushed forward by solving
    ``y + u(y) = M x`` with the fixed-point iteration ``y ← M x - u(y)``, which converges because the field is smooth
    (its largest slope is far below 1 for the amplitudes of :class:`RandomPose`).

    Args:
        matrix: ``(4, 4)`` affine part, world → world.
        field: ``(3, n0, n1, n2)`` control-point displacements in mm, or ``None`` (affine only).
        field_origin: ``(3,)`` world position of control point ``(0, 0, 0)``.
        field_spacing: control-point spacing in mm.

    Shape:
        points ``(..., 3)`` → ``(..., 3)``.

    Example:
        >>> t = SpatialTransform(matrix=np.diag([1.0, 1.0, 1.0, 1.0]))
        >>> t(np.zeros((5, 3))).shape
        (5, 3)
    """

    matrix: np.ndarray
    field: np.ndarray | None = None
    field_origin: np.ndarray | None = None
    field_spacing: float = 40.0

    def __post_init__(self) -> None:
        matrix = np.asarray(self.matrix, dtype=np.float64)
        if matrix.shape != (4, 4) or not np.all(np.isfinite(matrix)) or not np.allclose(matrix[3], [0, 0, 0, 1]):
            raise ValueError(f"matrix must be a finite (4, 4) affine with last row [0, 0, 0, 1], got {matrix!r}")
        if abs(np.linalg.det(matrix[:3, :3])) < 1e-9:
            raise ValueError("matrix is singular; a spatial transform must be invertible")
        object.__setattr__(self, "matrix", matrix)
        if self.field is not None:
            field = np.asarray(self.field, dtype=np.float64)
            if field.ndim != 4 or field.shape[0] != 3 or self.field_origin is None:
                raise ValueError(f"field must be (3, n0, n1, n2) with a field_origin, got shape {field.shape}")
            if not (math.isfinite(self.field_spacing) and self.field_spacing > 0):
                raise ValueError(f"field_spacing must be a positive number of mm, got {self.field_spacing!r}")
            # cubic B-spline coefficients, computed once (map_coordinates then skips its own prefilter)
            coefficients = np.stack([ndimage.spline_filter(f, order=3, mode="nearest") for f in field])
            object.__setattr__(self, "field", field)
            object.__setattr__(self, "field_origin", np.asarray(self.field_origin, dtype=np.float64).reshape(3))
            object.__setattr__(self, "_coefficients", coefficients)

    def displacement(self, points: np.ndarray) -> np.ndarray:
        """``u(points)`` in mm (zero without a field).

        Shape:
            ``(..., 3)`` → ``(..., 3)``.
        """
        points = np.asarray(points, dtype=np.float64)
        if self.field is None:
            return np.zeros_like(points)
        flat = rearrange(points, "... c -> c (...)")  # (3, N)
        grid = (flat - self.field_origin[:, None]) / self.field_spacing  # control-grid index coordinates
        coefficients = self._coefficients  # type: ignore[attr-defined]
        u = np.stack([ndimage.map_coordinates(c, grid, order=3, mode="nearest", prefilter=False) for c in coefficients])
        return rearrange(u, "c n -> n c").reshape(points.shape)

    def inverse(self, points: np.ndarray) -> np.ndarray:
        """``F⁻¹(y) = M⁻¹ (y + u(y))``: where a point of the new pose came from in the template (closed form).

        Shape:
            ``(..., 3)`` → ``(..., 3)``.
        """
        points = np.asarray(points, dtype=np.float64)
        moved = points + self.displacement(points)
        inv = np.linalg.inv(self.matrix)
        return moved @ inv[:3, :3].T + inv[:3, 3]

    def __call__(self, points: np.ndarray, *, tol: float = 1e-6, max_iter: int = 100) -> np.ndarray:
        """``F(x)``: where template points go in the new pose (``NaN`` rows stay ``NaN``).

        Shape:
            ``(..., 3)`` → ``(..., 3)``.
        """
        points = np.asarray(points, dtype=np.float64)
        target = points @ self.matrix[:3, :3].T + self.matrix[:3, 3]  # M x
        if self.field is None:
            return target
        y = target.copy()
        for _ in range(max_iter):
            new = target - self.displacement(y)
            change = np.nanmax(np.abs(new - y)) if np.isfinite(new).any() else 0.0
            y = new
            if change < tol:
                return y
        raise ValueError(f"the elastic displacement is too strong to invert (no convergence in {max_iter} steps); "
                         "use a smaller elastic amplitude or a larger control spacing")  # fmt: skip


def elastic_field(
    rng: np.random.Generator, *, centre: Sequence[float], extent_mm: float, amplitude_mm: float, spacing_mm: float
) -> tuple[np.ndarray, np.ndarray]:
    """Random control-point displacements (normal, standard deviation ``amplitude_mm``) on a cube of control points
    ``spacing_mm`` apart that covers ``extent_mm`` around ``centre``, plus one point of margin.

    Shape:
        - output: ``(field (3, n, n, n), origin (3,))``
    """
    n = int(math.ceil(extent_mm / spacing_mm)) + 3
    field = rng.normal(0.0, amplitude_mm, size=(3, n, n, n))
    origin = np.asarray(centre, dtype=np.float64) - (n - 1) / 2 * spacing_mm
    return field, origin


def _log_uniform(rng: np.random.Generator, low: float, high: float) -> float:
    return math.exp(rng.uniform(math.log(low), math.log(high)))


def _interval(value: Sequence[float], *, what: str, low: float = 0.0) -> tuple[float, float]:
    try:
        a, b = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be two numbers (low, high), got {value!r}") from None
    if not (math.isfinite(a) and math.isfinite(b) and low <= a <= b):
        raise ValueError(f"{what} must be finite with {low:g} <= low <= high, got ({a:g}, {b:g})")
    return a, b


@dataclass(frozen=True, kw_only=True)
class RandomPose:
    """Random spatial transforms about a centre: rigid, plus a mild affine and elastic part for training.

    ``F(x) = c + t + R · A · (x - c)`` then the elastic displacement, with ``R`` a rotation about a uniformly random
    axis by an angle uniform in ``[0, max_rotation_deg]``, ``t`` a shift in a uniformly random direction of length
    uniform in ``[0, max_shift_mm]``, and ``A = s · (I + shear) · diag(1 + a)``: ``s`` log-uniform in ``scale``,
    each ``a_i`` uniform in ``±axis_scale``, the six off-diagonal shears uniform in ``±max_shear``.

    Args:
        max_rotation_deg: largest rotation angle (0 to 180).
        max_shift_mm: largest shift length in mm.
        scale: ``(low, high)`` isotropic scale (``(1, 1)``: none).
        axis_scale: largest extra scaling per axis, as a fraction.
        max_shear: largest shear coefficient.
        elastic_mm: standard deviation of the control-point displacements in mm (0: none).
        elastic_spacing_mm: control-point spacing in mm.

    Shape:
        :meth:`draw` gives a :class:`SpatialTransform` (points ``(..., 3)`` → ``(..., 3)``).

    Example:
        >>> pose = RandomPose.rigid(max_rotation_deg=20, max_shift_mm=20)
        >>> pose.draw(np.random.default_rng(0), centre=np.zeros(3)).matrix.shape
        (4, 4)
    """

    max_rotation_deg: float = 30.0
    max_shift_mm: float = 30.0
    scale: tuple[float, float] = (0.9, 1.1)
    axis_scale: float = 0.05
    max_shear: float = 0.05
    elastic_mm: float = 1.5
    elastic_spacing_mm: float = 40.0

    def __post_init__(self) -> None:
        if not (0 <= self.max_rotation_deg <= 180):
            raise ValueError(f"max_rotation_deg must be in [0, 180], got {self.max_rotation_deg!r}")
        for name in ("max_shift_mm", "axis_scale", "max_shear", "elastic_mm"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if self.axis_scale >= 0.5 or self.max_shear >= 0.5:
            raise ValueError("axis_scale and max_shear must stay below 0.5 (mild affine transforms)")
        lo, hi = _interval(self.scale, what="scale")
        if lo <= 0:
            raise ValueError(f"scale must be > 0, got {self.scale!r}")
        object.__setattr__(self, "scale", (lo, hi))
        if not self.elastic_spacing_mm > 0:
            raise ValueError(f"elastic_spacing_mm must be > 0, got {self.elastic_spacing_mm!r}")
        if self.elastic_mm > 0.15 * self.elastic_spacing_mm:
            raise ValueError(f"elastic_mm={self.elastic_mm} is too large for control points {self.elastic_spacing_mm} "
                             "mm apart (folds); keep it below 0.15 × elastic_spacing_mm")  # fmt: skip

    @classmethod
    def rigid(cls, *, max_rotation_deg: float, max_shift_mm: float) -> RandomPose:
        """Rotations and shifts only (the test and validation poses)."""
        return cls(max_rotation_deg=max_rotation_deg, max_shift_mm=max_shift_mm, scale=(1.0, 1.0), axis_scale=0.0,
                   max_shear=0.0, elastic_mm=0.0)  # fmt: skip

    def draw(self, rng: np.random.Generator, *, centre: Sequence[float], extent_mm: float = 256.0) -> SpatialTransform:
        """One random transform about ``centre`` (world mm); the elastic grid covers ``extent_mm`` around it.

        Shape:
            - centre: ``(3,)``
            - output: :class:`SpatialTransform`
        """
        centre = np.asarray(centre, dtype=np.float64).reshape(3)
        rotation = axis_angle_matrix(_unit_vector(rng), rng.uniform(0.0, self.max_rotation_deg))
        shift = _unit_vector(rng) * rng.uniform(0.0, self.max_shift_mm)
        linear = _log_uniform(rng, *self.scale) * np.eye(3) if self.scale[0] < self.scale[1] else np.eye(3)
        if self.max_shear > 0:
            shear = rng.uniform(-self.max_shear, self.max_shear, size=(3, 3))
            np.fill_diagonal(shear, 0.0)
            linear = linear @ (np.eye(3) + shear)
        if self.axis_scale > 0:
            linear = linear @ np.diag(1.0 + rng.uniform(-self.axis_scale, self.axis_scale, size=3))
        forward = rotation @ linear
        matrix = np.eye(4)
        matrix[:3, :3] = forward
        matrix[:3, 3] = centre + shift - forward @ centre
        if self.elastic_mm == 0:
            return SpatialTransform(matrix=matrix)
        field, origin = elastic_field(rng, centre=centre + shift, extent_mm=extent_mm, amplitude_mm=self.elastic_mm,
                                      spacing_mm=self.elastic_spacing_mm)  # fmt: skip
        return SpatialTransform(matrix=matrix, field=field, field_origin=origin, field_spacing=self.elastic_spacing_mm)


def sampling_coordinates(
    transform: SpatialTransform,
    source_affine: np.ndarray,
    *,
    shape: Sequence[int],
    affine: np.ndarray,
    field_step: int = 2,
) -> np.ndarray:
    """Where each voxel of a new grid samples the source: ``A_src⁻¹ F⁻¹(A v)`` in source voxel coordinates.

    With ``F⁻¹(y) = M⁻¹ (y + u(y))`` this is ``L v + b + K u(A v)`` (``L = A_src⁻¹ M⁻¹ A``, ``K`` the linear part of
    ``A_src⁻¹ M⁻¹``): the affine part is built by broadcasting the three grid axes, and the displacement ``u`` is
    evaluated exactly every ``field_step`` voxels and upsampled linearly (the field varies over tens of mm: the
    linear interpolation error is ``h² |u''| / 8``, about 0.03 mm for 6 mm steps and the default amplitudes).

    Shape:
        - output: ``(3, D, H, W)`` float32 for ``shape = (D, H, W)``
    """
    shape = tuple(int(n) for n in shape)
    affine = np.asarray(affine, dtype=np.float64)
    back = np.linalg.inv(np.asarray(source_affine, dtype=np.float64)) @ np.linalg.inv(transform.matrix)
    linear = back @ affine  # output voxel → source voxel, without the displacement
    axes = [np.arange(n, dtype=np.float32) for n in shape]
    coords = np.empty((3, *shape), dtype=np.float32)
    for c in range(3):
        coords[c] = (linear[c, 3] + linear[c, 0] * axes[0][:, None, None] + linear[c, 1] * axes[1][None, :, None]
                     + linear[c, 2] * axes[2][None, None, :])  # fmt: skip
    if transform.field is not None:
        coarse_axes = [np.linspace(0.0, n - 1.0, max(2, int(math.ceil((n - 1) / field_step)) + 1)) for n in shape]
        grid = np.stack(np.meshgrid(*coarse_axes, indexing="ij"), axis=-1)  # (d, h, w, 3) voxel positions
        world = grid @ affine[:3, :3].T + affine[:3, 3]
        shift = transform.displacement(world) @ back[:3, :3].T  # (d, h, w, 3) in source voxels
        coords += _resize(rearrange(shift, "d h w c -> c d h w"), shape, align_corners=True)
    return coords


def _resize(volume: np.ndarray, shape: Sequence[int], *, align_corners: bool) -> np.ndarray:
    """Trilinear resize of ``(D, H, W)`` or ``(C, D, H, W)`` to ``shape`` (torch: several times faster than
    ``scipy.ndimage.zoom``). ``align_corners=True`` maps the corner voxels onto each other (samples of a field at
    ``linspace(0, n - 1, m)``); ``False`` maps voxel extents (a coarser image of the same field of view)."""
    array = torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32))
    batched = array[None] if array.ndim == 4 else array[None, None]
    out = torch.nn.functional.interpolate(batched, size=tuple(int(n) for n in shape), mode="trilinear",
                                          align_corners=align_corners)  # fmt: skip
    return (out[0] if array.ndim == 4 else out[0, 0]).numpy()


def warp_volume(
    volume: np.ndarray,
    source_affine: np.ndarray,
    transform: SpatialTransform,
    *,
    shape: Sequence[int],
    affine: np.ndarray,
    order: int = 1,
    fill: float | None = None,
    coordinates: np.ndarray | None = None,
) -> np.ndarray:
    """Pull ``volume`` through ``transform`` onto a new grid: output voxel ``v`` takes the source value at
    ``A_src⁻¹ F⁻¹(A v)`` (:func:`sampling_coordinates`; spline interpolation of ``order``; ``fill`` outside, default
    the volume minimum).

    Args:
        volume: the source image.
        source_affine: its voxel → world matrix.
        transform: the spatial map.
        shape, affine: the new grid.
        order: 0, 1 or 3.
        fill: value outside the source.
        coordinates: precomputed :func:`sampling_coordinates` (to warp several volumes through one map).

    Shape:
        - volume: ``(D0, H0, W0)``
        - output: ``shape`` ``(D, H, W)``, float32
    """
    if order not in (0, 1, 3):
        raise ValueError(f"order must be 0, 1 or 3, got {order!r}")
    source = np.asarray(volume, dtype=np.float32)
    fill = (float(source.min()) if source.size else 0.0) if fill is None else float(fill)
    if coordinates is None:
        coordinates = sampling_coordinates(transform, source_affine, shape=shape, affine=affine)
    if coordinates.shape != (3, *(int(n) for n in shape)):
        raise ValueError(f"coordinates must have shape (3, *shape) = (3, {tuple(shape)}), got {coordinates.shape}")
    return ndimage.map_coordinates(source, coordinates, order=order, mode="constant", cval=fill, prefilter=order > 1,
                                   output=np.float32)  # fmt: skip


def warp_to_grid(
    case: Case,
    transform: SpatialTransform,
    *,
    shape: Sequence[int],
    affine: np.ndarray,
    order: int = 1,
    coordinates: np.ndarray | None = None,
) -> Case:
    """A case in a new pose on a new grid: the image pulled through ``transform`` (:func:`warp_volume`), the
    landmarks pushed through it (world → ``F`` → voxels of the new grid); landmarks outside it become ``NaN``.

    Shape:
        - case.volume: ``(D0, H0, W0)``; landmarks ``(L, 3)``
        - output: ``Case`` with volume ``shape``, landmarks ``(L, 3)``, spacing from ``affine``

    Example:
        >>> c = Case(volume=np.zeros((8, 8, 8)), landmarks=[[3.0, 4.0, 4.0]], spacing=[1, 1, 1], names=("a",))
        >>> t = SpatialTransform(matrix=np.eye(4))
        >>> warp_to_grid(c, t, shape=(8, 8, 8), affine=np.eye(4)).landmarks.tolist()
        [[3.0, 4.0, 4.0]]
    """
    volume = warp_volume(case.volume, case.affine, transform, shape=shape, affine=affine, order=order,
                         coordinates=coordinates)
    moved = world_to_voxel(transform(voxel_to_world(case.landmarks, case.affine)), affine)
    size = np.asarray(volume.shape, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        inside = np.all((moved >= -0.5) & (moved <= size - 0.5), axis=1)
    moved[~inside] = np.nan
    return Case(volume=volume, landmarks=moved, spacing=spacing_from_affine(affine), case_id=case.case_id,
                affine=affine, names=case.names)  # fmt: skip


# ---------------------------------------------------------------------------------------------------- skull
def _otsu(values: np.ndarray, bins: int = 256) -> float:
    hist, edges = np.histogram(values, bins=bins)
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    s0 = np.cumsum(hist * centres)
    m0 = s0 / np.maximum(w0, 1)
    m1 = (s0[-1] - s0) / np.maximum(w1, 1)
    return float(centres[np.argmax(w0 * w1 * (m0 - m1) ** 2)])


def _ball(radius: int) -> np.ndarray:
    r = max(int(radius), 1)
    return np.linalg.norm(np.mgrid[-r : r + 1, -r : r + 1, -r : r + 1], axis=0) <= r


def brain_mask(case: Case, *, work_spacing: float = 2.0, erosion_mm: float = 8.0, margin_mm: float = 4.0) -> np.ndarray:
    """A rough brain mask of a T1w head: Otsu threshold, erosion, largest component, dilation, hole filling.

    Not a skull-stripping tool: it separates the brain (with its CSF) from the scalp of a clean T1 image well enough
    to make "skull-stripped" training variants. On ``work_spacing`` voxels: threshold at Otsu's level of the lightly
    smoothed image, erode by ``erosion_mm`` to cut the thin links between brain and scalp, keep the largest
    component, dilate by ``erosion_mm + margin_mm`` and keep what is brighter than half the threshold (grey matter,
    not the dark skull), close by 6 mm and fill holes (ventricles). The mask goes back to the case's grid by nearest
    neighbour.

    Args:
        case: a T1-weighted head image.
        work_spacing: voxel size in mm the morphology runs at.
        erosion_mm: erosion radius in mm.
        margin_mm: extra dilation in mm.

    Shape:
        - case.volume: ``(D, H, W)``
        - output: ``(D, H, W)`` bool

    Explained in notebooks/09_real_anatomy.ipynb.
    """
    small = resample(Case(volume=case.volume, landmarks=np.zeros((0, 3)), spacing=case.spacing, names=()),
                     spacing=work_spacing, order=1)  # fmt: skip
    volume = ndimage.gaussian_filter(small.volume.astype(np.float32), 0.5)
    threshold = _otsu(volume)
    foreground = volume > threshold
    radius = int(round(erosion_mm / work_spacing))
    core = ndimage.binary_erosion(foreground, _ball(radius))
    labels, n = ndimage.label(core)
    if n == 0:
        raise ValueError(f"case {case.case_id!r}: no brain found (the erosion removed everything); use a smaller "
                         "erosion_mm")  # fmt: skip
    sizes = ndimage.sum(core, labels, range(1, n + 1))
    brain = labels == int(np.argmax(sizes)) + 1
    brain = ndimage.binary_dilation(brain, _ball(int(round((erosion_mm + margin_mm) / work_spacing))))
    brain &= volume > 0.5 * threshold
    brain = ndimage.binary_fill_holes(ndimage.binary_closing(brain, _ball(int(round(6.0 / work_spacing)))))
    factor = np.asarray(case.volume.shape) / np.asarray(brain.shape)
    return ndimage.zoom(brain.astype(np.uint8), factor, order=0, mode="nearest", grid_mode=True).astype(bool)


# ---------------------------------------------------------------------------------------------------- intensity
@dataclass(frozen=True, kw_only=True)
class MRIntensityAugment:
    """Random MR appearance: bias field, blur or thick slices, contrast, gamma and noise, each with probability ``p``.

    In order, on intensities scaled by their 99.5th percentile (so ranges are unit-free):

    1. bias: ``v · exp(b)``, ``b`` a smooth field (a 4 × 4 × 4 normal grid of standard deviation ``bias``, zoomed
       cubically to 16³ then linearly to the volume);
    2. resolution: either a Gaussian blur of ``blur_mm`` or, as often, thick slices: along one random axis a slice
       profile (Gaussian of ``0.4 f`` voxels) then down- and up-sampling by ``f`` in ``low_res_factor``;
    3. contrast: ``(v - mean) · c + mean``, ``c`` log-uniform in ``contrast``;
    4. gamma: ``v^γ`` on ``v ≥ 0``, ``γ`` log-uniform in ``gamma``;
    5. noise: Gaussian, standard deviation uniform in ``noise_std``.

    Args:
        bias: standard deviation of the log bias field.
        blur_mm: ``(low, high)`` Gaussian blur sigma in mm.
        low_res_factor: ``(low, high)`` thick-slice factor (``>= 1``).
        contrast: ``(low, high)``, ``0 < low``.
        gamma: ``(low, high)``, ``0 < low``.
        noise_std: ``(low, high)`` as a fraction of the 99.5th percentile.
        p: probability of each of the five steps.

    Shape:
        volume ``(D, H, W)`` → ``(D, H, W)`` float32.

    Example:
        >>> aug = MRIntensityAugment()
        >>> aug(np.ones((8, 8, 8)), spacing=np.ones(3), rng=np.random.default_rng(0)).shape
        (8, 8, 8)
    """

    bias: float = 0.25
    blur_mm: tuple[float, float] = (0.5, 2.0)
    low_res_factor: tuple[float, float] = (1.5, 3.0)
    contrast: tuple[float, float] = (0.75, 1.33)
    gamma: tuple[float, float] = (0.7, 1.4)
    noise_std: tuple[float, float] = (0.0, 0.05)
    p: float = 0.5

    def __post_init__(self) -> None:
        if not (math.isfinite(self.bias) and self.bias >= 0):
            raise ValueError(f"bias must be a finite number >= 0, got {self.bias!r}")
        object.__setattr__(self, "blur_mm", _interval(self.blur_mm, what="blur_mm"))
        object.__setattr__(self, "low_res_factor", _interval(self.low_res_factor, what="low_res_factor", low=1.0))
        object.__setattr__(self, "noise_std", _interval(self.noise_std, what="noise_std"))
        for name in ("contrast", "gamma"):
            lo, hi = _interval(getattr(self, name), what=name)
            if lo <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
            object.__setattr__(self, name, (lo, hi))
        if not 0.0 <= self.p <= 1.0:
            raise ValueError(f"p must be a probability in [0, 1], got {self.p!r}")

    def __call__(self, volume: np.ndarray, *, spacing: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        v = np.asarray(volume, dtype=np.float32)
        top = float(np.percentile(v, 99.5))
        v = v / np.float32(top if top > 0 else 1.0)
        if self.bias > 0 and rng.random() < self.p:
            coarse = rng.normal(0.0, self.bias, size=(4, 4, 4))
            smooth = ndimage.zoom(coarse, 4, order=3, mode="nearest", grid_mode=True)  # (16, 16, 16), cubic
            v = v * np.exp(_resize(smooth, v.shape, align_corners=False))
        if rng.random() < self.p:
            if rng.random() < 0.5:
                sigma = rng.uniform(*self.blur_mm) / np.asarray(spacing, dtype=np.float64)
                v = ndimage.gaussian_filter(v, sigma).astype(np.float32)
            else:
                axis, f = int(rng.integers(3)), rng.uniform(*self.low_res_factor)
                v = ndimage.gaussian_filter1d(v, 0.4 * f, axis=axis)
                thick = list(v.shape)
                thick[axis] = max(1, round(v.shape[axis] / f))
                v = _resize(_resize(v, thick, align_corners=False), v.shape, align_corners=False)
        if rng.random() < self.p:
            c = _log_uniform(rng, *self.contrast)
            mean = np.float32(v.mean())
            v = (v - mean) * np.float32(c) + mean
        if rng.random() < self.p:
            v = np.power(np.clip(v, 0.0, None), np.float32(_log_uniform(rng, *self.gamma)))
        if rng.random() < self.p:
            sigma = rng.uniform(*self.noise_std)
            v = v + np.float32(sigma) * rng.standard_normal(v.shape, dtype=np.float32)
        return v.astype(np.float32, copy=False)


# ---------------------------------------------------------------------------------------------------- dataset
Split = Literal["train", "val"]


class AtlasDataset(Dataset):
    """Samples of one annotated template, each in a new random pose and appearance, for :func:`h3de_lite.training.fit`.

    ``split="train"``: item ``i`` of epoch ``e`` draws from ``default_rng([STREAMS["train"], seed, e, i])``: a pose
    (:class:`RandomPose`), the template pulled through it straight onto the working grid (``spacing`` mm over the
    template's field of view), with probability ``p_stripped`` multiplied by the (warped) :func:`brain_mask`, an MR
    appearance (:class:`MRIntensityAugment`), the percentile normalisation of inference, then a random crop of
    ``crop_size`` that keeps the landmarks in view (:class:`~h3de_lite.data.augment.RandomCrop`).

    ``split="val"``: item ``i`` is a rigid copy (``val_pose``, by default the test distribution: up to 20° and 20 mm)
    drawn from ``default_rng([STREAMS["val"], seed, i])``, resampled to the stored grid and then to ``spacing`` as the
    predictor does, normalised, whole; the same in every epoch and cached.

    Args:
        template: the annotated scan (:attr:`h3de_lite.data.afids.AfidsTemplate.case`).
        split: ``"train"`` or ``"val"``.
        length: items per epoch.
        spacing: working voxel size in mm (isotropic).
        crop_size: training crop ``(D, H, W)``; validation items are whole volumes.
        seed: base seed.
        pose: training poses (default :class:`RandomPose`); ``val_pose``: validation poses.
        intensity: training appearance (default :class:`MRIntensityAugment`; ``None``: none).
        p_stripped: share of skull-stripped training samples.
        mask: brain mask on the template grid (default :func:`brain_mask` of ``template`` when ``p_stripped > 0``).
        percentiles: intensity percentiles mapped to [0, 255].
        p_partial: share of training crops holding only some landmarks.

    Shape:
        Each item is a dict as :class:`~h3de_lite.data.dataset.LandmarkDataset` gives: ``image (1, D, H, W)`` float32
        in [0, 255], ``landmarks (L, 3)``, ``present (L,)``, ``spacing (3,)``, ``source_spacing (3,)``,
        ``origin (3,)``, ``case_id``.

    Example:
        >>> ds = AtlasDataset(template.case, length=64, spacing=3.0, crop_size=(64, 64, 64))  # doctest: +SKIP
        >>> ds[0]["image"].shape  # doctest: +SKIP
        torch.Size([1, 64, 64, 64])

    Explained in notebooks/09_real_anatomy.ipynb.
    """

    def __init__(
        self,
        template: Case,
        *,
        split: Split = "train",
        length: int = 64,
        spacing: float = 3.0,
        crop_size: Sequence[int] = (64, 64, 64),
        seed: int = 0,
        pose: RandomPose | None = None,
        val_pose: RandomPose | None = None,
        intensity: MRIntensityAugment | None = MRIntensityAugment(),
        p_stripped: float = 0.3,
        mask: np.ndarray | None = None,
        percentiles: Sequence[float] = DEFAULT_PERCENTILES,
        p_partial: float = 0.0,
    ) -> None:
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        if not isinstance(length, int) or length < 1:
            raise ValueError(f"length must be a positive int (items per epoch), got {length!r}")
        if not template.is_complete:
            raise ValueError(f"template {template.case_id!r} must have every landmark (no NaN rows)")
        if not 0.0 <= p_stripped <= 1.0:
            raise ValueError(f"p_stripped must be a probability in [0, 1], got {p_stripped!r}")
        self.template = template
        self.split: Split = split
        self.length = length
        self.spacing = float(spacing3(spacing, what="spacing")[0])
        self.grid_shape, self.grid_affine = working_grid(template, self.spacing)
        self.crop = RandomCrop(size=crop_size, p_partial=p_partial)
        self.seed = int(seed)
        self.epoch = 0
        self.pose = pose if pose is not None else RandomPose()
        self.val_pose = val_pose if val_pose is not None else RandomPose.rigid(max_rotation_deg=20, max_shift_mm=20)
        self.intensity = intensity
        self.p_stripped = float(p_stripped)
        if mask is None and p_stripped > 0 and split == "train":
            mask = brain_mask(template)
        if mask is not None and mask.shape != template.volume.shape:
            raise ValueError(f"mask shape {mask.shape} differs from the template's {template.volume.shape}")
        self.mask = mask
        percentile_normalize(np.zeros(2), percentiles=percentiles)  # validates
        self.percentiles = tuple(float(p) for p in percentiles)
        centre_voxel = (np.asarray(template.volume.shape, dtype=np.float64) - 1) / 2
        self.centre = voxel_to_world(centre_voxel, template.affine)
        self.extent_mm = float(np.max(np.asarray(template.volume.shape) * template.spacing))
        self._cache: dict[int, dict] = {}

    def __len__(self) -> int:
        return self.length

    def __repr__(self) -> str:
        return (f"AtlasDataset(split={self.split!r}, length={self.length}, spacing={self.spacing}, "
                f"grid={self.grid_shape}, crop={tuple(int(s) for s in self.crop.size)}, seed={self.seed})")  # fmt: skip

    def set_epoch(self, epoch: int) -> None:
        """Training items of the coming epoch are those of ``epoch`` (validation items never change)."""
        if not isinstance(epoch, (int, np.integer)) or epoch < 0:
            raise ValueError(f"epoch must be an int >= 0, got {epoch!r}")
        self.epoch = int(epoch)

    def sample(self, index: int) -> tuple[Case, SpatialTransform, bool]:
        """The un-normalised training case of item ``index`` in this epoch, its transform and whether it is stripped.

        Shape:
            output case.volume: the working grid ``(D, H, W)``; landmarks ``(L, 3)``.
        """
        rng = _rng("train", self.seed, self.epoch, index)
        transform = self.pose.draw(rng, centre=self.centre, extent_mm=self.extent_mm)
        coordinates = sampling_coordinates(transform, self.template.affine, shape=self.grid_shape,
                                           affine=self.grid_affine)  # fmt: skip
        case = warp_to_grid(self.template, transform, shape=self.grid_shape, affine=self.grid_affine,
                            coordinates=coordinates)  # fmt: skip
        stripped = self.mask is not None and rng.random() < self.p_stripped
        if stripped:
            mask = warp_volume(self.mask, self.template.affine, transform, shape=self.grid_shape,
                               affine=self.grid_affine, fill=0.0, coordinates=coordinates)  # fmt: skip
            case.volume = case.volume * mask
        if self.intensity is not None:
            case.volume = self.intensity(case.volume, spacing=case.spacing, rng=rng)
        return case, transform, stripped

    @staticmethod
    def _item(image: np.ndarray, case: Case, *, origin: np.ndarray, source_spacing: np.ndarray, case_id: str) -> dict:
        landmarks = case.landmarks
        return {
            "image": torch.from_numpy(np.ascontiguousarray(image)[None]),
            "landmarks": torch.from_numpy(landmarks.astype(np.float32)),
            "present": torch.from_numpy(~np.isnan(landmarks).any(axis=1)),
            "spacing": torch.from_numpy(case.spacing.astype(np.float32)),
            "source_spacing": torch.from_numpy(np.asarray(source_spacing, dtype=np.float32)),
            "origin": torch.from_numpy(np.asarray(origin, dtype=np.int64)),
            "case_id": case_id,
        }

    def __getitem__(self, index: int) -> dict:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        index = index % len(self)
        if self.split == "val":
            if index not in self._cache:
                case = rigid_copy(self.template, self.val_pose.draw(_rng("val", self.seed, index), centre=self.centre))
                work = resample(case, spacing=self.spacing, order=1)  # what the predictor does to a stored scan
                image = percentile_normalize(work.volume, percentiles=self.percentiles)
                self._cache[index] = self._item(image, work, origin=np.zeros(3), source_spacing=self.template.spacing,
                                                case_id=f"val-{self.seed}-{index:03d}")  # fmt: skip
            return self._cache[index]
        case, _, _ = self.sample(index)
        # normalise the whole volume (as inference does), then crop; the ground truth only places the crop
        image = percentile_normalize(case.volume, percentiles=self.percentiles)
        normalised = Case(volume=image, landmarks=case.landmarks, spacing=case.spacing, affine=case.affine,
                          names=case.names)  # fmt: skip
        rng = _rng("train", self.seed, self.epoch, index, 1)
        origin = self.crop.choose_start(normalised.volume.shape, normalised.landmarks, rng)
        cropped = crop(normalised, origin, self.crop.size)
        return self._item(cropped.volume, cropped, origin=origin, source_spacing=case.spacing,
                          case_id=f"train-{self.seed}-{self.epoch}-{index:05d}")  # fmt: skip


def atlas_data_config(
    *,
    spacing: float,
    crop: Sequence[int],
    names: Sequence[str],
    percentiles: Sequence[float] = DEFAULT_PERCENTILES,
    **notes: object,
) -> dict:
    """The ``data`` block of a single-atlas run's ``config.json``: the preprocessing
    :func:`~h3de_lite.evaluation.load_predictor` must repeat on a stored scan, plus free-form ``notes``.

    ``spacing`` (resample to it), ``window: None`` and ``percentiles`` (the :class:`AtlasDataset` normalisation),
    ``orientation: "RAS"`` (reorient the array first: the template's axis order), ``crop`` and the landmark ``names``.

    Example:
        >>> atlas_data_config(spacing=3.0, crop=(64, 64, 64), names=("AC", "PC"))["orientation"]
        'RAS'
    """
    return {
        "spacing": float(spacing),
        "window": None,
        "percentiles": [float(p) for p in percentiles],
        "orientation": "RAS",
        "crop": [int(c) for c in crop],
        "names": [str(n) for n in names],
        **notes,
    }


# ---------------------------------------------------------------------------------------------------- test copies
def rigid_copy(template: Case, transform: SpatialTransform, *, order: int = 1) -> Case:
    """The template in a new pose on its own grid (same shape, spacing and affine): the scanner sees a head that
    moved. Integer templates stay integer (rounded), as a scanner would store them.

    Shape:
        - template.volume: ``(D, H, W)``
        - output: ``Case`` with volume ``(D, H, W)``, landmarks ``(L, 3)``
    """
    case = warp_to_grid(template, transform, shape=template.volume.shape, affine=template.affine, order=order)
    if np.issubdtype(template.volume.dtype, np.integer):
        info = np.iinfo(template.volume.dtype)
        case.volume = np.clip(np.rint(case.volume), info.min, info.max).astype(template.volume.dtype)
    return case


def write_rigid_copies(
    template: Case,
    out_dir: str | Path,
    *,
    n: int = 20,
    seed: int = 0,
    max_rotation_deg: float = 20.0,
    max_shift_mm: float = 20.0,
    prefix: str = "rigid",
) -> list[Path]:
    """Write ``n`` random rigid copies of the template as ``<prefix>_NN.nii.gz`` + ``<prefix>_NN.fcsv`` (RAS mm,
    labelled with the template's names) and their transforms in ``transforms.json``: an evaluation folder for
    ``h3de-lite evaluate --data OUT_DIR --split .``.

    Copy ``i`` draws from ``default_rng([STREAMS["test"], seed, i])`` (a stream no training or validation item uses):
    a rotation about a uniformly random axis through the template's centre by an angle uniform in
    ``[0, max_rotation_deg]`` and a shift of length uniform in ``[0, max_shift_mm]`` in a uniformly random direction
    (:meth:`RandomPose.rigid`). Each copy keeps the template's grid (:func:`rigid_copy`). ``transforms.json`` holds,
    per case id, the ``(4, 4)`` world map ``F`` (template RAS mm → copy RAS mm), the rotation angle and the shift.

    Args:
        template: the annotated scan (complete).
        out_dir: the folder (created).
        n: number of copies.
        seed: second seed word.
        max_rotation_deg: largest rotation angle.
        max_shift_mm: largest shift in mm.
        prefix: file name prefix.

    Returns:
        The image paths.

    Shape:
        not a tensor function; each copy has the template's ``(D, H, W)``.

    Example:
        >>> write_rigid_copies(template.case, "data/afids-test", n=20)[0].name  # doctest: +SKIP
        'rigid_00.nii.gz'

    Explained in notebooks/09_real_anatomy.ipynb.
    """
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    if not template.is_complete:
        raise ValueError(f"template {template.case_id!r} must have every landmark (no NaN rows)")
    out_dir = Path(out_dir)
    pose = RandomPose.rigid(max_rotation_deg=max_rotation_deg, max_shift_mm=max_shift_mm)
    centre = voxel_to_world((np.asarray(template.volume.shape, dtype=np.float64) - 1) / 2, template.affine)
    record: dict[str, dict] = {}
    paths = []
    for i in range(n):
        case_id = f"{prefix}_{i:02d}"
        transform = pose.draw(_rng("test", seed, i), centre=centre)
        copy = rigid_copy(template, transform)
        if not copy.is_complete:
            raise ValueError(f"copy {case_id}: a landmark left the image; use smaller shifts or rotations")
        write_nifti(out_dir / f"{case_id}.nii.gz", copy.volume, copy.affine)
        world = voxel_to_world(copy.landmarks, copy.affine)
        write_markups(out_dir / f"{case_id}.fcsv", dict(zip(copy.names, world, strict=True)), coordinate_system="RAS")
        rotation = transform.matrix[:3, :3]
        angle = math.degrees(math.acos(float(np.clip((np.trace(rotation) - 1) / 2, -1.0, 1.0))))
        record[case_id] = {"matrix": transform.matrix.tolist(), "rotation_deg": angle,
                           "shift_mm": float(np.linalg.norm(transform(centre) - centre))}  # fmt: skip
        paths.append(out_dir / f"{case_id}.nii.gz")
    document = {"stream": "test", "seed": seed, "max_rotation_deg": max_rotation_deg, "max_shift_mm": max_shift_mm,
                "template": template.case_id, "cases": record}  # fmt: skip
    with atomic_output(out_dir / "transforms.json") as tmp:
        tmp.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    return paths


def read_rigid_transforms(folder: str | Path) -> dict[str, np.ndarray]:
    """The ``(4, 4)`` template → copy world maps that :func:`write_rigid_copies` stored, by case id.

    Raises:
        FileNotFoundError: no ``transforms.json`` in ``folder``.

    Shape:
        output values ``(4, 4)``.
    """
    path = Path(folder) / "transforms.json"
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r} does not exist; write the copies with write_rigid_copies (it stores "
                                "the true transforms the known-transform reference needs)")  # fmt: skip
    document = json.loads(path.read_text(encoding="utf-8"))
    return {case_id: np.asarray(entry["matrix"], dtype=np.float64) for case_id, entry in document["cases"].items()}
