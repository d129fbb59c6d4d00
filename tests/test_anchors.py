"""AnchorGrid: geometry, target encoding (eq. 5) and decoding (eq. 7–8)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from h3de_lite.anchors import ANCHOR_CONFIGS, AnchorGrid

NAN = float("nan")
ZERO_T, ZERO_P = torch.zeros(1, 8, 1, 3), torch.zeros(1, 8, 1)  # offsets and probabilities of an 8³ grid


@pytest.mark.parametrize(
    "volume_shape, config, feature_shape, n_a",
    [
        [(64, 64, 32), "single", (16, 16, 8), 1],
        [(64, 64, 32), "multi", (16, 16, 8), 3],
        [(10, 13, 4), "single", (3, 4, 1), 1],  # not divisible by 4: ceil(size / 4) cells
        [(1, 5, 7), "multi", (1, 2, 2), 3],
    ],
)
def test_grid_shapes(volume_shape, config, feature_shape, n_a):
    grid = AnchorGrid(volume_shape, config=config)
    assert grid.feature_shape == feature_shape
    assert grid.num_anchors_per_location == n_a
    assert grid.num_anchors == math.prod(feature_shape) * n_a
    assert grid.centers.shape == (grid.num_anchors, 3)
    assert grid.radii.shape == (grid.num_anchors,)
    assert grid.centers.dtype == grid.radii.dtype == torch.float32


def test_centres_and_radii_hand_computed():
    grid = AnchorGrid((8, 8, 12), config="multi")  # feature grid (2, 2, 3), 3 anchors per location
    # Cell j covers voxels 4j … 4j+3, centre 4j + 1.5.
    np.testing.assert_array_equal(grid.centers[0].numpy(), [1.5, 1.5, 1.5])
    np.testing.assert_array_equal(grid.radii[:3].numpy(), [2.0, 3.0, 4.0])  # 0.5u, 0.75u, 1u
    # Order is the flatten of (d, h, w, n_a): the last anchor is at (1, 1, 2).
    np.testing.assert_array_equal(grid.centers[-1].numpy(), [5.5, 5.5, 9.5])
    index = grid.anchor_index((1, 0, 2), anchor=1)
    assert index == ((1 * 2 + 0) * 3 + 2) * 3 + 1
    np.testing.assert_array_equal(grid.centers[index].numpy(), [5.5, 1.5, 9.5])
    assert float(grid.radii[index]) == 3.0
    single = AnchorGrid((8, 8, 12), config="single")
    assert torch.all(single.radii == 2.0)
    assert ANCHOR_CONFIGS["multi"][-1] == 1.0  # multi-scale: largest radius r = 1u


def test_as_volume_matches_order():
    grid = AnchorGrid((8, 12, 16), config="multi")
    values = torch.arange(grid.num_anchors).view(1, -1)
    vol = grid.as_volume(values)
    assert vol.shape == (1, 3, 2, 3, 4)
    assert int(vol[0, 2, 1, 2, 3]) == grid.anchor_index((1, 2, 3), anchor=2)


def _random_landmarks(rng: np.random.Generator, shape, n: int) -> torch.Tensor:
    high = np.asarray(shape, dtype=np.float64) - 0.5
    return torch.as_tensor(rng.uniform(-0.5, high, size=(n, 3)))


@pytest.mark.parametrize("config", ["single", "multi"])
@pytest.mark.parametrize("shape", [(32, 32, 16), (10, 13, 7)])
def test_roundtrip_exact(config, shape, rng):
    grid = AnchorGrid(shape, config=config)
    size = np.asarray(shape, dtype=np.float64)
    borders = torch.tensor(
        [
            [-0.5, -0.5, -0.5],  # outer corner of the first voxel
            [*(size - 0.5)],  # outer corner of the last voxel
            [0.0, size[1] - 1, 0.0],
            [1.5, 1.5, 1.5],  # exactly on the first anchor centre
            [5.5, 1.5, 5.5],  # exactly on another anchor centre
            [3.5, 3.5, 3.5],  # cell corner: equidistant from 8 anchor centres
        ],
        dtype=torch.float64,
    )
    borders = torch.minimum(borders, torch.as_tensor(size - 0.5))
    g = torch.cat([borders, _random_landmarks(rng, shape, 40)]).view(2, -1, 3)  # (B=2, L=23, 3)
    g[1, 4] = NAN  # one missing landmark
    t = grid.encode(g)
    assert t["offsets"].shape == (2, grid.num_anchors, g.shape[1], 3)
    assert t["probabilities"].shape == t["positive"].shape == (2, grid.num_anchors, g.shape[1])
    coords, present, score = grid.decode(offsets=t["offsets"], probabilities=t["probabilities"])
    expect_present = ~torch.isnan(g).any(-1)
    assert torch.equal(present, expect_present)
    assert torch.isnan(coords[~present]).all()
    # float32 output: half an ulp of a coordinate below 32 (9.5e-7) plus r · 2⁻²⁴ of float32 offsets (≤ 2.4e-7)
    torch.testing.assert_close(coords[present].double(), g[expect_present], atol=2e-6, rtol=0)
    assert torch.equal(score, expect_present.float())


def test_every_present_landmark_has_a_positive_and_missing_has_none(rng):
    grid = AnchorGrid((16, 20, 12), config="single")
    g = _random_landmarks(rng, (16, 20, 12), 200)
    g[::7] = NAN
    pos = grid.encode(g)["positive"][0]  # (A, L)
    present = ~torch.isnan(g).any(-1)
    assert (pos.sum(0)[present] >= 1).all()
    assert (pos.sum(0)[~present] == 0).all()


def test_positive_rule_hand_computed():
    grid = AnchorGrid((8, 8, 8), config="single")  # centres 1.5 and 5.5 per axis, r = 2
    # On an anchor centre: only that anchor (neighbours are 4 away > r).
    t = grid.encode(torch.tensor([[1.5, 1.5, 5.5]]))
    assert t["positive"][0, :, 0].nonzero().flatten().tolist() == [grid.anchor_index((0, 0, 1))]
    assert torch.all(t["offsets"][0, :, 0] == 0)
    # Inside the ball of (0,0,0): offset (g - f) / r = (1, 0, -1) / 2.
    t = grid.encode(torch.tensor([[2.5, 1.5, 0.5]]))
    (a,) = t["positive"][0, :, 0].nonzero().flatten().tolist()
    assert a == grid.anchor_index((0, 0, 0))
    np.testing.assert_allclose(t["offsets"][0, a, 0].numpy(), [0.5, 0.0, -0.5])
    # A cell corner (2·√3 ≈ 3.46 > r from all 8 centres) is in no ball: one nearest anchor becomes positive.
    t = grid.encode(torch.tensor([[3.5, 3.5, 3.5]]))
    assert int(t["positive"].sum()) == 1
    assert t["probabilities"].sum() == 1.0
    # Offsets of the fallback positive are still within ±1 per axis.
    assert t["offsets"].abs().max() <= 1.0
    # Multi-scale: the 1u ball covers the corner, for all 8 surrounding locations.
    multi = AnchorGrid((8, 8, 8), config="multi")
    t = multi.encode(torch.tensor([[3.5, 3.5, 3.5]]))
    assert int(t["positive"].sum()) == 8
    assert torch.all(multi.radii[t["positive"][0, :, 0]] == 4.0)


def test_missing_landmarks_all_negative():
    grid = AnchorGrid((16, 16, 16), config="multi")
    t = grid.encode(torch.full((3, 3), NAN))
    assert not t["positive"].any()
    assert torch.all(t["offsets"] == 0) and torch.all(t["probabilities"] == 0)
    coords, present, score = grid.decode(offsets=t["offsets"], probabilities=t["probabilities"])
    assert not present.any() and torch.isnan(coords).all()


def test_encode_accepts_numpy_and_batches():
    grid = AnchorGrid((16, 16, 16))
    g = np.array([[3.0, 4.0, 5.0], [np.nan, np.nan, np.nan]])
    a = grid.encode(g)
    b = grid.encode(torch.as_tensor(g)[None].repeat(2, 1, 1))
    assert a["offsets"].shape[0] == 1 and b["offsets"].shape[0] == 2
    assert torch.equal(a["offsets"][0], b["offsets"][1])
    assert a["offsets"].dtype == torch.float32 and a["positive"].dtype == torch.bool


def test_decode_weighted_vote_and_threshold():
    grid = AnchorGrid((8, 8, 8), config="single")
    A = grid.num_anchors
    offsets = torch.zeros(1, A, 1, 3)
    probs = torch.zeros(1, A, 1)
    a0, a1 = grid.anchor_index((0, 0, 0)), grid.anchor_index((1, 0, 0))
    probs[0, a0, 0], probs[0, a1, 0] = 0.9, 0.3  # centres (1.5,1.5,1.5) and (5.5,1.5,1.5)
    coords, present, score = grid.decode(offsets=offsets, probabilities=probs, top=2)
    expected = (0.9 * 1.5 + 0.3 * 5.5) / 1.2
    np.testing.assert_allclose(coords[0, 0].numpy(), [expected, 1.5, 1.5], atol=1e-6)
    assert present.item() and score.item() == pytest.approx(0.9)
    coords, present, _ = grid.decode(offsets=offsets, probabilities=probs, top=1)
    np.testing.assert_allclose(coords[0, 0].numpy(), [1.5, 1.5, 1.5])
    coords, present, _ = grid.decode(offsets=offsets, probabilities=probs, threshold=0.95)
    assert not present.item() and torch.isnan(coords).all()


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: AnchorGrid((8, 8, 8), config="triple"), r"config must be one of \['multi', 'single'\]"),
        (lambda: AnchorGrid((8, 8), config="single"), r"volume_shape must be three positive integers"),
        (lambda: AnchorGrid((8, 0, 8)), r"volume_shape must be three positive integers"),
        (lambda: AnchorGrid((8, 8, 8), stride=0), "stride must be a positive integer"),
        (lambda: AnchorGrid((8, 8, 8)).encode(torch.zeros(4)), r"landmarks must have shape \(L, 3\) or \(B, L, 3\)"),
        (lambda: AnchorGrid((8, 8, 8)).encode(torch.zeros(2, 3, 2)), r"landmarks must have shape \(L, 3\)"),
        (  # outside the volume
            lambda: AnchorGrid((8, 8, 8)).encode(torch.tensor([[9.0, 1.0, 1.0]])),
            r"landmarks\[0, 0\] = \[9.0, 1.0, 1.0\] lies outside the volume",
        ),
        (
            lambda: AnchorGrid((8, 8, 8)).decode(offsets=ZERO_T, probabilities=ZERO_P, threshold=1.5),
            r"threshold must lie in \[0, 1\], got 1.5",
        ),
        (
            lambda: AnchorGrid((8, 8, 8)).decode(offsets=ZERO_T, probabilities=ZERO_P, threshold=-0.1),
            r"threshold must lie in \[0, 1\], got -0.1",
        ),
        (
            lambda: AnchorGrid((8, 8, 8)).decode(offsets=ZERO_T, probabilities=ZERO_P, top=0),
            "top must be a positive integer",
        ),
        (
            lambda: AnchorGrid((8, 8, 8)).decode(offsets=torch.zeros(1, 9, 1, 3), probabilities=torch.zeros(1, 9, 1)),
            r"probabilities must have shape \(B, A=8, L\)",
        ),
        (
            lambda: AnchorGrid((8, 8, 8)).decode(offsets=torch.zeros(1, 8, 2, 3), probabilities=torch.zeros(1, 8, 1)),
            r"offsets must have shape \(1, 8, 1, 3\) to match probabilities",
        ),
        (lambda: AnchorGrid((8, 8, 8)).anchor_index((2, 0, 0)), r"location \(2, 0, 0\) / anchor 0 is outside"),
    ],
)
def test_bad_input_raises_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_decode_ignores_confident_anchors_far_from_the_best_one():
    """A second confident anchor on the other side of the volume must not pull the vote away (vote_radius gate)."""
    grid = AnchorGrid((32, 32, 32), config="single")
    g = torch.tensor([[5.0, 6.0, 7.0]])
    targets = grid.encode(g)
    probabilities = targets["probabilities"].clone()
    far = grid.anchor_index((7, 7, 7))
    probabilities[0, far, 0] = 0.9  # confident, but 20+ voxels away from the landmark
    coords, present, _ = grid.decode(offsets=targets["offsets"], probabilities=probabilities)
    assert bool(present.all())
    torch.testing.assert_close(coords[0], g.to(coords.dtype), atol=2e-6, rtol=0)
    with pytest.raises(ValueError, match="vote_radius"):
        grid.decode(offsets=targets["offsets"], probabilities=probabilities, vote_radius=-1.0)
