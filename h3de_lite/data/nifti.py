"""NIfTI volumes and the voxel ↔ world (RAS, mm) affine: the edge where world coordinates enter and leave h3de-lite.

Inside the package every landmark is a voxel coordinate in array-axis order (index 0 ↔ axis D). World coordinates
exist only here, at the I/O edge, and pass through the image's ``(4, 4)`` affine::

    world = affine[:3, :3] @ voxel + affine[:3, 3]          (RAS, mm; voxel centres at integer indices)

so a rotated, anisotropic scan maps correctly both ways. ``NaN`` rows (missing landmarks) pass through unchanged.

Explained in notebooks/02_data.ipynb.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np

from h3de_lite.data.case import Case, validate_spacing
from h3de_lite.data.landmarks import LANDMARK_NAMES
from h3de_lite.files import atomic_output

__all__ = [
    "read_nifti",
    "write_nifti",
    "voxel_to_world",
    "world_to_voxel",
    "spacing_from_affine",
    "load_nifti_case",
    "reorient_to_ras",
]

NIFTI_SUFFIXES: tuple[str, ...] = (".nii", ".nii.gz")


def _check_affine(affine: np.ndarray, *, what: str = "affine") -> np.ndarray:
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4):
        raise ValueError(f"{what} must be a (4, 4) voxel → world matrix, got shape {affine.shape}")
    if not np.all(np.isfinite(affine)):
        raise ValueError(f"{what} holds NaN or infinite values: {affine.tolist()}")
    if not np.allclose(affine[3], [0.0, 0.0, 0.0, 1.0]):
        raise ValueError(f"{what} last row must be [0, 0, 0, 1], got {affine[3].tolist()}")
    if abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise ValueError(f"{what} is singular (a zero-size voxel axis); check the image header: {affine.tolist()}")
    return affine


def _check_points(points: np.ndarray, *, what: str = "points") -> np.ndarray:
    points = np.asarray(points, dtype=np.float64)
    if points.ndim == 0 or points.shape[-1] != 3:
        raise ValueError(f"{what} must have shape (..., 3), got shape {points.shape}")
    return points


def voxel_to_world(points: np.ndarray | Sequence[float], affine: np.ndarray) -> np.ndarray:
    """Map voxel coordinates (array-axis order) to world coordinates (RAS, mm) through ``affine``.

    Implements ``world = A[:3, :3] @ voxel + A[:3, 3]``; ``NaN`` rows (missing landmarks) stay ``NaN``.

    Args:
        points: voxel coordinates, last axis of size 3.
        affine: ``(4, 4)`` voxel → world matrix.

    Shape:
        - points: ``(..., 3)``
        - output: ``(..., 3)``

    Example:
        >>> voxel_to_world(np.array([[1.0, 2.0, 3.0]]), np.diag([0.5, 0.5, 2.0, 1.0])).shape
        (1, 3)

    Explained in notebooks/02_data.ipynb.
    """
    points = _check_points(points)
    affine = _check_affine(affine)
    return points @ affine[:3, :3].T + affine[:3, 3]


def world_to_voxel(points: np.ndarray | Sequence[float], affine: np.ndarray) -> np.ndarray:
    """Map world coordinates (RAS, mm) to voxel coordinates (array-axis order): the inverse of :func:`voxel_to_world`.

    Solves ``A[:3, :3] @ voxel = world - A[:3, 3]``; ``NaN`` rows stay ``NaN``.

    Args:
        points: world coordinates in mm, last axis of size 3.
        affine: ``(4, 4)`` voxel → world matrix.

    Shape:
        - points: ``(..., 3)``
        - output: ``(..., 3)``

    Example:
        >>> world_to_voxel(np.array([[0.5, 1.0, 6.0]]), np.diag([0.5, 0.5, 2.0, 1.0])).shape
        (1, 3)

    Explained in notebooks/02_data.ipynb.
    """
    points = _check_points(points)
    affine = _check_affine(affine)
    flat = points.reshape(-1, 3) - affine[:3, 3]
    voxels = np.linalg.solve(affine[:3, :3], flat.T).T
    return voxels.reshape(points.shape)


def spacing_from_affine(affine: np.ndarray) -> np.ndarray:
    """Voxel size in mm along each array axis: the lengths of the affine's first three columns.

    Args:
        affine: ``(4, 4)`` voxel → world matrix.

    Shape:
        - affine: ``(4, 4)``
        - output: ``(3,)``

    Example:
        >>> spacing_from_affine(np.diag([0.5, 0.5, 2.0, 1.0])).shape
        (3,)

    Explained in notebooks/02_data.ipynb.
    """
    affine = _check_affine(affine)
    return np.linalg.norm(affine[:3, :3], axis=0)


def reorient_to_ras(volume: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The same image with its array axes permuted and flipped to the closest RAS order, and its new affine.

    Exact (no interpolation): array axis 0 then runs closest to left → right, axis 1 to posterior → anterior, axis 2
    to inferior → superior, as in the templates and phantoms h3de-lite trains on. Both affines describe the same
    world, so a voxel coordinate ``v`` of the output is ``world_to_voxel(voxel_to_world(v, ras_affine), affine)`` in
    the input. An oblique acquisition keeps its obliquity (up to 45° about the nearest axes).

    Args:
        volume: ``(D, H, W)`` as stored.
        affine: its ``(4, 4)`` voxel → world (RAS mm) matrix.

    Shape:
        - volume: ``(D, H, W)``
        - output: ``(volume (D', H', W'), affine (4, 4))``, ``(D', H', W')`` a permutation of ``(D, H, W)``

    Example:
        >>> lps = np.diag([-1.0, -1.0, 2.0, 1.0])
        >>> volume, ras = reorient_to_ras(np.zeros((4, 5, 6)), lps)
        >>> volume.shape, np.diag(ras).tolist()
        ((4, 5, 6), [1.0, 1.0, 2.0, 1.0])

    Explained in notebooks/09_real_anatomy.ipynb.
    """
    from nibabel import orientations

    affine = _check_affine(affine)
    volume = np.asarray(volume)
    if volume.ndim != 3:
        raise ValueError(f"volume must be 3D (D, H, W), got shape {volume.shape}")
    ornt = orientations.io_orientation(affine)
    out = np.ascontiguousarray(orientations.apply_orientation(volume, ornt))
    return out, affine @ orientations.inv_ornt_aff(ornt, volume.shape)


def _require_file(path: str | Path, *, what: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist; check the path")
    return path


def read_nifti(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read a 3D NIfTI image (``.nii`` or ``.nii.gz``) and its voxel → world (RAS, mm) affine.

    The volume keeps its stored dtype unless the header asks for intensity scaling (``scl_slope``/``scl_inter``),
    in which case nibabel returns scaled floats. A 4D image with a single volume (``(D, H, W, 1)``) is squeezed.

    Args:
        path: the image file.

    Shape:
        - output: volume ``(D, H, W)``; affine ``(4, 4)``

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     write_nifti(f"{folder}/case.nii.gz", np.zeros((16, 16, 8), np.int16), np.diag([0.5, 0.5, 1.0, 1.0]))
        ...     volume, affine = read_nifti(f"{folder}/case.nii.gz")
        >>> volume.shape, affine.shape
        ((16, 16, 8), (4, 4))

    Explained in notebooks/02_data.ipynb.
    """
    path = _require_file(path, what="NIfTI image")
    try:
        image = nib.load(str(path))
        volume = np.asanyarray(image.dataobj)
        affine = np.asarray(image.affine, dtype=np.float64)
    except Exception as exc:  # nibabel raises many types for corrupt or foreign files
        raise ValueError(f"could not read NIfTI image {str(path)!r}: {exc}") from exc
    if volume.ndim == 4 and volume.shape[3] == 1:
        volume = volume[..., 0]
    if volume.ndim != 3:
        raise ValueError(f"NIfTI image {str(path)!r} must hold one 3D volume, got shape {volume.shape}")
    return np.ascontiguousarray(volume), _check_affine(affine, what=f"affine of {str(path)!r}")


def write_nifti(path: str | Path, volume: np.ndarray, affine: np.ndarray) -> None:
    """Write a 3D volume and its voxel → world (RAS, mm) affine as NIfTI-1, atomically (temporary file + rename).

    Both the sform and the qform are set (code 1, scanner) and units are mm. The header stores the affine in
    float32, so reading it back agrees to about 1e-7 relative.

    Args:
        path: output file ending in ``.nii`` or ``.nii.gz`` (gzip-compressed).
        volume: ``(D, H, W)`` array, written in its own dtype (float64 is stored as float32).
        affine: ``(4, 4)`` voxel → world matrix.

    Shape:
        - volume: ``(D, H, W)``; affine ``(4, 4)``

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     write_nifti(f"{folder}/case.nii.gz", np.zeros((4, 5, 6), np.int16), np.eye(4))
        ...     read_nifti(f"{folder}/case.nii.gz")[0].shape
        (4, 5, 6)

    Explained in notebooks/02_data.ipynb.
    """
    path = Path(path)
    if not path.name.endswith(NIFTI_SUFFIXES):
        raise ValueError(f"NIfTI path {str(path)!r} must end in .nii or .nii.gz")
    volume = np.asarray(volume)
    if volume.ndim != 3:
        raise ValueError(f"volume for {str(path)!r} must be 3D (D, H, W), got shape {volume.shape}")
    if volume.dtype == np.float64:
        volume = volume.astype(np.float32)
    affine = _check_affine(affine)
    image = nib.Nifti1Image(volume, affine)
    image.set_sform(affine, code=1)
    image.set_qform(affine, code=1)
    image.header.set_xyzt_units(xyz="mm")
    with atomic_output(path) as tmp:
        nib.save(image, str(tmp))


def load_nifti_case(
    image_path: str | Path,
    markups_path: str | Path,
    *,
    case_id: str | None = None,
    names: Sequence[str] = LANDMARK_NAMES,
) -> Case:
    """Read a NIfTI image plus its landmarks (``.mrk.json``, ``.fcsv`` or ``.csv``) into a :class:`Case`.

    World (RAS) landmark positions go through the inverse affine to voxel coordinates, and rows are ordered by
    ``names``: a name absent from the markups file becomes a ``NaN`` row (missing landmark).

    Args:
        image_path: the NIfTI image.
        markups_path: the landmark file, read with :func:`h3de_lite.data.markups.read_markups`.
        case_id: identifier; defaults to the image file name without its extension.
        names: landmark names giving the row order (default: the 14 MML names).

    Raises:
        FileNotFoundError: either file is missing.
        ValueError: a label is not one of ``names``, the file holds more points than ``names``, or a landmark
            falls outside the volume.

    Shape:
        - output: ``Case`` with volume ``(D, H, W)``, landmarks ``(L, 3)``, spacing ``(3,)``

    Example:
        >>> import tempfile
        >>> from h3de_lite.data.markups import write_markups
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     write_nifti(f"{folder}/0001.nii.gz", np.zeros((16, 16, 8), np.int16), np.eye(4))
        ...     write_markups(f"{folder}/0001.mrk.json", {"La": np.array([4.0, 5.0, 6.0])})  # RAS mm
        ...     case = load_nifti_case(f"{folder}/0001.nii.gz", f"{folder}/0001.mrk.json")
        >>> case.landmarks.shape
        (14, 3)

    Explained in notebooks/02_data.ipynb.
    """
    from h3de_lite.data.markups import read_markups  # markups imports this module's affine helpers

    image_path = Path(image_path)
    markups_path = Path(markups_path)
    volume, affine = read_nifti(image_path)
    points = read_markups(markups_path)
    names = tuple(names)
    if len(points) > len(names):
        raise ValueError(
            f"markups file {str(markups_path)!r} holds {len(points)} points but only {len(names)} landmarks are "
            f"expected ({', '.join(names)})"
        )
    unknown = sorted(set(points) - set(names))
    if unknown:
        raise ValueError(
            f"markups file {str(markups_path)!r} has unknown landmark labels {unknown}; "
            f"expected labels among {', '.join(names)}"
        )
    world = np.full((len(names), 3), np.nan)
    for row, name in enumerate(names):
        if name in points:
            world[row] = points[name]
    landmarks = world_to_voxel(world, affine)
    if case_id is None:
        case_id = image_path.name
        for suffix in NIFTI_SUFFIXES[::-1]:
            if case_id.endswith(suffix):
                case_id = case_id[: -len(suffix)]
                break
    spacing = validate_spacing(spacing_from_affine(affine), what=f"spacing of {str(image_path)!r}")
    try:
        return Case(volume=volume, landmarks=landmarks, spacing=spacing, case_id=case_id, affine=affine, names=names)
    except ValueError as exc:
        raise ValueError(f"landmarks of {str(markups_path)!r} do not fit image {str(image_path)!r}: {exc}") from exc
