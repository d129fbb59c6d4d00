"""MML release layout: write → read roundtrips, the missing-landmark sentinel, NRRD geometry, errors."""

from __future__ import annotations

from pathlib import Path

import nrrd
import numpy as np
import pytest

from h3de_lite.data.case import Case
from h3de_lite.data.mml import (
    MISSING_SENTINEL,
    list_mml_cases,
    mml_paths,
    read_mml_case,
    read_mml_landmarks,
    write_mml_case,
)

SPACING = np.array([0.3, 0.4, 1.25])


def make_case(rng: np.random.Generator, *, case_id: str = "0001", float_volume: bool = False, affine=None) -> Case:
    shape = (12, 10, 6)
    volume = rng.integers(-1024, 3000, size=shape).astype(np.float64)  # integral HU held as floats
    if float_volume:
        volume = volume + rng.uniform(0, 1, size=shape)
    landmarks = rng.uniform(0, 5.4, size=(14, 3))
    landmarks[[1, 8]] = np.nan
    return Case(volume=volume, landmarks=landmarks, spacing=SPACING, case_id=case_id, affine=affine)


def test_roundtrip_integral_volume_is_int16(tmp_path: Path, rng: np.random.Generator) -> None:
    case = make_case(rng)
    write_mml_case(tmp_path / "train", case)
    got = read_mml_case(tmp_path / "train", "0001")
    assert got.volume.dtype == np.int16
    np.testing.assert_array_equal(got.volume, case.volume)
    np.testing.assert_array_equal(got.landmarks, case.landmarks)  # NaN rows compare equal here
    np.testing.assert_array_equal(got.spacing, SPACING)
    assert got.case_id == "0001" and got.present.tolist() == case.present.tolist()
    np.testing.assert_allclose(got.affine, np.diag([*SPACING, 1.0]), atol=1e-12)


def test_roundtrip_float_volume_is_float32(tmp_path: Path, rng: np.random.Generator) -> None:
    case = make_case(rng, float_volume=True)
    write_mml_case(tmp_path, case)
    got = read_mml_case(tmp_path, "0001")
    assert got.volume.dtype == np.float32
    np.testing.assert_array_equal(got.volume, case.volume.astype(np.float32))


def test_files_follow_the_release_convention(tmp_path: Path, rng: np.random.Generator) -> None:
    case = make_case(rng)
    write_mml_case(tmp_path, case)
    paths = mml_paths(tmp_path, "0001")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["0001_label.npy", "0001_spacing.npy", "0001_volume.nrrd"]
    labels = np.load(paths["label"])
    assert labels.shape == (14, 3) and np.all(labels[[1, 8]] == MISSING_SENTINEL)
    np.testing.assert_array_equal(labels[0], case.landmarks[0])
    np.testing.assert_array_equal(np.load(paths["spacing"]), SPACING)
    data, header = nrrd.read(str(paths["volume"]))  # default index order, as the reference loader reads it
    np.testing.assert_array_equal(data, case.volume)
    assert header["space"] == "left-posterior-superior"
    np.testing.assert_allclose(np.linalg.norm(header["space directions"], axis=1), SPACING)


def test_release_sentinels_read_as_nan(tmp_path: Path, rng: np.random.Generator) -> None:
    write_mml_case(tmp_path, make_case(rng))
    labels = np.load(mml_paths(tmp_path, "0001")["label"])
    labels[3] = [-100.5, 12.0, 3.0]  # one value below -100 marks the whole row missing
    np.save(mml_paths(tmp_path, "0001")["label"], labels)
    got = read_mml_landmarks(tmp_path, "0001")
    assert np.isnan(got[[1, 3, 8]]).all() and not np.isnan(np.delete(got, [1, 3, 8], axis=0)).any()


def test_oblique_affine_survives_the_nrrd_header(tmp_path: Path, rng: np.random.Generator) -> None:
    c, s = np.cos(0.4), np.sin(0.4)
    affine = np.eye(4)
    affine[:3, :3] = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) @ np.diag(SPACING)
    affine[:3, 3] = [-12.5, 30.25, 7.0]
    write_mml_case(tmp_path, make_case(rng, affine=affine))
    np.testing.assert_allclose(read_mml_case(tmp_path, "0001").affine, affine, atol=1e-9)


def test_header_disagreeing_with_spacing_file_falls_back(tmp_path: Path, rng: np.random.Generator) -> None:
    write_mml_case(tmp_path, make_case(rng))
    np.save(mml_paths(tmp_path, "0001")["spacing"], np.array([1.0, 1.0, 1.0]))
    with pytest.warns(UserWarning, match="spacing file"):
        got = read_mml_case(tmp_path, "0001")
    np.testing.assert_array_equal(got.affine, np.eye(4))


def test_list_cases_sorted_and_clear_errors(tmp_path: Path, rng: np.random.Generator) -> None:
    for cid in ("0010", "0002", "0007"):
        write_mml_case(tmp_path / "val", make_case(rng, case_id=cid))
    assert list_mml_cases(tmp_path, "val") == ["0002", "0007", "0010"]
    with pytest.raises(FileNotFoundError, match=r"h3de-lite phantom --out"):
        list_mml_cases(tmp_path / "nowhere", "train")
    with pytest.raises(FileNotFoundError, match=r"train.*found splits: \['val'\].*h3de-lite phantom"):
        list_mml_cases(tmp_path, "train")


def test_missing_files_are_named(tmp_path: Path, rng: np.random.Generator) -> None:
    write_mml_case(tmp_path, make_case(rng))
    for kind in ("volume", "spacing", "label"):
        mml_paths(tmp_path, "0001")[kind].unlink()
        with pytest.raises(FileNotFoundError, match=f"0001_{kind}"):
            read_mml_case(tmp_path, "0001")


def test_unreadable_and_malformed_files(tmp_path: Path, rng: np.random.Generator) -> None:
    write_mml_case(tmp_path, make_case(rng))
    paths = mml_paths(tmp_path, "0001")
    paths["volume"].write_bytes(b"NRRD0004\ngarbage")
    with pytest.raises(ValueError, match="0001_volume.nrrd"):
        read_mml_case(tmp_path, "0001")
    paths["label"].write_bytes(b"not numpy")
    with pytest.raises(ValueError, match="0001_label.npy"):
        read_mml_case(tmp_path, "0001")
    np.save(paths["label"], np.zeros((13, 3)))
    with pytest.raises(ValueError, match=r"0001_label.npy.*\(13, 3\).*\(14, 3\)"):
        read_mml_case(tmp_path, "0001")


@pytest.mark.parametrize("spacing", [[1.0, np.nan, 1.0], [1.0, 0.0, 1.0], [1.0, 1.0]])
def test_bad_spacing_file(tmp_path: Path, rng: np.random.Generator, spacing: list[float]) -> None:
    write_mml_case(tmp_path, make_case(rng))
    np.save(mml_paths(tmp_path, "0001")["spacing"], np.array(spacing))
    with pytest.raises(ValueError, match="0001_spacing.npy"):
        read_mml_case(tmp_path, "0001")


def test_landmark_outside_volume(tmp_path: Path, rng: np.random.Generator) -> None:
    write_mml_case(tmp_path, make_case(rng))
    labels = np.load(mml_paths(tmp_path, "0001")["label"])
    labels[0] = [50.0, 1.0, 1.0]
    np.save(mml_paths(tmp_path, "0001")["label"], labels)
    with pytest.raises(ValueError, match="0001_label.npy.*outside the volume"):
        read_mml_case(tmp_path, "0001")


def test_write_rejects_bad_case(tmp_path: Path, rng: np.random.Generator) -> None:
    case = make_case(rng)
    case.case_id = "a/b"
    with pytest.raises(ValueError, match="case_id"):
        write_mml_case(tmp_path, case)
    with pytest.raises(ValueError, match="affine implies voxel size"):
        write_mml_case(tmp_path, make_case(rng, affine=np.eye(4)))
