"""h3de_lite.data.atlas: transforms that keep image and landmarks together, the single-atlas dataset, rigid test copies.

The golden check: bright dots drawn at known points of a synthetic volume, pulled through a random rigid + affine +
elastic transform onto a coarser, rotated grid, must have their centroids where the same transform pushes the points
(within 0.5 voxel).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from h3de_lite.data.atlas import (
    STREAMS,
    AtlasDataset,
    MRIntensityAugment,
    RandomPose,
    SpatialTransform,
    axis_angle_matrix,
    brain_mask,
    read_rigid_transforms,
    warp_to_grid,
    working_grid,
    write_rigid_copies,
)
from h3de_lite.data.augment import rotation_matrix
from h3de_lite.data.case import Case
from h3de_lite.data.nifti import voxel_to_world, world_to_voxel
from h3de_lite.data.transforms import percentile_normalize, resample
from h3de_lite.evaluation import load_labeled_case

NAMES = ("AC", "PC", "R MB", "L MB", "culmen", "genu of CC")


def _dots_case(shape=(48, 52, 44), spacing=(1.0, 1.2, 1.0), sigma_mm=1.6) -> Case:
    """Zero volume with one isotropic Gaussian dot (σ in mm) per landmark, on a rotated, anisotropic grid."""
    rng = np.random.default_rng(1)
    affine = np.eye(4)
    affine[:3, :3] = rotation_matrix([8.0, 0.0, -12.0]) @ np.diag(spacing)
    affine[:3, 3] = [-20.0, -30.0, -18.0]
    size = np.asarray(shape)
    # six corners of the box [0.3, 0.7] of the volume, jittered: the dots stay 15+ mm apart, so a centroid window
    # never holds a neighbour
    corners = np.array([[0, 0, 0], [1, 1, 0], [1, 0, 1], [0, 1, 1], [1, 1, 1], [0, 0, 1]], dtype=np.float64)
    points = (0.3 + 0.4 * corners) * size + rng.uniform(-1.0, 1.0, size=(len(NAMES), 3))
    grid = np.stack(np.meshgrid(*(np.arange(n) for n in shape), indexing="ij"), axis=-1).astype(np.float64)
    volume = np.zeros(shape, np.float32)
    for p in points:
        d2 = (((grid - p) * np.asarray(spacing)) ** 2).sum(-1)
        volume += np.exp(-d2 / (2 * sigma_mm**2)).astype(np.float32)
    return Case(volume=volume * 1000, landmarks=points, spacing=spacing, affine=affine, names=NAMES)


def _centroids(volume: np.ndarray, around: np.ndarray, radius: int = 3) -> np.ndarray:
    out = []
    for p in around:
        lo = np.maximum(np.round(p).astype(int) - radius, 0)
        hi = np.minimum(np.round(p).astype(int) + radius + 1, volume.shape)
        box = volume[tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))]
        grid = np.stack(np.meshgrid(*(np.arange(a, b) for a, b in zip(lo, hi, strict=True)), indexing="ij"), -1)
        w = np.clip(box - 0.05 * box.max(), 0, None)
        out.append((grid * w[..., None]).reshape(-1, 3).sum(0) / w.sum())
    return np.stack(out)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dots_follow_their_landmarks_through_rigid_affine_and_elastic_transforms(seed: int) -> None:
    case = _dots_case()
    pose = RandomPose(max_rotation_deg=30, max_shift_mm=8, scale=(0.9, 1.1), axis_scale=0.05, max_shear=0.05,
                      elastic_mm=2.0, elastic_spacing_mm=20.0)  # fmt: skip
    centre = voxel_to_world((np.asarray(case.volume.shape) - 1) / 2, case.affine)
    transform = pose.draw(np.random.default_rng(seed), centre=centre, extent_mm=80)
    assert transform.field is not None
    # a different, axis-aligned grid of 1.5 mm voxels over the same field of view: resampling and pose at once
    shape, affine = working_grid(Case(volume=case.volume, landmarks=np.zeros((0, 3)), spacing=case.spacing,
                                      names=()), 1.5)  # fmt: skip
    affine = affine.copy()
    affine[:3, :3] = np.diag([1.5, 1.5, 1.5])
    affine[:3, 3] = centre - (np.asarray(shape) - 1) / 2 * 1.5
    moved = warp_to_grid(case, transform, shape=shape, affine=affine)
    assert moved.is_complete
    found = _centroids(moved.volume, moved.landmarks)
    assert np.abs(found - moved.landmarks).max() < 0.5, np.abs(found - moved.landmarks).max()
    # and the expected position is the forward map of the world point, computed independently here
    expected = world_to_voxel(transform(voxel_to_world(case.landmarks, case.affine)), affine)
    np.testing.assert_allclose(moved.landmarks, expected, atol=1e-9)


def test_forward_map_inverts_the_pullback() -> None:
    pose = RandomPose(elastic_mm=3.0, elastic_spacing_mm=30.0)
    transform = pose.draw(np.random.default_rng(5), centre=np.zeros(3), extent_mm=120)
    x = np.random.default_rng(6).uniform(-50, 50, size=(100, 3))
    np.testing.assert_allclose(transform.inverse(transform(x)), x, atol=1e-5)
    nan = transform(np.full((2, 3), np.nan))
    assert np.isnan(nan).all()


def test_rigid_pose_limits_and_distances() -> None:
    pose = RandomPose.rigid(max_rotation_deg=20, max_shift_mm=20)
    centre = np.array([1.0, -18.0, 18.0])
    x = np.random.default_rng(0).uniform(-60, 60, size=(10, 3))
    d0 = np.linalg.norm(x[:, None] - x[None], axis=-1)
    for seed in range(50):
        t = pose.draw(np.random.default_rng(seed), centre=centre)
        r = t.matrix[:3, :3]
        np.testing.assert_allclose(r @ r.T, np.eye(3), atol=1e-12)
        angle = np.degrees(np.arccos(np.clip((np.trace(r) - 1) / 2, -1, 1)))
        assert 0 < angle <= 20 + 1e-9 and np.linalg.norm(t(centre) - centre) <= 20 + 1e-9
        y = t(x)
        np.testing.assert_allclose(np.linalg.norm(y[:, None] - y[None], axis=-1), d0, atol=1e-9)


def test_axis_angle_matches_rotation_matrix() -> None:
    np.testing.assert_allclose(axis_angle_matrix([0, 0, 1], 30), rotation_matrix([0, 0, 30]), atol=1e-12)
    with pytest.raises(ValueError, match="non-zero"):
        axis_angle_matrix([0, 0, 0], 10)


def test_working_grid_is_resample_grid() -> None:
    case = _dots_case()
    shape, affine = working_grid(case, 3.0)
    ref = resample(case, spacing=3.0)
    assert shape == ref.volume.shape
    np.testing.assert_allclose(affine, ref.affine, atol=1e-12)


def test_invalid_inputs_name_the_fix() -> None:
    with pytest.raises(ValueError, match="too large"):
        RandomPose(elastic_mm=10, elastic_spacing_mm=20)
    with pytest.raises(ValueError, match="max_rotation_deg"):
        RandomPose(max_rotation_deg=200)
    with pytest.raises(ValueError, match="singular"):
        SpatialTransform(matrix=np.zeros((4, 4)) + np.diag([0, 0, 0, 1]))
    with pytest.raises(ValueError, match="percentiles"):
        percentile_normalize(np.zeros(3), percentiles=(50, 10))


# ---------------------------------------------------------------------------------------------------- intensity, skull
def test_percentile_normalize_is_scale_free() -> None:
    v = np.random.default_rng(0).gamma(2.0, 100.0, size=(16, 16, 16))
    a = percentile_normalize(v)
    np.testing.assert_allclose(percentile_normalize(v * 37.0 + 5.0), a, atol=1e-3)
    assert a.min() == 0 and a.max() == pytest.approx(255.0) and a.dtype == np.float32
    assert (percentile_normalize(np.ones((4, 4, 4))) == 0).all()


def test_intensity_augment_is_seeded_and_finite() -> None:
    v = _dots_case().volume
    aug = MRIntensityAugment(p=1.0)
    a = aug(v, spacing=np.ones(3), rng=np.random.default_rng(3))
    b = aug(v, spacing=np.ones(3), rng=np.random.default_rng(3))
    np.testing.assert_array_equal(a, b)
    assert a.shape == v.shape and a.dtype == np.float32 and np.isfinite(a).all()
    assert not np.allclose(a / a.max(), v / v.max(), atol=1e-2)
    off = MRIntensityAugment(p=0.0)(v, spacing=np.ones(3), rng=np.random.default_rng(3))
    np.testing.assert_allclose(off / off.max(), v / v.max(), atol=1e-6)  # p = 0: only the scale changes


def test_brain_mask_keeps_the_brain_and_drops_the_scalp() -> None:
    shape = (64, 64, 64)
    r = np.linalg.norm(np.stack(np.meshgrid(*(np.arange(n) - 31.5 for n in shape), indexing="ij")), axis=0)  # mm
    volume = np.where(r < 22, 800.0, 0.0) + np.where((r >= 22) & (r < 28), 60.0, 0.0)  # brain, dark 6 mm skull
    volume += np.where((r >= 28) & (r < 31), 900.0, 0.0)  # bright scalp
    volume[(r < 5)] = 200.0  # dark "ventricle" inside: filled
    case = Case(volume=volume, landmarks=np.zeros((0, 3)), spacing=(1.0, 1.0, 1.0), names=())
    mask = brain_mask(case)
    assert mask.shape == shape and mask.dtype == bool
    assert mask[r < 19].mean() > 0.99 and mask[r < 5].all()
    assert mask[(r > 28.5) & (r < 30.5)].mean() < 0.01


# ---------------------------------------------------------------------------------------------------- dataset
def _template() -> Case:
    case = _dots_case(shape=(40, 44, 36), spacing=(2.0, 2.0, 2.0), sigma_mm=3.0)
    return Case(volume=case.volume + 100.0, landmarks=case.landmarks, spacing=case.spacing, affine=case.affine,
                names=case.names)  # fmt: skip


def test_training_items_are_seeded_always_transformed_and_valid() -> None:
    template = _template()
    ds = AtlasDataset(template, length=4, spacing=4.0, crop_size=(16, 16, 16), seed=3, p_stripped=0.0)
    item = ds[1]
    assert item["image"].shape == (1, 16, 16, 16) and item["image"].dtype == torch.float32
    assert 0.0 <= float(item["image"].min()) and float(item["image"].max()) <= 255.0 + 1e-3
    assert item["landmarks"].shape == (6, 3) and item["present"].all()
    assert torch.equal(ds[1]["image"], item["image"])  # same (seed, epoch, index): same sample
    ds.set_epoch(1)
    assert not torch.equal(ds[1]["image"], item["image"])
    for index in range(4):  # never the stored pose
        _, transform, _ = ds.sample(index)
        assert not np.allclose(transform.matrix[:3, :3], np.eye(3), atol=1e-3)
    # the un-cropped sample's landmarks are the forward map of the template's
    case, transform, _ = ds.sample(2)
    expected = world_to_voxel(transform(voxel_to_world(template.landmarks, template.affine)), ds.grid_affine)
    np.testing.assert_allclose(case.landmarks, expected, atol=1e-9)


def test_stripped_variant_and_validation_items() -> None:
    template = _template()
    mask = np.zeros(template.volume.shape, bool)
    mask[5:35, 5:39, 5:31] = True
    ds = AtlasDataset(template, length=2, spacing=4.0, crop_size=(16, 16, 16), p_stripped=1.0, mask=mask,
                      intensity=None)  # fmt: skip
    case, _, stripped = ds.sample(0)
    assert stripped and case.volume.min() == 0.0  # outside the mask
    val = AtlasDataset(template, split="val", length=2, spacing=4.0)
    a = val[0]
    val.set_epoch(5)
    assert a is val[0]  # cached, independent of the epoch
    assert a["image"].shape[1:] == resample(template, spacing=4.0).volume.shape
    world = voxel_to_world(a["landmarks"].double().numpy(), resample(template, spacing=4.0).affine)
    d = np.linalg.norm(world[:, None] - world[None], axis=-1)
    w0 = voxel_to_world(template.landmarks, template.affine)
    np.testing.assert_allclose(d, np.linalg.norm(w0[:, None] - w0[None], axis=-1), atol=1e-3)  # rigid
    with pytest.raises(ValueError, match="split"):
        AtlasDataset(template, split="test")  # type: ignore[arg-type]


def test_rigid_copies_are_an_evaluation_folder(tmp_path: Path) -> None:
    template = _template()
    template = Case(volume=np.rint(template.volume).astype(np.int16), landmarks=template.landmarks,
                    spacing=template.spacing, affine=template.affine, names=template.names)  # fmt: skip
    paths = write_rigid_copies(template, tmp_path, n=3, seed=0, max_rotation_deg=20, max_shift_mm=10)
    assert [p.name for p in paths] == ["rigid_00.nii.gz", "rigid_01.nii.gz", "rigid_02.nii.gz"]
    transforms = read_rigid_transforms(tmp_path)
    document = json.loads((tmp_path / "transforms.json").read_text())
    assert document["stream"] == "test" and STREAMS["test"] not in (STREAMS["train"], STREAMS["val"])
    w0 = voxel_to_world(template.landmarks, template.affine)
    for path in paths:
        case_id = path.name[: -len(".nii.gz")]
        case = load_labeled_case(path, tmp_path / f"{case_id}.fcsv", names=NAMES)
        assert case.volume.dtype == np.int16 and case.volume.shape == template.volume.shape
        world = voxel_to_world(case.landmarks, case.affine)
        m = transforms[case_id]
        np.testing.assert_allclose(world, w0 @ m[:3, :3].T + m[:3, 3], atol=1e-6)
        entry = document["cases"][case_id]
        assert 0 < entry["rotation_deg"] <= 20 and entry["shift_mm"] <= 10 + 1e-9
        found = _centroids(case.volume.astype(np.float64) - 100.0, case.landmarks, radius=3)
        assert np.abs(found - case.landmarks).max() < 0.5
    with pytest.raises(FileNotFoundError, match="write_rigid_copies"):
        read_rigid_transforms(tmp_path / "nothing")
