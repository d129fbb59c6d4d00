"""Reading a scan without its labels: NIfTI or NRRD (an MML ``<id>_volume.nrrd`` included) as a :class:`Case`.

The one reader of images for prediction (:mod:`h3de_lite.inference`, :mod:`h3de_lite.evaluation`): it never opens a
label file.

Explained in notebooks/02_data.ipynb.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from h3de_lite.data.case import Case, validate_spacing
from h3de_lite.data.nifti import NIFTI_SUFFIXES, read_nifti, spacing_from_affine

__all__ = ["IMAGE_SUFFIXES", "read_image", "strip_image_suffix"]

#: File endings of the images h3de-lite reads.
IMAGE_SUFFIXES: tuple[str, ...] = (*NIFTI_SUFFIXES, ".nrrd")


def strip_image_suffix(name: str) -> str | None:
    """The file name without its image ending, or None when it is not a NIfTI/NRRD name.

    Example:
        >>> strip_image_suffix("scan.nii.gz"), strip_image_suffix("notes.txt")
        ('scan', None)
    """
    for suffix in IMAGE_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return None


def read_image(path: str | Path) -> Case:
    """A stored volume (NIfTI ``.nii``/``.nii.gz`` or NRRD), its spacing and voxel → world (RAS) affine; no labels.

    NIfTI: the image affine. NRRD: the header's ``space directions``/``space origin`` (LPS or RAS), else its
    ``spacings``; an MML volume ``<id>_volume.nrrd`` takes its spacing from ``<id>_spacing.npy`` beside it, exactly as
    :func:`~h3de_lite.data.mml.read_mml_case` reads it (the case id drops ``_volume``).

    Args:
        path: the image file.

    Raises:
        FileNotFoundError: no such file.
        ValueError: unsupported name, unreadable file, not 3D, or no voxel size.

    Shape:
        output ``Case`` with volume ``(D, H, W)`` and landmarks ``(0, 3)``.

    Example:
        >>> import tempfile
        >>> from h3de_lite.data.nifti import write_nifti
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     write_nifti(f"{folder}/scan.nii.gz", np.zeros((8, 8, 4), np.int16), np.diag([0.5, 0.5, 1.0, 1.0]))
        ...     read_image(f"{folder}/scan.nii.gz").volume.shape
        (8, 8, 4)
    """
    path = Path(path)
    stem = strip_image_suffix(path.name)
    if stem is None:
        raise ValueError(f"{str(path)!r} is not a NIfTI (.nii, .nii.gz) or NRRD (.nrrd) image; pass one of those")
    if not path.is_file():
        raise FileNotFoundError(f"image {str(path)!r} does not exist; check the path")
    if path.name.endswith(NIFTI_SUFFIXES):
        volume, affine = read_nifti(path)
        spacing = spacing_from_affine(affine)
        return Case(volume=volume, landmarks=np.zeros((0, 3)), spacing=spacing, case_id=stem, affine=affine, names=())
    import nrrd

    from h3de_lite.data.mml import _affine_from_header  # the one NRRD-geometry reader of the package

    try:
        volume, header = nrrd.read(str(path))
    except Exception as exc:  # pynrrd raises NRRDError, ValueError, OSError, zlib.error...
        raise ValueError(f"could not read NRRD image {str(path)!r}: {exc}") from exc
    if volume.ndim != 3:
        raise ValueError(f"NRRD image {str(path)!r} must hold one 3D volume, got shape {volume.shape}")
    case_id = stem[: -len("_volume")] if stem.endswith("_volume") else stem
    spacing_file = path.with_name(f"{case_id}_spacing.npy")
    if stem.endswith("_volume") and spacing_file.is_file():
        spacing = np.load(spacing_file, allow_pickle=False).astype(np.float64).reshape(-1)
    elif header.get("space directions") is not None:
        spacing = np.linalg.norm(np.asarray(header["space directions"], dtype=np.float64), axis=1)
    elif header.get("spacings") is not None:
        spacing = np.asarray(header["spacings"], dtype=np.float64)
    else:
        raise ValueError(f"NRRD image {str(path)!r} gives no voxel size (no 'space directions' or 'spacings' field)")
    spacing = validate_spacing(spacing, what=f"voxel size of {str(path)!r}")
    affine = _affine_from_header(header, spacing, path)
    return Case(volume=np.ascontiguousarray(volume), landmarks=np.zeros((0, 3)), spacing=spacing, case_id=case_id,
                affine=affine, names=())  # fmt: skip
