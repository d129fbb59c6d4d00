"""Gaussian targets (eq. 1) and their decoding (eq. 2): known answers and roundtrips."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from h3de_lite.heatmaps import decode, gaussian_heatmaps

SHAPE = (24, 20, 16)


def _random_points(rng: np.random.Generator, n: int, margin: float = 3.0) -> torch.Tensor:
    lo, hi = margin, np.array(SHAPE) - 1 - margin
    return torch.tensor(rng.uniform(lo, hi, size=(2, n, 3)))


def test_peak_value_and_formula(rng: np.random.Generator) -> None:
    c = torch.tensor([[[10.3, 7.6, 5.2]]])
    hm = gaussian_heatmaps(c, SHAPE, sigma=2.0, dtype=torch.float64)
    assert hm.shape == (1, 1, *SHAPE)
    v = (4, 9, 11)
    d2 = sum((vi - ci) ** 2 for vi, ci in zip(v, c[0, 0].tolist()))
    assert hm[0, 0][v].item() == pytest.approx(math.exp(-d2 / (2 * 2.0**2)), rel=1e-12)
    assert hm.max() < 1.0  # the centre is between voxels, so no voxel reaches the peak
    assert hm.min() >= 0.0


def test_sigma_in_mm_uses_spacing() -> None:
    c = torch.tensor([[[10.0, 10.0, 8.0]]])
    hm = gaussian_heatmaps(c, SHAPE, sigma=2.0, spacing=[0.5, 1.0, 2.0], dtype=torch.float64)[0, 0]
    # one voxel along axis 0 is 0.5 mm, along axis 2 it is 2 mm
    assert hm[11, 10, 8].item() == pytest.approx(math.exp(-(0.5**2) / 8), rel=1e-12)
    assert hm[10, 10, 9].item() == pytest.approx(math.exp(-(2.0**2) / 8), rel=1e-12)


def test_per_case_spacing() -> None:
    c = torch.full((2, 1, 3), 8.0)
    hm = gaussian_heatmaps(c, SHAPE, sigma=2.0, spacing=[[1.0, 1.0, 1.0], [2.0, 2.0, 2.0]], dtype=torch.float64)
    assert hm[0, 0, 9, 8, 8].item() == pytest.approx(math.exp(-1 / 8), rel=1e-12)  # 1 mm away
    assert hm[1, 0, 9, 8, 8].item() == pytest.approx(math.exp(-4 / 8), rel=1e-12)  # 2 mm away
    shared = gaussian_heatmaps(c, SHAPE, sigma=2.0, spacing=[[2.0, 2.0, 2.0]], dtype=torch.float64)
    assert torch.equal(shared[0], hm[1]) and torch.equal(shared[1], hm[1])


def test_missing_landmark_gives_zero_channel() -> None:
    c = torch.tensor([[[5.0, 5.0, 5.0], [float("nan")] * 3]])
    hm = gaussian_heatmaps(c, SHAPE, sigma=1.5)
    assert hm[0, 0].max() == 1.0
    assert torch.count_nonzero(hm[0, 1]) == 0


@pytest.mark.parametrize("sigma", [1.5, 2.0, 3.0])
def test_subvoxel_decode_recovers_points(rng: np.random.Generator, sigma: float) -> None:
    c = _random_points(rng, 6)
    hm = gaussian_heatmaps(c, SHAPE, sigma=sigma)
    sub = decode(hm, "subvoxel")
    arg = decode(hm, "argmax")
    assert sub.shape == (2, 6, 3)
    assert (sub.double() - c).abs().max() < 0.05
    assert (arg.double() - c).abs().max() <= 0.5 + 1e-6


def test_decode_at_border_and_numpy_input() -> None:
    c = np.array([[[0.0, 19.0, 7.25]]])
    hm = gaussian_heatmaps(c, SHAPE, sigma=2.0).numpy()
    out, score = decode(hm, "subvoxel", return_score=True)
    assert np.allclose(out.numpy(), c, atol=0.05)
    assert score.shape == (1, 1)


def test_decode_flat_heatmap_falls_back_to_argmax() -> None:
    hm = torch.zeros(1, 1, *SHAPE)
    out = decode(hm, "subvoxel")
    assert torch.equal(out, torch.zeros(1, 1, 3))


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: gaussian_heatmaps(torch.zeros(3), SHAPE, 2.0), "coords"),
        (lambda: gaussian_heatmaps(torch.zeros(1, 3), (4, 4), 2.0), "shape"),
        (lambda: gaussian_heatmaps(torch.zeros(1, 3), SHAPE, -1.0), "sigma"),
        (lambda: gaussian_heatmaps(torch.zeros(1, 3), SHAPE, 1.0, spacing=[1, float("nan"), 1]), "spacing"),
        (lambda: gaussian_heatmaps(torch.tensor([[30.0, 1.0, 1.0]]), SHAPE, 1.0), "outside"),
        (
            lambda: gaussian_heatmaps(torch.zeros(2, 1, 3), SHAPE, 1.0, spacing=torch.ones(3, 3)),
            r"spacing has 3 rows.*B = 2.*\(2, 3\)",
        ),
        (lambda: decode(torch.zeros(2, 3, 4)), "heatmaps"),
        (lambda: decode(torch.zeros(1, 1, 2, 2, 2), "mean"), "method"),
    ],
)
def test_bad_input_raises(call, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call()
