"""h3de_lite.data.afids: the wheel cache (SHA-256, no network in tests), reading the template and its named fiducials.

Every file here is synthetic and written by the test: a small NIfTI with a rotated, anisotropic affine and an
AFIDs-style ``.fcsv`` (numbers in the label column, names in the description column, RAS). Nothing is downloaded.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest

from h3de_lite.data import afids
from h3de_lite.data.afids import (
    AFIDS_NAMES,
    FIDUCIALS_MEMBER,
    TEMPLATE_MEMBER,
    WHEEL_NAME,
    extract_afids_files,
    fetch_afids_wheel,
    load_afids_template,
    read_afids,
    sha256_file,
    synthetic_afids_template,
)
from h3de_lite.data.augment import rotation_matrix
from h3de_lite.data.markups import read_markups
from h3de_lite.data.nifti import voxel_to_world, write_nifti

SHAPE = (24, 28, 20)


def _affine() -> np.ndarray:
    affine = np.eye(4)
    affine[:3, :3] = rotation_matrix([10.0, -5.0, 20.0]) @ np.diag([1.5, 1.0, 2.0])
    affine[:3, 3] = [-20.0, -15.0, -12.0]
    return affine


def _write_fcsv(path: Path, names: tuple[str, ...], world: np.ndarray) -> None:
    """An ``.fcsv`` laid out as the AFIDs ground truth: RAS (``CoordinateSystem = 0``), label = number, desc = name."""
    lines = ["# Markups fiducial file version = 4.6", "# CoordinateSystem = 0",
             "# columns = id,x,y,z,ow,ox,oy,oz,vis,sel,lock,label,desc,associatedNodeID"]  # fmt: skip
    for i, (name, (x, y, z)) in enumerate(zip(names, world.tolist(), strict=True), start=1):
        lines.append(f"vtkMRMLMarkupsFiducialNode_{i},{x!r},{y!r},{z!r},0,0,0,1,1,1,0,{i},{name},vtkMRMLVolume1")
    path.write_text("\n".join(lines))


def _synthetic_files(folder: Path, names: tuple[str, ...] = AFIDS_NAMES) -> tuple[Path, Path, np.ndarray]:
    rng = np.random.default_rng(0)
    voxels = rng.uniform(3, np.asarray(SHAPE) - 4, size=(len(names), 3))
    world = voxel_to_world(voxels, _affine())
    image, fcsv = folder / "tpl_T1w.nii.gz", folder / "tpl_afids.fcsv"
    write_nifti(image, rng.integers(0, 1000, SHAPE).astype(np.int16), _affine())
    _write_fcsv(fcsv, names, world)
    return image, fcsv, voxels


def _fake_wheel(folder: Path) -> Path:
    image, fcsv, _ = _synthetic_files(folder)
    wheel = folder / "built.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.write(image, TEMPLATE_MEMBER)
        archive.write(fcsv, FIDUCIALS_MEMBER)
        archive.writestr("autoafids/__init__.py", "")
    return wheel


# ---------------------------------------------------------------------------------------------------- markups names
def test_read_markups_takes_names_from_the_description_column(tmp_path: Path) -> None:
    _, fcsv, _ = _synthetic_files(tmp_path)
    by_label = read_markups(fcsv)
    by_description = read_markups(fcsv, name_from="description")
    assert list(by_label) == [str(i) for i in range(1, 33)]
    assert tuple(by_description) == AFIDS_NAMES
    np.testing.assert_array_equal(by_description["AC"], by_label["1"])


def test_read_markups_description_in_mrk_json_and_not_in_csv(tmp_path: Path) -> None:
    doc = {"markups": [{"type": "Fiducial", "coordinateSystem": "RAS", "controlPoints": [
        {"label": "F-1", "description": "AC", "position": [1.0, 2.0, 3.0], "positionStatus": "defined"}]}]}  # fmt: skip
    path = tmp_path / "p.mrk.json"
    path.write_text(__import__("json").dumps(doc))
    assert list(read_markups(path, name_from="description")) == ["AC"]
    (tmp_path / "p.csv").write_text("name,x,y,z\nAC,1,2,3\n")
    with pytest.raises(ValueError, match="no description column"):
        read_markups(tmp_path / "p.csv", name_from="description")
    with pytest.raises(ValueError, match="name_from must be"):
        read_markups(path, name_from="desc")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------------- reading
def test_read_afids_gives_named_fiducials_in_world_and_voxels(tmp_path: Path) -> None:
    image, fcsv, voxels = _synthetic_files(tmp_path)
    template = read_afids(image, fcsv)
    assert template.names == AFIDS_NAMES and template.case.names == AFIDS_NAMES
    assert template.case.volume.shape == SHAPE and template.world.shape == (32, 3)
    np.testing.assert_allclose(template.case.spacing, [1.5, 1.0, 2.0], atol=1e-6)
    np.testing.assert_allclose(template.case.affine, _affine(), atol=1e-5)  # through the library's image reader
    np.testing.assert_allclose(template.case.landmarks, voxels, atol=1e-4)  # RAS mm → voxels through the affine
    np.testing.assert_allclose(voxel_to_world(template.case.landmarks, template.case.affine), template.world, atol=1e-9)


def test_read_afids_refuses_other_names(tmp_path: Path) -> None:
    names = ("AC", "PC", "culmen")
    image, fcsv, _ = _synthetic_files(tmp_path, names)
    with pytest.raises(ValueError, match=r"expected the 32 names given.*missing"):
        read_afids(image, fcsv)
    assert read_afids(image, fcsv, names=None).names == names
    assert read_afids(image, fcsv, names=("culmen", "AC", "PC")).names == ("culmen", "AC", "PC")  # row order


# ---------------------------------------------------------------------------------------------------- the wheel
def test_no_wheel_and_no_download_says_how_to_get_it(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as info:
        fetch_afids_wheel(cache_dir=tmp_path, download=False)
    message = str(info.value)
    assert "pip download --no-deps" in message and "autoafids==0.1.4" in message
    assert str(tmp_path / WHEEL_NAME) in message and afids.WHEEL_SHA256 in message


def test_failed_download_says_how_to_get_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(folder: Path, **_: object) -> Path:
        raise OSError("network is unreachable")

    monkeypatch.setattr(afids, "_download_wheel", offline)
    with pytest.raises(FileNotFoundError, match=r"network is unreachable.*pip download --no-deps"):
        fetch_afids_wheel(cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache" / WHEEL_NAME).exists()


def test_wrong_checksum_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / WHEEL_NAME).write_bytes(b"not the wheel")
    with pytest.raises(ValueError, match="SHA-256"):
        fetch_afids_wheel(cache_dir=tmp_path, download=False)
    (tmp_path / WHEEL_NAME).unlink()

    def served_other(folder: Path, **_: object) -> Path:
        (folder / WHEEL_NAME).write_bytes(b"something else")
        return folder / WHEEL_NAME

    monkeypatch.setattr(afids, "_download_wheel", served_other)
    with pytest.raises(ValueError, match="different file"):
        fetch_afids_wheel(cache_dir=tmp_path)
    assert not (tmp_path / WHEEL_NAME).exists()  # a bad download never lands in the cache


def test_download_lands_in_the_cache_and_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "build").mkdir()
    built = _fake_wheel(tmp_path / "build")
    monkeypatch.setattr(afids, "WHEEL_SHA256", sha256_file(built))
    calls = []

    def download(folder: Path, **_: object) -> Path:
        calls.append(folder)
        (folder / WHEEL_NAME).write_bytes(built.read_bytes())
        return folder / WHEEL_NAME

    monkeypatch.setattr(afids, "_download_wheel", download)
    cache = tmp_path / "cache"
    template = load_afids_template(cache_dir=cache)
    assert template.names == AFIDS_NAMES and template.case.volume.shape == SHAPE
    assert (cache / WHEEL_NAME).is_file() and len(calls) == 1
    assert sorted(p.name for p in cache.iterdir()) == ["autoafids-0.1.4", WHEEL_NAME]  # no temporary left
    load_afids_template(cache_dir=cache, download=False)  # cached: no second download
    assert len(calls) == 1


def test_extract_names_the_missing_member(tmp_path: Path) -> None:
    wheel = tmp_path / "other.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("autoafids/__init__.py", "")
    with pytest.raises(ValueError, match="tpl-MNI152NLin2009cAsym_res-01_T1w.nii.gz"):
        extract_afids_files(wheel, out_dir=tmp_path / "out")
    (tmp_path / "bad.whl").write_bytes(b"zip? no")
    with pytest.raises(ValueError, match="not a readable wheel"):
        extract_afids_files(tmp_path / "bad.whl", out_dir=tmp_path / "out")


def test_synthetic_stand_in_has_the_names_and_a_brain() -> None:
    from h3de_lite.data.atlas import brain_mask

    template = synthetic_afids_template()
    case = template.case
    assert template.names == AFIDS_NAMES and template.image_path is None
    assert case.volume.shape == (96, 114, 96) and case.is_complete
    np.testing.assert_allclose(voxel_to_world(case.landmarks, case.affine), template.world, atol=1e-9)
    i, j = AFIDS_NAMES.index("R MB"), AFIDS_NAMES.index("L MB")
    np.testing.assert_allclose(template.world[i] * [-1, 1, 1], template.world[j])  # pairs mirror across the midline
    assert template.world[AFIDS_NAMES.index("AC"), 0] == 0.0
    mask = brain_mask(case)
    inside = mask[tuple(np.round(case.landmarks).astype(int).T)]
    assert inside.all() and 0.1 < mask.mean() < 0.5
