"""NIfTI I/O, voxel ↔ world conversions through the affine, and loading a NIfTI + markups pair into a Case."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from h3de_lite.data.landmarks import LANDMARK_NAMES
from h3de_lite.data.markups import write_markups
from h3de_lite.data.nifti import (
    load_nifti_case,
    read_nifti,
    spacing_from_affine,
    voxel_to_world,
    world_to_voxel,
    write_nifti,
)


def _rotation(ax: float, ay: float, az: float) -> np.ndarray:
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


SPACING = np.array([0.3, 0.45, 1.25])


def oblique_affine() -> np.ndarray:
    """Rotated (no shear), anisotropic, translated voxel → RAS affine."""
    affine = np.eye(4)
    affine[:3, :3] = _rotation(0.3, -0.5, 1.1) @ np.diag(SPACING)
    affine[:3, 3] = [-95.25, 120.5, -310.75]
    return affine


def test_world_voxel_world_roundtrip_is_exact_for_oblique_anisotropic_affine(rng: np.random.Generator) -> None:
    affine = oblique_affine()
    world = rng.uniform(-300, 300, size=(1000, 3))
    back = voxel_to_world(world_to_voxel(world, affine), affine)
    assert np.max(np.abs(back - world)) < 1e-5
    voxels = rng.uniform(-5, 500, size=(1000, 3))
    assert np.max(np.abs(world_to_voxel(voxel_to_world(voxels, affine), affine) - voxels)) < 1e-8


def test_voxel_to_world_hand_computed() -> None:
    affine = np.diag([0.5, 2.0, 3.0, 1.0])
    affine[:3, 3] = [10.0, 20.0, 30.0]
    np.testing.assert_allclose(voxel_to_world(np.array([1.0, 2.0, 3.0]), affine), [10.5, 24.0, 39.0])
    np.testing.assert_allclose(world_to_voxel(np.array([10.5, 24.0, 39.0]), affine), [1.0, 2.0, 3.0])


def test_nan_rows_pass_through() -> None:
    affine = oblique_affine()
    points = np.array([[1.0, 2.0, 3.0], [np.nan, np.nan, np.nan]])
    world = voxel_to_world(points, affine)
    assert np.isnan(world[1]).all() and np.isfinite(world[0]).all()
    assert np.isnan(world_to_voxel(world, affine)[1]).all()


def test_spacing_from_oblique_affine() -> None:
    np.testing.assert_allclose(spacing_from_affine(oblique_affine()), SPACING, rtol=1e-12)


@pytest.mark.parametrize("bad", [np.eye(3), np.zeros((4, 4)), np.full((4, 4), np.nan)])
def test_bad_affine_raises(bad: np.ndarray) -> None:
    with pytest.raises(ValueError, match="affine"):
        voxel_to_world(np.zeros((1, 3)), bad)


def test_points_need_three_coordinates() -> None:
    with pytest.raises(ValueError, match=r"\(\.\.\., 3\)"):
        world_to_voxel(np.zeros((4, 2)), np.eye(4))


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
@pytest.mark.parametrize("dtype", [np.int16, np.float32])
def test_nifti_roundtrip(tmp_path: Path, rng: np.random.Generator, suffix: str, dtype: type) -> None:
    volume = rng.integers(-1000, 3000, size=(6, 7, 5)).astype(dtype)
    path = tmp_path / f"case{suffix}"
    write_nifti(path, volume, oblique_affine())
    got, affine = read_nifti(path)
    assert got.dtype == dtype and got.shape == (6, 7, 5)
    np.testing.assert_array_equal(got, volume)
    np.testing.assert_allclose(affine, oblique_affine(), atol=1e-4)  # the header stores float32
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # atomic write leaves no temporary file


def test_read_nifti_missing_and_corrupt(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.nii.gz"):
        read_nifti(tmp_path / "nope.nii.gz")
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"not a nifti file at all")
    with pytest.raises(ValueError, match="bad.nii.gz"):
        read_nifti(bad)


def test_write_nifti_rejects_bad_input(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="3D"):
        write_nifti(tmp_path / "a.nii.gz", np.zeros((4, 4)), np.eye(4))
    with pytest.raises(ValueError, match=r"\.nii"):
        write_nifti(tmp_path / "a.nrrd", np.zeros((4, 4, 4)), np.eye(4))
    with pytest.raises(ValueError, match="singular"):
        write_nifti(tmp_path / "a.nii.gz", np.zeros((4, 4, 4)), np.diag([1.0, 0.0, 1.0, 1.0]))


@pytest.mark.parametrize("markups_name", ["pts.mrk.json", "pts.fcsv", "pts.csv"])
def test_load_nifti_case_orders_rows_and_converts_to_voxels(
    tmp_path: Path, rng: np.random.Generator, markups_name: str
) -> None:
    affine = oblique_affine()
    volume = rng.integers(-1000, 2000, size=(40, 30, 12)).astype(np.int16)
    write_nifti(tmp_path / "0007.nii.gz", volume, affine)
    voxels = rng.uniform(1, 10, size=(14, 3))
    missing = [2, 9]
    world = voxel_to_world(voxels, affine)
    points = {name: world[i] for i, name in enumerate(LANDMARK_NAMES) if i not in missing}
    points = dict(reversed(list(points.items())))  # file order differs from LANDMARK_NAMES order
    write_markups(tmp_path / markups_name, points)
    case = load_nifti_case(tmp_path / "0007.nii.gz", tmp_path / markups_name)
    assert case.case_id == "0007"
    expected = voxels.copy()
    expected[missing] = np.nan
    np.testing.assert_allclose(case.landmarks, expected, atol=1e-3)
    assert case.present.tolist() == [i not in missing for i in range(14)]
    np.testing.assert_allclose(case.spacing, SPACING, rtol=1e-5)
    np.testing.assert_array_equal(case.volume, volume)


def test_load_nifti_case_errors_name_the_file(tmp_path: Path) -> None:
    write_nifti(tmp_path / "img.nii.gz", np.zeros((10, 10, 10), np.int16), np.eye(4))
    write_markups(tmp_path / "unknown.mrk.json", {"L0": np.array([1.0, 1.0, 1.0]), "Lz": np.array([2.0, 2.0, 2.0])})
    with pytest.raises(ValueError, match=r"unknown\.mrk\.json.*'Lz'"):
        load_nifti_case(tmp_path / "img.nii.gz", tmp_path / "unknown.mrk.json")
    write_markups(tmp_path / "three.fcsv", {n: np.array([1.0, 1.0, 1.0]) for n in LANDMARK_NAMES[:3]})
    with pytest.raises(ValueError, match=r"three\.fcsv.*3 points but only 2"):
        load_nifti_case(tmp_path / "img.nii.gz", tmp_path / "three.fcsv", names=LANDMARK_NAMES[:2])
    write_markups(tmp_path / "far.csv", {"L0": np.array([50.0, 1.0, 1.0])})
    with pytest.raises(ValueError, match=r"far\.csv.*outside the volume"):
        load_nifti_case(tmp_path / "img.nii.gz", tmp_path / "far.csv")
    with pytest.raises(FileNotFoundError, match="absent.mrk.json"):
        load_nifti_case(tmp_path / "img.nii.gz", tmp_path / "absent.mrk.json")
