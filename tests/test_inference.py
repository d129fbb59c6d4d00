"""Whole-volume inference: sizes, known answers with fake networks, translation, anchors, labels never read."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from h3de_lite.data.case import Case
from h3de_lite.data.dataset import LandmarkDataset
from h3de_lite.data.mml import write_mml_case
from h3de_lite.data.nifti import write_nifti
from h3de_lite.data.phantom import generate_phantom
from h3de_lite.heatmaps import gaussian_heatmaps
from h3de_lite.inference import (
    INPUT_SCALE,
    predict_case,
    predict_volume,
    prepare_input,
    gaussian_weights,
    sliding_window_outputs,
)
from h3de_lite.inference import _group_windows
from h3de_lite.models import H3DENet

ROI = (64, 64, 32)  # the tiny preset's input size
STRATEGIES = ("sliding", "coarse_to_fine")


class Echo(nn.Module):
    """A fake network whose L heatmaps are its input: on a Gaussian blob it 'finds' the blob wherever the window is.

    It records the shape of every window it sees and refuses sizes that are not multiples of 32, like H3DENet.
    """

    def __init__(self, num_landmarks: int = 1) -> None:
        super().__init__()
        self.num_landmarks = num_landmarks
        self.calls: list[tuple[int, ...]] = []
        self.anchor = nn.Parameter(torch.zeros(()))  # gives the module a device

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if any(s % 32 for s in x.shape[2:]):
            raise ValueError(f"sizes must be multiples of 32, got {tuple(x.shape)}")
        self.calls.append(tuple(x.shape))
        return x.expand(-1, self.num_landmarks, -1, -1, -1) + self.anchor


class MultipleOf32(nn.Module):
    """Passes its input through, refusing spatial sizes that are not multiples of 32 (as H3DENet does)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if any(s % 32 for s in x.shape[2:]):
            raise ValueError(f"sizes must be multiples of 32, got {tuple(x.shape)}")
        return x


class Blur(Echo):
    """Echo followed by a 7³ box blur with zero padding: its output near a window face depends on the window."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool3d(super().forward(x), kernel_size=7, stride=1, padding=3, count_include_pad=True)


class CellMeanAnchors(Echo):
    """A fake anchor-based network (n_a = 1, stride 4): existence probability of a cell = 0.01 + 0.98 × its mean
    input (in [0, 1]; 1 - input with ``invert``), offsets a constant ``shift`` (in anchor radii). It depends only on
    the cell's content, so the probabilities of a whole volume are known exactly when windows are stride-aligned."""

    def __init__(self, shift: float, invert: bool = False) -> None:
        super().__init__(num_landmarks=1)
        self.shift = shift
        self.invert = invert

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        heatmaps = super().forward(x)
        p = 0.01 + 0.98 * F.avg_pool3d(1 - x if self.invert else x, kernel_size=4)  # (B, 1, D/4, H/4, W/4)
        logits = rearrange(torch.logit(p), "b l d h w -> b (d h w) l")  # (B, A, L)
        offsets = torch.full((*logits.shape, 3), self.shift)  # (B, A, L, 3)
        return {"heatmaps": heatmaps, "offsets": offsets, "logits": logits}


def blob_image(shape: tuple[int, int, int], centres: list[list[float]], sigma: float = 2.0) -> torch.Tensor:
    """``(1, D, H, W)`` image in [0, 255] holding Gaussian blobs of height 255 at ``centres``."""
    heat = gaussian_heatmaps(torch.tensor([centres], dtype=torch.float64), shape, sigma=sigma)  # (1, L, D, H, W)
    return (heat.amax(dim=1) * INPUT_SCALE).float()  # (1, D, H, W)


# ------------------------------------------------------------------------------------------- input convention
def test_prepare_input_maps_0_255_to_0_1():
    image = torch.tensor([0.0, 51.0, 255.0], dtype=torch.float64)
    out = prepare_input(image)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.tensor([0.0, 0.2, 1.0]))


# ------------------------------------------------------------------------------------------- sizes
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize(
    "shape",
    [(37, 50, 29), (64, 64, 32), (70, 90, 45), (130, 33, 17)],
    ids=["smaller-odd", "equal", "larger-odd", "mixed"],
)
def test_any_volume_size_gives_coords_inside_the_volume(shape, strategy):
    torch.manual_seed(0)
    model = nn.Sequential(MultipleOf32(), nn.Conv3d(1, 3, kernel_size=3, padding=1), nn.Tanh())
    image = torch.rand(1, *shape) * 255
    coords, present, score = predict_volume(model, image, roi_size=ROI, strategy=strategy, threshold=0.0)
    assert coords.shape == (3, 3) and present.shape == score.shape == (3,)
    assert coords.dtype == score.dtype == torch.float32 and present.dtype == torch.bool
    assert present.all()  # threshold 0: every landmark present
    upper = torch.tensor(shape, dtype=torch.float32) - 1
    assert ((coords >= 0) & (coords <= upper)).all(), coords


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_windows_are_roi_sized_multiples_of_32(strategy):
    model = Echo()
    predict_volume(model, blob_image((70, 90, 45), [[30.0, 40.0, 20.0]]), roi_size=ROI, strategy=strategy)
    assert len(model.calls) > 1
    assert all(shape[2:] == ROI for shape in model.calls)


def test_tiny_h3denet_on_an_odd_volume_smaller_than_its_crop():
    model = H3DENet.from_preset("tiny", num_landmarks=4)
    coords, present, score = predict_volume(model, torch.rand(1, 37, 50, 29) * 255, roi_size=ROI, threshold=0.0)
    assert coords.shape == (4, 3) and present.all() and torch.isfinite(score).all()
    assert ((coords >= 0) & (coords <= torch.tensor([36.0, 49.0, 28.0]))).all()


# ------------------------------------------------------------------------------------------- known answers
@pytest.mark.parametrize("sw_batch_size", [1, 3])
def test_sliding_windows_recover_a_blob_across_a_window_border(sw_batch_size):
    # Padded volume (100, 80, 52); along D the windows are [0, 64) and [36, 100): the blob at D = 62.3 straddles the
    # end of the first; along W (padded by one voxel in front) at 31.2 + 1 it straddles the end of [0, 32).
    shape, centre = (100, 80, 50), [62.3, 40.6, 31.2]
    model = Echo()
    image = blob_image(shape, [centre])
    coords, present, score = predict_volume(model, image, roi_size=ROI, sw_batch_size=sw_batch_size)
    assert sum(c[0] for c in model.calls) == 8  # 2 × 2 × 2 windows
    assert present.all()
    nearest_voxel_d2 = 0.3**2 + 0.4**2 + 0.2**2  # the peak voxel (62, 41, 31) of the blob
    torch.testing.assert_close(score, torch.tensor([np.exp(-nearest_voxel_d2 / 8)], dtype=torch.float32))
    assert (coords[0] - torch.tensor(centre)).abs().max() < 1e-3, coords


def test_coarse_to_fine_recovers_a_blob_in_a_large_volume():
    shape, centre = (150, 120, 60), [97.4, 30.7, 41.1]
    model = Echo()
    coords, present, _ = predict_volume(model, blob_image(shape, [centre], sigma=3.0), roi_size=ROI,
                                        strategy="coarse_to_fine")  # fmt: skip
    assert len(model.calls) == 2  # one coarse window, one full-resolution window
    assert present.all()
    assert (coords[0] - torch.tensor(centre)).abs().max() < 1e-3, coords


def test_coarse_to_fine_searches_only_near_the_coarse_estimate():
    # A broad blob A (height 180) survives the coarse view (zoom 150 / 64 = 2.34); a narrow spike B (height 255),
    # 10 voxels away in the same fine window, is averaged away there but is the fine window's highest voxel.
    shape, a, b = (150, 120, 60), [70.0, 60.0, 30.0], [80.0, 60.0, 30.0]
    broad = gaussian_heatmaps(torch.tensor([[a]], dtype=torch.float64), shape, sigma=4.0)[0, 0] * 180
    spike = gaussian_heatmaps(torch.tensor([[b]], dtype=torch.float64), shape, sigma=0.7)[0, 0] * 255
    image = torch.maximum(broad, spike).float()[None]
    near, _, _ = predict_volume(Echo(), image, roi_size=ROI, strategy="coarse_to_fine")  # default: 2 coarse voxels
    anywhere, _, _ = predict_volume(Echo(), image, roi_size=ROI, strategy="coarse_to_fine", search_radius=None)
    assert (near[0] - torch.tensor(a)).abs().max() < 1e-3, near
    assert (anywhere[0] - torch.tensor(b)).abs().max() < 1e-3, anywhere
    for bad in (0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="search_radius"):
            predict_volume(Echo(), image, roi_size=ROI, strategy="coarse_to_fine", search_radius=bad)


def test_coarse_to_fine_landmarks_at_one_place_share_one_window():
    model = Echo(num_landmarks=3)  # three identical channels: three estimates at the same blob
    predict_volume(model, blob_image((150, 120, 60), [[60.0, 60.0, 30.0]], sigma=3.0), roi_size=ROI,
                   strategy="coarse_to_fine")  # fmt: skip
    assert len(model.calls) == 2


def test_fine_windows_are_centred_and_shared_only_well_inside():
    # roi (64, 64, 32), margin roi // 4 = (16, 16, 8); padded volume (150, 120, 60).
    centres = torch.tensor([
        [60.0, 60.0, 30.0],  # new window centred: start (28, 28, 14)
        [75.0, 47.0, 23.0],  # inside [28 + 16, 28 + 63 - 16] × … × [14 + 8, 14 + 31 - 8]: shares window 0
        [76.0, 60.0, 30.0],  # 76 > 28 + 63 - 16 = 75: too close to the face, new window at (44, 28, 14)
        [3.0, 118.0, 59.0],  # near the corner: window clamped into the volume at (0, 56, 28)
    ])  # fmt: skip
    starts, owner = _group_windows(centres, ROI, (150, 120, 60), margin=[16, 16, 8])
    assert starts == [(28, 28, 14), (44, 28, 14), (0, 56, 28)]
    assert owner == [0, 0, 1, 2]


def test_gaussian_weights_are_the_unclamped_separable_profile():
    w = gaussian_weights((8, 8, 4))  # σ = 1, 1, 0.5 voxel; centre at 3.5, 3.5, 1.5
    assert w.shape == (8, 8, 4) and w.max() == 1.0 and w[3, 4, 1] == 1.0
    # Corner: exp(-(3.5² - 0.5²) / 2) twice (relative to the central voxels) and exp(-(1.5² - 0.5²) / (2 · 0.25)).
    torch.testing.assert_close(w[0, 0, 0], torch.tensor(np.exp(-6.0 - 6.0 - 4.0), dtype=torch.float32))
    assert w.min() < 1e-6  # MONAI's map would stop at 1e-3


def test_blending_matches_the_network_run_on_the_whole_volume():
    # Blur is translation-equivariant except within 3 voxels of a window face (zero padding). On the whole volume it
    # gives the reference; Gaussian blending must keep the face errors of each window out of the blend. (MONAI's
    # default weight map, clamped at 1e-3, lets them through: 0.017 where the peak is 0.42.)
    shape = (110, 96, 52)
    image = blob_image(shape, [[50.2, 44.7, 28.4], [20.0, 70.0, 10.0]], sigma=2.5)
    out = sliding_window_outputs(Blur(), image, roi_size=ROI)
    reference = F.avg_pool3d(prepare_input(image)[None], kernel_size=7, stride=1, padding=3)[0]  # (1, D, H, W)
    assert out.num_windows == 8 and out.heatmaps.shape == (1, *shape)
    assert (out.heatmaps - reference).abs().max() < 1e-3


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_a_shifted_blob_gives_a_shifted_prediction(strategy):
    shape, centre, shift = (110, 96, 52), [50.2, 44.7, 28.4], torch.tensor([5.0, -5.0, 5.0])
    preds = []
    for c in (torch.tensor(centre), torch.tensor(centre) + shift):
        coords, _, _ = predict_volume(Blur(), blob_image(shape, [c.tolist()], sigma=2.5), roi_size=ROI,
                                      strategy=strategy, threshold=0.0)  # fmt: skip
        preds.append(coords[0])
    # Errors measured: sliding 0.009 (0.22 with MONAI's clamped weight map), coarse-to-fine 2e-6 (its window is
    # centred on the blob); 0.001 of the distance to the centre is the box blur's own sub-voxel bias.
    assert (preds[1] - preds[0] - shift).abs().max() < 0.02, preds
    assert (preds[0] - torch.tensor(centre)).abs().max() < 0.02, preds[0]


# ------------------------------------------------------------------------------------------- anchor head
@pytest.mark.parametrize("overlap", [0.25, 0.3])
def test_anchor_grid_is_blended_on_stride_aligned_windows(overlap):
    # A bright 4³ cube filling cell (10, 9, 6) of the global stride-4 grid. Its probability is 0.99 in every window
    # whose cells line up with the global ones, and lower in any window that starts off the stride (the cell would be
    # split between two of its cells). Overlap 0.3 makes MONAI's own step along W int(32 × 0.7) = 22, not a
    # multiple of 4; the aligned step is 20. Offsets are 0.5 radii (r = 2 voxels): +1 voxel on every axis.
    shape = (96, 72, 60)  # multiples of 4 and ≥ ROI: no padding
    image = torch.zeros(1, *shape)
    image[0, 40:44, 36:40, 24:28] = 255.0
    model = CellMeanAnchors(shift=0.5)
    out = sliding_window_outputs(model, image, roi_size=ROI, overlap=overlap)
    assert out.grid is not None and out.grid.volume_shape == shape and out.pad == (0, 0, 0)
    assert out.probabilities.shape == (24 * 18 * 15, 1) and out.offsets.shape == (24 * 18 * 15, 1, 3)
    assert len(model.calls) > 8
    coords, present, score = predict_volume(model, image, roi_size=ROI, overlap=overlap)
    assert present.all()
    torch.testing.assert_close(score, torch.tensor([0.99]), atol=1e-6, rtol=0)
    torch.testing.assert_close(coords, torch.tensor([[42.5, 38.5, 26.5]]), atol=1e-5, rtol=0)


def test_anchor_decoding_ignores_cells_in_the_padding_and_stays_inside():
    # An inverted detector (probability 0.01 + 0.98 × darkness) sees the air padding as 0.99 everywhere; only cells
    # overlapping the volume may vote. (37, 50, 29) is padded to (64, 64, 32) with (13, 7, 1) voxels in front, so
    # padded cell (12, 4, 2) holds the volume's last two D voxels, 35-36, and H 9-12, W 7-10: darkened, it is the
    # only in-volume cell at 0.99. Its anchor (49.5, 17.5, 9.5) + 1 voxel of offset is (37.5, 11.5, 9.5) in the
    # volume, past its last D voxel, so D is clamped to 36.
    image = torch.full((1, 37, 50, 29), 255.0)
    image[0, 35:37, 9:13, 7:11] = 0.0
    coords, present, score = predict_volume(CellMeanAnchors(shift=0.5, invert=True), image, roi_size=ROI, top=1)
    assert present.all()
    torch.testing.assert_close(score, torch.tensor([0.99]), atol=1e-6, rtol=0)
    torch.testing.assert_close(coords, torch.tensor([[36.0, 11.5, 9.5]]), atol=1e-5, rtol=0)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_tiny_anchor_h3denet_returns_shapes(strategy):
    model = H3DENet.from_preset("tiny", num_landmarks=2, head="anchor", anchors="multi")
    image = torch.rand(1, 37, 50, 29 if strategy == "sliding" else 40) * 255  # coarse-to-fine: W 40 > 32
    coords, present, score = predict_volume(model, image, roi_size=ROI, strategy=strategy, threshold=0.0,
                                            sw_batch_size=2)  # fmt: skip
    assert coords.shape == (2, 3) and present.shape == score.shape == (2,) and present.all()
    assert ((score >= 0) & (score <= 1)).all()
    assert ((coords >= 0) & (coords <= torch.tensor(image.shape[1:], dtype=torch.float32) - 1)).all()


# ------------------------------------------------------------------------------------------- labels never read
def test_a_case_with_all_missing_labels_gets_the_same_predictions(tmp_path):
    case = generate_phantom(seed=3, shape=(40, 48, 28), case_id="0000")
    assert case.present.all()
    unlabelled = Case(volume=case.volume, landmarks=np.full_like(case.landmarks, np.nan), spacing=case.spacing,
                      case_id=case.case_id, affine=case.affine)  # fmt: skip
    write_mml_case(tmp_path / "real" / "test", case)
    write_mml_case(tmp_path / "missing" / "test", unlabelled)
    real = LandmarkDataset(tmp_path / "real", "test", crop_size=None)[0]
    missing = LandmarkDataset(tmp_path / "missing", "test", crop_size=None)[0]
    assert real["present"].all() and not missing["present"].any()
    assert torch.equal(real["image"], missing["image"])

    torch.manual_seed(0)
    model = H3DENet.from_preset("tiny", head="anchor")
    a = predict_volume(model, real["image"], roi_size=ROI)
    b = predict_volume(model, missing["image"], roi_size=ROI)
    assert torch.equal(torch.nan_to_num(a[0], nan=-1.0), torch.nan_to_num(b[0], nan=-1.0))
    assert torch.equal(a[1], b[1]) and torch.equal(a[2], b[2])


def test_predict_case_ignores_the_landmarks_of_a_sample():
    image = blob_image((70, 60, 40), [[30.0, 20.0, 10.0]])
    labelled = {"image": image, "landmarks": torch.tensor([[30.0, 20.0, 10.0]]), "present": torch.tensor([True])}
    unlabelled = {"image": image, "landmarks": torch.full((1, 3), float("nan")), "present": torch.tensor([False])}
    a, b = predict_case(Echo(), labelled, roi_size=ROI), predict_case(Echo(), unlabelled, roi_size=ROI)
    assert torch.equal(a.coords, b.coords) and torch.equal(a.score, b.score) and torch.equal(a.present, b.present)
    assert a.world is None and a.case_id is None


# ------------------------------------------------------------------------------------------- cases and world mm
AFFINE = np.array([[0.0, 0.5, 0.0, 10.0], [-0.5, 0.0, 0.0, -5.0], [0.0, 0.0, 2.0, 3.0], [0.0, 0.0, 0.0, 1.0]])


def _hu_blob_case(centre: list[float]) -> Case:
    blob = blob_image((70, 60, 40), [centre])[0].numpy() / INPUT_SCALE  # peak 1
    volume = -1000.0 + 4000.0 * blob  # HU: air around a blob that the default window maps to [0, 255]
    return Case(volume=volume, landmarks=np.full((1, 3), np.nan), spacing=[0.5, 0.5, 2.0], case_id="blob",
                affine=AFFINE, names=("P",))  # fmt: skip


def test_predict_case_gives_world_coordinates_through_the_affine(tmp_path):
    centre = [33.3, 21.6, 17.2]
    expected_world = torch.tensor([[0.5 * 21.6 + 10.0, -0.5 * 33.3 - 5.0, 2.0 * 17.2 + 3.0]], dtype=torch.float64)
    case = _hu_blob_case(centre)
    result = predict_case(Echo(), case, roi_size=ROI)
    torch.testing.assert_close(result.coords, torch.tensor([centre]), atol=1e-3, rtol=0)
    torch.testing.assert_close(result.world, expected_world, atol=2e-3, rtol=0)
    assert result.case_id == "blob"

    write_nifti(tmp_path / "blob.nii.gz", case.volume.astype(np.float32), AFFINE)
    from_file = predict_case(Echo(), tmp_path / "blob.nii.gz", roi_size=ROI)
    torch.testing.assert_close(from_file.world, expected_world, atol=2e-3, rtol=0)
    assert from_file.case_id == "blob"

    write_mml_case(tmp_path / "mml", case)
    (tmp_path / "mml" / "blob_label.npy").unlink()  # inference must not need the label file
    from_nrrd = predict_case(Echo(), tmp_path / "mml" / "blob_volume.nrrd", roi_size=ROI)
    torch.testing.assert_close(from_nrrd.world, expected_world, atol=2e-3, rtol=0)


def test_predict_case_on_a_batch_with_one_affine_per_volume():
    centres = [[10.0, 20.0, 30.0], [50.5, 40.0, 8.0]]
    images = torch.stack([blob_image((70, 60, 40), [c]) for c in centres])  # (2, 1, D, H, W)
    affines = np.stack([np.eye(4), np.diag([2.0, 2.0, 2.0, 1.0])])
    result = predict_case(Echo(), {"image": images, "case_id": ["a", "b"]}, affine=affines, roi_size=ROI)
    assert result.coords.shape == (2, 1, 3) and result.present.shape == (2, 1)
    torch.testing.assert_close(result.coords[:, 0], torch.tensor(centres), atol=1e-3, rtol=0)
    torch.testing.assert_close(result.world[:, 0], torch.tensor([centres[0], [101.0, 80.0, 16.0]],
                               dtype=torch.float64), atol=2e-3, rtol=0)  # fmt: skip
    assert result.case_id == ["a", "b"]


# ------------------------------------------------------------------------------------------- modes and errors
@pytest.mark.parametrize("training", [True, False])
def test_the_model_mode_is_restored_and_outputs_are_ordinary_tensors(training):
    model = Echo()
    model.train(training)
    coords, present, score = predict_volume(model, blob_image((70, 60, 40), [[30.0, 30.0, 20.0]]), roi_size=ROI,
                                            strategy="coarse_to_fine")  # fmt: skip
    assert model.training is training
    coords.add_(1.0)  # inference-mode tensors would refuse an in-place update here
    assert not coords.is_inference() and not score.is_inference()


def test_the_roi_size_comes_from_the_model_when_it_has_one():
    model = Echo()
    model.input_size = ROI
    predict_volume(model, blob_image((40, 40, 20), [[20.0, 20.0, 10.0]]))
    assert model.calls == [(1, 1, *ROI)]


@pytest.mark.parametrize(
    ("kwargs", "image_shape", "match"),
    [
        ({"roi_size": (64, 64, 30)}, (1, 40, 40, 20), "multiples of 32"),
        ({}, (1, 40, 40, 20), "pass roi_size"),
        ({"roi_size": ROI, "strategy": "tiles"}, (1, 40, 40, 20), "strategy must be one of"),
        ({"roi_size": ROI, "overlap": 1.0}, (1, 40, 40, 20), "overlap must lie in"),
        ({"roi_size": ROI, "threshold": 2.0}, (1, 40, 40, 20), "threshold must be None or lie in"),
        ({"roi_size": ROI, "method": "mean"}, (1, 40, 40, 20), "method must be"),
        ({"roi_size": ROI}, (2, 40, 40, 20), r"image must have shape \(1, D, H, W\)"),
    ],
)
def test_bad_arguments_raise(kwargs, image_shape, match):
    with pytest.raises(ValueError, match=match):
        predict_volume(Echo(), torch.zeros(image_shape), **kwargs)


def test_progress_bar_runs(capsys):
    coords, _, _ = predict_volume(Echo(), blob_image((70, 60, 40), [[30.0, 30.0, 20.0]]), roi_size=ROI, progress=True)
    assert (coords - torch.tensor([[30.0, 30.0, 20.0]])).abs().max() < 1e-3


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_amp_on_cuda_matches_float32(strategy):
    torch.manual_seed(0)
    model = H3DENet.from_preset("tiny", num_landmarks=3).cuda()
    image = blob_image((96, 80, 40), [[40.0, 30.0, 20.0]])
    full = predict_volume(model, image, roi_size=ROI, strategy=strategy, threshold=0.0)
    half = predict_volume(model, image, roi_size=ROI, strategy=strategy, threshold=0.0, amp=True)
    assert half[0].device.type == "cpu"
    assert (half[0] - full[0]).abs().max() < 2.0  # an untrained net's peaks: float16 may move them a little
