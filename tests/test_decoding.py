"""predict_landmarks: one entry point for heatmap and anchor outputs."""

from __future__ import annotations

import math

import pytest
import torch

from h3de_lite.anchors import AnchorGrid
from h3de_lite.decoding import predict_landmarks
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


def test_heatmap_outputs(landmarks):
    hm = gaussian_heatmaps(landmarks, (16, 16, 8), sigma=1.5)
    coords, present, score = predict_landmarks(hm)
    assert coords.shape == (1, 3, 3) and present.shape == score.shape == (1, 3)
    assert present.tolist() == [[True, True, False]]
    assert torch.allclose(coords[present].double(), landmarks[0, :2], atol=1e-3)
    assert torch.isnan(coords[0, 2]).all()
    assert score[0, 2].item() == 0.0 and score[0, 0].item() > 0.9
    coords, present, _ = predict_landmarks(hm, method="argmax")
    assert coords[0, 0].tolist() == [3.0, 4.0, 5.0] or coords[0, 0].tolist() == [3.0, 4.0, 6.0]
    _, present, _ = predict_landmarks(hm, threshold=0.0)
    assert present.all()  # threshold 0 keeps every landmark


@pytest.mark.parametrize("config", ["single", "multi"])
def test_anchor_outputs_build_grid_from_heatmap_shape(config, landmarks):
    shape = (16, 16, 8)
    outputs = _anchor_outputs(AnchorGrid(shape, config=config), landmarks, shape)
    coords, present, score = predict_landmarks(outputs)
    assert present.tolist() == [[True, True, False]]
    assert torch.allclose(coords[present].double(), landmarks[0, :2], atol=1e-4)
    assert torch.isnan(coords[0, 2]).all()
    assert score[0, 0].item() == pytest.approx(1 / (1 + math.exp(-20)))
    # An explicit grid gives the same result without heatmaps.
    no_hm = {k: outputs[k] for k in ("offsets", "logits")}
    coords2, present2, _ = predict_landmarks(no_hm, grid=AnchorGrid(shape, config=config))
    assert torch.equal(present, present2) and torch.allclose(coords[present], coords2[present2])


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
    "call",
    [
        lambda: predict_landmarks(torch.zeros(1, 2, 4, 4, 4), threshold=2.0),
        lambda: predict_landmarks(torch.zeros(1, 2, 4, 4, 4), method="mean"),
        lambda: predict_landmarks(torch.zeros(2, 4, 4, 4)),
        lambda: predict_landmarks({"offsets": torch.zeros(1, 8, 1, 3)}),
        lambda: predict_landmarks({"offsets": torch.zeros(1, 8, 1, 3), "logits": torch.zeros(1, 8, 1)}),  # no grid
        lambda: predict_landmarks(  # 5 anchors fit no config of a 8×8×8 volume
            {"offsets": torch.zeros(1, 5, 1, 3), "logits": torch.zeros(1, 5, 1), "heatmaps": torch.zeros(1, 1, 8, 8, 8)}
        ),
        lambda: predict_landmarks([torch.zeros(1)]),
    ],
)
def test_bad_input_raises_value_error(call):
    with pytest.raises(ValueError):
        call()
