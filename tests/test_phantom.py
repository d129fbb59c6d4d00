"""Tests of the phantom head-CT generator: geometry, landmark truth, variation, absence, intensities, dataset writer.

Tests that hold for both phantoms run for ``difficulty="v1"`` and ``"v2"``; those of v1-only properties (mirror
symmetry, touching molars, an incomplete case being the complete one minus teeth) pin ``"v1"``. v2's own behaviour is
tested in tests/test_phantom_v2.py, v1's bytes in tests/test_phantom_v1.py."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from h3de_lite.data import phantom
from h3de_lite.data.case import Case
from h3de_lite.data.landmarks import LANDMARK_NAMES
from h3de_lite.data.phantom import (
    DEFAULT_SHAPE,
    HU_RANGES,
    INPLANE_SPACING_MM,
    REQUIRED_FOV_MM,
    SLICE_SPACING_MM,
    Tissue,
    generate_phantom,
    write_phantom_dataset,
)

SMALL = (64, 64, 48)
MEDIUM = (112, 112, 80)
CROWN_TISSUE = {Tissue.ENAMEL, Tissue.DENTIN, Tissue.METAL}  # a cusp tip / crown landmark lies in the (restored) crown
APEX_TISSUE = {Tissue.DENTIN, Tissue.CANCELLOUS, Tissue.CORTICAL}  # a root apex lies in the root tip, in bone
TOOTH_GROUPS = [("0",), ("a", "b", "c"), ("d", "e", "f")]


def _expected_tissue(name: str) -> set[Tissue]:
    return CROWN_TISSUE if name[1] in "0ad" else APEX_TISSUE


def _nearest_label(labels: np.ndarray, point: np.ndarray) -> Tissue:
    return Tissue(int(labels[tuple(np.rint(point).astype(int))]))


def _neighbour_labels(labels: np.ndarray, point: np.ndarray) -> set[Tissue]:
    """Labels of the 8 voxels whose centres surround a sub-voxel point."""
    low = np.floor(point).astype(int)
    high = np.asarray(labels.shape) - 1
    return {Tissue(int(labels[tuple(np.clip(low + o, 0, high))])) for o in np.ndindex(2, 2, 2)}


DIFFICULTIES = ["v1", "v2"]


@pytest.mark.parametrize("difficulty, top", [("v1", 4095), ("v2", 30710)])
def test_case_fields_and_types(difficulty: str, top: int) -> None:
    case, tissue = generate_phantom(seed=3, shape=SMALL, case_id="0007", return_tissue=True, difficulty=difficulty)
    assert isinstance(case, Case)
    assert case.volume.shape == SMALL and case.volume.dtype == np.float32
    assert np.array_equal(case.volume, np.rint(case.volume))  # integral HU, stored as int16 by the MML writer
    assert case.volume.min() >= -1024 and case.volume.max() <= top
    assert case.landmarks.shape == (14, 3) and case.landmarks.dtype == np.float64
    assert case.names == LANDMARK_NAMES and case.case_id == "0007" and case.is_complete
    assert tissue.shape == SMALL and tissue.dtype == np.int8
    assert set(np.unique(tissue)) <= {int(t) for t in Tissue}
    assert np.allclose(case.affine, np.diag([*case.spacing, 1.0]))
    # landmarks are sub-voxel, not rounded
    assert not np.allclose(case.landmarks, np.rint(case.landmarks))


@pytest.mark.parametrize("difficulty", DIFFICULTIES)
def test_deterministic_per_seed(difficulty: str) -> None:
    a = generate_phantom(seed=11, shape=SMALL, incomplete=True, difficulty=difficulty)
    b = generate_phantom(seed=11, shape=SMALL, incomplete=True, difficulty=difficulty)
    c = generate_phantom(seed=12, shape=SMALL, incomplete=True, difficulty=difficulty)
    assert np.array_equal(a.volume, b.volume)
    assert np.array_equal(a.landmarks, b.landmarks, equal_nan=True)
    assert np.array_equal(a.spacing, b.spacing)
    assert not np.array_equal(a.volume, c.volume)
    assert not np.allclose(a.spacing, c.spacing)


@pytest.mark.parametrize("difficulty", DIFFICULTIES)
@pytest.mark.parametrize("seed", range(6))
def test_landmarks_inside_and_on_their_structure(seed: int, difficulty: str) -> None:
    """Every present landmark is inside the volume and its voxel carries the tissue the landmark names."""
    case, tissue = generate_phantom(seed=seed, shape=MEDIUM, incomplete=seed % 2 == 1, return_tissue=True,
                                    difficulty=difficulty)  # fmt: skip
    present = case.present
    assert present.sum() >= 1
    points = case.landmarks[present]
    assert np.all(points >= 0) and np.all(points <= np.asarray(MEDIUM) - 1)
    for name, point in zip(np.asarray(LANDMARK_NAMES)[present], points):
        assert _nearest_label(tissue, point) in _expected_tissue(name), (seed, name)
        if name[1] in "0ad":  # and the crown is bright in the image itself
            assert case.volume[tuple(np.rint(point).astype(int))] > 1000.0, (seed, name)


@pytest.mark.parametrize("difficulty", DIFFICULTIES)
@pytest.mark.parametrize("seed", range(4))
def test_landmarks_on_structure_small_volume(seed: int, difficulty: str) -> None:
    """At ~2 mm voxels a cusp tip may fall between voxels: one of the 8 surrounding voxels holds the tooth."""
    case, tissue = generate_phantom(seed=seed, shape=SMALL, incomplete=True, return_tissue=True, difficulty=difficulty)
    for name, point, ok in zip(LANDMARK_NAMES, case.landmarks, case.present):
        if ok:
            assert _neighbour_labels(tissue, point) & _expected_tissue(name), (seed, name)


@pytest.mark.slow
@pytest.mark.parametrize("difficulty", DIFFICULTIES)
def test_landmarks_on_structure_default_shape(difficulty: str) -> None:
    for seed in range(8):
        case, tissue = generate_phantom(seed=seed, incomplete=seed % 2 == 0, return_tissue=True, difficulty=difficulty)
        assert case.volume.shape == DEFAULT_SHAPE
        for name, point, ok in zip(LANDMARK_NAMES, case.landmarks, case.present):
            if ok:
                assert _nearest_label(tissue, point) in _expected_tissue(name), (seed, name)


@pytest.mark.parametrize("seed", [1, 2, 5])
def test_incomplete_removes_whole_teeth_and_nothing_else(seed: int) -> None:
    """v1: the incomplete case is the complete one minus teeth (v2 lets neighbours drift into gaps)."""
    full, full_tissue = generate_phantom(seed=seed, shape=MEDIUM, return_tissue=True, difficulty="v1")
    part, part_tissue = generate_phantom(seed=seed, shape=MEDIUM, incomplete=True, return_tissue=True, difficulty="v1")
    assert full.is_complete and not part.is_complete
    # the same head in the same pose: present landmarks are identical
    assert np.array_equal(part.landmarks[part.present], full.landmarks[part.present])
    assert np.array_equal(part.spacing, full.spacing)
    for side in "LR":
        for group in TOOTH_GROUPS:
            rows = [LANDMARK_NAMES.index(side + letter) for letter in group]
            flags = part.present[rows]
            assert flags.all() or not flags.any(), f"{side}{group}: a tooth loses all of its landmarks or none"
            if not flags.any():  # the tooth is gone from the image: no enamel/dentin at its crown any more
                crown = full.landmarks[rows[0]]
                assert _nearest_label(full_tissue, crown) in CROWN_TISSUE
                assert _nearest_label(part_tissue, crown) not in CROWN_TISSUE | {Tissue.PULP}
    # only tooth voxels changed
    changed = full_tissue != part_tissue
    assert np.isin(full_tissue[changed], [Tissue.ENAMEL, Tissue.DENTIN, Tissue.PULP, Tissue.CORTICAL]).all()


def test_third_molars_are_most_often_absent() -> None:
    rng = np.random.default_rng(0)
    counts: dict[str, int] = {}
    for _ in range(3000):
        missing = phantom._sample_missing(rng, incomplete=True)
        assert missing, "an incomplete case misses at least one tooth"
        for key in missing:
            counts[key] = counts.get(key, 0) + 1
    for side in "LR":
        assert counts[f"{side}-M3"] > counts[f"{side}-M2"] > counts[f"{side}-C"] > 0
    assert phantom._sample_missing(rng, incomplete=False) == set()


@pytest.mark.parametrize("shape", [DEFAULT_SHAPE, SMALL, (160, 160, 96)])
def test_spacing_is_realistic_and_holds_the_jaw(shape: tuple[int, int, int]) -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        spacing = phantom._sample_spacing(rng, shape)
        assert spacing[0] == spacing[1] and spacing[2] >= spacing[0]  # anisotropic, slice axis coarsest
        assert np.all(np.asarray(shape) * spacing >= np.asarray(REQUIRED_FOV_MM) - 1e-9)
        if shape == DEFAULT_SHAPE:
            assert INPLANE_SPACING_MM[0] <= spacing[0] <= INPLANE_SPACING_MM[1]
            assert SLICE_SPACING_MM[0] <= spacing[2] <= SLICE_SPACING_MM[1]


@pytest.mark.parametrize("difficulty, low, high", [("v1", 38.0, 62.0), ("v2", 36.0, 66.0)])
def test_pose_scale_and_arch_vary_between_cases(difficulty: str, low: float, high: float) -> None:
    """Different seeds give different orientations and sizes of the arch (in mm)."""
    directions, widths = [], []
    for seed in range(6):
        case = generate_phantom(seed=seed, shape=SMALL, difficulty=difficulty)
        la, ra = (case.landmarks[LANDMARK_NAMES.index(n)] * case.spacing for n in ("La", "Ra"))
        directions.append((ra - la) / np.linalg.norm(ra - la))
        widths.append(np.linalg.norm(ra - la))
        assert ra[0] > la[0]  # axis 0 runs from the patient's left to right
    angles = np.degrees(np.arccos(np.clip([d @ np.array([1.0, 0.0, 0.0]) for d in directions], -1, 1)))
    assert np.ptp(angles) > 5.0
    # second molars 45–55 mm apart (v2: 42–58 mm, teeth tilted and spaced) × scale 0.9–1.1
    assert low < min(widths) and max(widths) < high and np.ptp(widths) > 2.0


def test_left_and_right_molars_look_alike() -> None:
    """Mirror-symmetric anatomy up to small asymmetry: tooth geometry (mm) and crown intensity match across sides."""
    case = generate_phantom(seed=4, shape=MEDIUM, difficulty="v1")
    mm = {n: p * case.spacing for n, p in zip(LANDMARK_NAMES, case.landmarks)}
    for a, b in [("a", "b"), ("a", "c"), ("a", "d"), ("d", "e"), ("0", "a")]:
        left, right = np.linalg.norm(mm["L" + a] - mm["L" + b]), np.linalg.norm(mm["R" + a] - mm["R" + b])
        assert abs(left - right) / max(left, right) < 0.2, (a, b, left, right)
    sampled = ndimage.map_coordinates(case.volume, case.landmarks[[1, 8]].T, order=1)
    assert abs(sampled[0] - sampled[1]) < 500.0


def test_neighbouring_molars_touch() -> None:
    for seed in range(3):
        case, tissue = generate_phantom(seed=seed, shape=MEDIUM, return_tissue=True, difficulty="v1")
        tooth = np.isin(tissue, [Tissue.ENAMEL, Tissue.DENTIN, Tissue.PULP]).astype(np.uint8)
        for side in "LR":
            p, q = (case.landmarks[LANDMARK_NAMES.index(side + n)] for n in "ad")
            line = p[None] + np.linspace(0.0, 1.0, 100)[:, None] * (q - p)[None]
            assert ndimage.map_coordinates(tooth, line.T, order=0).mean() > 0.85, (seed, side)
            assert 7.0 < np.linalg.norm((q - p) * case.spacing) < 13.0


def test_intensities_and_noise() -> None:
    case, tissue = generate_phantom(seed=2, shape=MEDIUM, return_tissue=True, difficulty="v1")
    for kind, (low, high) in HU_RANGES.items():
        core = ndimage.binary_erosion(tissue == kind, iterations=2)
        if core.sum() < 50:
            continue
        median = np.median(case.volume[core])
        assert low - 60 <= median <= high + 60, (kind.name, median)
        if kind == Tissue.SOFT:
            assert case.volume[core].std() >= 20.0  # Gaussian noise σ ≥ 20 HU (plus texture)
    assert np.median(case.volume[tissue == Tissue.ENAMEL]) > np.median(case.volume[tissue == Tissue.CANCELLOUS])


def test_every_tissue_appears_at_default_field_of_view() -> None:
    _, tissue = generate_phantom(seed=0, shape=MEDIUM, return_tissue=True, difficulty="v1")
    assert set(np.unique(tissue)) == {int(t) for t in HU_RANGES}  # v1's eight tissues
    _, tissue = generate_phantom(seed=2, shape=MEDIUM, return_tissue=True)  # v2 seed 2 has metal
    # the head holder shows only where the back of the head is inside the volume (tests/test_phantom_v2.py)
    assert set(np.unique(tissue)) == {int(t) for t in Tissue if t != Tissue.DEVICE}


def test_invalid_arguments_raise() -> None:
    with pytest.raises(ValueError, match="shape"):
        generate_phantom(seed=0, shape=(64, 64))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="shape"):
        generate_phantom(seed=0, shape=(8, 64, 64))
    with pytest.raises(ValueError, match="seed"):
        generate_phantom(seed=-1, shape=SMALL)
    with pytest.raises(ValueError, match="spacing"):
        generate_phantom(seed=0, shape=SMALL, spacing=(1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="field of view"):
        generate_phantom(seed=0, shape=SMALL, spacing=(0.5, 0.5, 0.5))
    with pytest.raises(ValueError, match="field of view"):
        generate_phantom(seed=0, shape=SMALL, spacing=(0.5, 0.5, 0.5), difficulty="v1")
    with pytest.raises(ValueError, match="difficulty must be one of 'v1', 'v2'"):
        generate_phantom(seed=0, shape=SMALL, difficulty="v3")
    with pytest.raises(ValueError, match="difficulty='v1' has none"):
        generate_phantom(seed=0, shape=SMALL, difficulty="v1", effects={"metal": False})
    with pytest.raises(ValueError, match=r"unknown effects \['metals'\]"):
        generate_phantom(seed=0, shape=SMALL, effects={"metals": False})


@pytest.mark.parametrize("difficulty", DIFFICULTIES)
def test_explicit_spacing_is_used(difficulty: str) -> None:
    case = generate_phantom(seed=0, shape=SMALL, spacing=(1.7, 1.7, 2.0), difficulty=difficulty)
    assert np.array_equal(case.spacing, [1.7, 1.7, 2.0])


def test_write_phantom_dataset_layout_and_roundtrip(tmp_path) -> None:
    from h3de_lite.data.mml import list_mml_cases, read_mml_case

    shape = (48, 48, 40)
    paths = write_phantom_dataset(tmp_path, seed=3, n_train=2, n_val=1, n_test=1, incomplete_fraction=0.5,
                                  shape=shape, progress=False)  # fmt: skip
    assert [p.parent.name for p in paths] == ["train", "train", "val", "test"]
    assert [p.name for p in paths] == [f"{i:04d}_volume.nrrd" for i in range(4)]
    assert all(p.is_file() for p in paths)
    assert list_mml_cases(tmp_path, "train") == ["0000", "0001"] and list_mml_cases(tmp_path, "test") == ["0003"]
    train = [read_mml_case(tmp_path / "train", i) for i in ("0000", "0001")]
    assert sum(not c.is_complete for c in train) == 1  # round(0.5 × 2)
    assert all(c.volume.shape == shape for c in train)
    # same arguments → same files
    again = write_phantom_dataset(tmp_path / "again", seed=3, n_train=2, n_val=1, n_test=1,
                                  incomplete_fraction=0.5, shape=shape, progress=False)  # fmt: skip
    for p, q in zip(paths, again):
        a, b = read_mml_case(p.parent, p.name[:4]), read_mml_case(q.parent, q.name[:4])
        assert np.array_equal(a.volume, b.volume) and np.array_equal(a.landmarks, b.landmarks, equal_nan=True)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"n_train": -1, "n_val": 1, "n_test": 1}, "n_train"),
        ({"n_train": 1, "n_val": 1.5, "n_test": 1}, "n_val"),
        ({"n_train": 0, "n_val": 0, "n_test": 0}, "at least 1"),
        ({"n_train": 1, "n_val": 0, "n_test": 0, "incomplete_fraction": 1.5}, "incomplete_fraction"),
        ({"n_train": 1, "n_val": 0, "n_test": 0, "incomplete_fraction": -0.1}, "incomplete_fraction"),
        ({"n_train": 1, "n_val": 0, "n_test": 0, "shape": (64, 64)}, "shape"),
    ],
)
def test_write_phantom_dataset_rejects_bad_arguments(tmp_path, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        write_phantom_dataset(tmp_path, progress=False, **kwargs)
    assert not any(tmp_path.iterdir())
