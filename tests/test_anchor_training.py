"""Every term of the anchor-based loss (eq. 17) falls when the tiny anchor-based H3DE-Net fits one phantom batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from h3de_lite.anchors import AnchorGrid
from h3de_lite.data.phantom import generate_phantom
from h3de_lite.data.transforms import normalize_intensity
from h3de_lite.decoding import predict_landmarks
from h3de_lite.heatmaps import gaussian_heatmaps
from h3de_lite.losses import anchor_based_loss
from h3de_lite.models.h3de_net import H3DENet

SHAPE = (64, 64, 32)  # the tiny preset's input size
STEPS = 16  # ≈ 0.7 s of CPU per step on one core
WINDOW = 4  # steps averaged at the start and at the end


def _phantom_batch() -> tuple[torch.Tensor, torch.Tensor]:
    case = generate_phantom(seed=0, shape=SHAPE, incomplete=True)
    volume = normalize_intensity(case.volume) / 255.0
    x = torch.as_tensor(volume, dtype=torch.float32)[None, None]  # (1, 1, D, H, W)
    g = torch.as_tensor(case.landmarks, dtype=torch.float64)[None]  # (1, 14, 3), NaN rows missing
    return x, g


@pytest.mark.parametrize("anchors", ["single", pytest.param("multi", marks=pytest.mark.slow)])
def test_every_loss_term_falls(anchors):
    x, g = _phantom_batch()
    assert x.shape[-3:] == SHAPE
    present = ~torch.isnan(g).any(-1)
    assert present.any(), "the phantom should have at least one present landmark"

    torch.manual_seed(0)
    model = H3DENet.from_preset("tiny", head="anchor", anchors=anchors)
    grid = AnchorGrid(SHAPE, config=anchors)
    targets = grid.encode(g)
    target_heatmaps = gaussian_heatmaps(g, SHAPE, sigma=2.0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    history: dict[str, list[float]] = {"offset": [], "existence": [], "heatmap": [], "total": []}
    model.train()
    for _ in range(STEPS):
        outputs = model(x)
        losses = anchor_based_loss(outputs, targets, target_heatmaps=target_heatmaps)
        optimizer.zero_grad()
        losses["total"].backward()
        optimizer.step()
        for key in history:
            history[key].append(losses[key].detach().item())

    for key, values in history.items():
        first, last = np.mean(values[:WINDOW]), np.mean(values[-WINDOW:])
        assert np.isfinite(values).all(), key
        assert last < first, f"{key} did not fall: first {WINDOW} steps {first:.4g}, last {WINDOW} {last:.4g}"

    # The decoded output has the contract the rest of the package relies on.
    model.eval()
    with torch.no_grad():
        coords, found, score = predict_landmarks(model(x))
    assert coords.shape == (1, 14, 3) and found.shape == score.shape == (1, 14)
