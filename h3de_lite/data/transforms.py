"""Preprocessing (paper §III-A): intensity window to [0, 255], crops that keep the landmarks, and resampling.

Every transform takes and returns a :class:`~h3de_lite.data.case.Case`, so landmarks, spacing and the voxel → world
affine move together with the voxels and an error measured in mm stays right after any crop or zoom.

Conventions:

- Voxel centres sit at integer coordinates; voxel ``i`` covers ``[i - 0.5, i + 0.5]``. A point is inside a volume of
  size ``n`` when ``-0.5 <= x <= n - 0.5`` (the same test :class:`Case` applies).
- A crop may start before 0 or end past the volume: the outside is padded with the volume's minimum (air).
- A landmark that falls outside a crop becomes ``NaN``: what the network cannot see is treated as absent from the input,
  exactly like a missing landmark, so the existence branch learns "not in view" as "absent".

Explained in notebooks/02_data.ipynb.
"""

from __future__ import annotations

from typing import Sequence, TypeVar

import numpy as np
import torch
from scipy import ndimage

from h3de_lite.data.case import Case, validate_spacing
from h3de_lite.data.landmarks import LANDMARK_NAMES

__all__ = [
    "DEFAULT_WINDOW",
    "normalize_intensity",
    "percentile_normalize",
    "crop",
    "choose_crop_start",
    "random_crop",
    "center_crop",
    "resample",
    "zoom_shape",
    "zoom_to_fit",
    "to_source_voxels",
]

DEFAULT_WINDOW: tuple[float, float] = (-1000.0, 3000.0)
"""HU window mapped to [0, 255]: from air (-1000 HU) to dental enamel (about 2500-3000 HU), so every tissue between
them — soft tissue, cancellous and cortical bone, dentine, enamel — keeps its contrast, and only metal (fillings,
implants, > 3000 HU) is clipped. The paper states the output range ([0, 255]) but not the window."""

ArrayOrTensor = TypeVar("ArrayOrTensor", np.ndarray, torch.Tensor)


def _pair(values: Sequence[float], *, what: str) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in values)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what} must be two numbers (low, high), got {values!r}") from exc
    if not (np.isfinite(low) and np.isfinite(high) and low < high):
        raise ValueError(f"{what} must be finite with low < high, got ({low}, {high})")
    return low, high


def _size3(size: Sequence[int] | int, *, what: str = "size") -> np.ndarray:
    arr = np.broadcast_to(np.asarray(size), (3,)) if np.ndim(size) == 0 else np.asarray(size)
    if arr.shape != (3,) or not np.all(np.mod(arr, 1) == 0) or np.any(arr < 1):
        raise ValueError(f"{what} must be three positive integers (D, H, W), got {size!r}")
    return arr.astype(np.int64)


def spacing3(spacing: Sequence[float] | float, *, what: str = "spacing") -> np.ndarray:
    """A voxel size as ``(3,)`` mm: one number means isotropic; validated with :func:`validate_spacing`."""
    arr = np.asarray(spacing, dtype=np.float64)
    return validate_spacing(np.full(3, float(arr)) if arr.ndim == 0 else arr, what=what)


def _as_case(case_or_arrays: Case | Sequence[np.ndarray]) -> Case:
    """A Case as is, or ``(volume, landmarks[, spacing])`` wrapped in one (spacing defaults to 1 mm)."""
    if isinstance(case_or_arrays, Case):
        return case_or_arrays
    if not isinstance(case_or_arrays, (tuple, list)) or len(case_or_arrays) not in (2, 3):
        raise ValueError(
            "expected a Case or a tuple (volume, landmarks) / (volume, landmarks, spacing), "
            f"got {type(case_or_arrays).__name__}"
        )
    volume, landmarks, *rest = case_or_arrays
    landmarks = np.asarray(landmarks, dtype=np.float64)
    if landmarks.ndim != 2 or landmarks.shape[-1] != 3:
        raise ValueError(f"landmarks must have shape (L, 3), got {landmarks.shape}")
    rows = len(landmarks)
    names = LANDMARK_NAMES if rows == len(LANDMARK_NAMES) else tuple(f"P{i}" for i in range(rows))
    spacing = rest[0] if rest else np.ones(3)
    return Case(volume=np.asarray(volume), landmarks=landmarks, spacing=spacing, names=names)


def normalize_intensity(
    volume: np.ndarray,
    *,
    window: Sequence[float] = DEFAULT_WINDOW,
    out_range: Sequence[float] = (0.0, 255.0),
) -> np.ndarray:
    """Clip intensities to ``window`` and scale them linearly onto ``out_range`` (paper §III-A: CT to [0, 255]).

    ``out = (clip(v, w0, w1) - w0) / (w1 - w0) * (o1 - o0) + o0``; see :data:`DEFAULT_WINDOW` for the HU choice.

    Args:
        volume: intensities (HU for raw CT), any shape.
        window: ``(low, high)`` input values mapped to the ends of ``out_range``.
        out_range: ``(low, high)`` output range.

    Shape:
        - volume: ``(D, H, W)`` (any shape works)
        - output: same shape, float32

    Example:
        >>> normalize_intensity(np.array([[[-2000, -1000, 1000, 5000]]])).shape
        (1, 1, 4)

    Explained in notebooks/02_data.ipynb.
    """
    w0, w1 = _pair(window, what="window")
    o0, o1 = _pair(out_range, what="out_range")
    clipped = np.clip(np.asarray(volume, dtype=np.float32), w0, w1)
    return ((clipped - np.float32(w0)) * np.float32((o1 - o0) / (w1 - w0)) + np.float32(o0)).astype(np.float32)


def percentile_normalize(
    volume: np.ndarray,
    *,
    percentiles: Sequence[float] = (0.5, 99.5),
    out_range: Sequence[float] = (0.0, 255.0),
) -> np.ndarray:
    """Scale intensities between two percentiles of the volume itself onto ``out_range``, clipping outside.

    For images without a physical intensity scale (MRI): the ``p0`` and ``p1`` percentiles of ``volume`` play the part
    of the CT window of :func:`normalize_intensity`, ``out = (clip(v, q0, q1) - q0) / (q1 - q0) * (o1 - o0) + o0``,
    so a scan stored in 0–4095 and one in 0–1 give the same input. A constant volume maps to ``o0``.

    Args:
        volume: intensities in any unit, any shape.
        percentiles: ``(p0, p1)`` with ``0 <= p0 < p1 <= 100``.
        out_range: ``(low, high)`` output range.

    Shape:
        - volume: ``(D, H, W)`` (any shape works)
        - output: same shape, float32

    Example:
        >>> [float(v) for v in percentile_normalize(np.array([0.0, 50.0, 100.0]), percentiles=(0, 100))]
        [0.0, 127.5, 255.0]

    Explained in notebooks/09_real_anatomy.ipynb.
    """
    p0, p1 = _pair(percentiles, what="percentiles")
    if not 0.0 <= p0 < p1 <= 100.0:
        raise ValueError(f"percentiles must satisfy 0 <= low < high <= 100, got ({p0:g}, {p1:g})")
    o0, o1 = _pair(out_range, what="out_range")
    values = np.asarray(volume, dtype=np.float32)
    q0, q1 = (float(q) for q in np.percentile(values, [p0, p1]))
    if not q1 > q0:
        return np.full(values.shape, o0, dtype=np.float32)
    clipped = np.clip(values, np.float32(q0), np.float32(q1))
    return ((clipped - np.float32(q0)) * np.float32((o1 - o0) / (q1 - q0)) + np.float32(o0)).astype(np.float32)


def crop(case: Case, start: Sequence[int], size: Sequence[int], *, fill: float | None = None) -> Case:
    """Cut the box ``[start, start + size)`` out of a case, padding with the volume minimum where it leaves the volume.

    Landmarks shift by ``-start``; those outside the box become ``NaN``. The affine is moved so world coordinates
    stay right; spacing is unchanged.

    Args:
        case: the case to crop.
        start: first voxel index of the box along each axis (may be negative or past the end: padding).
        size: box size ``(D, H, W)`` in voxels.
        fill: padding value instead of the volume minimum.

    Shape:
        - case.volume: ``(D0, H0, W0)``
        - output: ``Case`` with volume ``(D, H, W) = size``, landmarks ``(L, 3)``

    Example:
        >>> c = Case(volume=np.zeros((20, 20, 10)), landmarks=np.full((14, 3), 5.0), spacing=[1, 1, 1])
        >>> crop(c, (2, 2, 2), (8, 8, 4)).volume.shape
        (8, 8, 4)

    Explained in notebooks/02_data.ipynb.
    """
    size = _size3(size)
    start = np.asarray(start)
    if start.shape != (3,) or not np.all(np.mod(start, 1) == 0):
        raise ValueError(f"start must be three integers, got {start!r}")
    start = start.astype(np.int64)
    shape = np.asarray(case.volume.shape)
    src_lo, src_hi = np.maximum(start, 0), np.minimum(start + size, shape)
    if fill is None:
        fill = case.volume.min() if case.volume.size else 0
    out = np.full(tuple(size), fill, dtype=case.volume.dtype)
    if np.all(src_hi > src_lo):
        dst_lo = src_lo - start
        dst = tuple(slice(lo, lo + n) for lo, n in zip(dst_lo, src_hi - src_lo))
        out[dst] = case.volume[tuple(slice(lo, hi) for lo, hi in zip(src_lo, src_hi))]
    landmarks, affine = _crop_frame(case.landmarks, case.affine, start, size)
    return Case(volume=out, landmarks=landmarks, spacing=case.spacing.copy(), case_id=case.case_id, affine=affine,
                names=case.names)  # fmt: skip


def _crop_frame(landmarks: np.ndarray, affine: np.ndarray, start: np.ndarray, size: np.ndarray):  # noqa: ANN202
    """The landmarks and affine of the box ``[start, start + size)``: shifted by ``-start``, ``NaN`` outside the box.

    Shape:
        landmarks ``(L, 3)``, affine ``(4, 4)``, start and size ``(3,)`` → ``(L, 3)``, ``(4, 4)``.
    """
    landmarks = landmarks - start
    with np.errstate(invalid="ignore"):  # NaN rows compare False and stay NaN
        inside = np.all((landmarks >= -0.5) & (landmarks <= size - 0.5), axis=1)
    landmarks[~inside] = np.nan
    shift = np.eye(4)
    shift[:3, 3] = start
    return landmarks, affine @ shift


def _most_landmarks_start(points: np.ndarray, size: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """The start (within ``[lo, hi]``) that keeps the most points in view, nearest the box centred on them."""
    centred = np.clip(np.round((points.min(0) + points.max(0)) / 2 - (size - 1) / 2), lo, hi).astype(np.int64)
    candidates = []
    for axis in range(3):
        c = points[:, axis]
        # the count only changes where a point enters or leaves the box: these starts cover every optimum
        values = np.concatenate([np.ceil(c + 0.5 - size[axis]), np.floor(c + 0.5), [centred[axis], lo[axis], hi[axis]]])
        candidates.append(np.unique(np.clip(values, lo[axis], hi[axis])).astype(np.int64))
    grid = np.stack(np.meshgrid(*candidates, indexing="ij"), axis=-1).reshape(-1, 3)  # (N, 3)
    rel = points[None, :, :] - grid[:, None, :]  # (N, P, 3)
    count = np.all((rel >= -0.5) & (rel <= size - 0.5), axis=-1).sum(axis=1)  # (N,)
    best = grid[count == count.max()]
    return best[np.argmin(np.abs(best - centred).sum(axis=1))]


def choose_crop_start(
    shape: Sequence[int],
    landmarks: np.ndarray | None,
    size: Sequence[int],
    *,
    rng: np.random.Generator | int | None = None,
    keep_landmarks: bool = True,
) -> np.ndarray:
    """Pick the start of a random crop box of ``size`` inside a volume of ``shape``.

    With ``keep_landmarks`` the start is drawn uniformly among the boxes that contain every present landmark and stay
    inside the volume (when the volume is smaller than the box, among the placements of the volume inside the box).
    If the landmarks span more than the box, the box keeps as many as possible and, among those, is the one closest
    to centred on their bounding box (deterministic). Without landmarks the start is uniform over the volume.

    Args:
        shape: volume size ``(D0, H0, W0)``.
        landmarks: ``(L, 3)`` voxel coordinates with ``NaN`` rows, or ``None``.
        size: crop size ``(D, H, W)``.
        rng: random generator (or seed).
        keep_landmarks: keep the present landmarks in view.

    Shape:
        - output: ``(3,)`` int64 start index (negative means padding before the volume)

    Example:
        >>> choose_crop_start((64, 64, 32), np.array([[30.0, 30.0, 16.0]]), (32, 32, 16), rng=0).shape
        (3,)

    Explained in notebooks/02_data.ipynb.
    """
    rng = np.random.default_rng(rng)
    shape_arr, size = _size3(shape, what="shape"), _size3(size)
    lo, hi = np.minimum(0, shape_arr - size), np.maximum(0, shape_arr - size)  # starts without needless padding
    points = np.zeros((0, 3))
    if keep_landmarks and landmarks is not None:
        landmarks = np.asarray(landmarks, dtype=np.float64)
        points = landmarks[~np.isnan(landmarks).any(axis=1)]
    if len(points) == 0:
        return rng.integers(lo, hi + 1)
    first = np.maximum(np.ceil(points.max(0) + 0.5 - size), lo)  # box must reach past the highest point...
    last = np.minimum(np.floor(points.min(0) + 0.5), hi)  # ...and begin before the lowest one
    if np.all(first <= last):
        return rng.integers(first.astype(np.int64), last.astype(np.int64) + 1)
    return _most_landmarks_start(points, size, lo, hi)


def random_crop(
    case_or_arrays: Case | Sequence[np.ndarray],
    *,
    size: Sequence[int] = (128, 128, 64),
    rng: np.random.Generator | int | None = None,
    keep_landmarks: bool = True,
    return_start: bool = False,
) -> Case | tuple[Case, np.ndarray]:
    """A random crop that keeps the present landmarks in view (paper §III-A: random 128×128×64 crops).

    See :func:`choose_crop_start` for how the box is placed and :func:`crop` for padding and landmarks that leave it.

    Args:
        case_or_arrays: a :class:`Case`, or ``(volume, landmarks)`` / ``(volume, landmarks, spacing)``.
        size: crop size ``(D, H, W)``.
        rng: random generator (or seed).
        keep_landmarks: keep the present landmarks in view when they fit.
        return_start: also return the crop start (to map predictions back).

    Shape:
        - output: ``Case`` with volume ``(D, H, W) = size``; with ``return_start`` also ``(3,)`` int64

    Example:
        >>> c = Case(volume=np.zeros((40, 40, 20)), landmarks=np.full((14, 3), 10.0), spacing=[1, 1, 1])
        >>> random_crop(c, size=(16, 16, 8), rng=0).volume.shape
        (16, 16, 8)

    Explained in notebooks/02_data.ipynb.
    """
    case = _as_case(case_or_arrays)
    start = choose_crop_start(case.volume.shape, case.landmarks, size, rng=rng, keep_landmarks=keep_landmarks)
    out = crop(case, start, size)
    return (out, start) if return_start else out


def center_crop(case_or_arrays: Case | Sequence[np.ndarray], *, size: Sequence[int] = (128, 128, 64),
                return_start: bool = False) -> Case | tuple[Case, np.ndarray]:  # fmt: skip
    """Crop the centre of the volume (padding if it is smaller). Uses no landmark, so it is safe at inference.

    Args:
        case_or_arrays: a :class:`Case`, or ``(volume, landmarks)`` / ``(volume, landmarks, spacing)``.
        size: crop size ``(D, H, W)``.
        return_start: also return the crop start.

    Shape:
        - output: ``Case`` with volume ``(D, H, W) = size``; with ``return_start`` also ``(3,)`` int64

    Example:
        >>> c = Case(volume=np.zeros((40, 40, 20)), landmarks=np.full((14, 3), 10.0), spacing=[1, 1, 1])
        >>> center_crop(c, size=(16, 16, 8)).volume.shape
        (16, 16, 8)

    Explained in notebooks/02_data.ipynb.
    """
    case = _as_case(case_or_arrays)
    start = (np.asarray(case.volume.shape) - _size3(size)) // 2
    out = crop(case, start, size)
    return (out, start) if return_start else out


def resample(case: Case, *, spacing: Sequence[float] | float | None = None, order: int = 1) -> Case:
    """Resample a case to a new voxel size, moving landmarks, spacing and affine consistently.

    The new grid covers the same physical extent as the old one (voxel-centre convention, ``scipy.ndimage.zoom`` with
    ``grid_mode=True``): the shape is ``round(shape * old_spacing / spacing)`` and, because of that rounding, the
    spacing actually reached is ``old_spacing * old_shape / new_shape`` (returned in ``Case.spacing``). With the
    actual zoom ``f = new_shape / old_shape`` each landmark moves to ``(x + 0.5) * f - 0.5``, so distances in mm
    between landmarks are unchanged.

    Args:
        case: the case to resample.
        spacing: target voxel size in mm, ``(3,)`` or one number for isotropic; ``None`` returns the case unchanged.
        order: spline order (0 nearest, 1 linear, 3 cubic). With ``order > 0`` the volume becomes float32.

    Shape:
        - case.volume: ``(D0, H0, W0)``
        - output: ``Case`` with volume ``(round(D0 * s0 / t0), …)``

    Example:
        >>> c = Case(volume=np.zeros((20, 20, 10)), landmarks=np.full((14, 3), 5.0), spacing=[0.5, 0.5, 1.0])
        >>> resample(c, spacing=1.0).volume.shape
        (10, 10, 10)

    Explained in notebooks/02_data.ipynb.
    """
    if spacing is None:
        return Case(volume=case.volume, landmarks=case.landmarks.copy(), spacing=case.spacing.copy(),
                    case_id=case.case_id, affine=case.affine.copy(), names=case.names)  # fmt: skip
    target = spacing3(spacing, what="target spacing")
    if order not in (0, 1, 2, 3, 4, 5):
        raise ValueError(f"order must be a spline order 0..5, got {order!r}")
    old_shape = np.asarray(case.volume.shape)
    new_shape = np.maximum(1, np.round(old_shape * case.spacing / target)).astype(np.int64)
    factor = new_shape / old_shape  # the zoom actually applied (shape rounding)
    dtype = case.volume.dtype if order == 0 else np.float32
    volume = ndimage.zoom(case.volume.astype(dtype, copy=False), factor, output=dtype, order=order,
                          mode="nearest", grid_mode=True)  # fmt: skip
    assert volume.shape == tuple(new_shape), (volume.shape, new_shape)
    return _on_zoomed_grid(case, volume, factor)


def _on_zoomed_grid(case: Case, volume: np.ndarray, zoom: np.ndarray) -> Case:
    """``case`` with ``volume``, its voxels zoomed by ``zoom = new_shape / old_shape`` per axis over the same extent
    (voxel-centre convention): landmarks go to ``(x + 0.5) * zoom - 0.5``, spacing to ``spacing / zoom``, and the
    affine follows, so positions in mm are unchanged."""
    to_old = np.eye(4)  # new voxel index → old voxel index
    to_old[:3, :3] = np.diag(1.0 / zoom)
    to_old[:3, 3] = 0.5 / zoom - 0.5
    return Case(volume=volume, landmarks=(case.landmarks + 0.5) * zoom - 0.5, spacing=case.spacing / zoom,
                case_id=case.case_id, affine=case.affine @ to_old, names=case.names)  # fmt: skip


def zoom_shape(shape: Sequence[int], size: Sequence[int]) -> tuple[int, int, int]:
    """Shape of a volume of ``shape`` shrunk by one factor (aspect kept) until it fits in ``size``; a volume that
    already fits keeps its shape (never enlarged).

    Shape:
        - shape, size: ``(3,)``
        - output: ``(3,)`` with every entry ``<= size``

    Example:
        >>> zoom_shape((146, 146, 144), (64, 64, 32))
        (32, 32, 32)
    """
    shape_arr, size_arr = _size3(shape, what="shape"), _size3(size)
    factor = max(1.0, float(np.max(shape_arr / size_arr)))
    out = [max(1, min(int(r), round(int(s) / factor))) for s, r in zip(shape_arr, size_arr, strict=True)]
    return out[0], out[1], out[2]


def zoom_to_fit(case: Case, *, size: Sequence[int]) -> Case:
    """The whole volume shrunk by one factor (aspect kept, :func:`zoom_shape`) and padded with air, centred, to
    ``size``: the coarse view of a whole scan in one network window.

    Voxels are averaged over the cells they cover (``torch.nn.functional.interpolate(mode="area")``, what
    ``strategy="coarse_to_fine"`` inference does to its input) and the padding is the source volume's minimum (air),
    so a landmark at ``x`` moves to
    ``(x + 0.5) / f - 0.5 + pad`` with ``f = shape / zoomed_shape`` per axis and ``pad = (size - zoomed_shape) // 2``;
    spacing becomes ``spacing * f`` and the affine follows, so errors in mm stay right. A volume that already fits is
    only padded. Training with some of these views (``LandmarkDataset(p_zoom=...)``) teaches the network the coarse
    step of coarse-to-fine inference, where the whole head, and so each molar's side and rank, is in view.

    Args:
        case: the case (any shape).
        size: window ``(D, H, W)`` in voxels.

    Shape:
        - case.volume: ``(D0, H0, W0)``
        - output: ``Case`` with volume ``(D, H, W) = size`` (float32), landmarks ``(L, 3)``

    Example:
        >>> c = Case(volume=np.zeros((128, 128, 64)), landmarks=np.full((14, 3), 31.5), spacing=[1, 1, 1])
        >>> z = zoom_to_fit(c, size=(32, 32, 32))
        >>> z.volume.shape, z.landmarks[0].tolist(), z.spacing.tolist()
        ((32, 32, 32), [7.5, 7.5, 15.5], [4.0, 4.0, 4.0])

    Explained in notebooks/02_data.ipynb.
    """
    size_arr = _size3(size)
    shape = np.asarray(case.volume.shape)
    small = np.asarray(zoom_shape(shape, size_arr))
    volume = torch.from_numpy(np.ascontiguousarray(case.volume, dtype=np.float32))[None, None]
    volume = torch.nn.functional.interpolate(volume, size=tuple(int(s) for s in small), mode="area")[0, 0].numpy()
    zoomed = _on_zoomed_grid(case, volume, small / shape)  # the same bookkeeping as resample
    return crop(zoomed, -((size_arr - small) // 2), size_arr, fill=float(case.volume.min()))  # air of the source


def to_source_voxels(
    points: ArrayOrTensor, *, origin: ArrayOrTensor, spacing: ArrayOrTensor, source_spacing: ArrayOrTensor
) -> ArrayOrTensor:
    """Map voxel coordinates in a (resampled, then cropped) sample back to the source volume's voxel grid.

    Undoes :func:`crop` (``+ origin``) then :func:`resample` (``(x + 0.5) * spacing / source_spacing - 0.5``); with no
    resampling ``spacing == source_spacing`` and only the crop offset remains. Works on numpy arrays and tensors.

    Args:
        points: predicted coordinates in the sample.
        origin: crop start in the resampled volume (``LandmarkDataset``'s ``origin``).
        spacing: voxel size of the sample (``spacing``).
        source_spacing: voxel size of the source volume (``source_spacing``).

    Raises:
        ValueError: a spacing that is not ``(..., 3)`` or holds a zero, negative or non-finite value.

    Shape:
        - points: ``(..., L, 3)``; origin, spacing, source_spacing: ``(..., 3)``
        - output: ``(..., L, 3)``

    Example:
        >>> to_source_voxels(np.zeros((14, 3)), origin=np.array([4, 4, 2]), spacing=np.ones(3),
        ...                  source_spacing=np.ones(3)).shape
        (14, 3)

    Explained in notebooks/02_data.ipynb.
    """
    for what, value in (("spacing", spacing), ("source_spacing", source_spacing)):
        arr = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value, dtype=np.float64)
        if arr.shape[-1:] != (3,):
            raise ValueError(f"to_source_voxels: {what} must have shape (..., 3) in mm, got shape {arr.shape}")
        if not np.all(np.isfinite(arr)) or np.any(arr <= 0):
            raise ValueError(
                f"to_source_voxels: {what} must be finite positive voxel sizes in mm, got {arr.tolist()}; pass the "
                "sample's 'spacing' and 'source_spacing' (as LandmarkDataset returns them)"
            )
    ratio = spacing / source_spacing
    return (points + origin[..., None, :] + 0.5) * ratio[..., None, :] - 0.5
