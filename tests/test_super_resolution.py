"""3D pixel shuffle, ICNR initialisation, the Super-Resolution Block and its trilinear ablation."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from h3de_lite.layers.super_resolution import (
    SuperResolutionBlock,
    TrilinearUpsample,
    icnr_,
    pixel_shuffle_3d,
    pixel_unshuffle_3d,
)


def test_pixel_shuffle_places_channels_by_the_index_formula() -> None:
    r, c = 2, 3
    x = torch.randn(2, c * r**3, 3, 2, 4)
    y = pixel_shuffle_3d(x, r)
    assert y.shape == (2, c, 6, 4, 8)
    for ch in range(c):
        for i in range(r):
            for j in range(r):
                for k in range(r):
                    source = x[:, ch * r**3 + i * r * r + j * r + k]  # (B, D, H, W)
                    torch.testing.assert_close(y[:, ch, i::r, j::r, k::r], source, rtol=0, atol=0)


def test_pixel_shuffle_matches_torch_2d_pixel_shuffle_on_a_flat_volume() -> None:
    # Fix the sub-voxel index i along D: the placement of the remaining r² sub-voxels over (H, W) is torch's 2D
    # pixel_shuffle of the channels c·r³ + i·r² + (0 … r² - 1).
    x = torch.randn(1, 8 * 2, 1, 3, 3)
    y = pixel_shuffle_3d(x, 2)  # (1, 2, 2, 6, 6)
    for ch in range(2):
        for i in range(2):
            group = x[:, ch * 8 + i * 4 : ch * 8 + (i + 1) * 4, 0]  # (1, 4, 3, 3): the r2·r3 sub-pixels of slice i
            torch.testing.assert_close(y[:, ch, i], F.pixel_shuffle(group, 2)[:, 0], rtol=0, atol=0)


@pytest.mark.parametrize(("shape", "r"), [((2, 16, 3, 2, 4), 2), ((1, 54, 2, 1, 2), 3), ((1, 5, 2, 3, 4), 1)])
def test_unshuffle_inverts_shuffle(shape: tuple, r: int) -> None:
    x = torch.randn(shape)
    torch.testing.assert_close(pixel_unshuffle_3d(pixel_shuffle_3d(x, r), r), x, rtol=0, atol=0)


def test_shuffle_inverts_unshuffle() -> None:
    x = torch.randn(2, 3, 4, 6, 8)
    torch.testing.assert_close(pixel_shuffle_3d(pixel_unshuffle_3d(x, 2), 2), x, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("fn", "shape", "r", "match"),
    [
        (pixel_shuffle_3d, (1, 12, 2, 2, 2), 2, "channel count is not a multiple of 8"),  # 12 channels
        (pixel_shuffle_3d, (12, 2, 2, 2), 2, r"needs x of shape \(B, C\*2\^3, D, H, W\); got \(12, 2, 2, 2\)"),
        (pixel_unshuffle_3d, (1, 2, 4, 3, 4), 2, "with D, H, W multiples of 2"),  # H not a multiple of 2
        (pixel_shuffle_3d, (1, 8, 2, 2, 2), 0, "scale must be a positive integer upsampling factor, got 0"),
    ],
)
def test_shuffle_errors(fn, shape: tuple, r: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        fn(torch.randn(shape), r)


def test_icnr_makes_the_shuffle_a_nearest_neighbour_upsampling() -> None:
    conv = nn.Conv3d(4, 3 * 8, 3, padding=1, bias=False)
    icnr_(conv.weight, 2)
    base = conv.weight[::8]  # (3, 4, 3, 3, 3): one filter per output channel
    x = torch.randn(1, 4, 3, 4, 2)
    expected = F.interpolate(F.conv3d(x, base, padding=1), scale_factor=2, mode="nearest")
    torch.testing.assert_close(pixel_shuffle_3d(conv(x), 2), expected)


@pytest.mark.parametrize("separable", [True, False])
def test_srb_starts_as_nearest_upsampling_of_a_conv(separable: bool) -> None:
    srb = SuperResolutionBlock(in_channels=4, out_channels=2, separable=separable, norm_layer=None, act_layer=None)
    x = torch.randn(2, 4, 3, 2, 4)
    coarse = srb.expand.weight[::8]  # ICNR: the shared filter of each output channel
    expected = F.interpolate(F.conv3d(srb.context(x), coarse, padding=coarse.shape[-1] // 2), scale_factor=2)
    torch.testing.assert_close(srb(x), expected)


SRB_CASES = [
    # [kwargs, input shape, expected shape]
    [{"in_channels": 8, "out_channels": 4}, (2, 8, 4, 4, 2), (2, 4, 8, 8, 4)],
    [{"in_channels": 8, "out_channels": 8, "separable": False}, (1, 8, 2, 3, 4), (1, 8, 4, 6, 8)],
    [{"in_channels": 4, "out_channels": 2, "scale": 3}, (1, 4, 2, 2, 1), (1, 2, 6, 6, 3)],
    [{"in_channels": 4, "out_channels": 2, "kernel_size": 1}, (1, 4, 2, 2, 2), (1, 2, 4, 4, 4)],
]


@pytest.mark.parametrize(("kwargs", "input_shape", "expected"), SRB_CASES)
def test_srb_shapes(kwargs: dict, input_shape: tuple, expected: tuple) -> None:
    assert SuperResolutionBlock(**kwargs)(torch.randn(input_shape)).shape == expected


def test_srb_separable_is_much_lighter_than_dense() -> None:
    def count(m: nn.Module) -> int:
        return sum(p.numel() for p in m.parameters())

    separable = SuperResolutionBlock(in_channels=64, out_channels=32, norm_layer=None)
    dense = SuperResolutionBlock(in_channels=64, out_channels=32, separable=False, norm_layer=None)
    assert count(separable) == 27 * 64 + 64 * 32 * 8
    assert count(dense) == 27 * 64 * 32 * 8


@pytest.mark.parametrize(
    ("input_shape", "expected"), [((1, 8, 2, 3, 4), (1, 4, 4, 6, 8)), ((2, 8, 1, 1, 2), (2, 4, 2, 2, 4))]
)
def test_trilinear_upsample_shapes(input_shape: tuple, expected: tuple) -> None:
    assert TrilinearUpsample(in_channels=8, out_channels=4)(torch.randn(input_shape)).shape == expected


def test_trilinear_upsample_projects_before_interpolating_without_changing_the_result() -> None:
    up = TrilinearUpsample(in_channels=3, out_channels=2, norm_layer=None, act_layer=None)
    x = torch.randn(1, 3, 3, 4, 2)
    interpolated_first = F.conv3d(
        F.interpolate(x, scale_factor=2, mode="trilinear"), up.project.weight, up.project.bias
    )
    torch.testing.assert_close(up(x), interpolated_first)


def test_every_parameter_gets_a_gradient() -> None:
    model = nn.Sequential(
        SuperResolutionBlock(in_channels=4, out_channels=4),
        SuperResolutionBlock(in_channels=4, out_channels=2, separable=False),
        TrilinearUpsample(in_channels=2, out_channels=2),
    )
    out = model(torch.randn(2, 4, 2, 2, 1))
    assert out.shape == (2, 2, 16, 16, 8) and torch.isfinite(out).all()
    out.square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_bad_arguments_raise() -> None:
    with pytest.raises(ValueError, match="kernel_size must be odd"):
        SuperResolutionBlock(in_channels=4, out_channels=2, kernel_size=2)
    with pytest.raises(ValueError, match="in_channels must be a positive integer, got 0"):
        SuperResolutionBlock(in_channels=0, out_channels=2)
    with pytest.raises(ValueError, match="scale must be a positive integer upsampling factor, got 0"):
        TrilinearUpsample(in_channels=4, out_channels=2, scale=0)
