"""The MML release layout (He et al. 2024): one folder per split, three files per case.

::

    root/
      train/  0001_volume.nrrd  0001_label.npy  0001_spacing.npy  ...
      val/    ...
      test/   ...

- ``<id>_volume.nrrd``: the CT volume. Its array axes are the ones ``pynrrd`` returns by default
  (``index_order="F"``, the file's fastest axis first), exactly as the reference loader reads them; landmark
  coordinates index this array. h3de-lite also stores the voxel → world geometry in the header
  (``space: left-posterior-superior``, ``space directions``, ``space origin``) so Slicer shows the scan at its size.
- ``<id>_label.npy``: ``(14, 3)`` voxel coordinates in array-axis order, rows in ``LANDMARK_NAMES`` order. The
  release marks a missing landmark with a row of values below -100; we write ``-1000.0`` and read any row holding
  a value below -100 as ``NaN``. The sentinel never leaves this module.
- ``<id>_spacing.npy``: ``(3,)`` voxel size in mm, same axis order. It is the source of truth for spacing.

Writes are atomic (temporary file + ``os.replace``), and the volume is written last, so a case only appears in
:func:`list_mml_cases` once all three files are complete.

Explained in notebooks/02_data.ipynb.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import nrrd
import numpy as np

from h3de_lite.data.case import Case, validate_spacing
from h3de_lite.data.landmarks import LANDMARK_NAMES
from h3de_lite.data.nifti import spacing_from_affine
from h3de_lite.files import atomic_output

__all__ = [
    "write_mml_case",
    "read_mml_case",
    "read_mml_landmarks",
    "list_mml_cases",
    "mml_paths",
    "MISSING_SENTINEL",
]

MISSING_SENTINEL: float = -1000.0
"""Value written into every coordinate of a missing landmark's row in ``<id>_label.npy`` (the release's convention)."""
_MISSING_BELOW: float = -100.0
_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])
_INT16 = np.iinfo(np.int16)
_HOW_TO_CREATE = "create a synthetic dataset with `h3de-lite phantom --out DIR ...` or point to the MML release"


def mml_paths(directory: str | Path, case_id: str) -> dict[str, Path]:
    """The three file paths of case ``case_id`` in ``directory`` (a split folder).

    Args:
        directory: the split folder, e.g. ``root / "train"``.
        case_id: the case identifier, e.g. ``"0001"``.

    Shape:
        - output: ``{"volume": Path, "label": Path, "spacing": Path}``

    Example:
        >>> sorted(mml_paths("data/train", "0001"))
        ['label', 'spacing', 'volume']

    Explained in notebooks/02_data.ipynb.
    """
    if not isinstance(case_id, str) or not case_id or any(c in case_id for c in "/\\") or case_id in (".", ".."):
        raise ValueError(f"case_id must be a non-empty file-name-safe string (no '/'), got {case_id!r}")
    directory = Path(directory)
    return {kind: directory / f"{case_id}_{kind}.{'nrrd' if kind == 'volume' else 'npy'}"
            for kind in ("volume", "label", "spacing")}  # fmt: skip


def _storage_dtype(volume: np.ndarray) -> np.dtype:
    """int16 when every value is an integer inside the int16 range (raw HU), float32 otherwise."""
    if volume.size == 0:
        return np.dtype(np.float32)
    if np.issubdtype(volume.dtype, np.integer) or np.issubdtype(volume.dtype, np.bool_):
        integral = True
    else:
        integral = bool(np.all(np.isfinite(volume)) and np.all(np.mod(volume, 1) == 0))
    if integral and volume.min() >= _INT16.min and volume.max() <= _INT16.max:
        return np.dtype(np.int16)
    return np.dtype(np.float32)


def _nrrd_header(case: Case) -> dict:
    lps = _RAS_TO_LPS @ case.affine[:3, :4]  # (3, 4): columns are the axis directions, then the origin
    return {
        "space": "left-posterior-superior",
        "space directions": lps[:, :3].T.copy(),  # pynrrd: one row per array axis
        "space origin": lps[:, 3].copy(),
        "kinds": ["domain", "domain", "domain"],
        "encoding": "gzip",
    }


def _save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_output(path) as tmp, tmp.open("wb") as handle:
        np.save(handle, array, allow_pickle=False)


def write_mml_case(directory: str | Path, case: Case) -> None:
    """Write one case in the MML layout into ``directory`` (a split folder, created if needed).

    The volume is stored as int16 when it is integral-valued and fits (raw HU), else float32; missing landmark rows
    are written as ``MISSING_SENTINEL``; the geometry of ``case.affine`` goes into the NRRD header.

    Args:
        directory: the split folder, e.g. ``root / "train"``.
        case: the case; ``case.case_id`` names the files.

    Raises:
        ValueError: empty or unsafe ``case_id``, or ``case.affine`` whose voxel size disagrees with ``case.spacing``.

    Shape:
        - case.volume ``(D, H, W)``; case.landmarks ``(L, 3)``; case.spacing ``(3,)``

    Example:
        >>> import tempfile
        >>> case = Case(volume=np.zeros((8, 8, 4)), landmarks=np.full((14, 3), np.nan), spacing=[1, 1, 2],
        ...             case_id="0001")
        >>> with tempfile.TemporaryDirectory() as root:  # e.g. "data"
        ...     write_mml_case(f"{root}/train", case)
        ...     read_mml_case(f"{root}/train", "0001").volume.shape
        (8, 8, 4)

    Explained in notebooks/02_data.ipynb.
    """
    paths = mml_paths(directory, case.case_id)
    implied = spacing_from_affine(case.affine)
    if not np.allclose(implied, case.spacing, rtol=1e-5, atol=1e-8):
        raise ValueError(
            f"case {case.case_id!r}: affine implies voxel size {implied.tolist()} mm but spacing is "
            f"{case.spacing.tolist()} mm; build the Case with a matching affine (or affine=None)"
        )
    labels = np.where(np.isnan(case.landmarks), MISSING_SENTINEL, case.landmarks)
    labels[~case.present] = MISSING_SENTINEL  # a row with any NaN is missing as a whole
    volume = np.asarray(case.volume)
    volume = volume.astype(_storage_dtype(volume), copy=False)
    _save_npy(paths["label"], labels.astype(np.float64))
    _save_npy(paths["spacing"], case.spacing.astype(np.float64))
    with atomic_output(paths["volume"]) as tmp:
        nrrd.write(str(tmp), volume, header=_nrrd_header(case), compression_level=1)


def _load_npy(path: Path, *, what: str) -> np.ndarray:
    if not path.is_file():
        raise FileNotFoundError(f"{what} file {str(path)!r} does not exist; each MML case needs "
                                f"<id>_volume.nrrd, <id>_label.npy and <id>_spacing.npy")  # fmt: skip
    try:
        return np.load(path, allow_pickle=False)
    except Exception as exc:  # numpy raises ValueError, OSError, EOFError, UnpicklingError...
        raise ValueError(f"could not read {what} file {str(path)!r}: {exc}") from exc


def read_mml_landmarks(directory: str | Path, case_id: str, *, num_landmarks: int = len(LANDMARK_NAMES)) -> np.ndarray:
    """Read only the landmarks of one case (cheap: no volume), with missing rows as ``NaN``.

    Args:
        directory: the split folder.
        case_id: the case identifier.
        num_landmarks: expected number of rows.

    Shape:
        - output: ``(L, 3)`` float64 voxel coordinates, ``NaN`` rows for missing landmarks

    Example:
        >>> import tempfile
        >>> case = Case(volume=np.zeros((8, 8, 4)), landmarks=np.full((14, 3), np.nan), spacing=[1, 1, 2],
        ...             case_id="0001")
        >>> with tempfile.TemporaryDirectory() as folder:  # e.g. "data/train"
        ...     write_mml_case(folder, case)
        ...     read_mml_landmarks(folder, "0001").shape
        (14, 3)

    Explained in notebooks/02_data.ipynb.
    """
    path = mml_paths(directory, case_id)["label"]
    labels = _load_npy(path, what="landmark").astype(np.float64)
    if labels.shape != (num_landmarks, 3):
        raise ValueError(f"landmark file {str(path)!r} has shape {labels.shape}, expected ({num_landmarks}, 3)")
    missing = np.any(labels < _MISSING_BELOW, axis=1) | np.any(np.isnan(labels), axis=1)
    labels[missing] = np.nan
    return labels


def _affine_from_header(header: dict, spacing: np.ndarray, path: Path) -> np.ndarray:
    """Voxel → RAS affine from the NRRD geometry, or ``diag(spacing, 1)`` when the header has none that agrees."""
    fallback = np.diag([*spacing, 1.0])
    directions = header.get("space directions")
    if directions is None:
        return fallback
    try:
        directions = np.asarray(directions, dtype=np.float64)
        origin = np.asarray(header.get("space origin", np.zeros(3)), dtype=np.float64)
    except (TypeError, ValueError):
        return fallback
    if directions.shape != (3, 3) or origin.shape != (3,) or not np.all(np.isfinite(directions)):
        return fallback
    space = str(header.get("space", "left-posterior-superior")).lower()
    to_ras = {"left-posterior-superior": _RAS_TO_LPS, "lps": _RAS_TO_LPS,
              "right-anterior-superior": np.eye(3), "ras": np.eye(3)}.get(space)  # fmt: skip
    if to_ras is None:
        return fallback
    affine = np.eye(4)
    affine[:3, :3] = to_ras @ directions.T
    affine[:3, 3] = to_ras @ origin
    if not np.allclose(np.linalg.norm(affine[:3, :3], axis=0), spacing, rtol=1e-4):
        warnings.warn(
            f"{str(path)!r}: header voxel size {np.linalg.norm(affine[:3, :3], axis=0).tolist()} disagrees with "
            f"the spacing file {spacing.tolist()}; using the spacing file and an axis-aligned affine",
            stacklevel=3,
        )
        return fallback
    return affine


def read_mml_case(directory: str | Path, case_id: str) -> Case:
    """Read one case from the MML layout.

    Args:
        directory: the split folder, e.g. ``root / "train"``.
        case_id: the case identifier, e.g. ``"0001"``.

    Raises:
        FileNotFoundError: one of the three files is missing (the message names it).
        ValueError: a file cannot be parsed, or has the wrong shape, or spacing is invalid, or a landmark lies
            outside the volume.

    Shape:
        - output: ``Case`` with volume ``(D, H, W)`` (int16 or float32 as stored), landmarks ``(L, 3)`` with ``NaN``
          rows for missing landmarks, spacing ``(3,)``

    Example:
        >>> import tempfile
        >>> case = Case(volume=np.zeros((8, 8, 4)), landmarks=np.full((14, 3), np.nan), spacing=[1, 1, 2],
        ...             case_id="0001")
        >>> with tempfile.TemporaryDirectory() as folder:  # e.g. "data/train"
        ...     write_mml_case(folder, case)
        ...     read_mml_case(folder, "0001").landmarks.shape
        (14, 3)

    Explained in notebooks/02_data.ipynb.
    """
    paths = mml_paths(directory, case_id)
    landmarks = read_mml_landmarks(directory, case_id)
    spacing = _load_npy(paths["spacing"], what="spacing").astype(np.float64).reshape(-1)
    validate_spacing(spacing, what=f"spacing file {str(paths['spacing'])!r}")
    if not paths["volume"].is_file():
        raise FileNotFoundError(f"volume file {str(paths['volume'])!r} does not exist")
    try:
        volume, header = nrrd.read(str(paths["volume"]))
    except Exception as exc:  # pynrrd raises NRRDError, ValueError, OSError, zlib.error...
        raise ValueError(f"could not read volume file {str(paths['volume'])!r}: {exc}") from exc
    if volume.ndim != 3:
        raise ValueError(f"volume file {str(paths['volume'])!r} must hold a 3D volume, got shape {volume.shape}")
    affine = _affine_from_header(header, spacing, paths["volume"])
    try:
        return Case(
            volume=np.ascontiguousarray(volume), landmarks=landmarks, spacing=spacing, case_id=case_id, affine=affine
        )
    except ValueError as exc:
        raise ValueError(f"{str(paths['label'])!r} does not fit {str(paths['volume'])!r}: {exc}") from exc


def list_mml_cases(root: str | Path, split: str) -> list[str]:
    """Sorted ids of the cases in ``root / split`` (every ``<id>_volume.nrrd``).

    Args:
        root: the dataset folder holding the split folders.
        split: ``"train"``, ``"val"``, ``"test"`` or any other split folder name.

    Raises:
        FileNotFoundError: ``root`` or ``root / split`` does not exist (the message says how to create data).

    Shape:
        - output: ``list[str]``

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as root:  # e.g. "data"
        ...     for case_id in ("0002", "0001"):
        ...         write_mml_case(f"{root}/train", Case(volume=np.zeros((8, 8, 4)), landmarks=np.full((14, 3), np.nan),
        ...                                              spacing=[1, 1, 2], case_id=case_id))
        ...     list_mml_cases(root, "train")
        ['0001', '0002']

    Explained in notebooks/02_data.ipynb.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset root {str(root)!r} does not exist; {_HOW_TO_CREATE}")
    folder = root / split
    if not folder.is_dir():
        present = sorted(p.name for p in root.iterdir() if p.is_dir())
        raise FileNotFoundError(
            f"split folder {str(folder)!r} does not exist (found splits: {present}); {_HOW_TO_CREATE}"
        )
    suffix = "_volume.nrrd"
    return sorted(p.name[: -len(suffix)] for p in folder.iterdir() if p.name.endswith(suffix) and p.is_file()
                  and not p.name.startswith(".tmp-"))  # fmt: skip
