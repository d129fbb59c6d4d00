"""predict_landmarks: one entry point for heatmap and anchor outputs."""

from __future__ import annotations

import math

import pytest
import torch

from h3de_lite.anchors import AnchorGrid
from h3de_lite.decoding import ANCHOR_THRESHOLD, predict_landmarks
from h3de_lite.heatmaps import gaussian_heatmaps

NAN = float("nan")


@pytest.fixture
def landmarks() -> torch.Tensor:
    return torch.tensor([[[3.25, 4.0, 5.5], [12.0, 0.0, 7.0], [NAN, NAN, NAN]]], dtype=torch.float64)


def _anchor_outputs(grid: AnchorGrid, g: torch.Tensor, shape) -> dict[str, torch.Tensor]:
    t = grid.encode(g)
    return {
        "offsets": t["offsets"],
        "logits": torch.where(t["positive"], 20.0, -20.0),
        "heatmaps": torch.zeros(g.shape[0], g.shape[1], *shape),
    }


def test_heatmap_outputs_give_every_landmark_a_coordinate_by_default(landmarks):
    """Eq. 2 has no presence test: by default every channel is decoded, even an all-zero one."""
    hm = gaussian_heatmaps(landmarks, (16, 16, 8), sigma=1.5)
    coords, present, score = predict_landmarks(hm)
    assert coords.shape == (1, 3, 3) and present.shape == score.shape == (1, 3)
    assert present.all() and torch.isfinite(coords).all()
    # A clean Gaussian: the log-parabola fit is exact, so only float32 rounding of the coordinates remains
    # (half an ulp below 16 is 4.8e-7).
    torch.testing.assert_close(coords[0, :2].double(), landmarks[0, :2], atol=2e-6, rtol=0)
    assert coords[0, 2].tolist() == [0.0, 0.0, 0.0]  # an all-zero channel peaks at its first voxel
    peak0 = math.exp(-(0.25**2 + 0.5**2) / (2 * 1.5**2))  # nearest voxel (3, 4, 5 or 6): 0.25 and 0.5 away
    assert score[0].tolist() == pytest.approx([peak0, 1.0, 0.0], abs=1e-6)
    coords, _, _ = predict_landmarks(hm, method="argmax")
    assert coords[0, 0].tolist() in ([3.0, 4.0, 5.0], [3.0, 4.0, 6.0])  # 5.5 lies halfway between two voxels


def test_weak_and_negative_heatmaps_are_still_decoded_by_default(landmarks):
    """An untrained or uncertain network's peaks lie far below 1, or below 0: eq. 2 still returns the arg-max."""
    g = landmarks[:, :2]
    hm = gaussian_heatmaps(g, (16, 16, 8), sigma=1.5)
    coords, present, score = predict_landmarks(0.2 * hm)  # a scaled Gaussian: the sub-voxel fit is still exact
    assert present.all() and score.max() <= 0.2 + 1e-6
    torch.testing.assert_close(coords[0].double(), g[0], atol=2e-6, rtol=0)
    coords, present, score = predict_landmarks(0.2 * hm - 1.0)  # peaks -0.8: no log-parabola, the arg-max voxel
    assert present.all() and (score < 0).all()
    assert coords[0].tolist() in ([[3.0, 4.0, 5.0], [12.0, 0.0, 7.0]], [[3.0, 4.0, 6.0], [12.0, 0.0, 7.0]])


def test_heatmap_threshold_is_an_option(landmarks):
    hm = gaussian_heatmaps(landmarks, (16, 16, 8), sigma=1.5)
    coords, present, score = predict_landmarks(hm, threshold=0.5)
    assert present.tolist() == [[True, True, False]]
    assert torch.isnan(coords[0, 2]).all() and torch.isfinite(coords[0, :2]).all()
    _, present, _ = predict_landmarks(hm, threshold=0.93)  # landmark 0 peaks at exp(-0.3125 / 4.5) ≈ 0.933
    assert present.tolist() == [[True, True, False]]
    _, present, _ = predict_landmarks(hm, threshold=0.94)
    assert present.tolist() == [[False, True, False]]
    _, present, _ = predict_landmarks(hm, threshold=0.0)
    assert present.all()  # every peak is ≥ 0 here


@pytest.mark.parametrize("config", ["single", "multi"])
def test_anchor_outputs_build_grid_from_heatmap_shape(config, landmarks):
    shape = (16, 16, 8)
    outputs = _anchor_outputs(AnchorGrid(shape, config=config), landmarks, shape)
    coords, present, score = predict_landmarks(outputs)
    assert present.tolist() == [[True, True, False]]
    # Offsets are float32 (t within ±1: ≤ r · 2⁻²⁴ voxels of rounding), coordinates are returned in float32.
    torch.testing.assert_close(coords[present].double(), landmarks[0, :2], atol=2e-6, rtol=0)
    assert torch.isnan(coords[0, 2]).all()
    assert score[0, 0].item() == pytest.approx(1 / (1 + math.exp(-20)))
    # An explicit grid gives the same result without heatmaps.
    no_hm = {k: outputs[k] for k in ("offsets", "logits")}
    coords2, present2, _ = predict_landmarks(no_hm, grid=AnchorGrid(shape, config=config))
    assert torch.equal(present, present2) and torch.equal(coords[present], coords2[present2])


def test_anchor_default_threshold_is_one_half():
    """Anchor outputs: threshold=None means ANCHOR_THRESHOLD = 0.5 on the highest existence probability."""
    assert ANCHOR_THRESHOLD == 0.5
    grid = AnchorGrid((8, 8, 8))
    logits = torch.full((1, grid.num_anchors, 3), -20.0)
    logits[0, 0, 0] = math.log(0.51 / 0.49)  # p = 0.51: present
    logits[0, 0, 1] = math.log(0.49 / 0.51)  # p = 0.49: absent
    outputs = {"offsets": torch.zeros(1, grid.num_anchors, 3, 3), "logits": logits}
    _, present, score = predict_landmarks(outputs, grid=grid)
    assert present.tolist() == [[True, False, False]]
    torch.testing.assert_close(score[0, :2], torch.tensor([0.51, 0.49]), atol=1e-6, rtol=0)
    _, present, _ = predict_landmarks(outputs, grid=grid, threshold=0.4)
    assert present.tolist() == [[True, True, False]]


def test_anchor_outputs_from_untrained_head_are_absent():
    from h3de_lite.models.heads import AnchorHead

    head = AnchorHead(in_channels=4, num_landmarks=2, num_anchors=3)
    out = head(torch.randn(1, 4, 4, 4, 2))
    out["heatmaps"] = torch.zeros(1, 2, 16, 16, 8)
    coords, present, score = predict_landmarks(out)
    assert not present.any() and (score < 0.1).all()  # prior p = 0.01
    coords, present, _ = predict_landmarks(out, threshold=0.0)
    assert present.all() and torch.isfinite(coords).all()


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: predict_landmarks(torch.zeros(1, 2, 4, 4, 4), threshold=2.0), r"threshold must lie in \[0, 1\]"),
        (lambda: predict_landmarks(torch.zeros(1, 2, 4, 4, 4), method="mean"), "method must be 'argmax' or 'subvoxel'"),
        (lambda: predict_landmarks(torch.zeros(2, 4, 4, 4)), r"must have shape \(B, L, D, H, W\)"),
        (lambda: predict_landmarks({"offsets": torch.zeros(1, 8, 1, 3)}), "needs 'offsets' and 'logits'"),
        (
            lambda: predict_landmarks({"offsets": torch.zeros(1, 8, 1, 3), "logits": torch.zeros(1, 8, 1)}),
            "without 'heatmaps' need grid=",
        ),
        (
            lambda: predict_landmarks(  # 5 anchors fit no config of a 8×8×8 volume
                {
                    "offsets": torch.zeros(1, 5, 1, 3),
                    "logits": torch.zeros(1, 5, 1),
                    "heatmaps": torch.zeros(1, 1, 8, 8, 8),
                }
            ),
            "5 anchors match no anchor config",
        ),
        (lambda: predict_landmarks([torch.zeros(1)]), "must be a heatmap tensor or the anchor head's dict"),
    ],
)
def test_bad_input_raises_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()
