"""LandmarkDataset over a tiny MML-layout folder written in tmp_path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from h3de_lite.data.case import Case
from h3de_lite.data.dataset import LandmarkDataset
from h3de_lite.data.mml import write_mml_case
from h3de_lite.data.transforms import to_source_voxels

SHAPE = (28, 24, 12)
SPACING = np.array([0.5, 0.6, 1.2])
CROP = (16, 16, 8)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """Three train cases (0001, 0002 complete; 0003 missing two landmarks) and one test case."""
    rng = np.random.default_rng(0)
    for split, cid, missing in [("train", "0001", []), ("train", "0002", []), ("train", "0003", [4, 11]),
                                ("test", "0100", [])]:  # fmt: skip
        landmarks = rng.uniform([9, 8, 3], [17, 14, 8], size=(14, 3))  # fits inside a 16×16×8 crop
        landmarks[missing] = np.nan
        volume = rng.integers(-1500, 4000, size=SHAPE).astype(np.int16)
        write_mml_case(tmp_path / split, Case(volume=volume, landmarks=landmarks, spacing=SPACING, case_id=cid))
    return tmp_path


def test_item_contents(root: Path) -> None:
    ds = LandmarkDataset(root, "train", crop_size=CROP)
    assert len(ds) == 3 and ds.case_ids == ["0001", "0002", "0003"]
    item = ds[2]
    assert item["image"].shape == (1, *CROP) and item["image"].dtype == torch.float32
    assert item["image"].min() >= 0 and item["image"].max() <= 255
    assert item["landmarks"].shape == (14, 3) and item["landmarks"].dtype == torch.float32
    assert item["present"].dtype == torch.bool and item["present"].tolist() == [i not in (4, 11) for i in range(14)]
    assert torch.isnan(item["landmarks"][~item["present"]]).all()
    assert item["spacing"].dtype == torch.float32 and torch.allclose(item["spacing"], torch.tensor(SPACING).float())
    assert item["origin"].dtype == torch.int64 and item["origin"].shape == (3,)
    assert item["case_id"] == "0003"


def test_landmarks_and_image_map_back_to_the_source(root: Path) -> None:
    from h3de_lite.data.mml import read_mml_case
    from h3de_lite.data.transforms import normalize_intensity

    ds = LandmarkDataset(root, "train", crop_size=CROP, seed=3)
    source = read_mml_case(root / "train", "0001")
    item = ds[0]
    o = item["origin"].numpy()
    back = to_source_voxels(item["landmarks"].double(), origin=item["origin"], spacing=item["spacing"].double(),
                            source_spacing=item["source_spacing"].double())  # fmt: skip
    np.testing.assert_allclose(back.numpy(), source.landmarks, atol=1e-5)
    window = source.volume[o[0] : o[0] + CROP[0], o[1] : o[1] + CROP[1], o[2] : o[2] + CROP[2]]
    np.testing.assert_allclose(item["image"][0].numpy(), normalize_intensity(window), rtol=1e-6)


def test_subsets_use_uncropped_presence(root: Path) -> None:
    assert LandmarkDataset(root, "train", subset="complete", crop_size=CROP).case_ids == ["0001", "0002"]
    assert LandmarkDataset(root, "train", subset="incomplete", crop_size=CROP).case_ids == ["0003"]
    with pytest.raises(ValueError, match="subset 'incomplete'.*empty"):
        LandmarkDataset(root, "test", subset="incomplete")
    with pytest.raises(ValueError, match="subset must be"):
        LandmarkDataset(root, "train", subset="partial")  # type: ignore[arg-type]


def test_default_collate(root: Path) -> None:
    batch = next(iter(DataLoader(LandmarkDataset(root, "train", crop_size=CROP), batch_size=2)))
    assert batch["image"].shape == (2, 1, *CROP)
    assert batch["landmarks"].shape == (2, 14, 3) and batch["present"].shape == (2, 14)
    assert batch["origin"].shape == (2, 3) and batch["case_id"] == ["0001", "0002"]


def test_whole_volume_and_centre_crop(root: Path) -> None:
    whole = LandmarkDataset(root, "test", crop_size=None)[0]
    assert whole["image"].shape == (1, *SHAPE) and whole["origin"].tolist() == [0, 0, 0]
    centre = LandmarkDataset(root, "test", crop_size=CROP, random_crop=False)
    first, again = centre[0], centre[0]
    assert first["origin"].tolist() == [6, 4, 2]  # (SHAPE - CROP) // 2: the volume centre, not the landmarks
    assert torch.equal(first["image"], again["image"])


def test_random_crops_reproducible_and_varying(root: Path) -> None:
    a = LandmarkDataset(root, "train", crop_size=CROP, seed=7)
    b = LandmarkDataset(root, "train", crop_size=CROP, seed=7)
    first = []
    for epoch in range(8):
        a.set_epoch(epoch)
        first.append(a[0]["origin"].tolist())
        assert a[0]["origin"].tolist() == first[-1]  # the same (seed, epoch, index): the same crop, however often
    for epoch in reversed(range(8)):  # any order, any process: only (seed, epoch, index) matters
        b.set_epoch(epoch)
        assert b[0]["origin"].tolist() == first[epoch]
    assert len({tuple(o) for o in first}) > 1  # a new crop every epoch
    for origin in first:  # all landmarks stay in view
        assert np.all(np.array(origin) >= 0)
    assert all(a[i]["present"].sum() == b[i]["present"].sum() for i in range(3))
    with pytest.raises(ValueError, match="epoch must be an int"):
        a.set_epoch(-1)


def test_augmentation_is_training_only_and_seeded(root: Path) -> None:
    from h3de_lite.data.augment import IntensityJitter, RandomFlipLR

    ds = LandmarkDataset(root, "train", crop_size=CROP, seed=3, augment=RandomFlipLR(p=1.0))
    plain = LandmarkDataset(root, "train", crop_size=CROP, seed=3)
    flipped, item = ds[0], plain[0]
    assert not torch.equal(flipped["image"], item["image"])
    jitter = LandmarkDataset(root, "train", crop_size=CROP, seed=3, intensity_augment=IntensityJitter())
    assert torch.equal(jitter[1]["image"], jitter[1]["image"])  # seeded by (seed, epoch, index)
    assert torch.equal(jitter[1]["landmarks"].isnan(), plain[1]["landmarks"].isnan())
    for kwargs in ({"augment": RandomFlipLR()}, {"intensity_augment": IntensityJitter()}, {"p_background": 0.5}):
        with pytest.raises(ValueError, match="training items"):
            LandmarkDataset(root, "test", **kwargs)


def test_rotation_is_resampled_in_the_crop_only_and_gives_the_same_items(root: Path, monkeypatch) -> None:
    """A trailing RandomRotateScale is resampled inside the crop (warp_crop): the items of the whole-volume warp, and
    no whole-volume warp made."""
    from h3de_lite.data import augment as aug
    from h3de_lite.data.augment import Compose, RandomFlipLR, RandomRotateScale

    pipeline = Compose([RandomFlipLR(), RandomRotateScale(degrees=15, scale=(0.9, 1.1))])
    kwargs = dict(crop_size=CROP, seed=5, p_partial=0.3, p_background=0.2)
    windowed = LandmarkDataset(root, "train", augment=pipeline, **kwargs)
    whole = LandmarkDataset(root, "train", augment=lambda case, rng: pipeline(case, rng), **kwargs)  # opaque: whole
    warped_shapes = []
    real_warp = aug.warp

    def counted_warp(case, *args, **kwargs):
        warped_shapes.append(case.volume.shape)
        return real_warp(case, *args, **kwargs)

    monkeypatch.setattr(aug, "warp", counted_warp)
    for epoch in range(3):
        for ds in (windowed, whole):
            ds.set_epoch(epoch)
        for i in range(3):
            before = len(warped_shapes)
            a = windowed[i]
            assert len(warped_shapes) == before  # the windowed path never warps the whole volume
            b = whole[i]
            assert len(warped_shapes) == before + 1
            torch.testing.assert_close(a["image"], b["image"], rtol=0, atol=1e-3)
            torch.testing.assert_close(a["landmarks"], b["landmarks"], equal_nan=True)


def test_background_crops_hold_no_landmark(tmp_path: Path) -> None:
    volume = np.zeros((40, 40, 20), dtype=np.int16)
    landmarks = np.full((14, 3), np.nan)
    landmarks[:3] = [[5.0, 5.0, 5.0], [6.0, 6.0, 4.0], [7.0, 5.0, 6.0]]  # one corner: windows elsewhere are empty
    write_mml_case(tmp_path / "train", Case(volume=volume, landmarks=landmarks, spacing=SPACING, case_id="0001"))
    ds = LandmarkDataset(tmp_path, "train", crop_size=CROP, p_background=1.0)
    for epoch in range(5):
        ds.set_epoch(epoch)
        assert not ds[0]["present"].any()
    assert LandmarkDataset(tmp_path, "train", crop_size=CROP)[0]["present"].sum() == 3


def test_target_spacing_and_window_none(root: Path) -> None:
    ds = LandmarkDataset(root, "test", crop_size=None, target_spacing=1.2, window=None)
    item = ds[0]
    assert item["image"].shape == (1, 12, 12, 12)
    np.testing.assert_allclose(item["spacing"].numpy(), SPACING * np.array(SHAPE) / 12, rtol=1e-6)
    np.testing.assert_allclose(item["source_spacing"].numpy(), SPACING)
    assert item["image"].min() < 0  # raw HU kept when window is None


def test_errors(root: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"does_not_exist.*h3de-lite phantom --out"):
        LandmarkDataset(root / "does_not_exist", "train")
    with pytest.raises(FileNotFoundError, match=r"val.*h3de-lite phantom --out"):
        LandmarkDataset(root, "val")
    (root / "empty").mkdir()
    with pytest.raises(ValueError, match="no cases"):
        LandmarkDataset(root, "empty")
    with pytest.raises(ValueError, match="crop_size"):
        LandmarkDataset(root, "train", crop_size=(16, 16))
    with pytest.raises(ValueError, match="target_spacing"):
        LandmarkDataset(root, "train", target_spacing=(1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="window"):
        LandmarkDataset(root, "train", window=(10.0, 0.0))
    with pytest.raises(IndexError):
        LandmarkDataset(root, "train")[3]


def _rewrite_labels(directory: Path, case_id: str, landmarks: np.ndarray) -> None:
    """Replace one case's landmarks on disk (same volume, spacing and geometry)."""
    from h3de_lite.data.mml import read_mml_case

    case = read_mml_case(directory, case_id)
    write_mml_case(directory, Case(volume=case.volume, landmarks=landmarks, spacing=case.spacing, case_id=case_id,
                                   affine=case.affine))  # fmt: skip


@pytest.mark.parametrize("kwargs", [{}, {"crop_size": CROP}, {"crop_size": (32, 32, 16)}])
def test_evaluation_item_never_sees_the_ground_truth(root: Path, kwargs: dict) -> None:
    corner = np.tile([[1.0, 1.0, 0.5]], (14, 1))  # every landmark far from the others, in one corner
    seen = []
    for landmarks in (None, corner, np.full((14, 3), np.nan)):
        if landmarks is not None:
            _rewrite_labels(root / "test", "0100", landmarks)
        item = LandmarkDataset(root, "test", **kwargs)[0]  # a fresh dataset: same seed, same call count
        seen.append((item["image"], item["origin"]))
    for image, origin in seen[1:]:
        assert torch.equal(image, seen[0][0]) and torch.equal(origin, seen[0][1])
    assert seen[2][0].shape == (1, *kwargs.get("crop_size", SHAPE))


def test_default_items_train_random_crop_evaluation_whole_volume(root: Path) -> None:
    from h3de_lite.data.mml import read_mml_case

    train = LandmarkDataset(root, "train")
    assert train.crop_size == (128, 128, 64) and train.random_crop
    landmarks = np.array(read_mml_case(root / "test", "0100").landmarks)
    landmarks[[0, 13]] = [[0.0, 0.0, 0.0], [27.0, 23.0, 11.0]]  # in the volume's corners
    landmarks[5] = np.nan
    _rewrite_labels(root / "test", "0100", landmarks)
    test = LandmarkDataset(root, "test")
    assert test.crop_size is None and not test.random_crop
    item = test[0]
    assert item["image"].shape == (1, *SHAPE) and item["origin"].tolist() == [0, 0, 0]
    assert item["present"].tolist() == [i != 5 for i in range(14)]
    np.testing.assert_array_equal(item["landmarks"].numpy(), landmarks.astype(np.float32))


def test_evaluation_crop_keeps_out_of_crop_landmarks(root: Path) -> None:
    from h3de_lite.data.mml import read_mml_case

    landmarks = np.array(read_mml_case(root / "test", "0100").landmarks)
    landmarks[0] = [1.0, 2.0, 0.0]  # before the centred crop [6, 22) × [4, 20) × [2, 10)
    landmarks[1] = [27.0, 23.0, 11.0]  # after it
    landmarks[2] = np.nan
    _rewrite_labels(root / "test", "0100", landmarks)
    ds = LandmarkDataset(root, "test", crop_size=CROP)
    assert not ds.random_crop
    item = ds[0]
    assert item["origin"].tolist() == [6, 4, 2]
    expected = (landmarks - [6, 4, 2]).astype(np.float32)
    np.testing.assert_array_equal(item["landmarks"].numpy(), expected)
    assert item["landmarks"][0].tolist() == [-5.0, -2.0, -2.0] and item["landmarks"][1].tolist() == [21.0, 19.0, 9.0]
    assert item["present"].tolist() == [i != 2 for i in range(14)]  # out of crop is still present
    back = to_source_voxels(item["landmarks"].double(), origin=item["origin"], spacing=item["spacing"].double(),
                            source_spacing=item["source_spacing"].double())  # fmt: skip
    np.testing.assert_allclose(back.numpy(), landmarks, atol=1e-5)

    # a crop larger than the volume is centred too and padded with the volume minimum
    big = LandmarkDataset(root, "test", crop_size=(32, 32, 16), window=None)[0]
    assert big["origin"].tolist() == [-2, -4, -2]
    source = read_mml_case(root / "test", "0100").volume
    np.testing.assert_array_equal(big["image"][0, 2:30, 4:28, 2:14].numpy(), source.astype(np.float32))
    assert (big["image"][0, :2] == float(source.min())).all()
    np.testing.assert_array_equal(big["landmarks"][0].numpy(), [3.0, 6.0, 2.0])


def test_explicit_random_crop_at_evaluation_and_crop_errors(root: Path) -> None:
    ds = LandmarkDataset(root, "test", crop_size=CROP, random_crop=True)  # allowed, when asked for explicitly
    item = ds[0]
    assert ds.random_crop and item["image"].shape == (1, *CROP) and item["present"].all()
    with pytest.raises(ValueError, match=r"random_crop=True needs a crop.*crop_size="):
        LandmarkDataset(root, "test", crop_size=None, random_crop=True)
    with pytest.raises(ValueError, match=r"crop_size .*'auto'"):
        LandmarkDataset(root, "test", crop_size="centre")  # type: ignore[arg-type]


def test_cache_gives_the_same_items_without_rereading(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import h3de_lite.data.dataset as dataset_module

    plain = LandmarkDataset(root, "train", crop_size=CROP, seed=2, target_spacing=0.8)
    cached = LandmarkDataset(root, "train", crop_size=CROP, seed=2, target_spacing=0.8, cache=True)
    first = [cached[i] for i in range(3)]
    monkeypatch.setattr(dataset_module, "read_mml_case", lambda *a, **k: pytest.fail("read again"))
    for epoch in (0, 1):
        cached.set_epoch(epoch)
        plain.set_epoch(epoch)
        for i in range(3):
            item = cached[i]
            if epoch == 0:
                assert torch.equal(item["image"], first[i]["image"])
            monkeypatch.undo()
            expected = plain[i]
            monkeypatch.setattr(dataset_module, "read_mml_case", lambda *a, **k: pytest.fail("read again"))
            assert torch.equal(item["image"], expected["image"])
            assert torch.equal(item["landmarks"].nan_to_num(-1), expected["landmarks"].nan_to_num(-1))


def test_zoomed_items_are_the_whole_volume_zoomed_to_fit_the_crop(root: Path) -> None:
    from h3de_lite.data.mml import read_mml_case
    from h3de_lite.data.transforms import normalize_intensity, zoom_to_fit

    zoomed = LandmarkDataset(root, "train", crop_size=CROP, p_zoom=1.0, p_partial=0.5, seed=4)
    for index, cid in enumerate(zoomed.case_ids):
        item = zoomed[index]
        expected = zoom_to_fit(read_mml_case(root / "train", cid), size=CROP)  # (28, 24, 12) / 1.75 → (16, 14, 7)
        torch.testing.assert_close(item["image"][0], torch.from_numpy(normalize_intensity(expected.volume)))
        np.testing.assert_allclose(item["landmarks"].numpy(), expected.landmarks, rtol=1e-6, atol=1e-5)
        np.testing.assert_allclose(item["spacing"].numpy(), SPACING * [28 / 16, 24 / 14, 12 / 7], rtol=1e-6)
        assert item["present"].sum() == (12 if cid == "0003" else 14)  # every present landmark stays in view
    plain = LandmarkDataset(root, "train", crop_size=CROP, p_partial=0.5, seed=4)
    same = LandmarkDataset(root, "train", crop_size=CROP, p_partial=0.5, p_zoom=0.0, seed=4)
    for epoch in range(4):  # p_zoom = 0 draws nothing more: the crops of existing runs are unchanged
        plain.set_epoch(epoch)
        same.set_epoch(epoch)
        assert plain[0]["origin"].tolist() == same[0]["origin"].tolist()
    for bad in (-0.1, 1.5, "half"):
        with pytest.raises(ValueError, match="p_zoom"):
            LandmarkDataset(root, "train", crop_size=CROP, p_zoom=bad)
    with pytest.raises(ValueError, match="training items"):
        LandmarkDataset(root, "test", p_zoom=0.5)
