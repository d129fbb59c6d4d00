"""Preprocessing: intensity window, crops that keep landmarks, resampling that preserves mm geometry."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from h3de_lite.data.case import Case
from h3de_lite.data.nifti import voxel_to_world
from h3de_lite.data.transforms import (
    center_crop,
    choose_crop_start,
    crop,
    normalize_intensity,
    random_crop,
    resample,
    to_source_voxels,
    zoom_shape,
    zoom_to_fit,
)


def make_case(rng: np.random.Generator, shape=(30, 26, 14), spacing=(0.4, 0.5, 1.2), low=2.0, high=None) -> Case:
    shape_arr = np.asarray(shape)
    high = shape_arr - 3.0 if high is None else np.asarray(high)
    landmarks = rng.uniform(low, high, size=(14, 3))
    landmarks[5] = np.nan
    volume = rng.integers(-1000, 2000, size=shape).astype(np.int16)
    return Case(volume=volume, landmarks=landmarks, spacing=spacing, case_id="t")


# ------------------------------------------------------------------------------------------------ intensity
def test_normalize_hand_values() -> None:
    out = normalize_intensity(np.array([-2000, -1000, 1000, 3000, 5000], dtype=np.int16))
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [0.0, 0.0, 127.5, 255.0, 255.0])
    np.testing.assert_allclose(normalize_intensity(np.array([0.0, 50.0, 100.0]), window=(0, 100), out_range=(-1, 1)),
                               [-1.0, 0.0, 1.0])  # fmt: skip


@pytest.mark.parametrize("window", [(100.0, 100.0), (3000.0, -1000.0), (np.nan, 1.0), (1.0,)])
def test_normalize_bad_window(window: tuple) -> None:
    with pytest.raises(ValueError, match="window"):
        normalize_intensity(np.zeros(3), window=window)


# ------------------------------------------------------------------------------------------------ crops
def test_crop_content_landmarks_and_affine(rng: np.random.Generator) -> None:
    case = make_case(rng)
    start, size = np.array([3, 4, 2]), (10, 12, 8)
    out = crop(case, start, size)
    np.testing.assert_array_equal(out.volume, case.volume[3:13, 4:16, 2:10])
    shifted = case.landmarks - start
    inside = np.all((shifted >= -0.5) & (shifted <= np.array(size) - 0.5), axis=1)
    np.testing.assert_array_equal(out.landmarks[inside], shifted[inside])
    assert np.isnan(out.landmarks[~inside]).all()
    # world positions of the kept landmarks do not move
    np.testing.assert_allclose(voxel_to_world(out.landmarks[inside], out.affine),
                               voxel_to_world(case.landmarks[inside], case.affine))  # fmt: skip
    np.testing.assert_array_equal(out.spacing, case.spacing)


def test_crop_pads_with_volume_minimum(rng: np.random.Generator) -> None:
    case = make_case(rng, shape=(6, 6, 4), low=1.0, high=(4.0, 4.0, 2.0))
    out = crop(case, (-2, -1, 0), (10, 8, 6))
    assert out.volume.shape == (10, 8, 6)
    np.testing.assert_array_equal(out.volume[2:8, 1:7, 0:4], case.volume)
    assert (out.volume[:2] == case.volume.min()).all() and (out.volume[:, :, 4:] == case.volume.min()).all()
    np.testing.assert_allclose(out.landmarks, case.landmarks + [2, 1, 0])


@pytest.mark.parametrize("seed", range(20))
def test_random_crop_keeps_all_landmarks_when_they_fit(seed: int) -> None:
    rng = np.random.default_rng(seed)
    case = make_case(rng, shape=(60, 50, 30), low=(20, 15, 10), high=(35, 30, 18))
    out, start = random_crop(case, size=(24, 20, 12), rng=rng, return_start=True)
    assert out.volume.shape == (24, 20, 12)
    assert np.all(start >= 0) and np.all(start + [24, 20, 12] <= case.volume.shape)  # no needless padding
    np.testing.assert_array_equal(out.present, case.present)
    np.testing.assert_allclose(out.landmarks, case.landmarks - start)
    np.testing.assert_array_equal(out.volume, case.volume[tuple(slice(s, s + n) for s, n in zip(start, (24, 20, 12)))])


def test_random_crop_varies_and_is_reproducible(rng: np.random.Generator) -> None:
    case = make_case(rng, shape=(60, 50, 30), low=(25, 20, 12), high=(30, 25, 15))
    starts = {tuple(random_crop(case, size=(16, 16, 8), rng=s, return_start=True)[1]) for s in range(10)}
    assert len(starts) > 1
    a = random_crop(case, size=(16, 16, 8), rng=3, return_start=True)[1]
    b = random_crop(case, size=(16, 16, 8), rng=3, return_start=True)[1]
    np.testing.assert_array_equal(a, b)


def test_random_crop_smaller_volume_is_padded_and_keeps_landmarks(rng: np.random.Generator) -> None:
    case = make_case(rng, shape=(10, 12, 6), low=1.0, high=(8.0, 10.0, 4.0))
    out, start = random_crop(case, size=(16, 16, 8), rng=rng, return_start=True)
    assert out.volume.shape == (16, 16, 8) and np.all(start <= 0)
    np.testing.assert_array_equal(out.present, case.present)


def test_random_crop_too_wide_keeps_as_many_as_possible() -> None:
    volume = np.zeros((40, 20, 10), dtype=np.int16)
    landmarks = np.full((14, 3), np.nan)
    landmarks[:4] = [[2.0, 10.0, 5.0], [30.0, 10.0, 5.0], [31.0, 10.0, 5.0], [33.0, 10.0, 5.0]]
    case = Case(volume=volume, landmarks=landmarks, spacing=(1.0, 1.0, 1.0))
    out = random_crop(case, size=(10, 10, 10), rng=0)
    assert out.present.sum() == 3 and out.present[1:4].all()  # the three clustered points, not the lone one


def test_random_crop_accepts_arrays(rng: np.random.Generator) -> None:
    volume = rng.normal(size=(20, 20, 10))
    out = random_crop((volume, np.array([[10.0, 10.0, 5.0]])), size=(8, 8, 4), rng=rng)
    assert out.volume.shape == (8, 8, 4) and out.present.all()
    with pytest.raises(ValueError, match="Case or a tuple"):
        random_crop(volume, size=(8, 8, 4))  # type: ignore[arg-type]


def test_choose_crop_start_without_landmarks_and_bad_size() -> None:
    start = choose_crop_start((20, 20, 10), None, (8, 8, 4), rng=0)
    assert np.all(start >= 0) and np.all(start <= [12, 12, 6])
    with pytest.raises(ValueError, match="size"):
        choose_crop_start((20, 20, 10), None, (8, 0, 4), rng=0)


def test_center_crop_ignores_landmarks(rng: np.random.Generator) -> None:
    case = make_case(rng, shape=(30, 26, 14))
    out, start = center_crop(case, size=(10, 10, 10), return_start=True)
    np.testing.assert_array_equal(start, [10, 8, 2])
    moved = Case(volume=case.volume, landmarks=np.full((14, 3), 1.0), spacing=case.spacing)
    np.testing.assert_array_equal(center_crop(moved, size=(10, 10, 10)).volume, out.volume)


# ------------------------------------------------------------------------------------------------ resampling
def _pairwise_mm(landmarks: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    mm = landmarks * spacing
    return np.linalg.norm(mm[:, None] - mm[None], axis=-1)


@pytest.mark.parametrize("target", [(1.0, 1.0, 1.0), 0.7, (0.33, 0.9, 0.5)])
def test_resample_preserves_mm_distances_and_world_positions(rng: np.random.Generator, target) -> None:
    case = make_case(rng, shape=(31, 27, 13), spacing=(0.4, 0.55, 1.3))
    out = resample(case, spacing=target)
    expected_shape = np.maximum(1, np.round(np.array(case.volume.shape) * case.spacing / np.broadcast_to(target, 3)))
    assert out.volume.shape == tuple(expected_shape.astype(int))
    np.testing.assert_allclose(out.spacing, case.spacing * np.array(case.volume.shape) / out.volume.shape)
    keep = case.present
    before = _pairwise_mm(case.landmarks[keep], case.spacing)
    after = _pairwise_mm(out.landmarks[keep], out.spacing)
    off = ~np.eye(len(before), dtype=bool)
    assert np.max(np.abs(after[off] - before[off]) / before[off]) < 1e-6
    np.testing.assert_allclose(voxel_to_world(out.landmarks[keep], out.affine),
                               voxel_to_world(case.landmarks[keep], case.affine), atol=1e-9)  # fmt: skip
    assert np.isnan(out.landmarks[~keep]).all()


def test_resample_keeps_a_blob_centroid_on_its_landmark() -> None:
    shape, spacing = np.array([40, 36, 20]), np.array([0.5, 0.6, 1.5])
    centre = np.array([19.3, 17.6, 9.4])
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1)
    mm = (grid - centre) * spacing
    volume = 1000.0 * np.exp(-(mm**2).sum(-1) / (2 * 2.5**2))  # round blob, sigma 2.5 mm
    landmarks = np.full((14, 3), np.nan)
    landmarks[0] = centre
    out = resample(Case(volume=volume, landmarks=landmarks, spacing=spacing), spacing=1.0)
    grid_new = np.stack(np.meshgrid(*[np.arange(n) for n in out.volume.shape], indexing="ij"), axis=-1)
    weights = out.volume.astype(np.float64)
    centroid = (grid_new * weights[..., None]).reshape(-1, 3).sum(0) / weights.sum()
    assert np.max(np.abs((centroid - out.landmarks[0]) * out.spacing)) < 0.02  # mm
    assert np.max(np.abs(centroid - out.landmarks[0])) < 0.02  # voxels


def test_resample_none_and_order_zero(rng: np.random.Generator) -> None:
    case = make_case(rng)
    same = resample(case, spacing=None)
    np.testing.assert_array_equal(same.volume, case.volume)
    np.testing.assert_array_equal(same.landmarks, case.landmarks)
    nearest = resample(case, spacing=(0.2, 0.25, 0.6), order=0)
    assert nearest.volume.dtype == np.int16 and nearest.volume.shape == (60, 52, 28)
    np.testing.assert_array_equal(nearest.volume[::2, ::2, ::2], case.volume)  # exact 2× upsampling


@pytest.mark.parametrize("bad", [0.0, -1.0, np.nan, (1.0, 1.0)])
def test_resample_bad_spacing(rng: np.random.Generator, bad) -> None:
    with pytest.raises(ValueError, match="spacing"):
        resample(make_case(rng), spacing=bad)


def test_to_source_voxels_undoes_resample_and_crop(rng: np.random.Generator) -> None:
    case = make_case(rng, shape=(31, 27, 13), spacing=(0.4, 0.55, 1.3))
    resampled = resample(case, spacing=0.8)
    out, start = random_crop(resampled, size=(12, 12, 12), rng=rng, return_start=True)
    back = to_source_voxels(out.landmarks, origin=start, spacing=out.spacing, source_spacing=case.spacing)
    np.testing.assert_allclose(back[out.present], case.landmarks[out.present], atol=1e-9)
    batched = to_source_voxels(torch.tensor(out.landmarks)[None], origin=torch.tensor(start)[None],
                               spacing=torch.tensor(out.spacing)[None],
                               source_spacing=torch.tensor(case.spacing)[None])  # fmt: skip
    np.testing.assert_allclose(batched[0].numpy(), back)


@pytest.mark.parametrize("which", ["spacing", "source_spacing"])
@pytest.mark.parametrize("bad", [0.0, -0.5, float("nan")])
@pytest.mark.parametrize("as_tensor", [False, True])
def test_to_source_voxels_rejects_bad_spacing(which: str, bad: float, as_tensor: bool) -> None:
    spacings = {"spacing": np.ones(3), "source_spacing": np.ones(3)}
    spacings[which] = np.array([1.0, bad, 1.0])
    if as_tensor:
        spacings = {k: torch.tensor(v) for k, v in spacings.items()}
    with pytest.raises(ValueError, match=rf"{which} must be finite positive voxel sizes in mm.*'source_spacing'"):
        to_source_voxels(np.zeros((2, 3)), origin=np.zeros(3), **spacings)


def test_to_source_voxels_rejects_spacing_without_three_axes() -> None:
    with pytest.raises(ValueError, match=r"source_spacing must have shape \(\.\.\., 3\)"):
        to_source_voxels(np.zeros((2, 3)), origin=np.zeros(3), spacing=np.ones(3), source_spacing=np.ones(2))


# ------------------------------------------------------------------------------------------------ zoom_to_fit
def test_zoom_to_fit_averages_blocks_and_moves_landmarks_by_hand(rng: np.random.Generator) -> None:
    volume = rng.normal(size=(32, 32, 16)).astype(np.float32)
    landmarks = np.full((14, 3), np.nan)
    landmarks[0] = [0.5, 3.5, 10.5]  # the centres of 2-voxel blocks 0, 1 and 5
    landmarks[1] = [31.0, 0.0, 2.0]
    case = Case(volume=volume, landmarks=landmarks, spacing=[0.5, 0.5, 1.0], case_id="z")
    out = zoom_to_fit(case, size=(16, 16, 8))  # factor 2 on every axis, nothing to pad
    blocks = volume.reshape(16, 2, 16, 2, 8, 2).mean(axis=(1, 3, 5))
    np.testing.assert_allclose(out.volume, blocks, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(out.landmarks[0], [0.0, 1.5, 5.0])
    np.testing.assert_allclose(out.landmarks[1], [15.25, -0.25, 0.75])  # (x + 0.5) / 2 - 0.5
    assert np.isnan(out.landmarks[2:]).all()
    np.testing.assert_allclose(out.spacing, [1.0, 1.0, 2.0])


def test_zoom_to_fit_keeps_aspect_pads_with_air_and_keeps_world_coordinates(rng: np.random.Generator) -> None:
    case = make_case(rng, shape=(40, 20, 16), spacing=(0.4, 0.5, 1.2))
    case.volume[:] = np.maximum(case.volume, -900)  # air (-1000) is then the padding alone
    case.volume[0, 0, 0] = -1000
    out = zoom_to_fit(case, size=(16, 16, 8))
    assert zoom_shape((40, 20, 16), (16, 16, 8)) == (16, 8, 6)  # one factor, 40 / 16 = 2.5, for every axis
    assert out.volume.shape == (16, 16, 8)
    np.testing.assert_array_equal(out.volume[:, :4], -1000.0)  # 8 rows centred in 16: 4 rows of padding before
    np.testing.assert_array_equal(out.volume[:, 12:], -1000.0)
    assert (out.volume[:, 4:12, 1:7] > -1000).all()
    np.testing.assert_allclose(out.spacing, np.array([0.4, 0.5, 1.2]) * [40 / 16, 20 / 8, 16 / 6])
    present = ~np.isnan(case.landmarks).any(axis=1)
    np.testing.assert_array_equal(~np.isnan(out.landmarks).any(axis=1), present)
    np.testing.assert_allclose(
        voxel_to_world(out.landmarks[present], out.affine), voxel_to_world(case.landmarks[present], case.affine)
    )


def test_zoom_to_fit_only_pads_a_volume_that_fits(rng: np.random.Generator) -> None:
    case = make_case(rng, shape=(12, 10, 6))
    out = zoom_to_fit(case, size=(16, 16, 8))
    np.testing.assert_array_equal(out.volume[2:14, 3:13, 1:7], case.volume)
    np.testing.assert_allclose(out.landmarks, case.landmarks + [2, 3, 1])
    np.testing.assert_allclose(out.spacing, case.spacing)
