"""Tests of the training augmentation: crops, L/R flips, rotations/scalings in mm, intensity jitter, the pipeline."""

from __future__ import annotations

import doctest
import functools
import itertools

import numpy as np
import pytest

from h3de_lite.data import augment
from h3de_lite.data.augment import (
    Compose,
    IntensityJitter,
    LabeledCase,
    RandomCrop,
    RandomFlipLR,
    RandomRotateScale,
    _landmark_counts,
    adjust_intensity,
    flip_lr,
    landmarks_off_tissue,
    mirror_rows,
    rotate_scale,
    rotate_scale_matrix,
    rotation_matrix,
    warp,
    warp_crop,
)
from h3de_lite.data.case import Case
from h3de_lite.data.landmarks import LANDMARK_NAMES
from h3de_lite.data.phantom import Tissue, generate_phantom
from h3de_lite.data.transforms import choose_crop_start, crop

SHAPE = (48, 48, 32)  # ≈2.2–2.4 mm in-plane, 2.5–3.1 mm slices: anisotropic
SEEDS = (0, 1, 2, 3)
PAIRS = [(LANDMARK_NAMES.index("L" + p), LANDMARK_NAMES.index("R" + p)) for p in "0abcdef"]


@functools.lru_cache(maxsize=None)
def _phantom(seed: int) -> LabeledCase:
    case, tissue = generate_phantom(seed=seed, shape=SHAPE, incomplete=seed % 2 == 1, return_tissue=True)
    return LabeledCase.from_case(case, tissue)


def _same(a: Case, b: Case) -> bool:
    return (
        type(a) is type(b)
        and np.array_equal(a.volume, b.volume)
        and np.array_equal(a.landmarks, b.landmarks, equal_nan=True)
        and np.array_equal(a.spacing, b.spacing)
        and np.array_equal(a.affine, b.affine)
        and a.names == b.names
        and (not isinstance(a, LabeledCase) or np.array_equal(a.labels, b.labels))
    )


def _point_case(shape, points, *, spacing=(1.0, 1.0, 1.0), names=None) -> Case:
    """A zero volume with value 1 at each (integer) point, landmarks at the points."""
    volume = np.zeros(shape, dtype=np.float32)
    points = np.asarray(points, dtype=np.float64)
    for p in points:
        if not np.isnan(p).any():
            volume[tuple(p.astype(int))] = 1.0
    names = names or tuple(f"P{i}" for i in range(len(points)))
    return Case(volume=volume, landmarks=points, spacing=spacing, names=names)


def _pairwise_mm(case: Case, rows: np.ndarray) -> np.ndarray:
    mm = case.landmarks[rows] * case.spacing
    return np.linalg.norm(mm[:, None] - mm[None], axis=-1)


# --------------------------------------------------------------------------------------------------------------------
# Flips
# --------------------------------------------------------------------------------------------------------------------


def test_mirror_rows_of_the_mml_names() -> None:
    rows = mirror_rows(LANDMARK_NAMES)
    assert [LANDMARK_NAMES[i] for i in rows] == ["R0", "Ra", "Rb", "Rc", "Rd", "Re", "Rf",
                                                 "L0", "La", "Lb", "Lc", "Ld", "Le", "Lf"]  # fmt: skip


def test_flip_swaps_names_of_a_hand_placed_landmark() -> None:
    landmarks = np.full((14, 3), np.nan)
    landmarks[LANDMARK_NAMES.index("La")] = [2.0, 3.0, 1.0]
    volume = np.zeros((10, 6, 4), dtype=np.float32)
    volume[2, 3, 1] = 7.0
    case = Case(volume=volume, landmarks=landmarks, spacing=[0.5, 0.5, 1.0])
    out = flip_lr(case)
    la, ra = LANDMARK_NAMES.index("La"), LANDMARK_NAMES.index("Ra")
    assert np.array_equal(out.landmarks[ra], [7.0, 3.0, 1.0])  # x' = D - 1 - x = 9 - 2, on the row named Ra
    assert not out.present[la] and out.present.sum() == 1
    assert out.volume[7, 3, 1] == 7.0 and out.volume.sum() == 7.0
    assert np.array_equal(out.spacing, case.spacing) and np.array_equal(out.affine, case.affine)


def test_flip_twice_is_identity() -> None:
    for seed in (0, 1):  # complete and incomplete (NaN rows)
        case = _phantom(seed)
        twice = flip_lr(flip_lr(case))
        np.testing.assert_allclose(twice.landmarks, case.landmarks, atol=1e-12, rtol=0)  # n-1-(n-1-x): rounding only
        assert _same(Case(volume=twice.volume, landmarks=case.landmarks, spacing=twice.spacing, affine=twice.affine),
                     Case(volume=case.volume, landmarks=case.landmarks, spacing=case.spacing, affine=case.affine))
        assert np.array_equal(twice.labels, case.labels) and np.array_equal(twice.present, case.present)


@pytest.mark.parametrize("seed", SEEDS)
def test_flipped_phantom_keeps_anatomy_and_sides(seed: int) -> None:
    """After a flip every landmark is on the tissue it names, and left landmarks still lie on the left (low axis 0)."""
    case = _phantom(seed)
    out = flip_lr(case)
    assert landmarks_off_tissue(out) == ()
    for left, right in PAIRS:
        assert out.present[left] == case.present[right] and out.present[right] == case.present[left]
        for c in (case, out):  # the phantom's convention: the patient's left is at low axis-0 index
            if c.present[left] and c.present[right]:
                assert c.landmarks[left, 0] < c.landmarks[right, 0]
    # the row named La of the flip is the mirrored Ra of the original
    la, ra = PAIRS[1]
    if case.present[ra]:
        expected = case.landmarks[ra] * [-1, 1, 1] + [SHAPE[0] - 1, 0, 0]
        assert np.array_equal(out.landmarks[la], expected)


def test_random_flip_probability_and_copy() -> None:
    case = _phantom(0)
    assert _same(RandomFlipLR(p=0.0)(case, np.random.default_rng(0)), case)
    assert _same(RandomFlipLR(p=1.0)(case, np.random.default_rng(0)), flip_lr(case))
    kept = RandomFlipLR(p=0.0)(case, np.random.default_rng(0))
    assert kept.volume is not case.volume and kept.landmarks is not case.landmarks


# --------------------------------------------------------------------------------------------------------------------
# Rotations and scalings
# --------------------------------------------------------------------------------------------------------------------


def test_zero_rotation_and_unit_scale_are_identity() -> None:
    case = _phantom(1)
    out = rotate_scale(case, angles_deg=(0, 0, 0), scale=1.0)
    np.testing.assert_allclose(out.landmarks, case.landmarks, atol=1e-6, rtol=0)
    assert np.array_equal(out.present, case.present)
    np.testing.assert_allclose(out.volume, case.volume, atol=1e-3, rtol=0)
    assert np.array_equal(out.labels, case.labels)


@pytest.mark.parametrize(
    "angles, point, expected",
    [
        ((0, 0, 90), (8, 5, 5), (5, 8, 5)),  # about axis 2: axis 0 → axis 1
        ((0, 0, -90), (8, 5, 5), (5, 2, 5)),
        ((90, 0, 0), (5, 8, 5), (5, 5, 8)),  # about axis 0: axis 1 → axis 2
        ((0, 90, 0), (5, 5, 8), (8, 5, 5)),  # about axis 1: axis 2 → axis 0
        ((0, 0, 180), (7, 4, 5), (3, 6, 5)),
    ],
)
def test_ninety_degree_rotation_of_a_hand_placed_point(angles, point, expected) -> None:
    """Isotropic 11³ volume, centre (5, 5, 5): the landmark and the bright voxel both land on ``expected``."""
    case = _point_case((11, 11, 11), [point])
    out = rotate_scale(case, angles_deg=angles)
    np.testing.assert_allclose(out.landmarks[0], expected, atol=1e-9)
    assert np.unravel_index(np.argmax(out.volume), out.volume.shape) == expected
    assert out.volume[expected] == pytest.approx(1.0, abs=1e-6) and out.volume.sum() == pytest.approx(1.0, abs=1e-6)


def test_rotation_with_anisotropic_spacing_turns_millimetres_not_voxels() -> None:
    """Spacing (1, 1, 2) mm, centre (5, 5, 5). +4 voxels on axis 1 = 4 mm; turned onto axis 2 it is 2 voxels."""
    case = _point_case((11, 11, 11), [(5, 9, 5), (5, 5, 7)], spacing=(1.0, 1.0, 2.0))
    out = rotate_scale(case, angles_deg=(90, 0, 0))
    np.testing.assert_allclose(out.landmarks, [(5, 5, 7), (5, 1, 5)], atol=1e-9)
    # the image: output voxel (5, 5, 7) pulls input (5, 9, 5), (5, 1, 5) pulls (5, 5, 7)
    assert out.volume[5, 5, 7] == pytest.approx(1.0) and out.volume[5, 1, 5] == pytest.approx(1.0)


def test_scaling_about_the_centre() -> None:
    case = _point_case((11, 11, 11), [(7, 5, 5), (5, 3, 6)])
    out = rotate_scale(case, scale=2.0)
    np.testing.assert_allclose(out.landmarks, [(9, 5, 5), (5, 1, 7)], atol=1e-9)
    assert out.volume[9, 5, 5] == pytest.approx(1.0) and out.volume[5, 1, 7] == pytest.approx(1.0)


def test_landmark_pushed_out_of_the_volume_becomes_missing() -> None:
    case = _point_case((11, 11, 11), [(9, 5, 5), (6, 5, 5)])
    out = rotate_scale(case, scale=1.5)  # 9 → 5 + 4 · 1.5 = 11 > 10.5: outside; 6 → 6.5: inside
    assert out.present.tolist() == [False, True]
    np.testing.assert_allclose(out.landmarks[1], (6.5, 5, 5), atol=1e-9)


@pytest.mark.parametrize("seed", SEEDS)
def test_rotation_keeps_millimetre_distances_and_scale_multiplies_them(seed: int) -> None:
    case = _phantom(seed)
    angles = np.random.default_rng(seed).uniform(-10, 10, 3)
    for scale in (1.0, 1.1):
        out = rotate_scale(case, angles_deg=angles, scale=scale)
        rows = np.flatnonzero(out.present)
        assert len(rows) >= 4
        np.testing.assert_allclose(_pairwise_mm(out, rows), scale * _pairwise_mm(case, rows), atol=1e-9)


def test_labels_are_resampled_by_nearest_neighbour() -> None:
    labels = np.zeros((11, 11, 11), dtype=np.int8)
    labels[3:8, 4:7, 2:9] = 7
    case = LabeledCase.from_case(_point_case((11, 11, 11), [(5, 5, 5)]), labels)
    out = rotate_scale(case, angles_deg=(20, -30, 35), scale=1.1)
    assert set(np.unique(out.labels)) == {0, 7} and out.labels.dtype == np.int8  # no blended values
    assert out.labels[5, 5, 5] == 7  # the centre stays inside the block


def test_rotation_matrix_is_a_proper_rotation() -> None:
    r = rotation_matrix([10.0, -7.0, 25.0])
    np.testing.assert_allclose(r @ r.T, np.eye(3), atol=1e-12)
    assert np.linalg.det(r) == pytest.approx(1.0)


def test_warp_matches_point_and_image_for_a_general_matrix() -> None:
    """A bright voxel at an integer point goes where the landmark goes (checked where the map hits a voxel centre)."""
    matrix = np.array([[0.0, -1.0, 0.0], [2.0, 0.0, 0.0], [0.0, 0.0, 1.0]])  # (x, y) → (-y, 2x) about (6, 6, 3)
    case = _point_case((13, 13, 7), [(8, 5, 3)])
    out = warp(case, matrix)
    np.testing.assert_allclose(out.landmarks[0], (7, 10, 3), atol=1e-9)  # (2, -1, 0) → (1, 4, 0) from the centre
    assert out.volume[7, 10, 3] == pytest.approx(1.0)


@pytest.mark.parametrize("start", [(10, 7, 5), (0, 0, 0), (24, 24, 8)])
def test_warp_crop_is_the_crop_of_the_warped_volume(start) -> None:
    """warp_crop resamples only the box and gives crop(warp(...)): image, labels, landmarks, affine, names."""
    case = _phantom(1)  # incomplete: NaN rows pass through
    matrix = rotate_scale_matrix(case.spacing, angles_deg=(8.0, -6.0, 13.0), scale=1.07)
    size = (24, 24, 24)
    whole = warp(case, matrix)
    expected = RandomCrop._crop(whole, np.asarray(start), np.asarray(size))
    got = warp_crop(case, matrix, start, size)
    assert isinstance(got, LabeledCase)
    np.testing.assert_allclose(got.volume, expected.volume, rtol=0, atol=1e-3)  # HU, float32 offset rounding
    assert np.mean(got.labels != expected.labels) < 1e-3  # nearest neighbour: a tie may round the other way
    np.testing.assert_array_equal(got.landmarks, expected.landmarks)
    np.testing.assert_array_equal(got.affine, expected.affine)
    assert got.names == expected.names and np.isnan(got.landmarks).any()
    assert not np.array_equal(got.volume, crop(case, start, size).volume)  # the warp happened


def test_warp_crop_of_a_box_leaving_the_volume_pads_like_crop() -> None:
    case = _phantom(0)
    matrix = rotate_scale_matrix(case.spacing, angles_deg=(0.0, 0.0, 15.0), scale=0.95)
    start, size = np.array([-4, 30, 20]), np.array([16, 24, 16])  # out at both ends
    assert _same(warp_crop(case, matrix, start, size), RandomCrop._crop(warp(case, matrix), start, size))


def test_random_rotate_scale_draw_is_the_call_without_the_resampling() -> None:
    case, t = _phantom(2), RandomRotateScale(degrees=12, scale=(0.9, 1.1), p=0.5)
    calls, draws = np.random.default_rng(7), np.random.default_rng(7)
    applied = 0
    for _ in range(6):
        matrix = t.draw(case, draws)
        out = t(case, calls)
        applied += matrix is not None
        assert _same(out, case if matrix is None else warp(case, matrix))
        assert calls.random() == draws.random()  # the same number of draws each time
    assert 0 < applied < 6


@pytest.mark.parametrize("seed", SEEDS)
def test_rotated_and_scaled_phantom_keeps_anatomy(seed: int) -> None:
    """Larger than training angles (±20°) and scales (0.8–1.25): every landmark still on its tissue."""
    case = _phantom(seed)
    rng = np.random.default_rng(100 + seed)
    for _ in range(3):
        out = RandomRotateScale(degrees=20, scale=(0.8, 1.25))(case, rng)
        assert isinstance(out, LabeledCase) and out.labels.dtype == case.labels.dtype
        assert set(np.unique(out.labels)) <= {int(t) for t in Tissue}  # nearest neighbour: no blended labels
        assert out.present.sum() >= 1
        assert landmarks_off_tissue(out) == ()


def test_inverse_map_would_put_landmarks_off_their_tissue() -> None:
    """The anatomy check has teeth: image and labels moved by the inverse of the landmark map fail it."""
    case = _phantom(0)
    out = rotate_scale(case, angles_deg=(15, -10, 15), scale=1.15)
    wrong = rotate_scale(case, angles_deg=(0, 0, 0), scale=1.0)
    wrong = warp(wrong, np.linalg.inv(np.diag(1 / case.spacing) @ (1.15 * rotation_matrix((15, -10, 15)))
                                      @ np.diag(case.spacing)))  # fmt: skip
    mixed = LabeledCase.from_case(Case(volume=wrong.volume, landmarks=out.landmarks, spacing=case.spacing),
                                  wrong.labels)  # fmt: skip
    assert len(landmarks_off_tissue(mixed)) >= 3


# --------------------------------------------------------------------------------------------------------------------
# Crops
# --------------------------------------------------------------------------------------------------------------------


def test_landmark_counts_match_brute_force() -> None:
    rng = np.random.default_rng(0)
    points = rng.uniform(-0.5, 19.5, size=(9, 3))
    points[0] = [0.5, 0.5, 0.5]  # ties on the box edges: x - s == size - 0.5 exactly
    size, lo, hi = np.array([6, 5, 4]), np.array([-1, 0, 2]), np.array([15, 14, 16])
    counts = _landmark_counts(points, size, lo, hi)
    for start in itertools.product(*(range(a, b + 1) for a, b in zip(lo, hi))):
        rel = points - np.asarray(start)
        expected = int(np.all((rel >= -0.5) & (rel <= size - 0.5), axis=1).sum())
        assert counts[tuple(np.asarray(start) - lo)] == expected, start


@pytest.mark.parametrize("seed", SEEDS)
def test_crop_modes_on_the_phantom(seed: int) -> None:
    case = _phantom(seed)
    n = int(case.present.sum())
    big, small = (32, 32, 20), (24, 24, 16)  # the jaw fits in the big window; the small one leaves room beside it
    rng = np.random.default_rng(seed)
    for _ in range(4):
        full = RandomCrop(size=big)(case, rng)
        partial = RandomCrop(size=small, p_partial=1.0)(case, rng)
        background = RandomCrop(size=small, p_background=1.0)(case, rng)
        assert full.present.sum() == n
        assert 0 < partial.present.sum() < n
        assert background.present.sum() == 0
        for out in (full, partial, background):
            size = out.volume.shape
            assert out.labels.shape == size
            assert landmarks_off_tissue(out) == ()
            # the labels were cut from the same box as the image: the affine holds the start
            start = np.rint(out.affine[:3, 3] / case.spacing).astype(int)
            assert np.all(start >= 0) and np.all(start + size <= SHAPE)  # inside the volume: no padding needed
            box = tuple(slice(s, s + k) for s, k in zip(start, size))
            assert np.array_equal(out.labels, case.labels[box]) and np.array_equal(out.volume, case.volume[box])


def test_background_crops_cover_the_volume_and_avoid_landmarks() -> None:
    case = _phantom(0)
    crop = RandomCrop(size=(16, 16, 16), p_background=1.0)
    starts = [crop.choose_start(case.volume.shape, case.landmarks, np.random.default_rng(i)) for i in range(40)]
    assert len({tuple(s) for s in starts}) > 20  # random, not a fixed window
    for s in starts:
        rel = case.landmarks[case.present] - s
        assert not np.all((rel >= -0.5) & (rel <= 15.5), axis=1).any()


def test_partial_and_background_crops_of_a_hand_made_case() -> None:
    """Two landmarks 1 voxel apart in a 20³ volume, 8³ windows: most windows hold both, the modes must not."""
    case = _point_case((20, 20, 20), [(10, 10, 10), (11, 10, 10)])
    rng = np.random.default_rng(0)
    for _ in range(30):
        assert RandomCrop(size=(8, 8, 8), p_partial=1.0)(case, rng).present.sum() == 1
        assert RandomCrop(size=(8, 8, 8), p_background=1.0)(case, rng).present.sum() == 0
        assert RandomCrop(size=(8, 8, 8))(case, rng).present.sum() == 2


def test_crop_without_modes_is_the_paper_crop() -> None:
    """Both probabilities 0: the same starts as choose_crop_start from the same generator state."""
    case = _phantom(1)
    for seed in range(5):
        rng = np.random.default_rng(seed)
        ours = RandomCrop(size=(32, 32, 20)).choose_start(case.volume.shape, case.landmarks, rng)
        paper = choose_crop_start(case.volume.shape, case.landmarks, (32, 32, 20), rng=np.random.default_rng(seed))
        assert np.array_equal(ours, paper)


def test_crop_fallbacks() -> None:
    # the window is the whole volume: no window without landmarks, the fewest is all of them
    case = _point_case((8, 8, 8), [(2, 2, 2), (5, 5, 5)])
    out = RandomCrop(size=(8, 8, 8), p_background=1.0)(case, np.random.default_rng(0))
    assert out.present.sum() == 2
    # a single landmark cannot be split: the partial mode keeps it
    single = _point_case((20, 20, 20), [(10, 10, 10), (np.nan,) * 3])
    out = RandomCrop(size=(8, 8, 8), p_partial=1.0)(single, np.random.default_rng(0))
    assert out.present.tolist() == [True, False]
    # no landmark at all: any window
    assert RandomCrop(size=(8, 8, 8), p_partial=1.0)(_point_case((20, 20, 20), [(np.nan,) * 3]),
                                                     np.random.default_rng(0)).volume.shape == (8, 8, 8)  # fmt: skip


def test_crop_mode_frequencies() -> None:
    case = _phantom(0)
    crop = RandomCrop(size=(24, 24, 16), p_partial=0.3, p_background=0.2)
    rng = np.random.default_rng(0)
    n, counts = int(case.present.sum()), {"full": 0, "partial": 0, "background": 0}
    for _ in range(300):
        k = crop(case, rng).present.sum()
        counts["full" if k == n else "background" if k == 0 else "partial"] += 1
    # binomial standard deviations ≈ 8, 7 and 8 samples
    assert abs(counts["partial"] - 90) < 30 and abs(counts["background"] - 60) < 30 and abs(counts["full"] - 150) < 30


# --------------------------------------------------------------------------------------------------------------------
# Intensity
# --------------------------------------------------------------------------------------------------------------------


def test_adjust_intensity_known_values() -> None:
    v = np.array([-10.0, 0.0, 25.0, 50.0, 100.0, 140.0])
    np.testing.assert_allclose(adjust_intensity(v, scale=2.0, shift=10.0), [-10, 10, 60, 110, 210, 290])
    # gamma 0.5 on the window (0, 100): 25 → 100·√0.25 = 50; outside the window unchanged
    np.testing.assert_allclose(adjust_intensity(v, gamma=0.5, window=(0, 100)), [-10, 0, 50, 70.7106781, 100, 140],
                               rtol=1e-6)  # fmt: skip


def test_intensity_jitter_keeps_geometry_and_adds_the_requested_noise() -> None:
    case = _phantom(0)
    jitter = IntensityJitter(scale=(1, 1), shift=(0, 0), gamma=(1, 1), noise_std=(25.0, 25.0))
    out = jitter(case, np.random.default_rng(0))
    assert np.array_equal(out.landmarks, case.landmarks, equal_nan=True) and np.array_equal(out.labels, case.labels)
    noise = out.volume - case.volume
    assert abs(noise.mean()) < 0.5 and noise.std() == pytest.approx(25.0, rel=0.02)  # 73 728 samples: ±0.3 %
    shifted = IntensityJitter(scale=(1.1, 1.1), shift=(30, 30), gamma=(1, 1), noise_std=(0, 0))(case,
                                                                                            np.random.default_rng(0))
    np.testing.assert_allclose(shifted.volume, 1.1 * case.volume + 30.0, rtol=1e-6, atol=1e-3)


# --------------------------------------------------------------------------------------------------------------------
# Pipeline
# --------------------------------------------------------------------------------------------------------------------


def _pipeline() -> Compose:
    return Compose([
        RandomFlipLR(p=0.5),
        RandomRotateScale(degrees=10, scale=(0.9, 1.1)),
        RandomCrop(size=(32, 32, 24), p_partial=0.2, p_background=0.2),
        IntensityJitter(),
    ])  # fmt: skip


@pytest.mark.parametrize("seed", SEEDS)
def test_pipeline_keeps_every_landmark_on_its_tissue(seed: int) -> None:
    case = _phantom(seed)
    before = (case.volume.copy(), case.landmarks.copy(), case.labels.copy(), case.affine.copy())
    rng = np.random.default_rng(seed)
    for _ in range(4):
        out = _pipeline()(case, rng)
        assert isinstance(out, LabeledCase) and out.volume.shape == (32, 32, 24)
        assert landmarks_off_tissue(out) == ()
    after = (case.volume, case.landmarks, case.labels, case.affine)
    assert all(np.array_equal(a, b, equal_nan=True) for a, b in zip(before, after))  # input untouched


def test_same_seed_same_output_and_plain_cases_stay_plain() -> None:
    case = _phantom(1)
    a = _pipeline()(case, np.random.default_rng(7))
    b = _pipeline()(case, np.random.default_rng(7))
    c = _pipeline()(case, np.random.default_rng(8))
    assert _same(a, b) and not np.array_equal(a.volume, c.volume)
    plain = Case(volume=case.volume, landmarks=case.landmarks, spacing=case.spacing)
    out = _pipeline()(plain, np.random.default_rng(7))
    assert type(out) is Case
    assert np.array_equal(out.volume, a.volume) and np.array_equal(out.landmarks, a.landmarks, equal_nan=True)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: RandomCrop(size=(8, 8)), "size"),
        (lambda: RandomCrop(size=(8, 8, 8), p_partial=1.5), "p_partial"),
        (lambda: RandomCrop(size=(8, 8, 8), p_background=-0.1), "p_background"),
        (lambda: RandomCrop(size=(8, 8, 8), p_partial=0.6, p_background=0.6), "p_partial \\+ p_background"),
        (lambda: RandomFlipLR(p=2.0), "p must be a probability"),
        (lambda: RandomFlipLR(axis=3), "axis"),
        (lambda: RandomRotateScale(degrees=-5), "degrees"),
        (lambda: RandomRotateScale(degrees=(10, 10)), "degrees"),
        (lambda: RandomRotateScale(scale=(1.1, 0.9)), "scale"),
        (lambda: RandomRotateScale(scale=(0.0, 1.1)), "scale"),
        (lambda: RandomRotateScale(order=7), "order"),
        (lambda: IntensityJitter(gamma=(0.0, 1.2)), "gamma"),
        (lambda: IntensityJitter(noise_std=(-1.0, 5.0)), "noise_std"),
        (lambda: IntensityJitter(shift=(10.0, -10.0)), "shift"),
        (lambda: IntensityJitter(window=(100.0, 100.0)), "window"),
        (lambda: IntensityJitter(scale="big"), "scale"),
        (lambda: Compose([RandomFlipLR(), 3]), "transforms\\[1\\]"),
        (lambda: rotation_matrix([0, 90]), "angles_deg"),
        (lambda: rotate_scale(_point_case((5, 5, 5), [(2, 2, 2)]), scale=0.0), "scale"),
        (lambda: warp(_point_case((5, 5, 5), [(2, 2, 2)]), np.zeros((3, 3))), "invertible"),
        (lambda: flip_lr(_point_case((5, 5, 5), [(2, 2, 2)]), axis=-1), "axis"),
        (lambda: RandomFlipLR()(_point_case((5, 5, 5), [(2, 2, 2)]), 0), "numpy.random.Generator"),
        (lambda: landmarks_off_tissue(_point_case((5, 5, 5), [(2, 2, 2)])), "LabeledCase"),
        (lambda: LabeledCase(volume=np.zeros((4, 4, 4)), landmarks=np.zeros((14, 3)), spacing=[1, 1, 1],
                             labels=np.zeros((4, 4, 3), dtype=np.int8)), "labels must have the volume's shape"),
        (lambda: LabeledCase(volume=np.zeros((4, 4, 4)), landmarks=np.zeros((14, 3)), spacing=[1, 1, 1],
                             labels=np.zeros((4, 4, 4))), "integers"),
        (lambda: augment.landmark_tissue("Xa"), "unknown landmark"),
    ],
)
def test_invalid_arguments_raise(make, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make()


def test_docstring_examples() -> None:
    result = doctest.testmod(augment, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
